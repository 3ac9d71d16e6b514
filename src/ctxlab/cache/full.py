"""Full KV cache: every token of the sequence, written in place into buffers allocated once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .spec import CacheSpec

if TYPE_CHECKING:
    from .runtime import Cache


class FullCache:
    """Buffers ``[B, H_kv, max_tokens, D]`` per stored tensor; slot ``s`` holds step ``s``.
    ``state`` holds the layer's fixed decode state, if its spec declares any."""

    def __init__(self, spec: CacheSpec, batch_size: int, max_tokens: int, dtype: torch.dtype, device):
        self.spec = spec
        self.buffers, self.state = spec.allocate(batch_size, max_tokens, dtype, device)

    def update(self, new: dict[str, torch.Tensor], cache: Cache) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Write ``new`` (each ``[B, H, T, D]``) at the cache's current length.

        Returns every stored token so far (views of the filled part, no copy) and their positions
        ``[B, S]`` (one tensor per step, shared by every full-cache layer).
        """
        start = cache.length
        stop = start + next(iter(new.values())).shape[-2]
        for name, x in new.items():
            self.buffers[name][..., start:stop, :] = x
        positions = cache.memo(
            ("full", stop), lambda: cache.step_positions(torch.arange(stop, device=cache.pad.device))
        )
        return {n: b[..., :stop, :] for n, b in self.buffers.items()}, positions

    def filled_in_blocks(self, stop: int, block: int) -> dict[str, torch.Tensor]:
        """Every stored tensor's first ``stop`` slots rounded up to a multiple of ``block`` (at most the
        capacity): views whose length changes once every ``block`` steps instead of at every step, for
        kernels that build one variant per shape (oneDNN's bf16 matmul). Slots from ``stop`` on hold
        zeros or stale values: the caller masks them."""
        end = min(-(-stop // block) * block, next(iter(self.buffers.values())).shape[-2])
        return {n: b[..., :end, :] for n, b in self.buffers.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [*self.buffers.values(), *self.state.values()]
