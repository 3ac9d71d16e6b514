"""ZAYA1: compressed convolutional attention with its decode state, residual scaling, the EDA router.

Tiny random ``ZayaForCausalLM`` models (every parameter randomised, key temperature, residual
scales/biases and the embedding affine included; router balancing biases calibrated so that
every class, "skip" included, receives tokens) are compared with ctxlab in fp32, eager attention.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ctxlab
from ctxlab.attention import cca
from ctxlab.attention.cca import depthwise_conv1d, grouped_conv1d

from conftest import assert_chunked_decode_matches, assert_matches_reference, assert_round_trip, randomize_

TOL = 1e-4
SEQ = 24
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=1,
    router_hidden_size=16,
    cca_time0=2,
    cca_time1=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={
        "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
    },
)
CASES = {
    "cca-k2-k2": {},
    "cca-k3-k2-bias-mha-sliding": dict(
        cca_time0=3,
        num_key_value_heads=4,
        attention_bias=True,
        layer_types=["hybrid", "hybrid_sliding", "hybrid"],
        sliding_window=6,
    ),
    "cca-gqa4-k1-k3": dict(num_attention_heads=8, cca_time0=1, cca_time1=3),
}


def calibrate_router_biases_(model, ids):
    """Layer by layer, centre each router's probabilities so every class (skip too) gets tokens."""
    for layer in model.model.layers:
        seen = {}
        hook = layer.mlp.gate.router_mlp.register_forward_hook(lambda m, i, out: seen.update(p=out.softmax(-1)))
        with torch.no_grad():
            model(ids)
        hook.remove()
        probs = seen["p"].reshape(-1, seen["p"].shape[-1]).float()
        layer.mlp.gate.balancing_biases.copy_(-probs.mean(0))


def hf_zaya(hf, case, seed=0):
    if not hasattr(hf, "ZayaForCausalLM"):
        pytest.skip("this transformers has no ZAYA")
    torch.manual_seed(seed)
    model = hf.ZayaForCausalLM(hf.ZayaConfig(**{**BASE, **CASES[case]}))
    model.config._attn_implementation = "eager"
    randomize_(model, seed=seed, std=0.15)  # every parameter: temp, residual scales and biases, affine, convs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(0.5 + torch.rand(p.shape))  # key temperature: not zero (zero = uniform attention)
    calibrate_router_biases_(model, torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(9)))
    return model.eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_zaya(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path), tmp_path


def routed_classes(model, ids):
    """The router classes chosen in each layer for ``ids`` (ctxlab model)."""
    chosen = []
    hooks = [
        b.mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(set(out[0].flatten().tolist())))
        for b in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return chosen


def test_logits_and_greedy_tokens_match_transformers(pair):
    ref, ours, _ = pair
    ids = torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(9))
    classes = routed_classes(ours, ids)
    assert any(4 in c for c in classes), "the skip class is never chosen: the test would not cover it"
    assert all(len(c) >= 3 for c in classes), f"routing collapsed: {classes}"
    assert_matches_reference(ref, ours, ids, 5, 12)


