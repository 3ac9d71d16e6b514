"""Generation: greedy equals a cache-free reference loop, left padding is invisible, stop
conditions, seeded sampling, the supports of top-k / nucleus sampling, streaming, bad arguments.

Models are ``build_model(load_config(preset), seed=0)`` for ``tiny-llama`` (global attention)
and ``tiny-qwen3-sliding`` (window 8 on layers 0 and 2), their weights then randomised with a
larger spread (``conftest.randomize_``): at the default init std of 0.02 greedy decoding just
repeats one token, which would make token-equality tests weak. Prompts and generations run
well past the window.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ctxlab

from conftest import randomize_

PRESETS = ["tiny-llama", "tiny-qwen3-sliding"]
WINDOW = 8  # tiny-qwen3-sliding's sliding_window
NEW = 20  # new tokens: prompt (13) + NEW goes far past the window
NO_EOS = []  # eos_token_id=[]: never stop before max_new_tokens


@functools.cache
def tiny(preset: str, **cfg_changes) -> ctxlab.CausalLM:
    cfg = ctxlab.load_config(preset)
    model = ctxlab.build_model(cfg.replace(**cfg_changes) if cfg_changes else cfg, seed=0)
    return randomize_(model, seed=0, std=0.3)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy_reference(model, tokens: list[int], n: int) -> list[int]:
    """Re-run the full forward (no cache) on everything so far and take the argmax, n times."""
    ids = torch.tensor([tokens])
    for _ in range(n):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[0].tolist()


def fresh_index(tokens: list[int], start: int = 2, avoid: tuple[int, ...] = ()) -> int:
    """Smallest k >= start whose token is not among tokens[:k] (nor in ``avoid``)."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k] and tokens[k] not in avoid:
            return k
    raise AssertionError(f"no usable EOS candidate in {tokens}")  # test setup, not the code under test


# --- greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 3, WINDOW, 100])
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_equals_full_forward_reference(preset, chunk):
    """Chunked prefill + cached decode picks the same tokens as re-running the whole forward each step."""
    model, p = tiny(preset), prompt(13)
    expected = greedy_reference(model, p, NEW)
    assert ctxlab.generate(model, [p], NEW, eos_token_id=NO_EOS, prefill_chunk=chunk) == [expected]
    out = ctxlab.generate(model, torch.tensor([p]), NEW, eos_token_id=NO_EOS, prefill_chunk=chunk)
    assert out.tolist() == [expected]


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_batch_of_ragged_prompts_equals_each_prompt_alone(preset, chunk):
    """Left padding is invisible: every row of a ragged batch equals generating its prompt alone."""
    model = tiny(preset)
    prompts = [prompt(13, seed=1), prompt(3, seed=2), prompt(9, seed=3), prompt(1, seed=4)]
    batched = ctxlab.generate(model, prompts, NEW, eos_token_id=NO_EOS, prefill_chunk=chunk)
    alone = [ctxlab.generate(model, [p], NEW, eos_token_id=NO_EOS)[0] for p in prompts]
    assert batched == alone
    assert alone[1] == greedy_reference(model, prompts[1], NEW)


@settings(max_examples=12, deadline=None)
@given(
    preset=st.sampled_from(PRESETS),
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3),
    chunk=st.sampled_from([None, 1, 2, 5, 8, 9]),
    seed=st.integers(0, 1000),
)
def test_any_ragged_batch_and_chunking_equals_reference(preset, lengths, chunk, seed):
    """For random prompt lengths and prefill chunks, each row is the cache-free greedy reference."""
    model = tiny(preset)
    prompts = [prompt(n, seed=seed + i) for i, n in enumerate(lengths)]
    out = ctxlab.generate(model, prompts, 12, eos_token_id=NO_EOS, prefill_chunk=chunk)
    assert out == [greedy_reference(model, p, 12) for p in prompts]


