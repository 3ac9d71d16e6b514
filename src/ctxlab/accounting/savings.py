"""Savings maths under named conventions: what cross-layer KV sharing saves, a uniform-geometry
estimator of it, and the baselines a mechanism is compared against (the same model with its heads
spread evenly, or with a standard attention of the same width)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import MLASpec, ModelConfig, RopeSpec
from ..dtypes import resolve_dtype
from ..errors import InputError
from .kv import kv_cache_bytes

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
        raise InputError(f"convention = {convention!r}: allowed: {list(SHARING_CONVENTIONS)}")
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

    def saving(self, cfg: ModelConfig, context_len: int, dtype="bfloat16") -> int:
        """Bytes saved by the model's consumer layers under these assumptions."""
        consumers = sum(s.kv_source is not None for s in cfg.layers)
        itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
        return consumers * context_len * self.n_kv_heads * (self.emb_dim // self.n_heads) * 2 * itemsize


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


def same_width_baselines(cfg: ModelConfig) -> dict[str, ModelConfig]:
    """The model with every layer's attention replaced by a standard one of the same width
    (``hidden / head_dim`` query heads of ``head_dim``, global, cached at full length): MHA, GQA
    with 4 and 2 KV heads, and a DeepSeek-V2-Lite-like MLA (KV latent 512 + RoPE key 64, 128-d
    no-RoPE query/key part, 128-d values). Everything else (MLP, norms) is kept, so attention
    FLOPs and cache bytes compare like with like (the CCA paper's comparison; zaya.md §3)."""
    first = cfg.layers[0]
    d = first.head_dim
    heads = cfg.hidden_size // d

    def swap(**attention) -> ModelConfig:
        plain = dict(
            attention="gqa",
            window=None,
            num_heads=heads,
            head_dim=d,
            qk_norm=False,
            v_norm=False,
            k_eq_v=False,
            output_gate=None,
            kv_source=None,
            attn_scale=None,
            mla=None,
            indexer=None,
        )
        changes = {**plain, **attention}
        return cfg.replace(
            layers=tuple(dataclasses.replace(s, rope=RopeSpec(theta=s.rope.theta), **changes) for s in cfg.layers)
        )

    mla = MLASpec(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    return {
        f"MHA ({heads}q/{heads}kv)": swap(num_kv_heads=heads),
        f"GQA ({heads}q/4kv)": swap(num_kv_heads=4),
        f"GQA ({heads}q/2kv)": swap(num_kv_heads=2),
        f"MLA ({heads} heads, latent 512 + rope 64)": swap(attention="mla", num_kv_heads=1, head_dim=192, mla=mla),
    }
