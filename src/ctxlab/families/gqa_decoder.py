"""Shared parsing for the standard GQA decoders (Llama 3, Qwen3): one uniform layer spec,
with an optional sliding window on selected layers."""

from __future__ import annotations

from typing import Any

from ..config import LayerSpec, ModelConfig
from ..errors import ConfigError
from .hf_fields import check_per_layer, hf_fields, legacy_rope_params, model_fields, parse_rope, rope_to_hf

REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
LAYER_TYPES = ("full_attention", "sliding_attention")


def base_layer(d: dict[str, Any], where: str, **overrides: Any) -> LayerSpec:
    """Layer 0's spec; ``overrides`` replace fields (Qwen3: q/k norms, and no MLP bias whatever the file says)."""
    heads = d["num_attention_heads"]
    derived_head_dim = d["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0
    fields = dict(
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or derived_head_dim,  # 0 is then reported by validation
        intermediate_size=d["intermediate_size"],
        rope=parse_rope(whole_head_rope(legacy_rope_params(d), where), f"{where}.rope_parameters"),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        activation=d.get("hidden_act", "silu"),
    )
    return LayerSpec(**{**fields, **overrides})


def whole_head_rope(params: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """Llama's and Qwen3's rotary embedding turns the whole head: their default RoPE ignores a
    ``partial_rotary_factor`` (HF ``LlamaRotaryEmbedding.compute_default_rope_parameters``), and with a
    scaled RoPE the factor shortens the frequencies but not the rotation, which fails in transformers; so the
    factor is dropped for the default type and refused for the others."""
    if not params or params.get("partial_rotary_factor") in (None, 1, 1.0):
        return params
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(
            [
                f"{where}.rope_parameters.partial_rotary_factor = {params['partial_rotary_factor']!r} with rope_type "
                f"{rope_type!r}: this family rotates the whole head (transformers fails on this config); "
                "remove the factor or set it to 1.0"
            ]
        )
    return {k: v for k, v in params.items() if k != "partial_rotary_factor"}


def check_layer_types(layer_types: list[str], num_layers: int, where: str) -> None:
    check_per_layer(where, num_layers, layer_types=(layer_types, LAYER_TYPES))


def model_config(d: dict[str, Any], family: str, layers: list[LayerSpec], name: str, **defaults: Any) -> ModelConfig:
    """``defaults``: the family's HF config class defaults for fields a file may leave out (:func:`model_fields`)."""
    return ModelConfig(
        **model_fields(d, **defaults),
        family=family,
        layers=tuple(layers),
        name=name,
    )


def uniform_to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The HF fields every GQA decoder shares, from layer 0 (the families check uniformity)."""
    s = cfg.layers[0]
    return {
        **hf_fields(cfg, model_type, architecture),
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": s.activation,
        "attention_bias": s.attention_bias,
        "rope_parameters": rope_to_hf(s.rope),
    }
