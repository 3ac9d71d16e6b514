"""The cache planner: layer specs -> per-layer cache specs -> a :class:`~ctxlab.cache.Cache`.

It sits above the attention kinds (each declares the cache spec of its layers) and the cache kinds
(which it allocates). A layer that reads another layer's K/V (``kv_source``, cross-layer KV
sharing) gets an alias with no storage; this module also checks that such a layer can share.
"""

from __future__ import annotations

import torch

from . import attention  # noqa: F401  (registers the attention kinds)
from .cache import Cache, CacheSpec, allocate
from .config import LayerSpec, ModelConfig
from .registry import ATTENTION_KINDS, LAYER_CHECKS


def layer_cache_spec(layer: LayerSpec) -> CacheSpec:
    """What one layer stores: an alias if it reads another layer's K/V, else what its attention kind declares."""
    if layer.kv_source is not None:
        return CacheSpec.alias(layer.kv_source)
    return ATTENTION_KINDS[layer.attention].cache_spec(layer)


def plan(cfg: ModelConfig) -> list[CacheSpec]:
    return [layer_cache_spec(layer) for layer in cfg.layers]


def new_cache(cfg: ModelConfig, batch_size: int, max_tokens: int, dtype: torch.dtype, device=None) -> Cache:
    """Every layer's cache for ``batch_size`` sequences of up to ``max_tokens`` tokens, allocated now."""
    return allocate(plan(cfg), batch_size, max_tokens, dtype, device)


SHARED_FIELDS = ("attention", "num_kv_heads", "head_dim", "window", "rope", "v_norm")


@LAYER_CHECKS.register("kv_sharing")
def validate_kv_source(at: str, i: int, s: LayerSpec, cfg: ModelConfig) -> list[str]:
    """A consumer reads an earlier producer whose K/V have its own geometry."""
    src = s.kv_source
    if src is None:
        return []
    if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < i:
        return [f"{at}.kv_source = {src!r}: must be the index of an earlier layer (0..{i - 1})"]
    o = cfg.layers[src]
    if o.kv_source is not None:
        return [f"{at}.kv_source = {src}: layer {src} itself reads layer {o.kv_source}; point at the producer"]
    mismatched = [
        f"{n} {getattr(s, n)!r} vs {getattr(o, n)!r}" for n in SHARED_FIELDS if getattr(s, n) != getattr(o, n)
    ]
    if mismatched:
        return [f"{at}.kv_source = {src}: a consumer must match its producer; differs in {', '.join(mismatched)}"]
    return []
