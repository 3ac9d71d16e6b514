"""Matmul FLOPs of decoding one token, by term, from the layer specs."""

from __future__ import annotations

from .. import blocks  # noqa: F401  (registers the block kinds)
from ..config import ModelConfig
from ..errors import InputError
from ..nn import ple
from ..registry import BLOCK_KINDS, RESIDUAL_KINDS


def decode_flops_terms(cfg: ModelConfig, context_len: int) -> dict[str, int]:
    """Matmul FLOPs of decoding the token at position ``context_len``, by term.

    Convention: 2 FLOPs per multiply-add of every matmul (projections, q·kᵀ, p·v, MLP, experts
    at top-k plus router logits, PLE projections, LM head), the way
    ``torch.utils.flop_counter.FlopCounterMode`` counts; elementwise work (norms, RoPE,
    softmax, activations, pooling) and embedding lookups are not counted. The token sees
    ``context_len + 1`` positions (itself included); each attention kind caps that at its window
    and adds what else it reads (compressed entries, top-k selections). Routed experts count at
    top-k per token: an upper bound for routers with a "skip" class (ZAYA1), whose skipped tokens
    run no expert.
    """
    if not (isinstance(context_len, int) and context_len >= 0):
        raise InputError(f"context_len = {context_len!r}: must be a non-negative integer")
    h = cfg.hidden_size
    terms = {"lm_head": 2 * h * cfg.vocab_size}
    if collapse := RESIDUAL_KINDS[cfg.residual].stack_flops(cfg):  # e.g. mHC's stream collapse
        terms["hyper_connections"] = collapse
    if cfg.per_layer_input_size:
        terms["per_layer_embedding"] = ple.stack_decode_flops(cfg)  # context projection
    for s in cfg.layers:  # every layer gets all context_len + 1 positions; windows cap inside
        for name, value in BLOCK_KINDS[s.block].decode_flops(cfg, s, context_len + 1).items():
            terms[name] = terms.get(name, 0) + value
    return terms


def decode_flops(cfg: ModelConfig, context_len: int) -> int:
    """Total of :func:`decode_flops_terms`."""
    return sum(decode_flops_terms(cfg, context_len).values())
