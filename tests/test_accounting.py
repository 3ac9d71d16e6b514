"""Accounting: published figures for the real presets, and agreement with built models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import ctxlab

from strategies import model_configs

TINY = ["tiny-llama", "tiny-qwen3-sliding"]


def test_llama3_8b_kv_cache_at_128k_bf16():
    """32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes x 131072 tokens = 16 GiB."""
    cfg = ctxlab.load_config("llama-3-8b")
    assert ctxlab.kv_cache_bytes(cfg, 131072, "bfloat16") == 17_179_869_184
    assert ctxlab.kv_cache_bytes(cfg, 1, "bfloat16", convention="naive") == 131_072  # Gallery: 128 KiB/token


def test_published_parameter_totals():
    """Llama-3-8B 8,030,261,248 (HF model page); Qwen3-8B 8.2B total, 6.95B non-embedding (model card)."""
    assert ctxlab.count_params(ctxlab.load_config("llama-3-8b"))["total"] == 8_030_261_248
    qwen = ctxlab.count_params(ctxlab.load_config("qwen3-8b"))
    assert round(qwen["total"] / 1e9, 1) == 8.2
    assert round(qwen["non_embedding"] / 1e9, 2) == 6.95


def test_qwen3_8b_kv_per_token():
    """36 layers x 8 KV heads x 128 x 2 x 2 bytes = 144 KiB per token in bf16."""
    cfg = ctxlab.load_config("qwen3-8b")
    assert ctxlab.kv_cache_bytes(cfg, 1, "bfloat16") == 36 * 8 * 128 * 2 * 2


@pytest.mark.parametrize("name", TINY)
def test_count_params_equals_built_model(name):
    cfg = ctxlab.load_config(name)
    model = ctxlab.build_model(cfg)
    counts = ctxlab.count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert counts["embedding"] == model.model.embed_tokens.weight.numel()


@settings(max_examples=60, deadline=None)
@given(cfg=model_configs())
def test_count_params_equals_built_model_for_random_configs(cfg):
    """Biases, q/k norms, tied heads and consumers without K/V projections, all counted right."""
    assert ctxlab.count_params(cfg)["total"] == sum(p.numel() for p in ctxlab.build_model(cfg).parameters())


def sdpa_with_gqa(query, key, value, *args, out_shape=None, **kwargs):
    """torch's own SDPA FLOP formula, with K/V expanded to the query heads (what GQA computes)."""
    heads = query[1]
    return sdpa_flop_count(query, (key[0], heads, *key[2:]), (value[0], heads, *value[2:]))


def measured_decode_flops(model, prompt_len):
    """FLOPs of one decode step after a prompt, counted by FlopCounterMode (CPU SDPA included)."""
    cache = model.new_cache(1, prompt_len + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + 1))
    with torch.no_grad():
        if prompt_len:
            model(ids[:, :-1], cache=cache)
        counter = FlopCounterMode(
            display=False,
            custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_with_gqa},
        )
        with counter:
            model(ids[:, -1:], cache=cache)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("prompt_len", [0, 7, 8, 30])  # 0: the first token, into an empty cache
def test_decode_flops_matches_flop_counter(name, prompt_len):
    """The analytic decode FLOPs equal what torch counts on a real one-token decode."""
    cfg = ctxlab.load_config(name)
    assert ctxlab.decode_flops(cfg, prompt_len) == measured_decode_flops(ctxlab.build_model(cfg), prompt_len)


@settings(max_examples=30, deadline=None)
@given(cfg=model_configs(), first_token=st.booleans())
def test_decode_flops_matches_flop_counter_for_random_configs(cfg, first_token):
    """Past every window, or the first token into an empty cache (CCA then also projects a zero token)."""
    prompt_len = 0 if first_token else max(s.window or 1 for s in cfg.layers) + 2
    assert ctxlab.decode_flops(cfg, prompt_len) == measured_decode_flops(ctxlab.build_model(cfg), prompt_len)


def test_decode_flops_terms_add_up_and_grow_with_context():
    cfg = ctxlab.load_config("llama-3-8b")
    terms = ctxlab.decode_flops_terms(cfg, 131072)
    assert sum(terms.values()) == ctxlab.decode_flops(cfg, 131072)
    # attention term: 32 layers x 32 heads x 128 dims x (q.k and p.v) x 2 FLOPs x 131073 keys
    assert terms["attention"] == 32 * 32 * 128 * 2 * 2 * 131073
    assert ctxlab.decode_flops(cfg, 1024) < ctxlab.decode_flops(cfg, 131072)


def test_naive_convention_ignores_windows_and_sharing():
    cfg = ctxlab.load_config("tiny-qwen3-sliding")  # 2 sliding (window 8) + 2 global layers
    per_token = 4 * 1 * 16 * 2 * 2  # layers x kv heads x head_dim x (K, V) x bf16
    assert ctxlab.kv_cache_bytes(cfg, 1000, "bfloat16", convention="naive") == 1000 * per_token
    assert ctxlab.kv_cache_bytes(cfg, 1000, "bfloat16") == (2 * 1000 + 2 * 8) * per_token // 4
    with pytest.raises(ValueError, match="convention"):
        ctxlab.kv_cache_bytes(cfg, 10, convention="gallery")


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_batch_sizes_that_are_not_positive_integers_are_refused(batch_size):
    from ctxlab.accounting.formats import kv_cache_bytes_stored
    from ctxlab.reporting.published import DEPLOYED_FORMATS

    name, fmt = next(iter(DEPLOYED_FORMATS.items()))
    cfg = ctxlab.load_config(name)
    for measure in (
        lambda: ctxlab.kv_cache_bytes(cfg, 16, batch_size=batch_size),
        lambda: kv_cache_bytes_stored(cfg, 16, fmt, batch_size=batch_size),
    ):
        with pytest.raises(ctxlab.InputError, match=f"batch_size = {batch_size!r}: must be a positive integer"):
            measure()
