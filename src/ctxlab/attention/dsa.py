"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp report; HF ``DeepseekV32Indexer``).

A cheap scorer picks, for every query, the ``topk`` past tokens the main attention may see:
``I[t, s] = sum_h w[t, h] / sqrt(H_I) * ReLU(q[t, h] · k[s] / sqrt(D_I))`` with one 128-d key per
token (LayerNorm, RoPE half-split on its first dims; cached next to the MLA latent) and per-head
weights ``w`` projected from the hidden state. Scores are computed in fp32 from the queries of
the MLA query bottleneck.

Ties: selection orders the scores as a *stable* descending sort would, so among equal scores the
earlier cache slot (the earlier position) wins; ``torch.topk`` of the scores gives no such
guarantee (:func:`best_first` runs it on keys that break the ties). At a decode step the scores come
from ``ctxlab::indexer_scores`` (``csrc/indexer.cpp``), which reads the bf16 keys as cached instead of
converting them all to fp32 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import IndexerSpec, LayerSpec


class LightningIndexer(nn.Module):
    def __init__(self, hidden_size: int, q_lora_rank: int, spec: IndexerSpec):
        super().__init__()
        self.spec = spec
        self.wq_b = nn.Linear(q_lora_rank, spec.n_heads * spec.head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, spec.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(spec.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, spec.n_heads, bias=False)

    def keys(self, x: torch.Tensor, rotary, cos, sin) -> torch.Tensor:
        """x [B, T, H] -> indexer keys [B, 1, T, D_I] (to cache)."""
        return rotary.apply(self.k_norm(self.wk(x))[:, None], cos, sin)

    def select(self, x, q_res, keys, allowed, rotary, cos, sin) -> torch.Tensor:
        """Indices [B, T, k] of the ``k = min(topk, S)`` best keys for each query.

        x [B, T, H], q_res [B, T, q_lora], keys [B, 1, S, D_I], allowed [B, 1, T, S] (causal mask),
        or None when every key may be chosen (decode without padding).
        """
        B, T, _ = x.shape
        s = self.spec
        q = rotary.apply(self.wq_b(q_res).view(B, T, s.n_heads, s.head_dim).transpose(1, 2), cos, sin)
        return indexer_topk(q, keys, self.weights_proj(x), None if allowed is None else allowed[:, 0], s.topk)

    @staticmethod
    def param_count(hidden_size: int, q_lora_rank: int, spec: IndexerSpec) -> int:
        return (
            q_lora_rank * spec.n_heads * spec.head_dim
            + hidden_size * spec.head_dim
            + 2 * spec.head_dim
            + (hidden_size * spec.n_heads)
        )

    @staticmethod
    def decode_flops(hidden_size: int, q_lora_rank: int, spec: IndexerSpec, keys: int) -> dict[str, int]:
        """Projections of one token, and the scan over every past key (its own term)."""
        projections = 2 * (q_lora_rank * spec.n_heads * spec.head_dim + hidden_size * (spec.head_dim + spec.n_heads))
        scan = 2 * keys * spec.n_heads * spec.head_dim + 2 * keys * spec.n_heads  # q·k, then the weighted head sum
        return {"indexer_projections": projections, "indexer_scan": scan}


DECODE_TOKENS = 8  # queries per sequence up to which the native scorer runs (a decode step's; prefill: matmuls)


def indexer_topk(
    q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, allowed: torch.Tensor | None, topk: int
) -> torch.Tensor:
    """The lightning indexer's selection, shared by DSA (keys = tokens) and CSA (keys = entries).

    q [B, H_I, T, D_I] (rotated), keys [B, 1, S, D_I], weights [B, T, H_I] (projected from the
    hidden state), allowed [B, T, S] (None: every key, as in decode) -> indices [B, T, min(topk, S)] of each query's best keys by
    ``sum_h w_h / sqrt(H_I) * ReLU(q_h . k / sqrt(D_I))`` in fp32, best first, ties to the earlier key.
    """
    n_heads, head_dim = q.shape[1], q.shape[-1]
    w = weights.float() * n_heads**-0.5  # [B, T, H_I]
    if _native_scores(q, keys):
        index = torch.ops.ctxlab.indexer_scores(
            q.detach().contiguous(), keys.detach(), w.detach().contiguous(), head_dim**-0.5
        )
    else:
        scores = F.relu(q.float() @ keys.float().transpose(-1, -2) * head_dim**-0.5)  # [B, H_I, T, S]
        index = torch.einsum("bth,bhts->bts", w, scores)
    if allowed is not None:
        index = index.masked_fill(~allowed, float("-inf"))
    return best_first(index, min(topk, index.shape[-1]))


def _native_scores(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``ctxlab::indexer_scores`` computes the scores: a decode step's few queries, bf16 on the CPU."""
    return (
        q.shape[2] <= DECODE_TOKENS
        and q.dtype == keys.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and keys.stride(-1) == 1
        and native.available()
    )


def best_first(index: torch.Tensor, k: int) -> torch.Tensor:
    """index [..., S] float32 -> the positions [..., k] of its k largest values, largest first, ties to the
    earlier position: ``torch.sort(index, descending=True, stable=True).indices[..., :k]``.

    With k < S, one ``torch.topk`` over int64 keys instead of a sort of all S (at 16K scores ~6x faster):
    each score's bits mapped to an int32 of the same order (negative floats: the 31 low bits flipped;
    -0.0 first made +0.0, as the sort ties them), shifted up, with ``2³² - 1 - position`` below, so that
    every key is distinct and, among equal scores, the earlier position is the larger key.
    """
    S = index.shape[-1]
    if k >= S:  # every position: the sort itself (cheaper than top-k of all)
        return torch.sort(index, dim=-1, descending=True, stable=True).indices
    bits = (index + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # [..., S] int32, ordered as the floats
    low = 0xFFFFFFFF - torch.arange(S, device=index.device)  # [S] int64, larger for earlier positions
    keys = (ordered.long() << 32) | low
    return 0xFFFFFFFF - (torch.topk(keys, k, dim=-1).values & 0xFFFFFFFF)


def tiny_indexer(spec: IndexerSpec) -> IndexerSpec:
    """A tiny indexer with the same top-k (measured caches of tiny models)."""
    return IndexerSpec(n_heads=2, head_dim=8, topk=spec.topk, rope_dims=4)


def validate_indexer(at: str, spec: LayerSpec) -> list[str]:
    """Checks of an :class:`IndexerSpec`, for the attention kinds that implement it."""
    i = spec.indexer
    if min(i.n_heads, i.head_dim, i.topk, i.rope_dims) <= 0:
        return [f"{at}.indexer = {i}: every field must be a positive integer"]
    if i.rope_dims != spec.rotary_dim:
        return [f"{at}.indexer.rope_dims = {i.rope_dims}: must equal the layer's rotary dims ({spec.rotary_dim})"]
    if i.rope_dims > i.head_dim:
        return [
            f"{at}.indexer.head_dim = {i.head_dim} (HF index_head_dim): must be at least the rotary dims it "
            f"rotates ({i.rope_dims})"
        ]
    return []
