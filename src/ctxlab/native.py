"""ctxlab's native kernels (``ctxlab/csrc/*.cpp``): how they are built, and the shapes of their ops.

Three steps of a decode run far from the memory bandwidth in PyTorch's CPU kernels, and the kernels here
run them close to it, in bf16 with float32 accumulation (docs/benchmarks.md):

* ``ctxlab::decode_attention`` (``decode_attention.cpp``): one decoded token's grouped-query attention
  over a bf16 cache, used by :mod:`ctxlab.attention.decode_kernel`;
* ``ctxlab::matvec`` (``matvec.cpp``): a bf16 linear map of a few rows, the weights read once in
  PyTorch's own layout, used by :mod:`ctxlab.nn.packing`;
* ``ctxlab::indexer_scores`` (``indexer.cpp``): the lightning indexer's float32 scores of a few queries
  against every cached bf16 indexer key, read once as stored, used by :mod:`ctxlab.attention.dsa`.

Three replace chains of small element-wise ops around the products (which a decode step dispatches one by
one), at inference (no backward; under ``torch.compile`` inductor fuses those ops itself, so they run eager
only):

* ``ctxlab::rms_norm`` (``rms_norm.cpp``): an RMSNorm in one call instead of ~8 ops, used by
  :class:`ctxlab.nn.norms.RMSNorm`;
* ``ctxlab::rope`` (``rope.cpp``): RoPE by halves on bf16 in one call instead of ~8, bit for bit (bar subnormals, flushed to zero), used
  by :class:`ctxlab.nn.rope.Rotary`;
* ``ctxlab::gated_act`` (``gated_act.cpp``): a gated MLP's ``act(gate) * up`` (SiLU, tanh-GELU, V4's
  clamp) in one pass over the fused gate / up product's halves instead of two, used by
  :func:`ctxlab.nn.mlp.gated`.

Four more replace chains of small steps with one pass each:

* ``ctxlab::sinkhorn`` / ``ctxlab::sinkhorn_backward`` (``sinkhorn.cpp``): mHC's Sinkhorn projection of
  one small matrix per token, ~40 dependent steps in registers instead of ~40 kernels over all tokens,
  used by :mod:`ctxlab.nn.mhc_fused`;
* ``ctxlab::hc_split`` / ``ctxlab::hc_merge`` (``hyper_connection.cpp``): all of an mHC connection's
  work before its block (RMS, mixing logits, pre / post / Sinkhorn, collapse), and after it (the
  stream mix), one call each, which PyTorch dispatches as ~20 and ~8 ops on a handful of numbers at
  a decode step, and in training as passes over the n-times-wide stream; ``ctxlab::hc_split_backward``
  / ``ctxlab::hc_merge_backward`` (``hyper_connection_backward.cpp``): their gradients, one pass each.

They need an x86 CPU with AVX512-BF16 (``vdpbf16ps``) and a C++ compiler, and are built together at first
use by ``torch.utils.cpp_extension`` (~15-30 s, cached under ``TORCH_EXTENSIONS_DIR``, one build per torch
version). Where either is missing, or ``CTXLAB_NATIVE_KERNELS=0`` is set, :func:`available` is False and
callers keep PyTorch's kernels; if the build fails, one warning says why.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
ISA_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
ENV_SWITCH = "CTXLAB_NATIVE_KERNELS"  # "0" keeps PyTorch's kernels everywhere
SINKHORN_MAX_STREAMS = 8  # the native mHC kernels' largest n (csrc/sinkhorn.h's SINKHORN_MAX_STREAMS)


def cpu_has_avx512_bf16() -> bool:
    """Whether the CPU executes AVX512-BF16 (read from Linux's /proc/cpuinfo; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags and " avx512vl" in flags


@torch.compiler.assume_constant_result  # under torch.compile: called (and the kernels built) while tracing
def available() -> bool:
    """Whether the native kernels run here; the first call builds them (or loads the cached build)."""
    return _build()


def runs_at_inference(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> bool:
    """Whether an inference-only kernel (``ctxlab::rms_norm``, ``ctxlab::rope``: no backward) takes x: autograd
    off, eager (under ``torch.compile`` inductor fuses the PyTorch ops into one loop itself), x on the CPU and
    of one of ``dtypes``, the kernels built."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and available()
    )


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
    if os.environ.get(ENV_SWITCH, "1") == "0" or not cpu_has_avx512_bf16():
        return False
    from torch.utils import cpp_extension

    _ninja_on_path()
    try:
        cpp_extension.load(
            name="ctxlab_native_torch_" + re.sub(r"\W", "_", torch.__version__),  # one build per torch
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS],  # -fopenmp: at::parallel_for's pragmas, torch's libgomp
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 (no compiler, no headers, ...): PyTorch's kernels still work
        warnings.warn(f"ctxlab's native kernels did not build, using PyTorch's ({error})", stacklevel=2)
        return False
    for name, shapes in OUTPUT_SHAPES.items():
        torch.library.register_fake(f"ctxlab::{name}")(shapes)
    _register_flop_formulas()
    return True


def _decode_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q2, k2):
    """out [B, H, G, Dv] (q's dtype), lse [B, H, G] float32: for torch.compile's tracing."""
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def _matvec_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int):
    """x [M, groups·K], weight [N, K] -> [M, N]: for torch.compile's tracing."""
    return x.new_empty(x.shape[0], weight.shape[0])


def _indexer_scores_shapes(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, scale: float):
    """q [B, H, T, D], keys [B, 1, S, D] -> [B, T, S] float32: for torch.compile's tracing."""
    return q.new_empty(q.shape[0], q.shape[2], keys.shape[2], dtype=torch.float32)


def _same_shape(x: torch.Tensor, *args):
    """An output shaped and typed as x (contiguous): for torch.compile's tracing."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gated_act_shapes(gate: torch.Tensor, up: torch.Tensor, activation: str, limit: float):
    """gate, up [..., I] -> [..., I] contiguous: for torch.compile's tracing."""
    return gate.new_empty(gate.shape)


def _rope_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int):
    """x [B, H, T, D] -> [B, H, T, D] contiguous: for torch.compile's tracing."""
    return x.new_empty(x.shape)


def _sinkhorn_shapes(logits: torch.Tensor, iters: int, eps: float):
    """logits [n, n, N] -> comb [n, n, N], contiguous: for torch.compile's tracing."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sinkhorn_backward_shapes(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float):
    """grad, logits [n, n, N] -> the logits' gradient [n, n, N], contiguous: for torch.compile's tracing."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _hc_split_shapes(x: torch.Tensor, fn: torch.Tensor, base, scale, iters: int, eps: float, norm_eps: float):
    """x [..., n, H], fn [M, n·H] -> u [..., H] (x's dtype), post [..., n], comb [..., n, n] (float32;
    empty when M = n, the head), mix [M, N] and inv_rms [N] (float32, N tokens): for torch.compile's tracing."""
    *lead, n, H = x.shape
    N, M, k = x.numel() // (n * H), fn.shape[0], 0 if fn.shape[0] == n else n
    f32 = {"dtype": torch.float32}
    return (
        x.new_empty(*lead, H),
        x.new_empty(*lead, k, **f32),
        x.new_empty(*lead, k, k, **f32),
        x.new_empty(M, N, **f32),
        x.new_empty(N, **f32),
    )


def _hc_split_backward_shapes(x, fn, gains, mix, inv_rms, s_pre, g_u, g_z_rest, g_stream, eps: float):
    """-> g_x [N, n, H], g_fn [M, n·H], g_z_pre [n, N] (float32): for torch.compile's tracing."""
    return torch.empty_like(x), torch.empty_like(fn), s_pre.new_empty(s_pre.shape)


def _hc_merge_backward_shapes(x, y, post, comb, g):
    """-> g_x, g_y, g_post, g_comb, shaped as x, y, post, comb: for torch.compile's tracing."""
    return tuple(torch.empty_like(t) for t in (x, y, post, comb))


def _hc_merge_shapes(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """x [..., n, H] -> X' [..., n, H] (x's dtype): for torch.compile's tracing."""
    return torch.empty_like(x)


OUTPUT_SHAPES = {  # every native op, and its output shapes for torch.compile's tracing (registered as its fake)
    "decode_attention": _decode_attention_shapes,
    "matvec": _matvec_shapes,
    "indexer_scores": _indexer_scores_shapes,
    "rms_norm": _same_shape,
    "rope": _rope_shapes,
    "gated_act": _gated_act_shapes,
    "sinkhorn": _sinkhorn_shapes,
    "sinkhorn_backward": _sinkhorn_backward_shapes,
    "hc_split": _hc_split_shapes,
    "hc_merge": _hc_merge_shapes,
    "hc_split_backward": _hc_split_backward_shapes,
    "hc_merge_backward": _hc_merge_backward_shapes,
}


def _register_flop_formulas() -> None:
    """What ``torch.utils.flop_counter.FlopCounterMode`` counts for each op (shapes in, FLOPs out): the
    multiply-adds of the matrix products each replaces, as torch counts them for its own ops (2 per
    multiply-add; softmax, norms and Sinkhorn's steps are not counted, as torch counts none)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def matvec(x, w, bias, groups=1, *args, out_shape=None, **kwargs):  # x [M, groups·K], w [N, K]
        return 2 * x[0] * w[1] * w[0]

    def decode_attention(q, k, v, scale, q2=None, k2=None, *args, out_shape=None, **kwargs):  # q [B, H, G, D]
        B, H, G, D = q
        return 2 * B * H * G * k[2] * (D + (q2[-1] if q2 else 0) + v[-1])  # scores, then values

    def indexer_scores(q, keys, *args, out_shape=None, **kwargs):  # q [B, H, T, D], keys [B, 1, S, D]
        B, H, T, D = q
        return 2 * B * H * T * keys[2] * (D + 1)  # q kᵀ, then the weighted sum over the heads (as torch's einsum)

    def hc_split(x, fn, *args, out_shape=None, **kwargs):  # x [..., n, H], fn [M, n·H]
        *lead, n, H = x
        N = math.prod(lead)
        return 2 * N * fn[0] * fn[1] + 2 * N * n * H  # the mixing logits, the collapse

    def hc_split_backward(x, fn, *args, out_shape=None, **kwargs):  # ∂X = g_rawᵀ fn, ∂fn = g_raw X, ∂pre
        N, n, H = x
        return 4 * N * fn[0] * fn[1] + 2 * N * n * H

    def hc_merge(x, *args, out_shape=None, **kwargs):  # the stream mix combᵀ X, x [..., n, H]
        *lead, n, H = x
        return 2 * math.prod(lead) * n * n * H

    def hc_merge_backward(x, *args, out_shape=None, **kwargs):  # ∂X = comb g, ∂comb = X gᵀ, ∂y, ∂post
        N, n, H = x
        return 4 * N * n * n * H + 4 * N * n * H

    for op, formula in [
        (torch.ops.ctxlab.matvec, matvec),
        (torch.ops.ctxlab.decode_attention, decode_attention),
        (torch.ops.ctxlab.indexer_scores, indexer_scores),
        (torch.ops.ctxlab.hc_split, hc_split),
        (torch.ops.ctxlab.hc_split_backward, hc_split_backward),
        (torch.ops.ctxlab.hc_merge, hc_merge),
        (torch.ops.ctxlab.hc_merge_backward, hc_merge_backward),
    ]:
        if op not in flop_registry:  # a rebuild after ``_build.cache_clear()`` registers again
            register_flop_formula(op)(formula)
