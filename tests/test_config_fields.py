"""config.json fields of the wrong type or range: one ConfigError naming the field, for every family.

The hypothesis test puts random JSON values (wrong types, negatives, zeros, huge numbers, nulls,
nesting) into every field of each family's tiny ``config.json``: ``load_config`` + ``build_model``
either succeed or raise ConfigError, never anything else.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxlab
from ctxlab.errors import ConfigError
from ctxlab.presets import preset_path


def tiny_configs() -> dict[str, dict]:
    """Each family's tiny HF config.json (the parity tests' base configs, the tiny presets)."""
    import test_deepseek_v4
    import test_deepseek_v32
    import test_gemma4
    import test_laguna
    import test_zaya

    out = {name: json.loads(preset_path(name).read_text()) for name in ("tiny-llama", "tiny-qwen3-sliding")}
    for model_type, module in (
        ("gemma4_text", test_gemma4),
        ("laguna", test_laguna),
        ("zaya", test_zaya),
        ("deepseek_v32", test_deepseek_v32),
        ("deepseek_v4", test_deepseek_v4),
    ):
        out[model_type] = {"model_type": model_type, **module.BASE}
    out["gemma4_text"].update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24)
    return out


CONFIGS = tiny_configs()


def write(tmp_path, d: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


def problems(tmp_path, d: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ctxlab.load_config(write(tmp_path, d))
    return e.value.problems


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hidden_layers", "ten"),
        ("num_hidden_layers", [3]),
        ("num_hidden_layers", True),
        ("hidden_size", "32"),
        ("hidden_size", 32.0),
        ("rms_norm_eps", "tiny"),
        ("rope_parameters", "yes"),
        ("tie_word_embeddings", "no"),
        ("num_key_value_heads", -2),
        ("eos_token_id", [2, "x"]),
    ],
)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_wrong_type_names_the_field_and_what_is_allowed(tmp_path, family, field, value):
    (problem,) = problems(tmp_path, {**CONFIGS[family], field: value})
    assert field in problem and "must be" in problem
    assert repr(value)[:20] in problem


def test_rope_parameter_of_the_wrong_type_names_it(tmp_path):
    d = json.loads(preset_path("tiny-llama").read_text())
    d["rope_parameters"]["rope_theta"] = "big"
    (problem,) = problems(tmp_path, d)
    assert "rope_parameters.rope_theta = 'big'" in problem and "positive number" in problem
    (problem,) = problems(tmp_path, {**CONFIGS["gemma4_text"], "rope_parameters": {"full_attention": 3}})
    assert "full_attention = 3" in problem and "JSON object" in problem


def test_a_partial_rotary_factor_with_scaled_rope_is_refused_where_the_family_turns_the_whole_head(tmp_path):
    """Llama / Qwen3 drop the factor with the default RoPE, as transformers does (tests/test_hf_parity.py), and
    refuse it with a scaled one, on which transformers fails."""
    for family in ("tiny-llama", "tiny-qwen3-sliding"):
        d = CONFIGS[family]
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5}
        (problem,) = problems(tmp_path, {**d, "rope_parameters": rope})
        assert "partial_rotary_factor = 0.5 with rope_type 'linear'" in problem and "whole head" in problem


def test_an_indexer_narrower_than_its_rotary_dims_is_refused(tmp_path):
    for family in ("deepseek_v32", "deepseek_v4"):
        (problem, *_) = problems(tmp_path, {**CONFIGS[family], "index_head_dim": 8})
        assert "indexer.head_dim = 8 (HF index_head_dim): must be at least the rotary dims" in problem, family


def test_zero_layers_names_num_hidden_layers(tmp_path):
    for family, d in CONFIGS.items():
        (problem,) = problems(tmp_path, {**d, "num_hidden_layers": 0})
        assert "num_hidden_layers = 0" in problem, family


def test_zero_kv_heads_is_an_error_and_only_absent_or_null_means_all_heads(tmp_path):
    d = json.loads(preset_path("tiny-llama").read_text())
    (problem,) = problems(tmp_path, {**d, "num_key_value_heads": 0})
    assert "num_key_value_heads = 0" in problem
    for absent in ({**d, "num_key_value_heads": None}, {k: v for k, v in d.items() if k != "num_key_value_heads"}):
        cfg = ctxlab.load_config(write(tmp_path, absent))
        assert {s.num_kv_heads for s in cfg.layers} == {d["num_attention_heads"]}


def test_token_ids_keep_null_as_none(tmp_path):
    d = json.loads(preset_path("tiny-llama").read_text())
    cfg = ctxlab.load_config(write(tmp_path, {**d, "bos_token_id": None, "eos_token_id": None}))
    assert cfg.bos_token_id is None and cfg.eos_token_id == ()


# -------------------------------------------------------------------------------------------- fuzz

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
BUILD_BUDGET = 3_000_000  # parameters: configs above it are valid but not built here


def nested_fields(d: dict, prefix=()) -> list[tuple]:
    """Paths of every field, including the fields of nested objects (rope parameters, per-type dicts)."""
    out = []
    for key, value in d.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(nested_fields(value, (*prefix, key)))
    return out


FIELD_PATHS = [(family, path) for family, d in sorted(CONFIGS.items()) for path in nested_fields(d)]


def replaced(d: dict, path: tuple, value) -> dict:
    d = json.loads(json.dumps(d))
    target = d
    for key in path[:-1]:
        target = target.get(key) if isinstance(target, dict) else None
    if isinstance(target, dict):  # (an earlier edit may have replaced the enclosing object)
        target[path[-1]] = value
    return d


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_values_in_any_field_load_and_build_or_raise_config_error(data, tmp_path_factory):
    family, path = data.draw(st.sampled_from(FIELD_PATHS), label="field")
    edits = [(path, data.draw(json_values, label="value"))]
    if data.draw(st.booleans(), label="second field"):
        edits.append((data.draw(st.sampled_from([p for f, p in FIELD_PATHS if f == family])), data.draw(json_values)))
    d = CONFIGS[family]
    for p, value in edits:
        d = replaced(d, p, value)
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "config.json").write_text(json.dumps(d))  # NaN / Infinity as Python's json writes them
    try:
        cfg = ctxlab.load_config(tmp / "config.json")
        if ctxlab.count_params(cfg)["total"] <= BUILD_BUDGET:
            ctxlab.build_model(cfg, seed=0)
    except ConfigError:
        pass


def test_fuzz_covers_every_family_and_nested_fields():
    families = {f for f, _ in FIELD_PATHS}
    assert families == set(CONFIGS) and len(families) == 7
    assert ("deepseek_v32", ("rope_parameters", "factor")) in FIELD_PATHS
    assert not math.isnan(float(torch.tensor(0.0)))


def test_mhc_with_per_layer_embeddings_is_refused_by_name():
    import dataclasses

    from ctxlab.io.config_file import config_from_dict

    g4 = config_from_dict(CONFIGS["gemma4_text"], name="g4")
    assert g4.per_layer_input_size
    with pytest.raises(ConfigError, match=r"residual = 'mhc' with per_layer_input_size = \d+"):
        g4.replace(residual="mhc", layers=tuple(dataclasses.replace(s, block="hyper") for s in g4.layers))