# --- stop conditions ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_eos_stops_right_after_it_in_list_form(preset):
    """With eos = the token greedy emits at step k, the list output ends with that token."""
    model, p = tiny(preset), prompt(10)
    new = greedy_reference(model, p, NEW)[len(p) :]
    k = fresh_index(new)
    assert ctxlab.generate(model, [p], NEW, eos_token_id=new[k]) == [p + new[: k + 1]]
    assert ctxlab.generate(model, [p], NEW, eos_token_id=[127 - new[k] % 2, new[k]]) == [p + new[: k + 1]]


def test_eos_from_the_config_is_used_by_default():
    """Without ``eos_token_id``, generation stops at the config's eos_token_id."""
    p = prompt(10)
    new = greedy_reference(tiny("tiny-llama"), p, NEW)[len(p) :]
    k = fresh_index(new)
    model = tiny("tiny-llama", eos_token_id=(new[k],))
    assert ctxlab.generate(model, [p], NEW) == [p + new[: k + 1]]


def test_finished_row_is_padded_in_tensor_form():
    """Tensor form: a row that hit EOS continues with the pad token while the other row goes on."""
    a, b = prompt(10, seed=5), prompt(10, seed=6)
    base = tiny("tiny-llama")
    new_a = greedy_reference(base, a, NEW)[10:]
    new_b = greedy_reference(base, b, NEW)[10:]
    k = fresh_index(new_a, avoid=tuple(new_b))
    eos = new_a[k]
    pad = next(t for t in range(3, 128) if t != eos)
    model = tiny("tiny-llama", pad_token_id=pad)
    out = ctxlab.generate(model, torch.tensor([a, b]), NEW, eos_token_id=eos)
    assert out.shape == (2, 10 + NEW)
    assert out[0].tolist() == a + new_a[: k + 1] + [pad] * (NEW - k - 1)
    assert out[1].tolist() == b + new_b


def test_tensor_form_stops_when_every_row_finished():
    """Tensor form: once every row has produced EOS no more columns are added."""
    model, p = tiny("tiny-qwen3-sliding"), prompt(12)
    new = greedy_reference(model, p, NEW)[12:]
    k = fresh_index(new)
    out = ctxlab.generate(model, torch.tensor([p]), NEW, eos_token_id=new[k])
    assert out.tolist() == [p + new[: k + 1]]


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_stops_generation(n):
    """Exactly ``max_new_tokens`` tokens are added when no EOS comes."""
    model, prompts = tiny("tiny-qwen3-sliding"), [prompt(4, seed=1), prompt(11, seed=2)]
    out = ctxlab.generate(model, prompts, n, eos_token_id=NO_EOS)
    assert [len(r) for r in out] == [4 + n, 11 + n]
    assert [r[: len(p)] for r, p in zip(out, prompts)] == prompts
    assert ctxlab.generate(model, torch.tensor([prompts[1]]), n, eos_token_id=NO_EOS).shape == (1, 11 + n)


def test_max_new_tokens_zero_returns_the_prompts():
    """``max_new_tokens=0`` generates nothing, in list, tensor and stream form."""
    model, prompts = tiny("tiny-llama"), [prompt(4, seed=1), prompt(7, seed=2)]
    assert ctxlab.generate(model, prompts, 0) == prompts
    ids = torch.tensor([prompts[1], prompts[1]])
    assert torch.equal(ctxlab.generate(model, ids, 0), ids)
    assert list(ctxlab.stream(model, prompts, 0)) == []


