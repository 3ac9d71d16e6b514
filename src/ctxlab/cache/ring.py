"""Ring buffer for sliding-window layers: holds the last ``window`` tokens, whatever the context.

Step ``s`` lives in slot ``s % window``. A one-token decode writes first and then attends over
the ring, which then holds exactly the window. A prefill chunk of ``T > 1`` tokens attends over
``[ring before the write | chunk]`` (its first queries still need up to ``window - 1`` older
keys, rasbt/LLMs-from-scratch #1013) and then keeps the chunk's last ``window`` tokens, so
chunks may be longer than the window. Masks are built from absolute positions, so the order of
slots never matters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .spec import CacheSpec

if TYPE_CHECKING:
    from .runtime import Cache

NEVER_WRITTEN = 1 << 62  # a position "in the future": causal masking hides empty slots


class RingCache:
    def __init__(self, spec: CacheSpec, batch_size: int, max_tokens: int, dtype: torch.dtype, device):
        self.spec = spec
        self.capacity = spec.tokens_held(max_tokens)
        self.buffers, self.state = spec.allocate(batch_size, self.capacity, dtype, device)

    def _slot_steps(self, written: int, device) -> torch.Tensor:
        """The step each slot holds after ``written`` steps; NEVER_WRITTEN for empty slots."""
        slots = torch.arange(self.capacity, device=device)
        steps = slots + self.capacity * torch.div(written - 1 - slots, self.capacity, rounding_mode="floor")
        return torch.where(slots < written, steps, torch.full_like(steps, NEVER_WRITTEN))

    def update(self, new: dict[str, torch.Tensor], cache: Cache) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Write ``new`` (each ``[B, H, T, D]``); return what the chunk attends over and its positions."""
        start, device = cache.length, cache.pad.device
        n_new = next(iter(new.values())).shape[-2]
        keep = min(n_new, self.capacity)  # only the chunk's last `capacity` tokens survive
        kept_steps = torch.arange(start + n_new - keep, start + n_new, device=device)
        if n_new == 1:  # decode: write, then the ring is exactly the window (read only its written slots)
            self._write(new, kept_steps, keep)
            filled = min(start + 1, self.capacity)
            positions = cache.memo(
                ("ring", self.capacity, start),
                lambda: cache.step_positions(self._slot_steps(start + 1, device)[:filled]),
            )
            return {n: b[..., :filled, :] for n, b in self.buffers.items()}, positions
        if start == 0:  # an empty ring adds nothing to attend over
            self._write(new, kept_steps, keep)
            steps = cache.memo(("full", n_new), lambda: cache.step_positions(torch.arange(n_new, device=device)))
            return dict(new), steps
        old_steps = self._slot_steps(start, device)
        attend = {n: torch.cat((self.buffers[n], x), dim=-2) for n, x in new.items()}  # prefill only
        steps = torch.cat((old_steps, torch.arange(start, start + n_new, device=device)))
        self._write(new, kept_steps, keep)
        return attend, cache.step_positions(steps)

    def _write(self, new: dict[str, torch.Tensor], steps: torch.Tensor, keep: int) -> None:
        slots = steps % self.capacity
        for name, x in new.items():
            self.buffers[name].index_copy_(-2, slots, x[..., x.shape[-2] - keep :, :])

    def tensors(self) -> list[torch.Tensor]:
        return [*self.buffers.values(), *self.state.values()]
