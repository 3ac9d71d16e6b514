"""Hypothesis strategies for small random ctxlab configs (GQA, windows, KV sharing, rope types)."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from ctxlab import LayerSpec, ModelConfig, RopeSpec
from ctxlab.config import MoESpec

ROPES = [
    RopeSpec(),
    RopeSpec(type="yarn", theta=10_000.0, factor=4.0, original_max_position_embeddings=16),
    RopeSpec(
        type="llama3",
        theta=500_000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
    RopeSpec(theta=10_000.0, partial_rotary_factor=0.5),
    RopeSpec(type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25),
]


@st.composite
def layer_specs(draw, kv_heads: int, head_dim: int, rope: RopeSpec) -> LayerSpec:
    attention = draw(st.sampled_from(["gqa", "gqa", "cca"]))
    block = draw(st.sampled_from(["pre_norm", "sandwich", "scaled_residual"]))
    mlp = draw(st.sampled_from(["gated", "gated", "moe"]))
    moe = None
    if mlp == "moe" or (block == "sandwich" and draw(st.booleans())):
        experts = draw(st.integers(1, 4))
        moe = MoESpec(
            num_experts=experts,
            top_k=draw(st.integers(1, experts)),
            intermediate_size=8,
            router=draw(st.sampled_from(["softmax_topk", "biased_topk"])),
            routed_scaling=draw(st.sampled_from([1.0, 2.5])),
            shared_expert_size=draw(st.sampled_from([0, 4])),
        )
    gqa_only = attention == "gqa"
    return LayerSpec(
        attention=attention,
        conv_kernels=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        block=block,
        mlp=mlp,
        moe=moe,
        output_gate=draw(st.sampled_from([None, "per_head", "per_element"])) if gqa_only else None,
        layer_scalar=draw(st.booleans()),
        v_norm=draw(st.booleans()) and gqa_only,
        k_eq_v=draw(st.booleans()) and gqa_only,
        activation=draw(st.sampled_from(["silu", "gelu_pytorch_tanh"])),
        num_heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=draw(st.sampled_from([8, 24])),
        window=draw(st.sampled_from([None, None, 1, 2, 3, 5, 8])),
        rope=rope,
        qk_norm=draw(st.booleans()) and gqa_only,
        attention_bias=draw(st.booleans()),
    )


@st.composite
def model_configs(draw, max_layers: int = 4, sharing: bool = True) -> ModelConfig:
    """1-4 layers; each layer its own heads/window; some layers may read an earlier producer's K/V."""
    kv_heads = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    rope = draw(st.sampled_from(ROPES))
    n = draw(st.integers(1, max_layers))
    residual_fp32 = draw(st.booleans())
    layers = [draw(layer_specs(kv_heads, head_dim, rope)) for _ in range(n)]
    if sharing:
        for i in range(1, n):
            if layers[i].attention == "gqa" and draw(st.integers(0, 2)) == 0:  # some later layers consume
                producers = [j for j in range(i) if layers[j].kv_source is None and layers[j].attention == "gqa"]
                if not producers:
                    continue
                src = draw(st.sampled_from(producers))
                layers[i] = dataclasses.replace(
                    layers[i],
                    kv_source=src,
                    window=layers[src].window,
                    v_norm=layers[src].v_norm,
                    num_kv_heads=layers[src].num_kv_heads,
                )
    vocab = draw(st.sampled_from([17, 64]))
    ple = draw(st.sampled_from([0, 0, 4]))
    return ModelConfig(
        per_layer_input_size=ple,
        input_affine=draw(st.booleans()),
        residual_fp32=residual_fp32,
        per_layer_vocab_size=vocab if ple else None,
        embedding_scale=draw(st.sampled_from([None, 2.5])),
        family="test",
        vocab_size=vocab,
        hidden_size=draw(st.sampled_from([8, 16])),
        layers=tuple(layers),
        tie_word_embeddings=draw(st.booleans()),
        final_logit_softcap=draw(st.sampled_from([None, 5.0])),
    )
