"""Hypothesis strategies for small random ctxlab configs (GQA, windows, KV sharing, rope types)."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from ctxlab import LayerSpec, ModelConfig, RopeSpec
from ctxlab.config import MoESpec

ROPES = [
    RopeSpec(),
    RopeSpec(type="yarn", theta=10_000.0, factor=4.0, original_max_position_embeddings=16),
    RopeSpec(type="llama3", theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=16),
    RopeSpec(theta=10_000.0, partial_rotary_factor=0.5),
    RopeSpec(type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25),
]  # fmt: skip


@st.composite
def layer_specs(draw, kv_heads: int, head_dim: int, rope: RopeSpec) -> LayerSpec:
    block = draw(st.sampled_from(["pre_norm", "sandwich"]))
    moe = None
    if block == "sandwich" and draw(st.booleans()):
        experts = draw(st.integers(1, 4))
        moe = MoESpec(num_experts=experts, top_k=draw(st.integers(1, experts)), intermediate_size=8)
    return LayerSpec(
        block=block,
        moe=moe,
        layer_scalar=draw(st.booleans()),
        v_norm=draw(st.booleans()),
        k_eq_v=draw(st.booleans()),
        activation=draw(st.sampled_from(["silu", "gelu_pytorch_tanh"])),
        num_heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=draw(st.sampled_from([8, 24])),
        window=draw(st.sampled_from([None, None, 1, 2, 3, 5, 8])),
        rope=rope,
        qk_norm=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
    )


@st.composite
def model_configs(draw, max_layers: int = 4, sharing: bool = True) -> ModelConfig:
    """1-4 layers; each layer its own heads/window; some layers may read an earlier producer's K/V."""
    kv_heads = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    rope = draw(st.sampled_from(ROPES))
    n = draw(st.integers(1, max_layers))
    layers = [draw(layer_specs(kv_heads, head_dim, rope)) for _ in range(n)]
    if sharing:
        for i in range(1, n):
            if draw(st.integers(0, 2)) == 0:  # about a third of later layers become consumers
                producers = [j for j in range(i) if layers[j].kv_source is None]
                src = draw(st.sampled_from(producers))
                layers[i] = dataclasses.replace(
                    layers[i], kv_source=src, window=layers[src].window, v_norm=layers[src].v_norm
                )
    vocab = draw(st.sampled_from([17, 64]))
    ple = draw(st.sampled_from([0, 0, 4]))
    return ModelConfig(
        per_layer_input_size=ple,
        per_layer_vocab_size=vocab if ple else None,
        embedding_scale=draw(st.sampled_from([None, 2.5])),
        family="test",
        vocab_size=vocab,
        hidden_size=draw(st.sampled_from([8, 16])),
        layers=tuple(layers),
        tie_word_embeddings=draw(st.booleans()),
        final_logit_softcap=draw(st.sampled_from([None, 5.0])),
    )
