"""``torch.compile(fullgraph=True)`` of the decode step on a short tiny model of every family:
the compiled steps give the eager logits. Slow (Inductor warm-up takes minutes on 2 shared cores)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ctxlab
from ctxlab.generate import compiled_decode_step, decode_step, prefill
from ctxlab.reporting.measure import FAMILY_PRESETS, tiny_like

pytestmark = pytest.mark.slow


def short_tiny(name: str, keep: int = 5) -> ctxlab.ModelConfig:
    """The first ``keep`` layers of a tiny model with ``name``'s layer pattern, plus one KV-sharing
    consumer per layer type (re-pointed at the last kept producer of its type)."""
    cfg = tiny_like(ctxlab.load_config(name))
    layers = list(cfg.layers[:keep])
    seen = set()
    for spec in cfg.layers[keep:]:
        if spec.kv_source is not None and spec.window not in seen:
            seen.add(spec.window)
            source = max(i for i, s in enumerate(layers) if s.kv_source is None and s.window == spec.window)
            layers.append(dataclasses.replace(spec, kv_source=source))
    return cfg.replace(layers=tuple(layers))


def decode_logits(model, ids, step, steps: int, room: int = 0) -> torch.Tensor:
    """``steps`` greedy decode steps after ``ids``, in a cache with ``room`` spare slots."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps + room)
    logits = prefill(model, ids, cache)
    out = []
    for _ in range(steps):
        logits = step(model, logits.argmax(-1), cache)
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("name", [n for n in FAMILY_PRESETS if n != "deepseek-v4-flash"])  # V4: below
def test_compiled_decode_equals_eager(name):
    cfg = short_tiny(name)
    model = ctxlab.build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    eager = decode_logits(model, ids, decode_step, steps=6)
    compiled = decode_logits(model, ids, compiled_decode_step(model), steps=6)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-3-8b", "laguna-xs2"])
def test_compiled_decode_of_a_fused_model_equals_eager(name):
    """Fused projections (one matmul, split after) compile with fullgraph too; laguna adds the output gate."""
    cfg = short_tiny(name)
    model = ctxlab.build_model(cfg, seed=0)
    ctxlab.fuse_projections(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    eager = decode_logits(model, ids, decode_step, steps=6)
    compiled = decode_logits(model, ids, compiled_decode_step(model), steps=6)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compiled_v4_decode_compiles_once_per_kind_of_step():
    """DeepSeek V4 across CSA (ratio 4) and HCA (ratio 128) block boundaries: the compiled steps give
    the eager logits, and the step compiles one graph per kind of step (no block completes, a CSA
    block completes, CSA and HCA blocks complete), not one per position within a block. The
    prompt holds two complete HCA blocks already (Dynamo specializes sizes 0 and 1, so a layer's
    first and second entries recompile once each), and the windows are widened so the ring never
    fills (filling recompiles once too)."""
    cfg = short_tiny("deepseek-v4-flash")
    cfg = cfg.replace(layers=tuple(dataclasses.replace(s, window=400) for s in cfg.layers))
    assert {s.compress.ratio for s in cfg.layers} == {0, 4, 128}
    model = ctxlab.build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 373), generator=torch.Generator().manual_seed(0))
    eager = decode_logits(model, ids, decode_step, steps=14, room=8)  # 4 CSA blocks end, and the third HCA block
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = decode_logits(model, ids, compiled_decode_step(model), steps=14, room=8)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 3
