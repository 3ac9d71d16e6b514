"""Shared test helpers: tiny random HF models (the parity oracle) and tiny ctxlab configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Give every parameter a random value, including those initialised to 0 or 1.

    Norm weights become 1 + noise (so they are not 1, but stay moderate), everything else
    normal(0, std), so no parameter keeps its initial value.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(std * noise)
    return module


@pytest.fixture
def hf():
    """The transformers module; the test is skipped (with the reason) when it is not installed."""
    return pytest.importorskip("transformers", reason="transformers (test extra) is not installed")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied first: every compiled model shares ``generate._decode_logits``'s code object,
    and the suite's earlier compiles count toward Dynamo's recompile limit for it."""
    torch._dynamo.reset()


TOL = 1e-4


def assert_matches_reference(ref, ours, ids, prompt_len: int, new_tokens: int, tol: float = TOL) -> None:
    """Logits within ``tol`` of the HF model's, and the same greedy continuation of ``ids[:, :prompt_len]``."""
    import ctxlab

    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= tol
        expected = ref.generate(
            ids[:, :prompt_len], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(ctxlab.generate(ours, ids[:, :prompt_len], max_new_tokens=new_tokens, eos_token_id=[]), expected)


def assert_round_trip(hf, ref, ours, out, ids, tol: float = TOL, fix=None, **load_kwargs):
    """Our save_pretrained loads back in transformers with the reference's logits, and back in ctxlab
    with the same config. ``fix(back, out)`` patches what a transformers loader changes after loading."""
    import ctxlab

    ours.save_pretrained(out)
    back = hf.AutoModelForCausalLM.from_pretrained(out, **load_kwargs).eval()
    if fix is not None:
        fix(back, out)
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= tol
    assert ctxlab.load_config(out) == ours.config.replace(name=str(out))
    return back


def stepped_logits(model, ids, sizes, cache) -> torch.Tensor:
    """Feed ``ids`` in chunks of ``sizes`` through ``cache``; the concatenated logits."""
    out, start = [], 0
    with torch.no_grad():
        for n in sizes:
            out.append(model(ids[:, start : start + n], cache=cache))
            start += n
    return torch.cat(out, dim=1)


def assert_chunked_decode_matches(model, ids, prefill_chunks, tol: float = TOL):
    """Prefill in ``prefill_chunks``, decode the rest one token at a time: == one full forward;
    the cache holds exactly its analytic bytes. Returns the cache."""
    import ctxlab

    total = ids.shape[1]
    cache = model.new_cache(ids.shape[0], total)
    sizes = list(prefill_chunks) + [1] * (total - sum(prefill_chunks))
    with torch.no_grad():
        assert (stepped_logits(model, ids, sizes, cache) - model(ids)).abs().max().item() <= tol
    assert cache.nbytes() == ctxlab.kv_cache_bytes(model.config, total, str(model.dtype).removeprefix("torch."))
    return cache
