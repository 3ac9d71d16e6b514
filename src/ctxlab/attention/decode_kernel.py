"""A decode step of attention over bf16 keys and values in ctxlab's native kernel (``csrc/decode_attention.cpp``).

At long context a decode step is dominated by reading the cache, and PyTorch's CPU flash kernel reads
it at a fraction of the memory bandwidth: it runs small GEMMs per 512-key block per head, 6-8 GB/s
for 16 query / 4 KV heads of 64 over 16K bf16 keys on this 2-core machine (docs/benchmarks.md,
"Decode attention in isolation"). The kernel computes the same softmax attention with the scores
and the value sums in registers, float32 accumulation, and the keys split across threads
(FlashDecoding's split-KV, Dao et al. 2023). Keys may come in two parts, ``q kᵀ + q2 k2ᵀ``: MLA's
absorbed decode (the latent and the RoPE key, stored apart). Where :func:`ctxlab.native.available` is False (no
AVX512-BF16, no compiler, ``CTXLAB_NATIVE_KERNELS=0``), callers keep PyTorch's SDPA.
"""

from __future__ import annotations

import torch

from .. import native


def applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *second: torch.Tensor
) -> bool:
    """Whether :func:`decode_attention` takes this call: one decoded token per sequence (q [B, H_kv, G, D]),
    bf16 on the CPU, every key attended, D (and a second key part's) a multiple of 32 and Dv of 64, rows
    of the keys and values contiguous. ``second``: the (q2, k2) of a second key part, if any."""
    return (
        mask is None
        and all(t.dtype == torch.bfloat16 for t in (q, k, v, *second))
        and q.device.type == "cpu"
        and all(t.shape[-1] % 32 == 0 for t in (q, *second))
        and v.shape[-1] % 64 == 0
        and all(t.stride(-1) == 1 for t in (k, v, *second[1:]))
        and native.available()
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q2: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H_kv, G, D] (the G query heads of each KV head), k [B, H_kv, S, D], v [B, H_kv, S, Dv], all
    bf16 -> (softmax(scale · q kᵀ) v [B, H_kv, G, Dv] bf16, its log-sum-exp [B, H_kv, G] float32).
    With ``q2`` [B, H_kv, G, D2] and ``k2`` [B, H_kv, S, D2] the scores are ``q kᵀ + q2 k2ᵀ`` (MLA's latent and
    RoPE parts, stored apart). K, V (and k2) are read in place (a cache's slice, broadcast heads); check
    :func:`applies` first."""
    if q2 is not None:
        q2 = q2.contiguous()
    return torch.ops.ctxlab.decode_attention(q.contiguous(), k, v, scale, q2, k2)