# --- sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_same_seed_same_tokens_different_seed_different_tokens(preset):
    """Sampling at temperature 1 is reproducible per seed and differs between seeds."""
    model, p = tiny(preset), prompt(6)

    def run(seed):
        return ctxlab.generate(model, [p], NEW, temperature=1.0, seed=seed, eos_token_id=NO_EOS)

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7)[0][: len(p)] == p and len(run(7)[0]) == len(p) + NEW


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p=1e-6"])
@pytest.mark.parametrize("preset", PRESETS)
def test_degenerate_truncation_equals_greedy(preset, kwargs):
    """top_k=1 or a tiny top_p leaves only the argmax, so sampling equals greedy for any seed."""
    model, p = tiny(preset), prompt(9)
    greedy = ctxlab.generate(model, [p], NEW, eos_token_id=NO_EOS)
    for seed in (0, 1):
        sampled = ctxlab.generate(model, [p], NEW, temperature=1.0, seed=seed, eos_token_id=NO_EOS, **kwargs)
        assert sampled == greedy


def draws(logits: torch.Tensor, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
    """n tokens sampled from one row of logits [V] (n independent rows, one seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    return ctxlab.sample(logits.expand(n, -1), generator=gen, **kwargs)


def test_top_k_draws_only_and_all_of_the_k_highest():
    """top_k=5 over 64 tokens: every draw is one of the 5 highest logits, and each of them occurs."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    got = draws(logits, 5000, temperature=1.0, top_k=5)
    assert set(got.tolist()) == top5


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 40),
    data=st.data(),
    temperature=st.floats(0.05, 5.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31),
)
def test_top_k_never_leaves_the_k_highest(vocab, data, temperature, scale, seed):
    """For random (distinct) logits, any k and temperature, draws stay among the k highest logits."""
    k = data.draw(st.integers(1, vocab), label="top_k")
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale
    assume(len(set(logits.tolist())) == vocab)
    allowed = set(torch.topk(logits, k).indices.tolist())
    assert set(draws(logits, 300, seed, temperature=temperature, top_k=k).tolist()) <= allowed


def test_top_p_draws_only_from_the_nucleus_in_proportion():
    """probs .5/.3/.15/.05 (shuffled) with top_p=.75: only the .5 and .3 tokens, in ratio 5:3."""
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])  # nucleus: tokens 2 (0.5) and 0 (0.3)
    got = draws(probs.log(), 20_000, temperature=1.0, top_p=0.75)
    assert set(got.tolist()) == {0, 2}
    assert (got == 2).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.02)


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 30),
    top_p=st.floats(0.01, 1.0),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**31),
)
def test_top_p_never_leaves_the_nucleus(vocab, top_p, scale, seed):
    """Draws stay in the smallest set of most likely tokens whose probability reaches top_p."""
    probs = (torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale).softmax(-1)
    assume(len(set(probs.tolist())) == vocab)
    cumulative = torch.sort(probs, descending=True).values.cumsum(0).tolist()
    assume(all(not math.isclose(c, top_p, abs_tol=1e-4) for c in cumulative))  # no float boundary cases
    ranked = torch.argsort(probs, descending=True).tolist()
    size = next(i + 1 for i, c in enumerate(cumulative) if c >= top_p or i == vocab - 1)
    nucleus = set(ranked[:size])
    assert set(draws(probs.log(), 300, seed, temperature=1.0, top_p=top_p).tolist()) <= nucleus


def test_greedy_sample_is_argmax_and_ignores_the_generator():
    """temperature=0 returns the argmax of every row, whatever the other arguments."""
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ctxlab.sample(logits), logits.argmax(-1))
    assert torch.equal(ctxlab.sample(logits, 0.0, top_k=3, top_p=0.5), logits.argmax(-1))


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 3}], ids=["greedy", "sampled"])
@pytest.mark.parametrize("preset", PRESETS)
def test_stream_concatenated_equals_generate(preset, sampling):
    """Stacking what ``stream`` yields gives exactly ``generate``'s new tokens."""
    model, prompts = tiny(preset), [prompt(12, seed=1), prompt(5, seed=2)]
    steps = list(ctxlab.stream(model, prompts, NEW, eos_token_id=NO_EOS, **sampling))
    assert len(steps) == NEW
    streamed = torch.stack([tokens for tokens, _ in steps], dim=1).tolist()
    out = ctxlab.generate(model, prompts, NEW, eos_token_id=NO_EOS, **sampling)
    assert [p + s for p, s in zip(prompts, streamed)] == out


