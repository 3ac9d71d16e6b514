"""DeepSeek V4 (Pro, Flash; HF ``DeepseekV4ForCausalLM``): mHC residual streams around compressed
attention (sliding-window, CSA and HCA layers from ``compress_ratios``), and an all-MoE FFN
(hash-routed first layers, then sqrt-softplus routing with a selection bias; one clamped shared
expert).

Wiring only. Use the checkpoints' ``compress_ratios`` (one per layer plus a trailing 0 for the
MTP layer, which is dropped): transformers' default schedule without it is one layer off from
the released models (deepseek.md §1.1). Checkpoints use DeepSeek's own tensor names, which
transformers also writes back; ``KEY_MAP`` maps ours to theirs and back. The MTP layer's
weights (``mtp.*``) are skipped.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..config import CompressSpec, IndexerSpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from ..errors import ConfigError
from .hf_fields import check_per_layer, fill_scaled_rope, hf_fields, model_fields, parse_rope, require, rope_to_hf
from .keymap import KeyMap

log = logging.getLogger("ctxlab")

MODEL_TYPE = "deepseek_v4"
ARCHITECTURE = "DeepseekV4ForCausalLM"
LAYER_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
MLP_TYPES = ("hash_moe", "moe")
DROPPED = "the multi-token-prediction (MTP) layer, not used for next-token decoding"
EXPERTS_PER_TENSOR = True
EXPERT_NAMES = ("w1", "w3", "w2")
_L = "model.layers.{}"
KEY_MAP = KeyMap(  # ours -> DeepSeek's (transformers' conversion_mapping "deepseek_v4" reads and writes these)
    {
        f"{_L}.input_layernorm": f"{_L}.attn_norm",
        f"{_L}.post_attention_layernorm": f"{_L}.ffn_norm",
        f"{_L}.self_attn": f"{_L}.attn",
        f"{_L}.self_attn.sinks": f"{_L}.attn.attn_sink",
        f"{_L}.self_attn.q_a_proj": f"{_L}.attn.wq_a",
        f"{_L}.self_attn.q_a_norm": f"{_L}.attn.q_norm",
        f"{_L}.self_attn.q_b_proj": f"{_L}.attn.wq_b",
        f"{_L}.self_attn.kv_proj": f"{_L}.attn.wkv",
        f"{_L}.self_attn.kv_norm": f"{_L}.attn.norm",
        f"{_L}.self_attn.o_a_proj": f"{_L}.attn.wo_a",
        f"{_L}.self_attn.o_b_proj": f"{_L}.attn.wo_b",
        f"{_L}.self_attn.compressor.position_bias": f"{_L}.attn.compressor.ape",
        f"{_L}.self_attn.compressor.kv_proj": f"{_L}.attn.compressor.wkv",
        f"{_L}.self_attn.compressor.gate_proj": f"{_L}.attn.compressor.wgate",
        f"{_L}.self_attn.compressor.kv_norm": f"{_L}.attn.compressor.norm",
        f"{_L}.self_attn.compressor.indexer": f"{_L}.attn.indexer",
        f"{_L}.self_attn.compressor.indexer.position_bias": f"{_L}.attn.indexer.compressor.ape",
        f"{_L}.self_attn.compressor.indexer.kv_proj": f"{_L}.attn.indexer.compressor.wkv",
        f"{_L}.self_attn.compressor.indexer.gate_proj": f"{_L}.attn.indexer.compressor.wgate",
        f"{_L}.self_attn.compressor.indexer.kv_norm": f"{_L}.attn.indexer.compressor.norm",
        f"{_L}.self_attn.compressor.indexer.q_b_proj": f"{_L}.attn.indexer.wq_b",
        f"{_L}.mlp": f"{_L}.ffn",
        f"{_L}.mlp.gate.e_score_correction_bias": f"{_L}.ffn.gate.bias",
        f"{_L}.mlp.shared_experts.gate_proj": f"{_L}.ffn.shared_experts.w1",
        f"{_L}.mlp.shared_experts.down_proj": f"{_L}.ffn.shared_experts.w2",
        f"{_L}.mlp.shared_experts.up_proj": f"{_L}.ffn.shared_experts.w3",
        f"{_L}.attn_hc.fn": f"{_L}.hc_attn_fn",
        f"{_L}.attn_hc.base": f"{_L}.hc_attn_base",
        f"{_L}.attn_hc.scale": f"{_L}.hc_attn_scale",
        f"{_L}.ffn_hc.fn": f"{_L}.hc_ffn_fn",
        f"{_L}.ffn_hc.base": f"{_L}.hc_ffn_base",
        f"{_L}.ffn_hc.scale": f"{_L}.hc_ffn_scale",
        "lm_head": "head",
    }
)


def checkpoint_key(name: str) -> str | None:
    """Tensors of the MTP layer (``mtp.*`` at any depth, as transformers ignores them) are not ours."""
    return None if re.search(r"(^|\.)mtp\.", name) else name


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "deepseek_v4 config"
    require(d, ["vocab_size", "hidden_size", "num_hidden_layers"], where)
    n = d["num_hidden_layers"]
    layer_types = _layer_types(d, n, where)
    mlp_types = list(d.get("mlp_layer_types") or [])[:n] or (
        ["hash_moe"] * min(n, d.get("num_hash_layers", 3)) + ["moe"] * max(0, n - d.get("num_hash_layers", 3))
    )
    check_per_layer(where, n, mlp_layer_types=(mlp_types, MLP_TYPES))
    head_dim = d.get("head_dim", 512)
    if d.get("n_shared_experts", 1) != 1:
        log.warning(
            "%s: n_shared_experts = %s is not read: transformers' DeepSeek V4 builds one shared expert of "
            "moe_intermediate_size",
            where,
            d["n_shared_experts"],
        )
    # HF DeepseekV4Config: a legacy qk_rope_head_dim / head_dim, else its default 64 / 512 (whatever head_dim is)
    partial = d.get("partial_rotary_factor") or (
        d["qk_rope_head_dim"] / head_dim if d.get("qk_rope_head_dim") is not None else 64 / 512
    )
    rope = _rope(d, partial, where)
    rates = {
        **{"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        **(d.get("compress_rates") or {}),
    }
    moe = dict(
        num_experts=d.get("n_routed_experts", 256),
        top_k=d.get("num_experts_per_tok", 6),
        intermediate_size=d.get("moe_intermediate_size", 2048),
        routed_scaling=float(d.get("routed_scaling_factor", 1.5)),
        # HF DeepseekV4MLP: one shared expert of moe_intermediate_size, whatever n_shared_experts says
        shared_expert_size=d.get("moe_intermediate_size", 2048),
        score_fn=d.get("scoring_func", "sqrtsoftplus"),
        router_precision="scores_model_dtype",  # HF DeepseekV4TopKRouter: scores in the model dtype
    )
    indexer = IndexerSpec(
        n_heads=d.get("index_n_heads", 64),
        head_dim=d.get("index_head_dim", 128),
        topk=d.get("index_topk", 512),
        rope_dims=int(head_dim * partial),
    )
    layers = []
    for kind, mlp in zip(layer_types, mlp_types):
        ratio = 0 if kind == "sliding_attention" else rates[kind]
        csa = kind == "compressed_sparse_attention"
        layers.append(
            LayerSpec(
                attention="compressed",
                num_heads=d.get("num_attention_heads", 64),
                num_kv_heads=1,
                head_dim=head_dim,
                intermediate_size=moe["intermediate_size"],
                window=d.get("sliding_window", 128),
                rope=rope["main" if ratio == 0 else "compress"],
                compress=CompressSpec(
                    ratio=ratio,
                    q_lora_rank=d.get("q_lora_rank", 1024),
                    o_groups=d.get("o_groups", 8),
                    o_lora_rank=d.get("o_lora_rank", 1024),
                    overlap=csa,
                ),
                indexer=indexer if csa else None,
                mlp="moe",
                moe=MoESpec(**moe, router="hash" if mlp == "hash_moe" else "biased_topk"),
                swiglu_limit=d.get("swiglu_limit", 10.0),
                activation=d.get("hidden_act", "silu"),
                block="hyper",
            )
        )
    return ModelConfig(
        **model_fields(d, eps=1e-6, max_positions=1048576, bos=0, eos=1),
        family=MODEL_TYPE,
        layers=tuple(layers),
        residual="mhc",
        hc_mult=d.get("hc_mult", 4),
        hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20),
        hc_eps=float(d.get("hc_eps", 1e-6)),
        name=name,
    )


def _layer_types(d: dict[str, Any], n: int, where: str) -> list[str]:
    if d.get("layer_types"):
        types = list(d["layer_types"])[:n]
    elif d.get("compress_ratios") is not None:  # one per layer + the MTP layer's trailing entry
        unknown = sorted({r for r in d["compress_ratios"] if r not in LAYER_TYPES})
        if unknown:
            raise ConfigError([f"{where}.compress_ratios contains {unknown}: allowed {sorted(LAYER_TYPES)}"])
        types = [LAYER_TYPES[r] for r in d["compress_ratios"][:n]]
    else:  # transformers' default schedule (matches no released model)
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))
        ]
    check_per_layer(where, n, layer_types=(types, tuple(LAYER_TYPES.values())))
    return types


def _rope(d: dict[str, Any], partial: float, where: str) -> dict[str, RopeSpec]:
    """``main`` (sliding layers) and ``compress`` (CSA/HCA layers) rope, both interleaved on the last dims."""
    params = d.get("rope_parameters") or {}
    if not (isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)):
        yarn = {k: v for k, v in (d.get("rope_scaling") or params).items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        compress = {**yarn, "rope_theta": d.get("compress_rope_theta", 160000.0)}
        compress.setdefault("rope_type", compress.pop("type", "default"))
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        params = {"main": main, "compress": compress}
    out = {}
    for key in ("main", "compress"):
        p = {k: v for k, v in params[key].items() if k != "type"}
        if "type" in params[key]:  # the legacy key, read when rope_type is absent (standardize_rope_params)
            p.setdefault("rope_type", params[key]["type"])
        p = fill_scaled_rope(p, d.get("max_position_embeddings"))
        p["partial_rotary_factor"] = partial
        spec = parse_rope(p, f"{where}.rope_parameters.{key}")
        out[key] = RopeSpec(**{**spec.__dict__, "interleaved": True})
    return out


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``deepseek_v4`` config.json; ``export_config`` checks it round-trips."""
    s = cfg.layers[0]
    csa = next((x for x in cfg.layers if x.indexer is not None), None)
    main = next((x.rope for x in cfg.layers if x.compress.ratio == 0), s.rope)
    compress = next((x.rope for x in cfg.layers if x.compress.ratio), s.rope)
    kinds = [
        "sliding_attention"
        if x.compress.ratio == 0
        else "compressed_sparse_attention"
        if x.compress.overlap
        else "heavily_compressed_attention"
        for x in cfg.layers
    ]
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    rates.update({t: x.compress.ratio for x, t in zip(cfg.layers, kinds) if x.compress.ratio})
    m = s.moe
    ix = csa.indexer if csa else IndexerSpec(64, 128, 512, s.rotary_dim)
    return {
        **hf_fields(cfg, MODEL_TYPE, ARCHITECTURE),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": 1,
        "head_dim": s.head_dim,
        "partial_rotary_factor": s.rope.partial_rotary_factor,
        "q_lora_rank": s.compress.q_lora_rank,
        "o_groups": s.compress.o_groups,
        "o_lora_rank": s.compress.o_lora_rank,
        "sliding_window": s.window,
        "layer_types": kinds,
        "compress_rates": rates,
        "mlp_layer_types": ["hash_moe" if x.moe.router == "hash" else "moe" for x in cfg.layers],
        "rope_parameters": {"main": rope_to_hf(main), "compress": rope_to_hf(compress)},
        "index_n_heads": ix.n_heads,
        "index_head_dim": ix.head_dim,
        "index_topk": ix.topk,
        "n_routed_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "moe_intermediate_size": m.intermediate_size,
        "n_shared_experts": m.shared_expert_size // m.intermediate_size,
        "routed_scaling_factor": m.routed_scaling,
        "scoring_func": m.score_fn,
        "swiglu_limit": s.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "hidden_act": s.activation,
    }
