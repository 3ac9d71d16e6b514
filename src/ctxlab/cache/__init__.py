"""One cache protocol, one cache kind per file.

Each attention kind declares a :class:`CacheSpec` per layer (what it stores per token, what
fixed state it keeps, its window); :func:`plan` turns layer specs into specs and
:func:`allocate` builds the per-layer caches once, up front. Accounting reads the same specs.
"""

from .planner import Cache, allocate, layer_cache_spec, plan
from .spec import CacheSpec

__all__ = ["Cache", "CacheSpec", "allocate", "layer_cache_spec", "plan"]
