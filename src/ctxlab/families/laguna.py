"""Poolside Laguna (XS.2; HF ``LagunaForCausalLM``): per-layer query-head budgets over sliding
and global layers with fixed KV heads, q/k norm, a softplus output gate, per-layer-type RoPE
(YaRN on half the head for global layers), and a sigmoid-routed MoE with a shared expert after
a dense first layer (``mlp_layer_types``).

Wiring only: the head budget is ``num_attention_heads_per_layer[i]`` into each layer's spec, so
the cache shape (KV heads) stays uniform while compute varies.
"""

from __future__ import annotations

from typing import Any

from ..config import LayerSpec, ModelConfig, MoESpec
from ..errors import ConfigError
from .hf_fields import check_per_layer, hf_fields, model_fields, parse_rope, require, rope_to_hf
from .keymap import KeyMap

MODEL_TYPE = "laguna"
# Published checkpoints (and transformers' save_pretrained) store experts one tensor per expert,
# the router's correction bias under experts., and the shared expert in the singular.
EXPERTS_PER_TENSOR = True
KEY_MAP = KeyMap(
    {
        "model.layers.{}.mlp.gate.e_score_correction_bias": "model.layers.{}.mlp.experts.e_score_correction_bias",
        "model.layers.{}.mlp.shared_experts": "model.layers.{}.mlp.shared_expert",
    }
)
ARCHITECTURE = "LagunaForCausalLM"
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = ("dense", "sparse")
# HF LagunaAttention gates per head for True / "per-head" and per element for anything else, false included
GATING = {True: "per_head", "per-head": "per_head", "per-element": "per_element", False: "per_element"}
DEFAULT_ROPE = {  # LagunaConfig.__post_init__
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "laguna config"
    require(d, ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"], where)
    n = d["num_hidden_layers"]
    layer_types = d.get("layer_types") or ["full_attention"] * n
    mlp_types = d.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    heads = d.get("num_attention_heads_per_layer") or [d["num_attention_heads"]] * n
    check_per_layer(
        where,
        n,
        layer_types=(layer_types, LAYER_TYPES),
        mlp_layer_types=(mlp_types, MLP_TYPES),
        num_attention_heads_per_layer=(heads, None),
    )
    if d.get("moe_apply_router_weight_on_input"):
        raise ConfigError(
            [f"{where}.moe_apply_router_weight_on_input = true: not supported (nor by transformers 5.23)"]
        )
    gating = d.get("gating", True)
    if gating not in GATING:
        raise ConfigError([f"{where}.gating = {gating!r}: allowed: true, false, 'per-head', 'per-element'"])
    # rope_parameters is keyed by layer type; released files also carry non-dict keys there (ignored)
    rope = {**DEFAULT_ROPE, **{k: v for k, v in (d.get("rope_parameters") or {}).items() if isinstance(v, dict)}}
    moe = MoESpec(
        num_experts=d.get("num_experts", 256),
        top_k=d.get("num_experts_per_tok", 8),
        intermediate_size=d.get("moe_intermediate_size", 512),
        router="biased_topk",
        routed_scaling=float(d.get("moe_routed_scaling_factor", 1.0)),
        shared_expert_size=d.get("shared_expert_intermediate_size", 512),
        router_logit_softcap=d.get("moe_router_logit_softcapping") or None,
    )
    layers = [
        LayerSpec(
            num_heads=heads[i],
            num_kv_heads=d.get("num_key_value_heads", 8),
            head_dim=d.get("head_dim", 128),
            intermediate_size=d.get("intermediate_size", 8192),
            window=d.get("sliding_window", 512) if layer_types[i] == "sliding_attention" else None,
            rope=parse_rope(rope[layer_types[i]], f"{where}.rope_parameters.{layer_types[i]}"),
            qk_norm=True,
            attention_bias=bool(d.get("attention_bias", False)),
            output_gate=GATING[gating],
            mlp="moe" if mlp_types[i] == "sparse" else "gated",
            moe=moe if mlp_types[i] == "sparse" else None,
            activation=d.get("hidden_act", "silu"),
        )
        for i in range(n)
    ]
    return ModelConfig(
        **model_fields(d, eps=1e-6, max_positions=131072),
        family=MODEL_TYPE,
        layers=tuple(layers),
        name=name,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``laguna`` config.json; ``export_config`` checks it round-trips."""
    first = cfg.layers[0]
    moe = next((s.moe for s in cfg.layers if s.moe is not None), None) or MoESpec(256, 8, 512, "biased_topk")
    full = next((s for s in cfg.layers if s.window is None), first)
    sliding = next((s for s in cfg.layers if s.window is not None), None)
    gating = {v: k for k, v in GATING.items() if isinstance(k, str)}.get(first.output_gate, True)
    rope = {"full_attention": rope_to_hf(full.rope)}
    if sliding is not None:
        rope["sliding_attention"] = rope_to_hf(sliding.rope)
    return {
        **hf_fields(cfg, MODEL_TYPE, ARCHITECTURE),
        "intermediate_size": next(
            (s.intermediate_size for s in cfg.layers if s.mlp == "gated"), first.intermediate_size
        ),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": max(s.num_heads for s in cfg.layers),
        "num_attention_heads_per_layer": [s.num_heads for s in cfg.layers],
        "num_key_value_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "layer_types": ["sliding_attention" if s.window is not None else "full_attention" for s in cfg.layers],
        "mlp_layer_types": ["sparse" if s.mlp == "moe" else "dense" for s in cfg.layers],
        "sliding_window": sliding.window if sliding is not None else 512,
        "rope_parameters": rope,
        "gating": gating,
        "attention_bias": first.attention_bias,
        "hidden_act": first.activation,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.intermediate_size,
        "shared_expert_intermediate_size": moe.shared_expert_size,
        "moe_routed_scaling_factor": moe.routed_scaling,
        "moe_router_logit_softcapping": moe.router_logit_softcap or 0.0,
    }
