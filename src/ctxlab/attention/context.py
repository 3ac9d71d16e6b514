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
    """

    positions: torch.Tensor
    cache: object | None = None
    per_layer_inputs: torch.Tensor | None = None
    router_state: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    sources: frozenset[int] = frozenset()
    shared_kv: dict[int, tuple] = field(default_factory=dict)
    _rope_tables: dict = field(default_factory=dict)

    def rope_tables(self, rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this forward's positions, computed once per distinct rope."""
        key = (rotary.key, dtype)
        if key not in self._rope_tables:
            self._rope_tables[key] = rotary.cos_sin(self.positions, dtype)
        return self._rope_tables[key]


def scope(spec) -> str:
    """"global" or "sliding (w=N)": what a layer's queries see, for labels."""
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