def test_stream_finished_flags_flip_at_eos():
    """``finished`` turns True at the EOS step and stays True; that row then yields the pad token."""
    a, b = prompt(10, seed=5), prompt(7, seed=6)
    base = tiny("tiny-qwen3-sliding")
    new_a = greedy_reference(base, a, NEW)[len(a) :]
    new_b = greedy_reference(base, b, NEW)[len(b) :]
    k = fresh_index(new_a, avoid=tuple(new_b))
    pad = next(t for t in range(3, 128) if t != new_a[k])
    model = tiny("tiny-qwen3-sliding", pad_token_id=pad)
    steps = list(ctxlab.stream(model, [a, b], NEW, eos_token_id=new_a[k]))
    assert len(steps) == NEW
    assert [bool(f[0]) for _, f in steps] == [False] * k + [True] * (NEW - k)
    assert not any(bool(f[1]) for _, f in steps)
    assert [int(t[0]) for t, _ in steps] == new_a[: k + 1] + [pad] * (NEW - k - 1)
    assert [int(t[1]) for t, _ in steps] == new_b


def test_stream_ends_when_every_row_finished():
    """The stream stops at the step where the last row produces EOS."""
    model, p = tiny("tiny-llama"), prompt(10, seed=9)
    new = greedy_reference(model, p, NEW)[10:]
    k = fresh_index(new)
    steps = list(ctxlab.stream(model, [p, p], NEW, eos_token_id=new[k]))
    assert len(steps) == k + 1
    assert bool(steps[-1][1].all()) and not bool(steps[-2][1].any())


# --- bad arguments --------------------------------------------------------------------------

BAD_SAMPLING = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1.0, "top_k": 0}, "top_k"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SAMPLING, ids=[f"{n}={kw[n]}" for kw, n in BAD_SAMPLING])
def test_bad_sampling_arguments_raise_value_error_naming_them(kwargs, name):
    """Out-of-range sampling arguments raise ValueError naming the argument (generate and sample)."""
    with pytest.raises(ValueError, match=name):
        ctxlab.generate(tiny("tiny-llama"), [prompt(3)], 4, **kwargs)
    with pytest.raises(ValueError, match=name):
        ctxlab.sample(torch.zeros(1, 8), **kwargs)


@pytest.mark.parametrize("prompts", [[[]], [[5, 6], []], []], ids=["one-empty", "one-of-two-empty", "no-prompts"])
def test_empty_prompt_raises_value_error(prompts):
    """An empty prompt (or no prompt at all) is refused, naming the prompt."""
    with pytest.raises(ValueError, match="prompt"):
        ctxlab.generate(tiny("tiny-llama"), prompts, 4)


def test_empty_tensor_prompt_raises_value_error():
    """A [B, 0] tensor prompt is refused with a message about the prompt (not about chunking)."""
    with pytest.raises(ValueError, match="input_ids|prompt"):
        ctxlab.generate(tiny("tiny-llama"), torch.empty(1, 0, dtype=torch.long), 4)


def test_negative_max_new_tokens_raises_value_error():
    """``max_new_tokens`` < 0 raises ValueError naming it."""
    with pytest.raises(ValueError, match="max_new_tokens"):
        ctxlab.generate(tiny("tiny-llama"), [prompt(3)], -1)


@pytest.mark.parametrize("chunk", [0, -2])
def test_non_positive_prefill_chunk_raises_value_error_naming_it(chunk):
    """``prefill_chunk`` <= 0 raises ValueError naming ``prefill_chunk`` (not silently 'no chunking')."""
    with pytest.raises(ValueError, match="prefill_chunk"):
        ctxlab.generate(tiny("tiny-llama"), [prompt(3)], 4, prefill_chunk=chunk)