def test_save_pretrained_loads_back_in_transformers(pair, hf, tmp_path_factory):
    ref, ours, _ = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))

    def restore_balancing_biases(back, out):
        """transformers' ZAYA loader resets balancing_biases[-1] to -1 after loading (spec, parity notes)."""
        back.load_state_dict(load_file(out / "model.safetensors"), strict=False)

    assert_round_trip(
        hf, ref, ours, tmp_path_factory.mktemp("ours"), ids, fix=restore_balancing_biases, attn_implementation="eager"
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 17])
def test_chunked_prefill_then_decode_equals_full_forward(pair, chunk):
    """The conv window and the delayed value cross chunk boundaries."""
    _, ours, _ = pair
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    prefill = 20
    assert_chunked_decode_matches(
        ours, ids, [chunk] * (prefill // chunk) + ([prefill % chunk] if prefill % chunk else [])
    )


def test_batch_of_prompts_of_different_lengths(pair):
    """Left padding is invisible: each row generates what it generates alone."""
    _, ours, _ = pair
    prompts = [[5, 9, 11, 40, 7, 3, 90], [17, 4], [60, 61, 62, 63]]
    together = ctxlab.generate(ours, prompts, max_new_tokens=8, eos_token_id=[])
    alone = [ctxlab.generate(ours, [p], max_new_tokens=8, eos_token_id=[])[0] for p in prompts]
    assert together == alone


def test_cache_holds_latent_kv_plus_fixed_state():
    """1024 B per token per layer in bf16 (5.000 GiB at 128K) plus 215,040 B of conv/delayed-value state."""
    cfg = ctxlab.load_config("zaya1-8b")
    n = 131072
    per_layer = ctxlab.kv_cache_bytes_per_layer(cfg, n, "bfloat16")
    state = (1280 * 2 + 128) * 2  # conv window (C = 1280 channels x 2 columns) + previous delayed value
    assert per_layer == [1024 * n + state] * 40
    assert ctxlab.kv_cache_bytes(cfg, n, "bfloat16") - 40 * state == 5 * 2**30
    assert 40 * state == 215_040
    growth = ctxlab.kv_cache_bytes(cfg, 2000, "bfloat16") - ctxlab.kv_cache_bytes(cfg, 1000, "bfloat16")
    assert growth == 40 * 1024 * 1000  # the state does not grow with the context


def test_published_parameter_counts():
    """Spec §3: 8,840,488,784 total; 1,290,741,584 active (753.6M without the embedding; "760M active")."""
    p = ctxlab.count_params(ctxlab.load_config("zaya1-8b"))
    assert p["total"] == 8_840_488_784
    assert p["active"] == 1_290_741_584
    assert round((p["active"] - p["embedding"]) / 1e6, 1) == 753.6


def test_decode_flops_match_flop_counter():
    """CCA's conv is counted as torch counts it; attention term = 4·H_q·d·keys."""
    from test_accounting import measured_decode_flops

    cfg = ctxlab.load_config("zaya1-8b").replace(
        vocab_size=64,
        hidden_size=32,
        eos_token_id=(2,),
        layers=tuple(
            ctxlab.LayerSpec(
                **{
                    **s.__dict__,
                    "num_heads": 4,
                    "num_kv_heads": 2,
                    "head_dim": 8,
                    "intermediate_size": 16,
                    "moe": ctxlab.config.MoESpec(
                        **{**s.moe.__dict__, "router_hidden_size": 8, "intermediate_size": 16, "num_experts": 4}
                    ),
                }
            )
            for s in ctxlab.load_config("zaya1-8b").layers[:2]
        ),
    )
    model = ctxlab.build_model(cfg)
    with torch.no_grad():  # make sure no token is routed to "skip", so every expert matmul runs
        for b in model.model.layers:
            b.mlp.gate.balancing_biases[-1] = -10.0
    assert ctxlab.decode_flops(cfg, 9) == measured_decode_flops(model, 9)
    attention = ctxlab.decode_flops_terms(ctxlab.load_config("zaya1-8b"), 131071)["attention"]
    assert round(attention / 1e9, 3) == 21.475  # 4 x 8 x 128 x 131072 x 40


def test_report_puts_cca_beside_gqa_and_mla_of_the_same_width():
    """Spec §3 table: KV bytes per token per layer and attention FLOPs at 128K vs MHA / GQA / MLA."""
    from ctxlab.reporting.rows import baseline_rows

    rows = {r["attention"]: r for r in baseline_rows("zaya1-8b", 131071, "bfloat16")}
    per_token = {k: r["kv_bytes_per_token_per_layer"] for k, r in rows.items()}
    assert per_token == {
        "zaya1-8b": 1024,
        "MHA (16q/16kv)": 8192,
        "GQA (16q/4kv)": 2048,
        "GQA (16q/2kv)": 1024,
        "MLA (16 heads, latent 512 + rope 64)": 1152,
    }
    gflops = {k: round(r["attention_flops"] / 1e9, 3) for k, r in rows.items()}
    assert gflops["zaya1-8b"] == 21.475 and gflops["GQA (16q/4kv)"] == 42.950
    assert gflops["MLA (16 heads, latent 512 + rope 64)"] == 182.536  # absorbed decode: 2·16·(576+512)·S·40


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 5),
    in_per_group=st.integers(1, 6),
    out_per_group=st.integers(1, 6),
    kernel=st.integers(1, 4),
    extra=st.integers(0, 9),  # windows beyond the first
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_conv1d_is_the_convolution(batch, groups, in_per_group, out_per_group, kernel, extra, bias, seed):
    """CCA's convolutions as batched matmuls on channels-last input (``cca.grouped_conv1d``) == ``nn.Conv1d``
    (depthwise included), with windows gathered channel-major (few positions) and position-major (many)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv1d(groups * in_per_group, groups * out_per_group, kernel, groups=groups, bias=bias).double()
    x = torch.randn(batch, kernel + extra, groups * in_per_group, dtype=torch.float64)  # [B, L, C]
    expected = conv(x.mT).mT
    torch.testing.assert_close(grouped_conv1d(x, conv), expected, rtol=1e-12, atol=1e-12)
    with patch.object(cca, "POSITION_MAJOR_FROM", -1 if extra + 1 <= cca.POSITION_MAJOR_FROM else 10**6):
        torch.testing.assert_close(grouped_conv1d(x, conv), expected, rtol=1e-12, atol=1e-12)  # the other order


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 40),
    kernel=st.integers(1, 4),
    extra=st.integers(0, 9),  # columns beyond the first window
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_depthwise_conv1d_is_the_convolution(batch, channels, kernel, extra, bias, dtype, seed):
    """CCA's depthwise stage as shifted multiply-adds (``cca.depthwise_conv1d``) == ``nn.Conv1d``: float32 sums
    (float64 kept) rounded once to the input's dtype, within that dtype's rounding of the convolution."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias).double()
    x = torch.randn(batch, kernel + extra, channels, dtype=torch.float64)  # [B, L, C]
    out = depthwise_conv1d(x.to(dtype), conv.to(dtype))
    assert out.dtype == dtype and out.shape == (batch, extra + 1, channels)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    expected = conv.double()(x.to(dtype).double().mT).mT
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
