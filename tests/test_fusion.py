"""Fused projections (``ctxlab.nn.fusion``): q/k/v(/gate) and gate/up as one matmul give the unfused model's
logits, in a full forward and in cached decode, for a tiny model of every family; quantizing after fusing gives
the same codes as quantizing the separate linears; a fused model saves the checkpoint's tensors, a quantized one
refuses to be saved."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ctxlab
from ctxlab.generate import decode_step, prefill
from ctxlab.nn.fusion import FusedProjections, fuse_projections_
from ctxlab.quant import quantize_
from ctxlab.reporting.measure import FAMILY_PRESETS, tiny_like


def tiny(name: str) -> ctxlab.ModelConfig:
    cfg = tiny_like(ctxlab.load_config(name), hidden=128, vocab=256)
    return cfg.replace(layers=cfg.layers[:6])


def with_biases(cfg: ctxlab.ModelConfig) -> ctxlab.ModelConfig:
    return cfg.replace(layers=tuple(dataclasses.replace(s, attention_bias=True, mlp_bias=True) for s in cfg.layers))


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter random, biases and norm weights included (their init is zero / one)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1 + (1 if p.dim() == 1 else 0) * 0.5)
    return model


def decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits, out = prefill(model, ids, cache), []
    for _ in range(steps):
        logits = decode_step(model, logits.argmax(-1), cache)
        out.append(logits)
    return torch.stack(out)


CONFIGS = {name: tiny(name) for name in FAMILY_PRESETS} | {"llama-with-biases": with_biases(tiny("llama-3-8b"))}


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_model_gives_the_unfused_logits(name):
    cfg = CONFIGS[name]
    model = randomized(ctxlab.build_model(cfg, seed=0))
    fused = copy.deepcopy(model)
    groups = fuse_projections_(fused)
    assert groups > 0 and any(isinstance(m, FusedProjections) for m in fused.modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), atol=1e-5, rtol=1e-5)
        # across a window / compression-block boundary: the tiny windows and CSA ratio are small
        torch.testing.assert_close(decode_logits(fused, ids, 9), decode_logits(model, ids, 9), atol=1e-5, rtol=1e-5)


def test_every_declared_group_is_fused_and_its_linears_are_gone():
    model = ctxlab.build_model(CONFIGS["laguna-xs2"], seed=0)  # output gates: q, k, v and g in one matmul
    fuse_projections_(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj is None and attn.k_proj is None and attn.g_proj is None
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.linear.weight" in names
    assert any(name.endswith("mlp.gate_up_proj.linear.weight") for name in names)
    separate = ("q_proj", "k_proj", "v_proj", "g_proj", "gate_proj", "up_proj")
    assert not [name for name in names if name.rsplit(".", 2)[-2] in separate]
    assert fuse_projections_(model) == 0  # a second call finds nothing left to fuse


def test_mixed_biases_are_not_fused():
    class Pair(nn.Module):
        FUSIBLE = {"ab": ("a", "b")}

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3, bias=True), nn.Linear(4, 5, bias=False)

    pair = Pair()
    assert fuse_projections_(pair) == 0 and pair.a is not None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_after_fusing_gives_the_same_model(mode):
    cfg = CONFIGS["llama-3-8b"]
    model = randomized(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0))
    separate = quantize_(copy.deepcopy(model), mode)
    fused = copy.deepcopy(model)
    fuse_projections_(fused)
    quantize_(fused, mode)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same codes and scales per output row; only the kernel's summation order may differ
        torch.testing.assert_close(fused(ids), separate(ids), atol=2e-2, rtol=2e-2)
    assert ctxlab.quant.weight_bytes(fused) == ctxlab.quant.weight_bytes(separate)


def test_a_fused_model_saves_the_checkpoint_layout_and_stays_fused(tmp_path):
    model = randomized(ctxlab.build_model(CONFIGS["llama-with-biases"], seed=0))
    model.save_pretrained(tmp_path / "plain")
    fuse_projections_(model)
    model.save_pretrained(tmp_path / "fused")
    assert (
        any(isinstance(m, FusedProjections) for m in model.modules()) and model.model.layers[0].self_attn.q_proj is None
    )
    plain, fused = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "fused"))
    assert plain.keys() == fused.keys() and all(torch.equal(plain[k], fused[k]) for k in plain)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ctxlab.from_pretrained(tmp_path / "fused")(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_a_quantized_model_refuses_to_be_saved(tmp_path):
    model = ctxlab.build_model(CONFIGS["llama-3-8b"], dtype=torch.bfloat16, seed=0)
    quantize_(model, "int8")
    with pytest.raises(ctxlab.InputError, match=r"quantized in place \(int8\)"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3-sliding"])
def test_cli_fuses_by_default_and_no_fuse_keeps_the_linears(capsys, monkeypatch, preset):
    import ctxlab.nn.fusion as fusion
    from ctxlab.cli import main

    groups = []
    monkeypatch.setattr(fusion, "fuse_projections_", lambda model: groups.append(fuse_projections_(model)))
    ids = {}
    for flags in ([], ["--no-fuse"]):
        assert main(["generate", preset, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", *flags]) == 0
        ids[bool(flags)] = json.loads(capsys.readouterr().out)["generated_ids"]
    assert len(groups) == 1 and groups[0] > 0  # only the default run fused
    assert ids[False] == ids[True]
