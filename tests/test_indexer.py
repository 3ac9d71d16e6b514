"""The lightning indexer's selection (ctxlab/attention/dsa.py), shared by DSA and CSA: the top-k by int64 keys
(:func:`best_first`) against the stable sort it replaces, and the native scorer ``ctxlab::indexer_scores``
(``ctxlab/csrc/indexer.cpp``) against the float32 matmul and einsum it replaces at a decode step.

The scorer needs an x86 CPU with AVX512-BF16 and a C++ compiler; where either is absent its tests are skipped
(the indexer then keeps the PyTorch scores, which every other test covers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ctxlab
from ctxlab import native
from ctxlab.attention import dsa
from ctxlab.reporting.measure import tiny_like

needs_kernel = pytest.mark.skipif(
    not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here"
)


def stable_sort_topk(index: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(index, dim=-1, descending=True, stable=True).indices[..., :k]


def pytorch_scores(q, keys, weights):
    """The indexer's scores as dsa.py computes them without the kernel: [B, T, S] float32."""
    n_heads, head_dim = q.shape[1], q.shape[-1]
    scores = F.relu(q.float() @ keys.float().transpose(-1, -2) * head_dim**-0.5)
    return torch.einsum("bth,bhts->bts", weights.float() * n_heads**-0.5, scores)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    length=st.integers(1, 3000),
    k=st.integers(1, 600),
    levels=st.sampled_from([0, 3, 1000]),  # 0: continuous scores; else rounded to few values (many ties)
    masked=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@example(rows=1, length=16384, k=512, levels=0, masked=0.0, seed=0)  # a CSA decode step at 64K tokens
def test_best_first_equals_the_stable_sort(rows, length, k, levels, masked, seed):
    """Largest first, ties to the earlier position, -inf (masked keys) last, -0.0 tied with +0.0."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randn(rows, length, generator=gen) * 10
    if levels:
        index = (index * levels / 10).round()
    index = torch.where(index == 0, -index, index)  # signed zeros
    index[torch.rand(rows, length, generator=gen) < masked] = float("-inf")
    k = min(k, length)
    assert torch.equal(dsa.best_first(index, k), stable_sort_topk(index, k))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 8),
    tokens=st.integers(1, dsa.DECODE_TOKENS),
    keys=st.one_of(st.integers(1, 40), st.integers(500, 2100)),
    head_dim=st.sampled_from([8, 40, 64, 128]),
    scale=st.sampled_from([0.1, 1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_native_scores_equal_the_float32_matmul(batch, heads, tokens, keys, head_dim, scale, seed):
    """Exact bf16 products, float32 sums in another order: within a few ulps of PyTorch's scores. The keys are
    read in place from a cache-like buffer longer than they are."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, heads, tokens, head_dim, generator=gen) * scale).bfloat16()
    buffer = torch.randn(batch, 1, keys + 7, head_dim, generator=gen).bfloat16()
    k = buffer[:, :, :keys]
    w = torch.randn(batch, tokens, heads, generator=gen).bfloat16()
    out = torch.ops.ctxlab.indexer_scores(q, k, (w.float() * heads**-0.5).contiguous(), head_dim**-0.5)
    expected = pytorch_scores(q, k, w)
    bound = pytorch_scores(q.abs(), k.abs(), w.abs())  # the size of the sums' terms
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert ((out - expected).abs() <= 4e-7 * bound * head_dim**0.5 + 1e-30).all()


@needs_kernel
def test_decode_takes_the_native_scores_and_chooses_as_pytorch(monkeypatch):
    """A bf16 DeepSeek V4 model (5 layers: sliding, CSA, HCA; the CSA indexer picking 3 of up to 15 entries)
    decodes 40 tokens with the kernel scoring every CSA layer's step, choosing the entries the PyTorch scores
    choose; the compiled step gives the same logits."""
    from ctxlab.generate import compiled_decode_step, decode_step, prefill

    cfg = tiny_like(ctxlab.load_config("deepseek-v4-flash"))
    layers = [
        s if s.indexer is None else dataclasses.replace(s, indexer=dataclasses.replace(s.indexer, topk=3))
        for s in cfg.layers[:5]
    ]
    model = ctxlab.build_model(cfg.replace(layers=tuple(layers)), dtype=torch.bfloat16, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))
    real_topk, real_scores = dsa.indexer_topk, torch.ops.ctxlab.indexer_scores
    chosen, kernel_calls = [], []
    monkeypatch.setattr(dsa, "indexer_topk", lambda *a: chosen.append(real_topk(*a)) or chosen[-1])
    monkeypatch.setattr(torch.ops.ctxlab, "indexer_scores", lambda *a: kernel_calls.append(1) or real_scores(*a))

    def decode(step):
        chosen.clear()
        cache = model.new_cache(1, 60)
        with torch.no_grad():
            prefill(model, ids[:, :20], cache)
            logits = torch.stack([step(model, ids[:, t], cache) for t in range(20, 60)])
        return logits.float(), [c.clone() for c in chosen[-40 * csa_layers :]]

    csa_layers = sum(s.compress is not None and s.indexer is not None for s in model.config.layers)
    assert csa_layers > 0
    with_kernel, picks = decode(decode_step)
    assert len(kernel_calls) == 40 * csa_layers
    monkeypatch.setattr(dsa, "_native_scores", lambda q, keys: False)
    without, reference_picks = decode(decode_step)
    assert all(torch.equal(a, b) for a, b in zip(picks, reference_picks, strict=True))
    torch.testing.assert_close(with_kernel, without, atol=0.02, rtol=0)
    monkeypatch.undo()  # the compiled step: the kernel in its graph (it scores whenever eager does)
    compiled, _ = decode(compiled_decode_step(model))
    torch.testing.assert_close(compiled, with_kernel, atol=0.05, rtol=0)


@needs_kernel
def test_flop_counter_counts_the_scorer_as_the_products_it_replaces():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 2, 64, generator=gen).bfloat16(), torch.randn(1, 1, 300, 64, generator=gen).bfloat16()
    w = torch.randn(1, 2, 4, generator=gen)
    expected = flops(lambda: pytorch_scores(q, k, w))
    assert flops(lambda: torch.ops.ctxlab.indexer_scores(q, k, w, 0.125)) == expected > 0
