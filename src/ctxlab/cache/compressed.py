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

    def append_entries(self, name: str, new: torch.Tensor, start: int) -> torch.Tensor:
        """Store ``new`` [B, 1, n, D], the entries of the blocks completed by a chunk that starts at
        step ``start``, after the ``start // ratio`` stored before it; return all of them (a view).
        The count follows from the step rather than being kept: a compiled decode step then carries
        no integer of its own (Dynamo would specialize a fresh one on the values 0 and 1)."""
        held, n = start // self.spec.compress_ratio, new.shape[-2]
        self.entries[name][..., held : held + n, :] = new
        return self.entries[name][..., : held + n, :]

    def tensors(self) -> list[torch.Tensor]:
        return [*super().tensors(), *self.entries.values()]
