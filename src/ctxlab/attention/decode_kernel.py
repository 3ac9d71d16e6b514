"""ctxlab's one native kernel: a decode step of attention over bf16 keys and values (``csrc/decode_attention.cpp``).

At long context a decode step is dominated by reading the cache, and PyTorch's CPU flash kernel reads
it at a fraction of the memory bandwidth: it runs small GEMMs per 512-key block per head, 6-8 GB/s
for 16 query / 4 KV heads of 64 over 16K bf16 keys on this 2-core machine (docs/benchmarks.md,
"Decode attention in isolation"). The kernel here computes the same softmax attention with the scores
and the value sums in registers, float32 accumulation, and the keys split across threads
(FlashDecoding's split-KV, Dao et al. 2023).

It needs an x86 CPU with AVX512-BF16 (``vdpbf16ps``) and a C++ compiler; it is built at first use with
``torch.utils.cpp_extension`` (~15 s, cached under ``TORCH_EXTENSIONS_DIR``). Where either is missing,
or ``CTXLAB_DECODE_KERNEL=0`` is set, :func:`available` is False and callers keep PyTorch's SDPA; if the
build fails, one warning says why.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
ISA_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
ENV_SWITCH = "CTXLAB_DECODE_KERNEL"  # "0" keeps SDPA everywhere


def _cpu_has_avx512_bf16() -> bool:
    """Whether the CPU executes AVX512-BF16 (read from Linux's /proc/cpuinfo; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags and " avx512vl" in flags


@torch.compiler.assume_constant_result  # under torch.compile: called (and the kernel built) while tracing
def available() -> bool:
    """Whether the kernel runs here; the first call builds it (or loads the cached build)."""
    return _build()


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; a venv that is not activated has the pip
    package's binary (a ctxlab dependency) off PATH, so put it there when no other ninja is."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _build() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0" or not _cpu_has_avx512_bf16():
        return False
    from torch.utils import cpp_extension

    _ninja_on_path()
    try:
        cpp_extension.load(
            name="ctxlab_decode_attention_torch_" + re.sub(r"\W", "_", torch.__version__),  # one build per torch
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS],  # -fopenmp: at::parallel_for's pragmas, torch's libgomp
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 (no compiler, no headers, ...): SDPA still works
        warnings.warn(f"ctxlab's decode-attention kernel did not build, using SDPA ({error})", stacklevel=2)
        return False
    torch.library.register_fake("ctxlab::decode_attention")(_fake)
    return True


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Shapes for torch.compile's tracing: out [B, H, G, Dv] (q's dtype), lse [B, H, G] float32."""
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes this call: one decoded token per sequence (q [B, H_kv, G, D]),
    bf16 on the CPU, every key attended, D a multiple of 32 and Dv of 64, rows of k / v contiguous."""
    return (
        mask is None
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.shape[-1] % 32 == 0
        and v.shape[-1] % 64 == 0
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and available()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H_kv, G, D] (the G query heads of each KV head), k [B, H_kv, S, D], v [B, H_kv, S, Dv], all
    bf16 -> (softmax(scale · q kᵀ) v [B, H_kv, G, Dv] bf16, its log-sum-exp [B, H_kv, G] float32).
    K and V are read in place (a cache's slice, broadcast heads); check :func:`applies` first."""
    return torch.ops.ctxlab.decode_attention(q.contiguous(), k, v, scale)
