"""Alias: a layer that reads another layer's K/V (cross-layer KV sharing) and stores nothing.

The consumer receives its producer's K/V of the current forward through the forward context
(see ``attention.context.ForwardContext.shared_kv``), in prefill and decode alike, so this cache has no
``update``; it exists so that the plan, ``nbytes`` and the accounting see the layer.
"""

from __future__ import annotations

import torch

from .spec import CacheSpec


class AliasCache:
    def __init__(self, spec: CacheSpec):
        self.spec = spec

    def tensors(self) -> list[torch.Tensor]:
        return []
