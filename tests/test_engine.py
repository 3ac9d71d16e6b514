"""The decode engine: grouped-query decode equals the expanded reference, masks are built only when
needed and once per step, no host sync in a decode step, MoE decode without the per-expert loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxlab
from ctxlab.attention import context as context_module
from ctxlab.attention import kernels
from ctxlab.attention.kernels import grouped_attention, sliding_causal_attention
from ctxlab.generate import decode_step, prefill
from ctxlab.nn.moe import Experts
from ctxlab.reporting.measure import tiny_like

from conftest import randomize_


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_decode_equals_sdpa_with_expanded_heads(heads, kv_heads, masked):
    gen = torch.Generator().manual_seed(0)
    B, S, D = 2, 37, 16
    q = torch.randn(B, heads, 1, D, generator=gen)
    k, v = torch.randn(B, kv_heads, S, D, generator=gen), torch.randn(B, kv_heads, S, D, generator=gen)
    mask = None
    if masked:  # left padding: row 1 may not see its first 5 keys
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[1, ..., :5] = False
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3), expected, atol=1e-6, rtol=1e-5)


def count_masks(monkeypatch) -> list:
    calls = []
    real = context_module.attention_mask

    def counting(q_pos, k_pos, window):
        calls.append(window)
        return real(q_pos, k_pos, window)

    monkeypatch.setattr(context_module, "attention_mask", counting)
    return calls


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-sliding"])
def test_decode_without_padding_builds_no_mask(monkeypatch, name):
    model = ctxlab.build_model(ctxlab.load_config(name), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 30)
    logits = prefill(model, ids, cache)
    calls = count_masks(monkeypatch)
    for _ in range(15):  # the sliding layers' rings (window 8) fill and wrap
        logits = decode_step(model, logits.argmax(-1), cache)
    assert calls == []


def test_padded_decode_builds_one_mask_per_layout_per_step(monkeypatch):
    """tiny-qwen3-sliding has full and sliding layers: two key layouts, so two masks a step, whatever
    the number of layers."""
    model = ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), seed=0)
    cache = model.new_cache(2, 20)
    cache.set_left_padding(torch.tensor([0, 3]))
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = prefill(model, ids, cache)
    calls = count_masks(monkeypatch)
    steps = 4
    for _ in range(steps):
        logits = decode_step(model, logits.argmax(-1), cache)
    assert model.config.num_layers > 2
    assert sorted(calls, key=str) == sorted([None, 8] * steps, key=str)


def test_prefill_without_cache_uses_causal_attention_without_a_mask(monkeypatch):
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    calls = count_masks(monkeypatch)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 9)))
    assert calls == []


def test_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """No ``.item()`` / ``.tolist()`` / ``bool(tensor)`` in a decode step of a dense model (tensors
    are on the CPU here, so the reads are caught by making them fail)."""
    model = ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, 20)
    token = prefill(model, ids, cache).argmax(-1)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in a decode step")

    for name in ("item", "tolist", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    decode_step(model, token, cache)


def test_model_call_still_checks_token_ids():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[0, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        ctxlab.generate(model, torch.tensor([[1, -1]]), max_new_tokens=2)


@pytest.mark.parametrize("name", ["laguna-xs2", "zaya1-8b", "deepseek-v4-flash"])
def test_gathered_experts_equal_the_expert_loop(name):
    """The compiled decode path's gathered experts (incl. ZAYA's skip class) == the eager loop over tokens
    grouped by expert == the eager one-token path (each row alone, its experts called directly)."""
    cfg = tiny_like(ctxlab.load_config(name))
    model = ctxlab.build_model(cfg.replace(layers=cfg.layers[:6]), seed=0)
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    gen = torch.Generator().manual_seed(0)
    E = experts.gate_up_proj.shape[0]
    x = torch.randn(3, cfg.hidden_size, generator=gen)
    index = torch.tensor([[0, E], [2, 1], [3, 0]])  # E = the skip class
    weight = torch.rand(3, 2, generator=gen)
    weight = torch.where(index < E, weight, torch.zeros_like(weight))
    with torch.no_grad():
        grouped = experts(x, index, weight)
        torch.testing.assert_close(experts._gathered(x, index, weight), grouped, atol=1e-6, rtol=1e-5)
        one_by_one = torch.cat([experts(x[i : i + 1], index[i : i + 1], weight[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(one_by_one, grouped, atol=1e-6, rtol=1e-5)


def test_decode_uses_the_rope_tables_precomputed_by_the_cache():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    cache = model.new_cache(1, 16)
    rotary = model.model.layers[0].self_attn.rotary
    cos, sin = cache.rope_table(rotary, model.dtype)
    expected_cos, expected_sin = rotary.cos_sin(torch.arange(16)[None], model.dtype)
    assert torch.equal(cos, expected_cos[0, 0]) and torch.equal(sin, expected_sin[0, 0])


def kv_sharing_model() -> ctxlab.CausalLM:
    """Gemma 4 E2B's layer pattern at tiny width (its last 20 of 35 layers read shared K/V), windows of 5."""
    cfg = tiny_like(ctxlab.load_config("gemma4-e2b"))
    cfg = cfg.replace(layers=tuple(dataclasses.replace(s, window=5) if s.window else s for s in cfg.layers))
    return randomize_(ctxlab.build_model(cfg, seed=0))


