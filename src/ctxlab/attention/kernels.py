"""The attention call every kind with per-head keys shares: grouped-query decode without expanding K/V.

``F.scaled_dot_product_attention(..., enable_gqa=True)`` repeats each KV head for its query heads
inside the kernel; for one decoded token that costs ~6× the time of reading K/V (measured: 16 query
heads, 4 KV heads, 16K keys, bf16: 17.9 ms with a boolean mask, 2.9 ms folded; docs/benchmarks.md).
Folding the ``G = H_q / H_kv`` query heads of each KV group into the query-length axis
(``q [B, H_kv, G, D]`` against ``k, v [B, H_kv, S, D]``) computes the same thing with K/V read once
(the layout gpt-fast and llama.cpp use for GQA decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool = False
) -> torch.Tensor:
    """q [B, H_q, T, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv], mask [B, 1, T, S] (True = attend) or None
    -> [B, H_q, T, Dv]. Query head ``h`` reads KV head ``h // (H_q / H_kv)`` (HF ``repeat_kv``)."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    if T == 1 and Hq != Hkv:  # decode: [B, H_kv, G, D]; a [B, 1, 1, S] mask broadcasts over the group
        out = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, -1), k, v, attn_mask=mask, scale=scale)
        return out.view(B, Hq, 1, -1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=Hq != Hkv
    )
