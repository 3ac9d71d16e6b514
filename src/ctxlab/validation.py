"""Validation of :class:`~ctxlab.config.ModelConfig`: every problem found, each naming the field,
its value and what is allowed. Called by ``ModelConfig.__post_init__``.

This module only collects problems. Checks that concern one mechanism live with it: each
registered kind (attention, MLP, router, block, residual, rope type) has a ``validate`` that
looks at its own spec fields, and mechanisms that are not kinds (cross-layer KV sharing, per-layer
embeddings) register theirs in :data:`~ctxlab.registry.LAYER_CHECKS` /
:data:`~ctxlab.registry.MODEL_CHECKS`. Attention kinds declare which optional layer fields they
implement (``OPTIONS``) and which sub-spec they own (``OWNS``); a field set on a kind that does not
implement it is refused here, in one generic check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import (
    ACTIVATIONS,
    ATTENTION_KINDS,
    BLOCK_KINDS,
    LAYER_CHECKS,
    MLP_KINDS,
    MODEL_CHECKS,
    RESIDUAL_KINDS,
    ROPE_TYPES,
    Registry,
)

if TYPE_CHECKING:  # annotations only: config.py calls this module, not the other way round
    from .config import LayerSpec, ModelConfig

# Optional LayerSpec fields an attention kind may or may not implement, with their "off" value.
OPTIONAL_FIELDS = {
    "qk_norm": False,
    "v_norm": False,
    "k_eq_v": False,
    "output_gate": None,
    "kv_source": None,
    "indexer": None,
}


def positive_int(value: Any) -> bool:
    """A positive int that is not a bool (``True`` is not one layer)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(cfg: ModelConfig) -> list[str]:
    """Every problem with ``cfg``, each naming the field, its value and what is allowed."""
    p: list[str] = []
    for name in ("vocab_size", "hidden_size", "max_position_embeddings"):
        if not positive_int(getattr(cfg, name)):
            p.append(f"{name} = {getattr(cfg, name)!r}: must be a positive integer")
    if not cfg.layers:
        p.append("layers = () (num_hidden_layers = 0): a model needs at least one layer")
    if not (isinstance(cfg.norm_eps, (int, float)) and not isinstance(cfg.norm_eps, bool) and cfg.norm_eps > 0):
        p.append(f"norm_eps = {cfg.norm_eps!r}: must be a positive number")
    if cfg.final_logit_softcap is not None and not _positive_number(cfg.final_logit_softcap):
        p.append(f"final_logit_softcap = {cfg.final_logit_softcap!r}: must be > 0 or None (no softcap)")
    if cfg.embedding_scale is not None and not _positive_number(cfg.embedding_scale):
        p.append(f"embedding_scale = {cfg.embedding_scale!r}: must be > 0, or None for no scaling")
    vocab = cfg.vocab_size if positive_int(cfg.vocab_size) else 0
    for tok in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, tok)
        if v is not None and not (_int(v) and 0 <= v < vocab):
            p.append(f"{tok} = {v!r}: must be None or a token id in [0, vocab_size={cfg.vocab_size})")
    for v in cfg.eos_token_id:
        if not (_int(v) and 0 <= v < vocab):
            p.append(f"eos_token_id contains {v!r}: must be token ids in [0, vocab_size={cfg.vocab_size})")
    if _known(p, "residual", cfg.residual, RESIDUAL_KINDS):
        p.extend(RESIDUAL_KINDS[cfg.residual].validate(cfg))
    for check in MODEL_CHECKS.values():
        p.extend(check(cfg))
    for i, layer in enumerate(cfg.layers):
        p.extend(_validate_layer(i, layer, cfg))
    return p


def _validate_layer(i: int, s: LayerSpec, cfg: ModelConfig) -> list[str]:
    p: list[str] = []
    at = f"layers[{i}]"
    for name in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        if not positive_int(getattr(s, name)):
            p.append(f"{at}.{name} = {getattr(s, name)!r}: must be a positive integer")
    if not p and s.num_heads % s.num_kv_heads:
        p.append(
            f"{at}.num_heads = {s.num_heads} is not divisible by num_kv_heads = {s.num_kv_heads}: "
            f"every KV head must serve the same number of query heads "
            f"(allowed num_kv_heads: divisors of {s.num_heads})"
        )
    if s.window is not None and not positive_int(s.window):
        p.append(f"{at}.window = {s.window!r}: must be a positive number of tokens, or None for global attention")
    if s.attn_scale is not None and not _positive_number(s.attn_scale):
        p.append(f"{at}.attn_scale = {s.attn_scale!r}: must be > 0, or None for 1/sqrt(head_dim)")
    _known(p, f"{at}.activation", s.activation, ACTIVATIONS)
    if _known(p, f"{at}.rope.type", s.rope.type, ROPE_TYPES):
        p.extend(ROPE_TYPES[s.rope.type].validate(at, s))
    if _known(p, f"{at}.block", s.block, BLOCK_KINDS):
        p.extend(BLOCK_KINDS[s.block].validate(at, s))
    if _known(p, f"{at}.mlp", s.mlp, MLP_KINDS):
        p.extend(MLP_KINDS[s.mlp].validate(at, s))
    if _known(p, f"{at}.attention", s.attention, ATTENTION_KINDS):
        p.extend(_options(at, s))
        if not p:  # kinds may rely on the basic fields being sane
            p.extend(ATTENTION_KINDS[s.attention].validate(at, s))
    for check in LAYER_CHECKS.values():
        p.extend(check(at, i, s, cfg))
    return p


def _options(at: str, s: LayerSpec) -> list[str]:
    """Optional fields and owned sub-specs used on an attention kind that does not implement them."""
    p: list[str] = []
    kind = ATTENTION_KINDS[s.attention]
    unsupported = [f for f, off in OPTIONAL_FIELDS.items() if getattr(s, f) != off and f not in kind.OPTIONS]
    by_support: dict[tuple[str, ...], list[str]] = {}
    for f in unsupported:
        supporters = tuple(n for n, k in ATTENTION_KINDS.items() if f in k.OPTIONS)
        by_support.setdefault(supporters, []).append(f)
    for supporters, fields in by_support.items():
        allowed = " or ".join(repr(n) for n in supporters) or "no kind"
        p.append(f"{at}: {fields} are implemented for attention = {allowed} only (got {s.attention!r})")
    for name, other in ATTENTION_KINDS.items():
        for owned in other.OWNS:
            if name != s.attention and getattr(s, owned) is not None:
                p.append(f"{at}.{owned} is set but attention = {s.attention!r}: only attention = {name!r} reads it")
    return p


def _known(p: list[str], field: str, value: Any, registry: Registry) -> bool:
    if value in registry:
        return True
    p.append(f"{field} = {value!r}: unknown {registry.what}; allowed: {registry.names()}")
    return False


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
