"""Initialisation by module: every module that owns tensors initialises them, the values equal
ctxlab's earlier parameter-by-parameter initialisation, and bfloat16 builds are those values rounded."""

from __future__ import annotations

import pytest
import torch

import ctxlab
from ctxlab import init
from ctxlab.init import BUILTIN_INIT
from ctxlab.io.config_file import config_from_dict
from ctxlab.reporting.measure import tiny_like
from test_config_fields import CONFIGS


def by_name_reference(cfg, seed=0, std=0.02) -> dict[str, torch.Tensor]:
    """The initialisation ctxlab used before modules initialised themselves (parameter-name rules)."""
    generator = torch.Generator().manual_seed(seed)
    model = ctxlab.CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".scale", "per_expert_scale", "_scale")) or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                experts = model.get_submodule(name.rsplit(".", 2)[0]).experts.gate_up_proj.shape[0]
                b.copy_(torch.rand(b.shape[0], experts, generator=generator).argsort(-1)[:, : b.shape[1]])
    return model.state_dict()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_seeded_float32_build_equals_the_earlier_initialisation(family):
    cfg = config_from_dict(CONFIGS[family], name=family)
    built = ctxlab.build_model(cfg, seed=3).state_dict()
    expected = by_name_reference(cfg, seed=3)
    assert built.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(built[name], t), name


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_module_that_owns_tensors_initialises_them(family):
    model = ctxlab.CausalLM(config_from_dict(CONFIGS[family], name=family))
    for name, module in model.named_modules():
        if type(module) in BUILTIN_INIT:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), name
        if any(True for _ in module.buffers(recurse=False)):
            assert hasattr(module, "reset_buffers"), name


@pytest.mark.parametrize("family", ["tiny-llama", "gemma4_text", "deepseek_v4", "zaya"])
def test_bfloat16_build_is_the_float32_build_rounded_and_keeps_declared_tensors_in_float32(family):
    cfg = config_from_dict(CONFIGS[family], name=family)
    full = ctxlab.build_model(cfg, seed=1).state_dict()
    half_model = ctxlab.build_model(cfg, dtype="bfloat16", seed=1)
    fp32 = {f"{n}" for n, _ in fp32_names(half_model)}
    for name, t in half_model.state_dict().items():
        if name in fp32:
            assert t.dtype == torch.float32 and torch.equal(t, full[name]), name
        elif t.is_floating_point():
            assert t.dtype == torch.bfloat16 and torch.equal(t, full[name].bfloat16()), name
        else:
            assert torch.equal(t, full[name]), name


@pytest.mark.parametrize("hidden, vocab", [(136, 203), (40, 97)])
def test_bfloat16_build_is_the_float32_build_rounded_at_sizes_not_a_multiple_of_16(hidden, vocab):
    """PyTorch's normal sampler takes another path for bfloat16 tensors whose size is not a multiple of 16
    (its stream then differs for every later tensor): ctxlab draws in float32 whatever the dtype."""
    cfg = tiny_like(ctxlab.load_config("llama-3-8b"), hidden=hidden, vocab=vocab)
    full = ctxlab.build_model(cfg, seed=2).state_dict()
    for name, t in ctxlab.build_model(cfg, dtype="bfloat16", seed=2).state_dict().items():
        assert torch.equal(t, full[name].bfloat16()), name


def test_large_tensors_are_drawn_in_chunks_with_the_same_values_in_every_dtype(monkeypatch):
    monkeypatch.setattr(init, "DRAW_CHUNK", 48)  # 100 elements: chunks of 48, 48, 4
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.empty(10, 10, dtype=dtype)
        init.normal_(t, torch.Generator().manual_seed(5), 1.0)
        values[dtype] = t
    assert torch.equal(values[torch.bfloat16], values[torch.float32].bfloat16())
    assert values[torch.float32].std() > 0.5  # drawn, every chunk
    assert (values[torch.float32].view(-1)[96:] != 0).all()


def fp32_names(model):
    from ctxlab.init import fp32_tensors

    names = {id(m): n for n, m in model.named_modules()}
    return [(f"{names[id(m)]}.{t}", m) for m, t in fp32_tensors(model)]


def test_an_unknown_module_with_parameters_is_refused():
    model = ctxlab.CausalLM(ctxlab.load_config("tiny-llama"))
    model.model.extra = torch.nn.Module()
    model.model.extra.w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="reset_parameters"):
        ctxlab.init.initialise(model)
