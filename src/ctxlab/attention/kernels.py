"""The attention call every kind with per-head keys shares: grouped-query decode without expanding K/V.

``F.scaled_dot_product_attention(..., enable_gqa=True)`` repeats each KV head for its query heads
inside the kernel; for one decoded token that costs ~6× the time of reading K/V (measured: 16 query
heads, 4 KV heads, 16K keys, bf16: 17.9 ms with a boolean mask, 2.9 ms folded; docs/benchmarks.md).
Folding the ``G = H_q / H_kv`` query heads of each KV group into the query-length axis
(``q [B, H_kv, G, D]`` against ``k, v [B, H_kv, S, D]``) computes the same thing with K/V read once
(the layout gpt-fast and llama.cpp use for GQA decode). In bf16 with every key attended, that decode
step runs in ctxlab's own kernel (:mod:`ctxlab.attention.decode_kernel`) where the CPU has AVX512-BF16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode_kernel
from .context import attention_mask


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, H_q, T, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv], mask [B, 1, T, S] (True = attend) or None
    -> [B, H_q, T, Dv]. Query head ``h`` reads KV head ``h // (H_q / H_kv)`` (HF ``repeat_kv``).

    ``is_causal``: the last T keys are the queries' own tokens and token t sees them up to itself, and
    every key before them (a cache's history, :func:`prefix_causal_attention`); with no history, only
    the last ``window`` tokens when ``window`` is given (:func:`sliding_causal_attention`).

    PyTorch's CPU flash-attention kernel needs one head size for q, k and v; otherwise SDPA falls back
    to its math kernel, which materializes the [T, S] scores. Values narrower than the keys (MLA: 128
    against 192) are therefore padded with zero columns, which leaves the real columns unchanged, and
    the padding is cut from the output: 2.3-3.4x faster for MLA's prefill attention (16 heads, bf16,
    2 threads; benchmarks/chunked_prefill.py) at the cost of a 1.5x wider value product."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    if T == 1:  # decode: [B, H_kv, G, D]; a [B, 1, 1, S] mask broadcasts over the group
        grouped = q.view(B, Hkv, Hq // Hkv, -1)
        if decode_kernel.applies(grouped, k, v, mask):
            return decode_kernel.decode_attention(grouped, k, v, scale)[0].view(B, Hq, 1, -1)
        if Hq != Hkv:
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
            return out.view(B, Hq, 1, -1)
    Dv = v.shape[-1]
    if Dv < q.shape[-1]:  # MLA's values are narrower than its keys
        v = F.pad(v, (0, q.shape[-1] - Dv))
    if is_causal and k.shape[2] > T:
        out = prefix_causal_attention(q, k, v, scale)
    elif is_causal and window is not None and window < T:
        out = sliding_causal_attention(q, k, v, scale, window)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=Hq != Hkv
        )
    return out[..., :Dv]


_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's CPU kernel: (out, lse, ...)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of T new tokens over S = P + T keys, where the first P (a cache's history) are visible
    to every query and the last T are the tokens themselves, causally (a prefill chunk after earlier
    ones). Two flash-attention calls without a mask -- the history, then the chunk with ``is_causal``
    -- merged by their log-sum-exps (the split-KV combine of FlashDecoding, Dao et al. 2023), instead of
    one call over a [T, S] mask: 1.27-1.35x faster for 4K chunks after 4K-12K tokens (16 / 4 heads of 64,
    bf16, 2 threads; benchmarks/chunked_prefill.py). q [B, H_q, T, D], k / v [B, H_kv, S, D] -> [B, H_q, T, D]."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # the kernel reads rows densely
    P = k.shape[2] - q.shape[2]
    history, lse_history = _flash_with_lse(q, k[:, :, :P], v[:, :, :P], 0.0, False, scale=scale)[:2]  # lse [B, H, T]
    chunk, lse_chunk = _flash_with_lse(q, k[:, :, P:], v[:, :, P:], 0.0, True, scale=scale)[:2]
    lse = torch.logaddexp(lse_history, lse_chunk)
    out = history.float() * (lse_history - lse).exp()[..., None] + chunk.float() * (lse_chunk - lse).exp()[..., None]
    return out.to(q.dtype)


def attention_with_sinks(
    q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor | None, scale: float, sinks: torch.Tensor
) -> torch.Tensor:
    """Softmax over [keys | one learned sink logit per head], values = keys (DeepSeek V4's one shared
    K = V head; HF ``DeepseekV4Attention``, which concatenates the sink to the logits). q [B, H, T, D],
    kv [B, 1, S, D], allowed [B, 1, T, S] (True = attend) or None, sinks [H] -> [B, H, T, D].

    The flash kernel gives the attention over the keys alone and its log-sum-exp ``lse``; the sink only
    adds ``exp(sink)`` to the softmax's denominator, so the output is that attention times
    ``1 / (1 + exp(sink - lse)) = sigmoid(lse - sink)``. Against logits ``q @ kvᵀ`` with the sink
    concatenated, the [T, S] logits are never materialized and are accumulated in float32 (bf16, 8
    heads of 256: one decode step over 256 keys 0.19 -> 0.08 ms; a 2048-token prefill 481 -> 301 ms)."""
    B, H, T, D = q.shape
    mask = None
    if allowed is not None:  # the kernel takes an additive mask of the query's dtype
        mask = additive(allowed, q.dtype)
    if T == 1 and decode_kernel.applies(q.reshape(B, 1, H, D), kv, kv, mask):  # decode, every key attended
        out, lse = decode_kernel.decode_attention(q.reshape(B, 1, H, D), kv, kv, scale)
    elif T == 1:  # decode: the heads folded into the query axis, [B, 1, H, D]; the mask broadcasts over them
        out, lse = _flash_with_lse(q.reshape(B, 1, H, D), kv, kv, 0.0, False, attn_mask=mask, scale=scale)[:2]
    else:  # the one head as a view for every query head (folding would copy the mask H times)
        kv = kv.expand(B, H, *kv.shape[2:])
        out, lse = _flash_with_lse(q, kv, kv, 0.0, False, attn_mask=mask, scale=scale)[:2]
    weight = torch.sigmoid(lse.view(B, H, T) - sinks.view(-1, 1).float())  # the keys' share beside the sink
    return (out.view(B, H, T, D).float() * weight[..., None]).to(q.dtype)


BAND_QUERIES = 128  # query rows per band (benchmarks/sliding_prefill.py: 64-256 are within ~15%)


def sliding_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int, block: int = BAND_QUERIES
) -> torch.Tensor:
    """Causal attention of T tokens over themselves where token t sees tokens ``t - window < s <= t``
    (HF's sliding-window mask), computed in bands: each ``block`` of queries attends only to the
    ``window - 1 + block`` keys it can see. A [T, T] mask would make the kernel score every pair
    (T² work, the band T · (window + block)): at T = 2048, window 512 one layer is ~2.6× faster,
    at T = 8192 ~9× (one thread, bf16). Every band whose keys start ``window - 1`` before its first query
    has the same mask, built once per call as the kernel takes it (additive, q's dtype) and sliced for a
    short last band; only the first bands, whose keys start at 0, build their own.
    q [B, H_q, T, D], k [B, H_kv, T, D], v [B, H_kv, T, Dv] -> [B, H_q, T, Dv]."""
    T, gqa = q.shape[2], q.shape[1] != k.shape[1]
    steady = None  # [block, window - 1 + block]: query i sees keys i .. i + window - 1
    bands = []
    for start in range(0, T, block):
        end = min(start + block, T)
        first = max(0, start - window + 1)  # the oldest key any query of the band sees
        if start == 0 and end <= window:  # the band is its own keys, all in the window: plain causal
            mask, causal = None, True
        elif first > 0:
            if steady is None:  # the pattern of every such band: queries window - 1 .. against keys 0 ..
                steady = _band_mask(window - 1, window - 1 + block, 0, window - 1 + block, window, q)
            mask, causal = steady[: end - start, : window - 1 + end - start], False
        else:  # keys from 0
            mask, causal = _band_mask(start, end, 0, end, window, q), False
        qb, kb, vb = q[:, :, start:end], k[:, :, first:end], v[:, :, first:end]
        bands.append(
            F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
        )
    return torch.cat(bands, dim=2)


def _band_mask(q_start: int, q_end: int, k_start: int, k_end: int, window: int, q: torch.Tensor) -> torch.Tensor:
    """:func:`~ctxlab.attention.context.attention_mask` of query positions q_start .. q_end - 1 against key
    positions k_start .. k_end - 1, additive in q's dtype and device (what SDPA makes of a boolean mask at
    every call) -> [q_end - q_start, k_end - k_start]."""
    q_pos = torch.arange(q_start, q_end, device=q.device)[None]
    k_pos = torch.arange(k_start, k_end, device=q.device)[None]
    return additive(attention_mask(q_pos, k_pos, window)[0, 0], q.dtype)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the flash kernel takes it: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
