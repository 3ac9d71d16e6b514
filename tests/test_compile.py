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


def decode_logits(model, ids, step, steps: int) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = prefill(model, ids, cache)
    out = []
    for _ in range(steps):
        logits = step(model, logits.argmax(-1), cache)
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_compiled_decode_equals_eager(name):
    cfg = short_tiny(name)
    model = ctxlab.build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    eager = decode_logits(model, ids, decode_step, steps=6)  # crosses a CSA block boundary (ratio 4)
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
