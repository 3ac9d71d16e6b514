"""Compressed cache (DeepSeek V4's CSA / HCA layers): a ring of the last ``window`` raw tokens, the
compressed entries (one per ``compress_ratio`` tokens, written when a block completes), and the
fixed compressor state (the pending partial block and, for overlapping windows, the previous
block's half). Nothing grows per token except one entry per completed block.
"""

from __future__ import annotations

import torch

from .ring import RingCache
from .spec import CacheSpec


class CompressedCache(RingCache):
    def __init__(self, spec: CacheSpec, batch_size: int, max_tokens: int, dtype: torch.dtype, device):
        super().__init__(spec, batch_size, max_tokens, dtype, device)
        slots = spec.entries_held(max_tokens)
        self.entries = {
            name: torch.zeros(batch_size, *shape[:-1], slots, shape[-1], dtype=dtype, device=device)
            for name, shape in spec.entry_shapes
        }
        self.entry_count = {name: 0 for name, _ in spec.entry_shapes}

    def append_entries(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """Store ``new`` [B, 1, n, D] after the entries so far; return all of them (a view)."""
        start, n = self.entry_count[name], new.shape[-2]
        self.entries[name][..., start : start + n, :] = new
        self.entry_count[name] = start + n
        return self.entries[name][..., : start + n, :]

    def tensors(self) -> list[torch.Tensor]:
        return [*super().tensors(), *self.entries.values()]
