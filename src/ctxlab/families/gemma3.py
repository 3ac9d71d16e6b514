"""Gemma 3 text decoder (Gemma Team 2025, arXiv:2503.19786; HF ``Gemma3ForCausalLM``, config
``gemma3_text``; multimodal configs ``gemma3`` nest it under ``text_config``).

Wiring only, from the mechanisms Gemma 4 also uses: sandwich blocks (a norm before and after
attention and MLP), q/k RMSNorm, sliding layers (``sliding_window``, local RoPE θ=10,000) and
global layers (RoPE θ=1,000,000, with the published linear scaling on the larger models) set by
``layer_types`` (default: every 6th layer global, HF ``Gemma3TextConfig.__post_init__``),
``query_pre_attn_scalar ** -0.5`` attention scaling, an optional final-logit tanh softcap,
gelu-tanh gated MLP, embeddings scaled by √H, tied head. Unlike Gemma 4, every RMSNorm multiplies
by ``1 + w`` (``ModelConfig.norm_unit_offset``); there is no v-norm, layer scalar, PLE, KV sharing
or K=V.

``attn_logit_softcapping`` is read but has no effect, as in the reference: transformers 5.23's
``Gemma3Attention`` stores it and never passes it to the attention function (Gemma 2's does), and
no released Gemma 3 config sets it. A config that sets it gets a warning saying so.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import LayerSpec, ModelConfig
from ..errors import ConfigError
from . import gemma4
from .hf_fields import hf_fields, model_fields, parse_rope, require, rope_to_hf

MODEL_TYPE = "gemma3_text"
MODEL_TYPES = ("gemma3", "gemma3_text")  # multimodal wrapper, text decoder
ARCHITECTURE = "Gemma3ForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
SLIDING_PATTERN = 6  # HF default: layers 6, 12, ... (1-based) are global
DEFAULT_THETA = {"sliding_attention": 10_000.0, "full_attention": 1_000_000.0}
# Multimodal checkpoints keep the text decoder under model.language_model., as Gemma 4's do.
checkpoint_key = gemma4.checkpoint_key
DROPPED = "not part of the text decoder (vision tower, multimodal projector)"

log = logging.getLogger("ctxlab")


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "gemma3 config"
    text = d.get("text_config") or d
    require(text, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"], where)
    if text.get("use_bidirectional_attention"):
        raise ConfigError([f"{where}.use_bidirectional_attention = true: only causal Gemma 3 decoders are supported"])
    if text.get("attn_logit_softcapping") is not None:
        log.warning(
            "%s: attn_logit_softcapping = %s is ignored, as transformers' Gemma3Attention ignores it "
            "(no released Gemma 3 sets it)",
            where,
            text["attn_logit_softcapping"],
        )
    n = text["num_hidden_layers"]
    pattern = text.get("sliding_window_pattern") or SLIDING_PATTERN
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
    ]
    _check_layer_types(layer_types, n, where)
    rope = _rope_parameters(text)
    heads = text["num_attention_heads"]
    layers = [
        LayerSpec(
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or 4,  # HF Gemma3TextConfig's defaults
            head_dim=text.get("head_dim") or 256,
            intermediate_size=text["intermediate_size"],
            window=text.get("sliding_window", 4096) if kind == "sliding_attention" else None,
            rope=parse_rope(rope[kind], f"{where}.rope_parameters.{kind}", DEFAULT_THETA[kind]),
            qk_norm=True,
            attention_bias=bool(text.get("attention_bias", False)),
            attn_scale=float(text.get("query_pre_attn_scalar", 256)) ** -0.5,
            activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
            block="sandwich",
        )
        for kind in layer_types
    ]
    fields = model_fields(
        {"vocab_size": 262_208, **text, "eos_token_id": d.get("eos_token_id", text.get("eos_token_id", 1))},
        tie=bool(d.get("tie_word_embeddings", True)),
        max_positions=131_072,
        bos=2,
        eos=1,
        pad=0,
    )
    return ModelConfig(
        **fields,
        family=MODEL_TYPE,
        layers=tuple(layers),
        final_logit_softcap=text.get("final_logit_softcapping"),
        embedding_scale=text["hidden_size"] ** 0.5,
        norm_unit_offset=True,
        float16_ok=False,
        name=name,
    )


def _rope_parameters(text: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer type, as HF ``Gemma3TextConfig.convert_rope_params_to_dict``: ``rope_parameters``
    (transformers 5), a 4.x ``rope_scaling`` over the global layers' entry, then the top-level ``rope_theta``
    (global) and ``rope_local_base_freq`` (local) where an entry has no ``rope_theta`` of its own."""
    given = text.get("rope_parameters") or {}
    if given and not set(given) <= set(LAYER_TYPES):  # one dict for every layer type (flat form)
        given = {kind: given for kind in LAYER_TYPES}
    out = {kind: dict(given.get(kind) or {"rope_type": "default"}) for kind in LAYER_TYPES}
    out["full_attention"].update(text.get("rope_scaling") or {})
    for kind, field in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
        if text.get(field) is not None:
            out[kind].setdefault("rope_theta", text[field])
    return out


def _check_layer_types(layer_types: list[str], n: int, where: str) -> None:
    problems = []
    if len(layer_types) != n:
        problems.append(f"{where}.layer_types has {len(layer_types)} entries; num_hidden_layers is {n}")
    unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
    if unknown:
        problems.append(f"{where}.layer_types contains {unknown}: allowed layer types are {list(LAYER_TYPES)}")
    if problems:
        raise ConfigError(problems)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``gemma3_text`` config.json (``Gemma3ForCausalLM``); ``export_config`` checks it round-trips."""
    sliding = next((s for s in cfg.layers if s.window is not None), cfg.layers[0])
    full = next((s for s in cfg.layers if s.window is None), cfg.layers[-1])
    return {
        **hf_fields(cfg, MODEL_TYPE, ARCHITECTURE),
        "intermediate_size": sliding.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": sliding.num_heads,
        "num_key_value_heads": sliding.num_kv_heads,
        "head_dim": sliding.head_dim,
        "query_pre_attn_scalar": _int_if_whole(round(sliding.scale**-2, 6)),
        "sliding_window": sliding.window or 4096,
        "layer_types": ["sliding_attention" if s.window is not None else "full_attention" for s in cfg.layers],
        "rope_parameters": {"sliding_attention": rope_to_hf(sliding.rope), "full_attention": rope_to_hf(full.rope)},
        "hidden_activation": sliding.activation,
        "attention_bias": sliding.attention_bias,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": cfg.final_logit_softcap,
    }


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
