"""The runtime cache of one batch: every layer's cache plus where the sequences are."""

from __future__ import annotations

import torch

from ..errors import CacheOverflowError


class Cache:
    """Per-layer caches of one batch of sequences, plus where the sequences are.

    ``length`` counts the steps written so far (the same for every row). ``pad[b]`` is the
    number of left-padding steps of row ``b``: the token at step ``s`` has position
    ``s - pad[b]``, and negative positions are padding that real tokens never attend to.
    """

    def __init__(self, layers: list, batch_size: int, max_tokens: int, device=None):
        self.layers = layers
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.length = 0
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.layers[i]

    def set_left_padding(self, pad: torch.Tensor) -> None:
        """Declare how many leading steps of each row are padding (only on an empty cache)."""
        if self.length:
            raise RuntimeError("set_left_padding() must be called before anything is written to the cache")
        if pad.shape != (self.batch_size,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}; expected ({self.batch_size},)")
        self.pad = pad.to(device=self.pad.device, dtype=torch.long)

    def step_positions(self, steps: torch.Tensor) -> torch.Tensor:
        """Positions [B, S] of the tokens at ``steps`` [S] (left padding subtracted)."""
        return steps[None, :] - self.pad[:, None]

    def reserve(self, n_new: int, batch_size: int) -> torch.Tensor:
        """Check ``n_new`` more tokens fit; return their positions [B, n_new]."""
        if batch_size != self.batch_size:
            raise ValueError(f"input has batch size {batch_size}, the cache was allocated for {self.batch_size}")
        if self.length + n_new > self.max_tokens:
            raise CacheOverflowError(
                f"cache capacity exceeded: it holds max_tokens={self.max_tokens} tokens, "
                f"{self.length} are written and {n_new} more were given (steps {self.length}.."
                f"{self.length + n_new - 1}); allocate a larger cache with model.new_cache(batch_size, max_tokens)"
            )
        return self.step_positions(torch.arange(self.length, self.length + n_new, device=self.pad.device))

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold, each storage counted once (aliases add nothing)."""
        seen, total = set(), 0
        for layer in self.layers:
            for t in layer.tensors():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total
