"""One cache protocol, one cache kind per file.

Each attention kind declares a :class:`CacheSpec` per layer (what it stores per token, what
fixed state it keeps, its window); the planner (:mod:`ctxlab.planner`, above the attention
kinds) turns layer specs into cache specs, and :func:`allocate` builds the per-layer caches once,
up front, into a :class:`Cache`. Accounting reads the same specs.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .alias import AliasCache
from .compressed import CompressedCache
from .full import FullCache
from .ring import RingCache
from .runtime import Cache
from .spec import CacheSpec

CACHE_KINDS = {"full": FullCache, "ring": RingCache, "alias": AliasCache, "compressed": CompressedCache}


def allocate(specs: list[CacheSpec], batch_size: int, max_tokens: int, dtype: torch.dtype, device=None) -> Cache:
    """One cache per layer spec, every buffer allocated now (nothing grows later)."""
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0):
        raise InputError(f"batch_size = {batch_size!r}: must be a positive integer")
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0):
        raise InputError(f"max_tokens = {max_tokens!r}: must be a positive integer")
    layers = []
    for spec in specs:
        kind = CACHE_KINDS[spec.kind]
        layers.append(kind(spec) if spec.kind == "alias" else kind(spec, batch_size, max_tokens, dtype, device))
    return Cache(layers, batch_size, max_tokens, device)


__all__ = ["CACHE_KINDS", "Cache", "CacheSpec", "allocate"]
