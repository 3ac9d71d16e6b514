"""Zyphra ZAYA1 (8B; HF ``ZayaForCausalLM``): compressed convolutional attention (CCGQA) in every
layer, ZAYA's residual scaling with a float32 residual stream and a learned embedding affine,
and a top-1 MoE whose router (with a "skip" class) carries its hidden state from layer to layer.

Wiring only: ``attention="cca"``, ``block="scaled_residual"``, ``router="mlp_eda"`` (layer 0
takes no incoming router state), tied head.
"""

from __future__ import annotations

from typing import Any

from ..config import LayerSpec, ModelConfig, MoESpec
from ..errors import ConfigError
from .hf_fields import hf_fields, model_fields, parse_rope, per_layer_problems, require, rope_to_hf

MODEL_TYPE = "zaya"
ARCHITECTURE = "ZayaForCausalLM"
LAYER_TYPES = ("hybrid", "hybrid_sliding")
DEFAULT_ROPE = {  # ZayaConfig.__post_init__
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "zaya config"
    require(d, ["vocab_size", "hidden_size", "num_hidden_layers"], where)
    n = d["num_hidden_layers"]
    layer_types = list(d.get("layer_types") or ["hybrid"] * n)
    problems = per_layer_problems(where, n, layer_types=(layer_types, LAYER_TYPES))
    if "hybrid_sliding" in layer_types and not d.get("sliding_window"):
        problems.append(f"{where}.sliding_window must be set when layer_types contains 'hybrid_sliding'")
    if d.get("lm_head_bias"):
        problems.append(f"{where}.lm_head_bias = true: an LM-head bias is not supported")
    if problems:
        raise ConfigError(problems)
    # hub files carry a stray top-level "rope_type" next to the per-type dicts (HF drops it too)
    rope = {**DEFAULT_ROPE, **{k: v for k, v in (d.get("rope_parameters") or {}).items() if isinstance(v, dict)}}
    moe = MoESpec(
        num_experts=d.get("num_experts", 16),
        top_k=d.get("num_experts_per_tok", 1),
        intermediate_size=d.get("moe_intermediate_size", 2048),
        router="mlp_eda",
        router_hidden_size=d.get("router_hidden_size", 256),
    )
    layers = [
        LayerSpec(
            attention="cca",
            num_heads=d.get("num_attention_heads", 8),
            num_kv_heads=d.get("num_key_value_heads", 2),
            head_dim=d.get("head_dim", 128),
            intermediate_size=moe.intermediate_size,
            window=d.get("sliding_window") if kind == "hybrid_sliding" else None,
            rope=parse_rope(rope[kind], f"{where}.rope_parameters.{kind}"),
            attention_bias=bool(d.get("attention_bias", False)),
            conv_kernels=(d.get("cca_time0", 2), d.get("cca_time1", 2)),
            mlp="moe",
            moe=MoESpec(**{**moe.__dict__, "router_state_in": i > 0}),
            activation=d.get("hidden_act", "silu"),
            block="scaled_residual",
        )
        for i, kind in enumerate(layer_types)
    ]
    return ModelConfig(
        **model_fields(d, eps=1e-5, tie=True, max_positions=131072, bos=2, eos=106, pad=0),
        family=MODEL_TYPE,
        layers=tuple(layers),
        input_affine=True,
        residual_fp32=True,
        name=name,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``zaya`` config.json; ``export_config`` checks it round-trips."""
    s = cfg.layers[0]
    sliding = next((x for x in cfg.layers if x.window is not None), None)
    rope = {"hybrid": rope_to_hf(next((x for x in cfg.layers if x.window is None), s).rope)}
    if sliding is not None:
        rope["hybrid_sliding"] = rope_to_hf(sliding.rope)
    return {
        **hf_fields(cfg, MODEL_TYPE, ARCHITECTURE),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "layer_types": ["hybrid_sliding" if x.window is not None else "hybrid" for x in cfg.layers],
        "sliding_window": sliding.window if sliding is not None else None,
        "rope_parameters": rope,
        "cca_time0": s.conv_kernels[0],
        "cca_time1": s.conv_kernels[1],
        "attention_bias": s.attention_bias,
        "num_experts": s.moe.num_experts,
        "num_experts_per_tok": s.moe.top_k,
        "moe_intermediate_size": s.moe.intermediate_size,
        "router_hidden_size": s.moe.router_hidden_size,
        "hidden_act": s.activation,
        "lm_head_bias": False,
    }