def test_last_only_runs_the_trailing_kv_readers_on_the_last_token_alone(monkeypatch):
    model = kv_sharing_model()
    readers = [i for i, s in enumerate(model.config.layers) if s.kv_source is not None]
    assert readers == list(range(15, 35))
    lengths = {}

    def recording(i, forward):
        def run(x, ctx):
            lengths[i] = x.shape[1]  # tokens this layer ran on
            return forward(x, ctx)

        return run

    for i, block in enumerate(model.model.layers):
        monkeypatch.setattr(block, "forward", recording(i, block.forward))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 9)), last_only=True)
    assert lengths == {i: 9 if i < 15 else 1 for i in range(35)}


@pytest.mark.parametrize("cached", [False, True])
def test_last_only_logits_equal_the_full_forwards_last_row(cached):
    """Prompts longer than the window (5), a prompt in two chunks: the last row of ``last_only``
    equals the full forward's, and decoding on from that cache stays equal."""
    model = kv_sharing_model()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad():
        full = model(ids)  # [2, 16, V]
        if not cached:
            for t in (1, 3, 12):
                torch.testing.assert_close(model(ids[:, :t], last_only=True), full[:, t - 1 : t], atol=1e-5, rtol=1e-5)
            return
        cache = model.new_cache(2, 16)
        model(ids[:, :7], cache=cache, last_only=True)
        last = model(ids[:, 7:12], cache=cache, last_only=True)
        torch.testing.assert_close(last, full[:, 11:12], atol=1e-5, rtol=1e-5)
        for t in range(12, 16):
            torch.testing.assert_close(model(ids[:, t : t + 1], cache=cache), full[:, t : t + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_last_only_with_left_padding_equals_each_row_alone(chunk):
    """Row 0 has 5 padding tokens; in chunks of 3 its whole first chunk is padding."""
    model = kv_sharing_model()
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 64, (1, 6), generator=gen), torch.randint(0, 64, (1, 11), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        cache = model.new_cache(2, 11)
        cache.set_left_padding(torch.tensor([5, 0]))
        both = prefill(model, batch, cache, chunk_size=chunk)[:, None]  # [2, 1, V]
        torch.testing.assert_close(both[:1], model(short)[:, -1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both[1:], model(long)[:, -1:], atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 300),
    window=st.integers(1, 320),
    block=st.integers(1, 70),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_banded_sliding_attention_equals_the_masked_kernel(tokens, window, block, kv_heads, group, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, kv_heads * group, tokens, 8, generator=gen)
    k, v = torch.randn(2, kv_heads, tokens, 8, generator=gen), torch.randn(2, kv_heads, tokens, 8, generator=gen)
    positions = torch.arange(tokens).expand(2, tokens)
    mask = context_module.attention_mask(positions, positions, window)  # [2, 1, T, T]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.4
    )
    got = sliding_causal_attention(q, k, v, 0.4, window, block)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_windowed_prefill_is_banded_and_builds_no_mask(monkeypatch):
    """A prompt longer than the window of tiny-qwen3-sliding (8): no [T, T] mask, the band kernel runs."""
    model = ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), seed=0)
    calls, banded = count_masks(monkeypatch), []
    real = kernels.sliding_causal_attention
    monkeypatch.setattr(kernels, "sliding_causal_attention", lambda *a, **k: banded.append(a[4]) or real(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cached = model(ids, cache=model.new_cache(1, 40))
    torch.testing.assert_close(cached, full)
    windows = [s.window for s in model.config.layers if s.window is not None]
    assert calls == [] and banded == windows * 2


@settings(max_examples=40, deadline=None)
@given(
    history=st.integers(1, 90),
    tokens=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_prefix_causal_attention_equals_the_masked_kernel(history, tokens, kv_heads, group, transposed, dtype, seed):
    """A chunk after ``history`` cached tokens: two unmasked flash calls merged by log-sum-exp == SDPA over the
    position mask. ``transposed`` queries are views with a strided last axis, as CCA hands them over."""
    gen = torch.Generator().manual_seed(seed)
    S, H = history + tokens, kv_heads * group
    if transposed:
        q = torch.randn(2, H, 8, tokens, generator=gen).to(dtype).transpose(-1, -2)
    else:
        q = torch.randn(2, H, tokens, 8, generator=gen).to(dtype)
    k, v = (torch.randn(2, kv_heads, S, 8, generator=gen).to(dtype) for _ in range(2))
    positions = torch.arange(S).expand(2, S)
    mask = context_module.attention_mask(positions[:, history:], positions, None)  # [2, 1, T, S]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.4
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernels.prefix_causal_attention(q, k, v, 0.4), expected, atol=tol, rtol=tol)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 24),
    keys=st.integers(1, 60),
    heads=st.sampled_from([1, 2, 5]),
    masked=st.booleans(),
    sink_scale=st.sampled_from([0.02, 1.0, 20.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_attention_with_sinks_equals_softmax_over_keys_and_sink(tokens, keys, heads, masked, sink_scale, dtype, seed):
    """The flash kernel rescaled by its log-sum-exp == HF's logits with the sink concatenated, one softmax;
    sharp sinks (scale 20) that take nearly all or nearly none of the weight included."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, tokens, 16, generator=gen).to(dtype)
    kv = torch.randn(2, 1, keys, 16, generator=gen).to(dtype)
    sinks = torch.randn(heads, generator=gen) * sink_scale
    allowed = None
    if masked:  # random visibility; every query keeps at least its first key
        allowed = torch.rand(2, 1, tokens, keys, generator=gen) < 0.6
        allowed[..., 0] = True
    logits = (q.double() @ kv.double().transpose(-1, -2)) * 0.25  # [2, H, T, S]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    with_sink = torch.cat((logits, sinks.double().view(1, -1, 1, 1).expand(2, -1, tokens, 1)), dim=-1)
    expected = with_sink.softmax(dim=-1)[..., :-1] @ kv.double()
    got = kernels.attention_with_sinks(q, kv, allowed, 0.25, sinks)
    assert got.dtype == dtype and got.shape == (2, heads, tokens, 16)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-sliding"])
def test_chunked_prefill_builds_masks_only_for_windowed_layers(monkeypatch, name):
    """A chunk after earlier ones attends to the whole history and itself causally: no [T, S] mask for full
    layers (sliding layers, whose window cuts the history, still build theirs)."""
    model = ctxlab.build_model(ctxlab.load_config(name), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    calls, prefix = count_masks(monkeypatch), []
    real = kernels.prefix_causal_attention
    monkeypatch.setattr(kernels, "prefix_causal_attention", lambda *a: prefix.append(a[0].shape[2]) or real(*a))
    cache = model.new_cache(1, 30)
    with torch.no_grad():
        chunked = torch.cat([model(ids[:, s : s + 10], cache=cache) for s in (0, 10, 20)], dim=1)
        torch.testing.assert_close(chunked, model(ids), atol=1e-5, rtol=1e-5)
    full_layers = sum(s.window is None for s in model.config.layers)
    assert prefix == [10] * (2 * full_layers)  # chunks 2 and 3
    assert set(calls) <= {s.window for s in model.config.layers if s.window is not None}
