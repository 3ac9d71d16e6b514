"""Per-forward state shared by the layers of one call, and the position-based attention mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardContext:
    """What every layer of one forward call needs besides its hidden states.

    ``positions`` [B, T]: absolute positions of the new tokens (negative = left padding).
    ``cache``: the :class:`ctxlab.cache.Cache` being appended to, or None for a plain forward.
    ``shared_kv``: K/V (and key positions) that producer layers hand to consumer layers in
    this forward (cross-layer KV sharing works the same with and without a cache).
    ``sources``: the layers whose K/V some consumer reads (only those are kept).
    ``per_layer_inputs`` [B, T, L, Dp]: per-layer embeddings (PLE), when the model has them.
    ``router_state``: a router's hidden state handed to the next layer's router (ZAYA's depth
    recurrence); per token, never cached over time. ``input_ids`` [B, T]: for hash routing.
    ``last_of_chunk``: this context holds only the last token of a longer forward
    (:meth:`last_token`), whose keys still span the whole forward.
    """

    positions: torch.Tensor
    cache: object | None = None
    per_layer_inputs: torch.Tensor | None = None
    router_state: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    sources: frozenset[int] = frozenset()
    shared_kv: dict[int, tuple] = field(default_factory=dict)
    last_of_chunk: bool = False
    _rope_tables: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    def last_token(self) -> ForwardContext:
        """The context of only the last query of this forward, for layers whose other positions
        nobody reads (:meth:`ctxlab.CausalLM.forward` with ``last_only``). K/V shared by producer
        layers stay whole; per-token state keeps its last row."""
        B, T = self.positions.shape
        state = self.router_state
        if state is not None:  # [B * T, R]
            state = state.view(B, T, -1)[:, -1].reshape(B, -1)
        return ForwardContext(
            positions=self.positions[:, -1:],
            cache=self.cache,
            per_layer_inputs=None if self.per_layer_inputs is None else self.per_layer_inputs[:, -1:],
            router_state=state,
            input_ids=None if self.input_ids is None else self.input_ids[:, -1:],
            sources=self.sources,
            shared_kv=self.shared_kv,
            last_of_chunk=T > 1 or self.last_of_chunk,
        )

    def rope_tables(self, rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this forward's positions, computed once per distinct rope (in decode, rows of
        the tables the cache precomputed for every position it can hold)."""
        key = (rotary.key, dtype)
        if key not in self._rope_tables:
            table = self.cache.rope_table(rotary, dtype) if self.decoding else None
            if table is None:
                self._rope_tables[key] = rotary.cos_sin(self.positions, dtype)
            else:  # decode positions are never padding (>= 0)
                cos, sin = table
                self._rope_tables[key] = (cos[self.positions][:, None], sin[self.positions][:, None])
        return self._rope_tables[key]

    @property
    def padded(self) -> bool:
        """Whether some row has left padding (a host-side flag of the cache: no device sync)."""
        return self.cache is not None and self.cache.has_padding

    @property
    def decoding(self) -> bool:
        """One new token per row attending over a cache (which returns only valid keys)."""
        return self.cache is not None and self.positions.shape[1] == 1 and not self.last_of_chunk

    def mask(self, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """:func:`attention_mask` of this forward's queries against ``k_pos``, built once per forward
        for every layer reading the same key positions (caches share them per step)."""
        if torch.compiler.is_compiling():  # the compiled graph deduplicates instead
            return attention_mask(self.positions, k_pos, window)
        key = (id(k_pos), window)
        if key not in self._masks:
            self._masks[key] = (k_pos, attention_mask(self.positions, k_pos, window))
        return self._masks[key][1]

    def sdpa_mask(self, k_pos: torch.Tensor, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """``(mask or None, is_causal)`` for attention over ``k_pos``, with no mask when none is needed.

        * decode without left padding: the caches return only written slots of steps at or before
          the query, all inside the window (rings keep exactly the window): every key is valid;
        * keys that are exactly this forward's tokens (no cache, or an empty one) and no padding:
          causal attention (``is_causal``, nothing materialized; a window shorter than the tokens is
          the kernel's to apply, :func:`ctxlab.attention.kernels.grouped_attention`);
        * a prefill chunk after earlier ones, no padding, no window: the keys are the whole history
          (a full cache returns every written step) followed by the chunk, so ``is_causal`` again, with
          the history visible to every query (:func:`ctxlab.attention.kernels.prefix_causal_attention`);
        * otherwise the position mask, shared by the layers reading the same key positions.
        """
        if not self.padded:
            T, S = self.positions.shape[1], k_pos.shape[1]
            if self.decoding:
                return None, False
            fresh = self.cache is None or self.cache.length == 0
            if fresh and S == T:
                return None, True
            if not fresh and window is None and not self.last_of_chunk and S == self.cache.length + T:
                return None, True
        return self.mask(k_pos, window), False


def scope(spec) -> str:
    """ "global" or "sliding (w=N)": what a layer's queries see, for labels."""
    return "global" if spec.window is None else f"sliding (w={spec.window})"


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: True where query t may attend key s.

    Causal by position, ``q - k < window`` for sliding layers (the window counts the query
    itself, as HF's ``kv_idx > q_idx - sliding_window``), and real tokens never see left
    padding (negative positions). A padding query sees earlier padding, so no row is empty.
    """
    q = q_pos[:, :, None]  # [B, T, 1]
    k = k_pos[:, None, :]  # [B, 1, S]
    allowed = (k <= q) & ((k >= 0) | (q < 0))
    if window is not None:
        allowed &= q - k < window
    return allowed[:, None]
