"""Shared parsing for the standard GQA decoders (Llama 3, Qwen3): one uniform layer spec,
with an optional sliding window on selected layers."""

from __future__ import annotations

from typing import Any

from ..config import LayerSpec, ModelConfig
from .hf_fields import check_per_layer, hf_fields, legacy_rope_params, model_fields, parse_rope, rope_to_hf

REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
LAYER_TYPES = ("full_attention", "sliding_attention")


def base_layer(d: dict[str, Any], where: str, **overrides: Any) -> LayerSpec:
    heads = d["num_attention_heads"]
    derived_head_dim = d["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0
    return LayerSpec(
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or derived_head_dim,  # 0 is then reported by validation
        intermediate_size=d["intermediate_size"],
        rope=parse_rope(legacy_rope_params(d), f"{where}.rope_parameters"),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        activation=d.get("hidden_act", "silu"),
        **overrides,
    )


def check_layer_types(layer_types: list[str], num_layers: int, where: str) -> None:
    check_per_layer(where, num_layers, layer_types=(layer_types, LAYER_TYPES))


def model_config(d: dict[str, Any], family: str, layers: list[LayerSpec], name: str) -> ModelConfig:
    return ModelConfig(
        **model_fields(d),
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
