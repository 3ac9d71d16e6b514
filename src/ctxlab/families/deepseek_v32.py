"""DeepSeek V3.2 (-Exp; HF ``DeepseekV32ForCausalLM``): MLA with the lightning indexer (DeepSeek
Sparse Attention) in every layer, YaRN RoPE in interleaved pairs, dense first layers, then
DeepSeek MoE (sigmoid routing with a selection bias, group-limited, one shared expert,
routed scaling).

Wiring only. The softmax scale is ``qk_head_dim^-1/2 * mscale(factor, mscale_all_dim)^2``
(HF ``yarn_apply_mscale``); the YaRN cos/sin factor is mscale/mscale_all_dim (= 1 as published).
"""

from __future__ import annotations

from typing import Any

from ..config import IndexerSpec, LayerSpec, MLASpec, ModelConfig, MoESpec, yarn_mscale
from ..errors import ConfigError
from .hf_fields import check_per_layer, hf_fields, legacy_rope_params, model_fields, parse_rope, require, rope_to_hf

MLP_TYPES = ("dense", "sparse")
MODEL_TYPE = "deepseek_v32"
ARCHITECTURE = "DeepseekV32ForCausalLM"
EXPERTS_PER_TENSOR = True  # transformers maps deepseek_v32 checkpoints like qwen2_moe
DROPPED = "the multi-token-prediction (MTP) layer (model.layers.61), not used for next-token decoding"


def checkpoint_key(name: str) -> str | None:
    """The published checkpoints' MTP layer is ``model.layers.61.*``, after the 61 decoder layers: transformers
    ignores it (``DeepseekV32PreTrainedModel._keys_to_ignore_on_load_unexpected``), and so does ctxlab."""
    return None if name.startswith("model.layers.61.") else name


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "deepseek_v32 config"
    require(d, ["vocab_size", "hidden_size", "num_hidden_layers"], where)
    n = d["num_hidden_layers"]
    dense = min(d.get("first_k_dense_replace", 3), n)
    mlp_types = d.get("mlp_layer_types") or ["dense"] * dense + ["sparse"] * (n - dense)
    check_per_layer(where, n, mlp_layer_types=(mlp_types, MLP_TYPES))
    rope_params = dict(legacy_rope_params(d) or {"rope_type": "default", "rope_theta": 10000.0})
    rope = parse_rope(rope_params, f"{where}.rope_parameters")
    rope = rope.__class__(**{**rope.__dict__, "interleaved": True})
    mla = MLASpec(
        kv_lora_rank=d.get("kv_lora_rank", 512),
        qk_nope_head_dim=d.get("qk_nope_head_dim", 128),
        qk_rope_head_dim=d.get("qk_rope_head_dim", 64),
        v_head_dim=d.get("v_head_dim", 128),
        q_lora_rank=d.get("q_lora_rank", 1536),
    )
    qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    scale = qk_head_dim**-0.5
    if rope.type != "default" and rope_params.get("mscale_all_dim") and rope.factor is not None:
        scale *= yarn_mscale(rope.factor, rope_params["mscale_all_dim"]) ** 2
    indexer = IndexerSpec(
        n_heads=d.get("index_n_heads", 64),
        head_dim=d.get("index_head_dim", 128),
        topk=d.get("index_topk", 2048),
        rope_dims=mla.qk_rope_head_dim,
    )
    moe = MoESpec(
        num_experts=d.get("n_routed_experts", 256),
        top_k=d.get("num_experts_per_tok", 8),
        intermediate_size=d.get("moe_intermediate_size", 2048),
        router="biased_topk",
        router_precision="logits_fp32",  # HF DeepseekV32TopkRouter: the logit matmul in float32
        routed_scaling=float(d.get("routed_scaling_factor", 2.5)),
        shared_expert_size=d.get("moe_intermediate_size", 2048) * d.get("n_shared_experts", 1),
        n_group=d.get("n_group", 8),
        topk_group=d.get("topk_group", 4),
    )
    if not d.get("norm_topk_prob", True):
        raise ConfigError([f"{where}.norm_topk_prob = false: only renormalised routing weights are supported"])
    layers = [
        LayerSpec(
            attention="mla",
            num_heads=d.get("num_attention_heads", 128),
            num_kv_heads=1,
            head_dim=qk_head_dim,
            intermediate_size=d.get("intermediate_size", 18432),
            rope=rope,
            attention_bias=bool(d.get("attention_bias", False)),
            attn_scale=scale,
            mla=mla,
            indexer=indexer,
            mlp="moe" if kind == "sparse" else "gated",
            moe=moe if kind == "sparse" else None,
            activation=d.get("hidden_act", "silu"),
        )
        for kind in mlp_types
    ]
    return ModelConfig(
        **model_fields(d, eps=1e-6, max_positions=163840, bos=0, eos=1),
        family=MODEL_TYPE,
        layers=tuple(layers),
        name=name,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``deepseek_v32`` config.json; ``export_config`` checks it round-trips."""
    s = cfg.layers[0]
    m, ix = s.mla, s.indexer
    moe = next((x.moe for x in cfg.layers if x.moe is not None), None) or MoESpec(256, 8, 2048, "biased_topk")
    rope = rope_to_hf(s.rope)
    rope.pop("interleaved", None)
    kinds = ["sparse" if x.mlp == "moe" else "dense" for x in cfg.layers]
    return {
        **hf_fields(cfg, MODEL_TYPE, ARCHITECTURE),
        "intermediate_size": next((x.intermediate_size for x in cfg.layers if x.mlp == "gated"), s.intermediate_size),
        "moe_intermediate_size": moe.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_heads,
        "n_shared_experts": moe.shared_expert_size // moe.intermediate_size,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "norm_topk_prob": True,
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "v_head_dim": m.v_head_dim,
        "index_topk": ix.topk,
        "index_head_dim": ix.head_dim,
        "index_n_heads": ix.n_heads,
        "mlp_layer_types": kinds,
        "first_k_dense_replace": kinds.index("sparse") if "sparse" in kinds else cfg.num_layers,
        "rope_parameters": rope,
        "attention_bias": s.attention_bias,
        "hidden_act": s.activation,
    }
