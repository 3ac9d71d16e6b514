"""Explicit checkpoint-name maps (families/keymap.py): one table, both directions, tested on every
tensor name of each family's tiny model."""

import pytest

import ctxlab
from ctxlab.families import FAMILIES
from ctxlab.families.keymap import KeyMap
from ctxlab.io import layout
from ctxlab.io.checkpoint import model_tensor_shapes
from test_deepseek_v4 import BASE as V4_BASE
from test_laguna import BASE as LAGUNA_BASE


def test_keymap_matches_whole_components_longest_first():
    m = KeyMap({"a.{}.b": "x.{}.y", "a.{}.b.c": "x.{}.z", "head": "out"})
    assert m.to_checkpoint("a.3.b.weight") == "x.3.y.weight"
    assert m.to_checkpoint("a.12.b.c.bias") == "x.12.z.bias"
    assert m.to_checkpoint("a.3.bb.weight") == "a.3.bb.weight"  # not a whole component: unchanged
    assert m.to_checkpoint("head.weight") == "out.weight" and m.to_checkpoint("header.weight") == "header.weight"
    for name in ("a.3.b.weight", "a.12.b.c.bias", "head.weight", "other.weight"):
        assert m.from_checkpoint(m.to_checkpoint(name)) == name


def test_keymap_refuses_a_many_to_one_table():
    with pytest.raises(ValueError, match="one-to-one"):
        KeyMap({"a": "x", "b": "x"})


def _v4_model():
    cfg = ctxlab.io.config_file.config_from_dict({**V4_BASE, "model_type": "deepseek_v4"})
    return ctxlab.build_model(cfg)


TINY = {"deepseek_v4": {**V4_BASE, "model_type": "deepseek_v4"}, "laguna": {**LAGUNA_BASE, "model_type": "laguna"}}


def test_every_family_with_a_key_map_is_covered_here():
    assert {t for t, f in FAMILIES.items() if hasattr(f, "KEY_MAP")} == set(TINY)


@pytest.mark.parametrize("family", sorted(TINY))
def test_names_round_trip_on_every_tensor_of_the_tiny_model(family):
    model = ctxlab.build_model(ctxlab.io.config_file.config_from_dict(TINY[family]))
    key_map = FAMILIES[family].KEY_MAP
    ours = list(model_tensor_shapes(model))
    theirs = [key_map.to_checkpoint(n) for n in ours]
    assert len(set(theirs)) == len(ours) and [key_map.from_checkpoint(t) for t in theirs] == ours


def test_deepseek_v4_names_round_trip_on_every_tensor():
    model = _v4_model()
    key_map = FAMILIES["deepseek_v4"].KEY_MAP
    ours = list(model_tensor_shapes(model))
    theirs = [key_map.to_checkpoint(n) for n in ours]
    assert len(set(theirs)) == len(ours)  # one checkpoint name per tensor
    assert [key_map.from_checkpoint(t) for t in theirs] == ours
    # DeepSeek's own names (what transformers' conversion mapping reads and writes)
    for suffix in (
        "attn.indexer.compressor.wkv.weight",
        "attn.indexer.weights_proj.weight",
        "attn.compressor.ape",
        "hc_attn_fn",
        "ffn.gate.bias",
        "ffn.shared_experts.w3.weight",
        "attn.attn_sink",
    ):
        assert any(t.startswith("model.layers.") and t.endswith(suffix) for t in theirs), suffix
    assert "head.weight" in theirs
    assert not any(".self_attn." in t or ".mlp." in t or "lm_head" in t for t in theirs)


def test_deepseek_v4_checkpoint_layout_uses_the_map_for_experts():
    model = _v4_model()
    plan = layout.sources(model_tensor_shapes(model), FAMILIES["deepseek_v4"])
    names = [n for src in plan.values() for n in src.names]
    assert len(names) == len(set(names))
    assert "model.layers.0.ffn.experts.0.w1.weight" in names and "model.layers.0.ffn.experts.0.w2.weight" in names
