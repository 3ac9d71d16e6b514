"""Mechanisms added as configurations of existing ones (docs/architecture.md, "Adding an attention
kind"): cross-layer attention (CLA2, a kv_source schedule) and OpenELM-style layer-wise scaling
(per-layer heads and FFN widths). Each runs, caches and costs exactly what the accounting says."""

import json

import pytest
import torch

import ctxlab
from ctxlab.cli import main
from ctxlab.io.checkpoint import model_tensor_shapes
from ctxlab.scaling import cross_layer_attention, layer_wise_scaling, round_to_multiple

from conftest import assert_chunked_decode_matches

PRESETS = ("cla2-tiny", "openelm-tiny")


@pytest.mark.parametrize("name", PRESETS)
def test_cached_decode_equals_full_forward_and_bytes_match(name):
    cfg = ctxlab.load_config(name)
    model = ctxlab.build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    assert_chunked_decode_matches(model, ids, [5, 11])


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_and_cache_bytes_equal_the_built_model(name, dtype):
    cfg = ctxlab.load_config(name)
    model = ctxlab.build_model(cfg, dtype=ctxlab.accounting.as_dtype(dtype))
    assert ctxlab.count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    assert ctxlab.count_params(cfg)["total"] == sum(
        map(lambda s: torch.Size(s).numel(), model_tensor_shapes(model).values())
    )
    for n in (1, 100, 1000):
        assert model.new_cache(1, n).nbytes() == ctxlab.kv_cache_bytes(cfg, n, dtype)


def test_cla2_consumers_hold_nothing_and_halve_the_cache():
    cfg = ctxlab.load_config("cla2-tiny")
    assert [s.kv_source for s in cfg.layers] == [None, 0, None, 2, None, 4]
    plain = cfg.replace(layers=tuple(s.__class__(**{**s.__dict__, "kv_source": None}) for s in cfg.layers))
    assert ctxlab.kv_cache_bytes(plain, 4096) == 2 * ctxlab.kv_cache_bytes(cfg, 4096)
    per_layer = ctxlab.kv_cache_bytes_per_layer(cfg, 4096)
    assert per_layer[1::2] == [0, 0, 0] and all(b > 0 for b in per_layer[::2])


def test_cross_layer_attention_schedules():
    layers = ctxlab.load_config("tiny-llama").layers * 2  # 6 layers
    assert [s.kv_source for s in cross_layer_attention(layers, 3)] == [None, 0, 0, None, 3, 3]
    assert [s.kv_source for s in cross_layer_attention(layers, 1)] == [None] * 6
    with pytest.raises(ctxlab.ConfigError, match="sharing"):
        cross_layer_attention(layers, 0)


def test_openelm_preset_is_what_the_helper_emits():
    cfg = ctxlab.load_config("openelm-tiny")
    base = cfg.layers[0]
    again = layer_wise_scaling(base, 128, 6, (0.5, 1.0), (0.5, 4.0), gqa_groups=2, ffn_divisor=32)
    assert cfg.layers == again
    heads = [s.num_heads for s in cfg.layers]
    widths = [s.intermediate_size for s in cfg.layers]
    assert heads == sorted(heads) and heads[0] < heads[-1] and widths == sorted(widths) and widths[0] < widths[-1]
    assert all(s.num_heads == 2 * s.num_kv_heads for s in cfg.layers)


def test_layer_wise_scaling_matches_openelm_270m_shapes():
    """OpenELM-270M's shape (d_model 1280, 16 layers, head dim 64, the default multipliers): the
    query width runs from α = 0.5 to 1.0 of d_model and the FFN from β = 0.5 to 4.0 of d_model."""
    base = ctxlab.LayerSpec(num_heads=1, num_kv_heads=1, head_dim=64, intermediate_size=1)
    layers = layer_wise_scaling(base, 1280, 16)
    assert layers[0].num_heads * 64 == round_to_multiple(640, 256) and layers[-1].num_heads * 64 == 1280
    assert layers[0].intermediate_size == round_to_multiple(640, 256) and layers[-1].intermediate_size == 5120
    assert all(a.num_heads <= b.num_heads for a, b in zip(layers, layers[1:]))


def test_round_to_multiple():
    assert [round_to_multiple(v, 8) for v in (1, 4, 12, 13, 100)] == [8, 8, 16, 16, 104]
    assert round_to_multiple(9.5, 8) == 16  # 8 would lose more than 10%


@pytest.mark.parametrize("bad", [dict(num_layers=0), dict(gqa_groups=0), dict(qkv_multipliers=(1.0, 0.5))])
def test_layer_wise_scaling_refuses_bad_input(bad):
    base = ctxlab.LayerSpec(num_heads=1, num_kv_heads=1, head_dim=8, intermediate_size=1)
    kwargs = dict(hidden_size=64, num_layers=4) | bad
    with pytest.raises(ctxlab.ConfigError, match=next(iter(bad))):
        layer_wise_scaling(base, **kwargs)


@pytest.mark.parametrize("name", PRESETS)
def test_report_and_inspect_show_their_bytes_and_params(name, capsys):
    cfg = ctxlab.load_config(name)
    assert main(["report", "--models", name, "--context", "4096", "--dtype", "float32", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["models"][0]
    assert row["kv_bytes_realized"] == ctxlab.kv_cache_bytes(cfg, 4096, "float32")
    assert row["params_total"] == sum(p.numel() for p in ctxlab.build_model(cfg).parameters())
    assert main(["inspect", name, "--context", "4096", "--dtype", "float32", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [r["cache_bytes"] for r in layers] == ctxlab.kv_cache_bytes_per_layer(cfg, 4096, "float32")
    assert [r["num_heads"] for r in layers] == [s.num_heads for s in cfg.layers]
