"""The runtime cache of one batch: every layer's cache plus where the sequences are."""

from __future__ import annotations

import torch

from ..errors import CacheOverflowError, InputError


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
        self.has_padding = False  # host-side, so forwards never read `pad` back from the device
        self._step_memo: dict = {}  # per-step values every layer of a layout shares (cleared by advance)
        self._rope_tables: dict = {}  # (rope key, dtype) -> cos/sin [max_tokens, rotary_dim]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.layers[i]

    def set_left_padding(self, pad: torch.Tensor) -> None:
        """Declare how many leading steps of each row are padding (only on an empty cache)."""
        if self.length:
            raise RuntimeError("set_left_padding() must be called before anything is written to the cache")
        if pad.shape != (self.batch_size,):
            raise InputError(f"pad has shape {tuple(pad.shape)}; expected ({self.batch_size},)")
        self.pad = pad.to(device=self.pad.device, dtype=torch.long)
        self.has_padding = bool((self.pad != 0).any())  # the one sync, at setup

    def memo(self, key, compute):
        """``compute()`` once per step for ``key`` (e.g. the key positions of every full-cache layer).
        Under ``torch.compile`` the graph deduplicates instead (keys may hold symbolic ints)."""
        if torch.compiler.is_compiling():
            return compute()
        if key not in self._step_memo:
            self._step_memo[key] = compute()
        return self._step_memo[key]

    def precompute_rope(self, rotaries, dtype: torch.dtype) -> None:
        """cos/sin tables for positions ``0..max_tokens-1`` of each distinct rope, so decode steps
        index rows instead of recomputing them (the gpt-fast layout)."""
        positions = torch.arange(self.max_tokens, device=self.pad.device)[None]
        for rotary in rotaries:
            key = (rotary.key, dtype)
            if key not in self._rope_tables:
                cos, sin = rotary.cos_sin(positions, dtype)  # [1, 1, max_tokens, rot]
                self._rope_tables[key] = (cos[0, 0], sin[0, 0])

    def rope_table(self, rotary, dtype: torch.dtype):
        """The precomputed ``(cos, sin)`` [max_tokens, rot] of a rope, or None."""
        return self._rope_tables.get((rotary.key, dtype))

    def step_positions(self, steps: torch.Tensor) -> torch.Tensor:
        """Positions [B, S] of the tokens at ``steps`` [S] (left padding subtracted)."""
        return steps[None, :] - self.pad[:, None]

    def reserve(self, n_new: int, batch_size: int) -> torch.Tensor:
        """Check ``n_new`` more tokens fit; return their positions [B, n_new]."""
        if batch_size != self.batch_size:
            raise InputError(f"input has batch size {batch_size}, the cache was allocated for {self.batch_size}")
        if self.length + n_new > self.max_tokens:
            raise CacheOverflowError(
                f"cache capacity exceeded: it holds max_tokens={self.max_tokens} tokens, "
                f"{self.length} are written and {n_new} more were given (steps {self.length}.."
                f"{self.length + n_new - 1}); allocate a larger cache with model.new_cache(batch_size, max_tokens)"
            )
        return self.step_positions(torch.arange(self.length, self.length + n_new, device=self.pad.device))

    def advance(self, n_new: int) -> None:
        self.length += n_new
        self._step_memo.clear()

    def rope_nbytes(self) -> int:
        """Bytes of the RoPE cos / sin tables the cache also holds (not K/V state: not in :meth:`nbytes`)."""
        return sum(t.nbytes for pair in self._rope_tables.values() for t in pair)

    def nbytes(self) -> int:
        """Bytes the cache's K/V state really holds, each storage counted once (aliases add nothing); the
        accounting's "realized" bytes. Its RoPE tables are :meth:`rope_nbytes`."""
        seen, total = set(), 0
        for layer in self.layers:
            for t in layer.tensors():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total
