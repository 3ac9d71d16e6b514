"""What one layer's cache holds, declared by its attention kind (and nothing else)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CACHE_KINDS = ("full", "ring", "alias", "compressed")


@dataclass(frozen=True)
class CacheSpec:
    """Storage one layer needs, per sequence.

    ``token_shapes``: named tensors stored for every cached token, e.g.
    ``(("k", (H_kv, D)), ("v", (H_kv, D)))``; a cache allocates each as ``[B, *lead, S, last]``.
    ``window``: a ring buffer keeps only the last ``window`` tokens.
    ``source``: an alias reads layer ``source``'s cache and holds nothing itself.
    ``state_shapes``: fixed-size decode state per sequence, whatever the context (e.g. CCA's
    convolution window and previous-token value), allocated as ``[B, *shape]``.
    ``compress_ratio`` / ``entry_shapes``: a compressed cache also holds one entry per
    ``compress_ratio`` tokens (DeepSeek V4's CSA/HCA), allocated as ``[B, *lead, entries, last]``.
    """

    kind: str
    token_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    window: int | None = None
    source: int | None = None
    state_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    compress_ratio: int = 0
    entry_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def entries_held(self, max_tokens: int) -> int:
        """Compressed entries a cache of ``max_tokens`` can hold (only complete blocks are stored)."""
        return max_tokens // self.compress_ratio if self.compress_ratio else 0

    @staticmethod
    def alias(source: int) -> CacheSpec:
        return CacheSpec(kind="alias", source=source)

    @staticmethod
    def for_tokens(token_shapes, window: int | None, state_shapes=()) -> CacheSpec:
        """Per-token tensors: a full cache for global layers, a ring of the window for sliding ones."""
        kind = "full" if window is None else "ring"
        return CacheSpec(kind=kind, token_shapes=token_shapes, window=window, state_shapes=state_shapes)

    def tokens_held(self, max_tokens: int) -> int:
        """How many token slots this layer allocates for a cache of ``max_tokens``."""
        if self.kind == "alias":
            return 0
        return max_tokens if self.window is None else min(self.window, max_tokens)

    def elements_per_token(self) -> int:
        return sum(math.prod(shape) for _, shape in self.token_shapes)

    def state_elements(self) -> int:
        return sum(math.prod(shape) for _, shape in self.state_shapes)

    def nbytes(self, batch_size: int, max_tokens: int, dtype: torch.dtype) -> int:
        """Token slots plus fixed state, for ``batch_size`` sequences."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        elements = self.tokens_held(max_tokens) * self.elements_per_token() + self.state_elements()
        elements += self.entries_held(max_tokens) * sum(math.prod(shape) for _, shape in self.entry_shapes)
        return batch_size * elements * itemsize

    def allocate(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> tuple[dict, dict]:
        """Zeroed token buffers ``[B, *lead, capacity, last]`` and state buffers ``[B, *shape]``."""
        tokens = {
            name: torch.zeros(batch_size, *shape[:-1], capacity, shape[-1], dtype=dtype, device=device)
            for name, shape in self.token_shapes
        }
        state = {name: torch.zeros(batch_size, *shape, dtype=dtype, device=device) for name, shape in self.state_shapes}
        return tokens, state
