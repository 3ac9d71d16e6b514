"""Named accounting conventions behind published figures, next to what a real cache holds.

Published savings are often computed under simplifications (uniform head dims, no sliding-window
cap, decimal GB). Each convention here is a function with its assumptions in the docstring, so a
report can reproduce a published figure *and* show the realized one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .accounting import as_dtype, kv_cache_bytes
from .config import ModelConfig

SHARING_CONVENTIONS = ("realized", "uncapped")


def without_sharing(cfg: ModelConfig) -> ModelConfig:
    """The same model with every layer computing and caching its own K/V."""
    return cfg.replace(layers=tuple(dataclasses.replace(s, kv_source=None) for s in cfg.layers))


def kv_sharing_saving(cfg: ModelConfig, context_len: int, dtype="bfloat16", convention: str = "realized") -> int:
    """Cache bytes that cross-layer KV sharing saves, per sequence.

    ``realized``: what this library's caches hold without vs with sharing (sliding layers capped
    at their window). ``uncapped``: every layer holds every token with its true geometry.
    """
    if convention not in SHARING_CONVENTIONS:
        raise ValueError(f"convention = {convention!r}: allowed: {list(SHARING_CONVENTIONS)}")
    return kv_cache_bytes(without_sharing(cfg), context_len, dtype, convention=convention) - kv_cache_bytes(
        cfg, context_len, dtype, convention=convention
    )


@dataclass(frozen=True)
class UniformEstimate:
    """Inputs of a uniform-geometry KV estimator: every layer has ``n_kv_heads`` heads of
    ``emb_dim / n_heads`` dims and holds every token (no window cap)."""

    emb_dim: int
    n_heads: int
    n_kv_heads: int
    published: str
    source: str

    def saving(self, cfg: ModelConfig, context_len: int, dtype="bfloat16") -> int:
        """Bytes saved by the model's consumer layers under these assumptions."""
        consumers = sum(s.kv_source is not None for s in cfg.layers)
        itemsize = torch.empty((), dtype=as_dtype(dtype)).element_size()
        return consumers * context_len * self.n_kv_heads * (self.emb_dim // self.n_heads) * 2 * itemsize


_RASCHKA = (
    "S. Raschka, 'Recent Developments in LLM Architectures: KV Sharing, mHC, and Compressed Attention' "
    "(Ahead of AI, 2026-05-16), via rasbt/LLMs-from-scratch ch04/10_kv-sharing memory_estimator_kv_sharing.py "
    "README presets"
)
# The estimator inputs that reproduce the widely quoted Gemma 4 savings at 128K (bf16, decimal GB).
# Note E2B's emb_dim 2048 is not the model's hidden size (1536): it is what makes head_dim 256.
PUBLISHED_SHARING_ESTIMATES = {
    "gemma4-e2b": UniformEstimate(emb_dim=2048, n_heads=8, n_kv_heads=1, published="2.7 GB", source=_RASCHKA),
    "gemma4-e4b": UniformEstimate(emb_dim=2560, n_heads=8, n_kv_heads=2, published="~6 GB", source=_RASCHKA),
}


def uniform_head_budget(cfg: ModelConfig) -> ModelConfig | None:
    """The same model with its query heads spread evenly over the layers (same total heads).

    The baseline that per-layer head budgets (Laguna XS.2: 48 heads on global, 64 on sliding
    layers) are compared against. KV heads become the largest count dividing the new head
    number, which leaves the attention FLOPs (4·H·d per key) unchanged. None when the model's
    heads are already uniform or the total does not split evenly.
    """
    heads = [s.num_heads for s in cfg.layers]
    total = sum(heads)
    if len(set(heads)) == 1 or total % len(heads):
        return None
    per_layer = total // len(heads)
    return cfg.replace(
        layers=tuple(
            dataclasses.replace(s, num_heads=per_layer, num_kv_heads=math.gcd(per_layer, s.num_kv_heads))
            for s in cfg.layers
        ),
        name=f"{cfg.name} (uniform {per_layer} heads)",
    )
