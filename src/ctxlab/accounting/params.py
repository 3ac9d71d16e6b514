"""Parameter counts from the config alone (no model is built)."""

from __future__ import annotations

from .. import blocks  # noqa: F401  (registers the block kinds)
from ..config import ModelConfig
from ..nn import ple
from ..registry import BLOCK_KINDS, RESIDUAL_KINDS


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no model is built).

    ``embedding``: the input token table. ``head``: the output projection when untied (0 when
    tied, since it is then the embedding table). ``per_layer_embedding``: the packed PLE table
    (Gemma 4 E2B/E4B). ``non_embedding``: total minus those tables (Kaplan et al. 2020; the
    "Non-Embedding" figure of the Qwen3 model cards). ``non_text``: towers outside the text
    decoder that published totals include (vision, audio; from the family's data).
    ``effective``: text decoder plus towers minus every embedding table (Google's "effective
    parameters" of Gemma 4 E2B/E4B; = non_embedding when there are no towers). ``active``:
    parameters used per token (routed experts counted at top-k; = total for dense models).
    """
    h = cfg.hidden_size
    embedding = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    per_layer = [BLOCK_KINDS[s.block].param_count(cfg, s) for s in cfg.layers]
    ple_counts = ple.stack_param_count(cfg)
    stack = h + (2 * h if cfg.input_affine else 0)  # final norm, embedding affine
    stack += RESIDUAL_KINDS[cfg.residual].stack_param_count(cfg)  # e.g. mHC's stream collapse
    total = (
        embedding + head + sum(c["total"] for c in per_layer) + stack + ple_counts["table"] + ple_counts["projection"]
    )
    tables = embedding + head + ple_counts["table"]
    return {
        "total": total,
        "embedding": embedding,
        "head": head,
        "per_layer_embedding": ple_counts["table"],
        "blocks": sum(c["total"] for c in per_layer),
        "non_embedding": total - tables,
        "non_text": cfg.non_text_params,
        "effective": total + cfg.non_text_params - tables,
        "active": total - sum(c["total"] - c["active"] for c in per_layer),
    }
