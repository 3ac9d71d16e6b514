"""Bad input gives one clear error that names what is wrong, and nothing is partly loaded.

Configs (built directly and via ``load_config``), checkpoints (missing / mis-shaped /
unexpected tensors, pickles, broken shard indexes), caches (overflow, batch size) and the
model's ``input_ids``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctxlab
from ctxlab import LayerSpec, ModelConfig, RopeSpec
from ctxlab.io import checkpoint as checkpoint_io


def layer(**kw) -> LayerSpec:
    return LayerSpec(**{"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 16, **kw})


def config(layers=None, **kw) -> ModelConfig:
    return ModelConfig(**{"family": "llama", "vocab_size": 64, "hidden_size": 32, "layers": layers or (layer(),), **kw})


def config_error(*layers, **kw) -> ctxlab.ConfigError:
    with pytest.raises(ctxlab.ConfigError) as info:
        config(layers or None, **kw)
    return info.value


# --- config validation ----------------------------------------------------------------------


def test_valid_helper_config_builds():
    """The helpers above make a valid config (so each error below comes from the one bad field)."""
    assert config((layer(), layer(kv_source=0))).num_layers == 2


@pytest.mark.parametrize(
    "bad,field,value",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads", "3"),
        (dict(window=0), "window", "0"),
        (dict(window=-4), "window", "-4"),
        (dict(attention="linear"), "attention", "'linear'"),
        (dict(rope=RopeSpec(type="dynamic")), "rope.type", "'dynamic'"),
        (dict(rope=RopeSpec(type="yarn", original_max_position_embeddings=64)), "rope.factor", "missing"),
    ],
    ids=["heads-not-divisible", "window-0", "window-negative", "unknown-attention", "unknown-rope", "yarn-no-factor"],
)
def test_bad_layer_field_names_field_and_value(bad, field, value):
    """One bad layer field gives one ConfigError naming the layer, the field and the value."""
    err = config_error(layer(), layer(**bad))
    assert len(err.problems) == 1
    assert "layers[1]" in err.problems[0] and field in err.problems[0] and value in err.problems[0]
    assert err.problems[0] in str(err)


@pytest.mark.parametrize(
    "layers,at",
    [
        ((layer(kv_source=1), layer()), "layers[0].kv_source = 1"),  # a later layer
        ((layer(), layer(kv_source=2), layer()), "layers[1].kv_source = 2"),  # a later layer
        ((layer(), layer(kv_source=1)), "layers[1].kv_source = 1"),  # itself
        ((layer(), layer(kv_source=0), layer(kv_source=1)), "layers[2].kv_source = 1"),  # a consumer
        ((layer(head_dim=8), layer(head_dim=16, kv_source=0)), "layers[1].kv_source = 0"),  # other head_dim
        ((layer(kv_source=-1),), "layers[0].kv_source = -1"),
    ],
    ids=["later-layer-0", "later-layer-1", "itself", "consumer", "other-head-dim", "negative"],
)
def test_bad_kv_source_is_refused(layers, at):
    """kv_source must point at an earlier producer layer of the same shape; the error names the pair."""
    err = config_error(*layers)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(at)


def test_kv_source_head_dim_mismatch_says_what_differs():
    """A consumer whose head_dim differs from its producer's names head_dim and both values."""
    (problem,) = config_error(layer(head_dim=8), layer(head_dim=16, kv_source=0)).problems
    assert re.search(r"head_dim 16 vs 8", problem)


@pytest.mark.parametrize("vocab", [0, -5])
def test_bad_vocab_size(vocab):
    """vocab_size must be a positive integer."""
    (problem,) = config_error(vocab_size=vocab).problems
    assert f"vocab_size = {vocab}" in problem


def test_several_problems_are_listed_in_one_error():
    """Every problem of a config is reported at once, one per line."""
    err = config_error(layer(window=0), layer(attention="linear"), layer(num_kv_heads=3), vocab_size=0)
    assert len(err.problems) == 4
    msg = str(err)
    for needle in ("vocab_size = 0", "layers[0].window = 0", "layers[1].attention = 'linear'", "layers[2].num_heads"):
        assert needle in msg
    assert "4 problem" in msg


def test_replace_validates_again():
    """``ModelConfig.replace`` re-validates: an impossible change raises ConfigError."""
    with pytest.raises(ctxlab.ConfigError, match="hidden_size = 0"):
        config().replace(hidden_size=0)


# --- config.json via load_config ------------------------------------------------------------


def tiny_config_json(name: str = "tiny-qwen3-sliding") -> dict:
    return json.loads((ctxlab.presets.PRESET_DIR / f"{name}.json").read_text())


def write_config(tmp_path, d: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


def test_qwen3_layer_types_wrong_length_and_unknown_type_both_reported(tmp_path):
    """layer_types with the wrong length and an unknown type: both problems in one ConfigError."""
    d = tiny_config_json()
    d["layer_types"] = ["sliding_attention", "linear_attention", "full_attention"]  # 3 entries, 4 layers
    with pytest.raises(ctxlab.ConfigError) as info:
        ctxlab.load_config(write_config(tmp_path, d))
    assert len(info.value.problems) == 2
    msg = str(info.value)
    assert "layer_types" in msg and "3 entries" in msg and "num_hidden_layers is 4" in msg
    assert "linear_attention" in msg and "sliding_attention" in msg  # the bad value and the allowed ones


def test_unknown_model_type(tmp_path):
    """An unsupported model_type names it and the supported ones."""
    d = tiny_config_json("tiny-llama")
    d["model_type"] = "mamba"
    with pytest.raises(ctxlab.ConfigError, match=r"model_type = 'mamba'.*llama.*qwen3"):
        ctxlab.load_config(write_config(tmp_path, d))


def test_unknown_rope_type_in_config_json(tmp_path):
    """An unimplemented rope_type in config.json is refused, naming it and the allowed types."""
    d = tiny_config_json("tiny-llama")
    d["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ctxlab.ConfigError, match=r"rope_type = 'dynamic'.*yarn"):
        ctxlab.load_config(write_config(tmp_path, d))


def test_unknown_preset_lists_the_presets():
    """A name that is neither a preset nor a path lists every available preset."""
    with pytest.raises(ctxlab.ConfigError) as info:
        ctxlab.load_config("tiny-lama")
    msg = str(info.value)
    assert "'tiny-lama'" in msg
    assert ctxlab.preset_names() and all(name in msg for name in ctxlab.preset_names())


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_missing_required_field(tmp_path, field):
    """A config.json without a required field names that field."""
    d = tiny_config_json("tiny-llama")
    del d[field]
    with pytest.raises(ctxlab.ConfigError, match=f"'{field}' is missing"):
        ctxlab.load_config(write_config(tmp_path, d))


def test_zero_attention_heads_in_config_json_is_a_config_error(tmp_path):
    """num_attention_heads = 0 (and no head_dim) is a ConfigError naming the field, not a ZeroDivisionError."""
    d = tiny_config_json("tiny-llama")
    d["num_attention_heads"] = 0
    del d["head_dim"]
    with pytest.raises(ctxlab.ConfigError, match="num_attention_heads|num_heads"):
        ctxlab.load_config(write_config(tmp_path, d))


def test_invalid_json_is_a_config_error(tmp_path):
    """A config.json that is not JSON gives a ConfigError naming the file."""
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ctxlab.ConfigError, match="not valid JSON"):
        ctxlab.load_config(path)


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny-llama checkpoint directory and the model that wrote it."""
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    return d, model


def copy_checkpoint(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_misshaped_and_unexpected_tensors_in_one_error(saved, tmp_path, monkeypatch):
    """All three mismatches are listed in one CheckpointError, before any tensor data is read."""
    d = copy_checkpoint(saved[0], tmp_path / "ckpt")
    state = load_file(d / "model.safetensors")
    missing, misshaped, unexpected = (
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.0.self_attn.extra.weight",
    )
    del state[missing]
    state[misshaped] = torch.zeros(8, 32)  # model: [16, 32] (2 KV heads x 8)
    state[unexpected] = torch.zeros(3)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})

    data_reads = spy_on_tensor_reads(monkeypatch)
    with pytest.raises(ctxlab.CheckpointError) as info:
        ctxlab.from_pretrained(d)
    msg = str(info.value)
    for name in (missing, misshaped, unexpected):
        assert name in msg
    assert "missing" in msg and "unexpected" in msg and "wrong shape" in msg
    assert "[8, 32]" in msg and "[16, 32]" in msg
    assert data_reads == []


def spy_on_tensor_reads(monkeypatch) -> list[str]:
    """Record every tensor whose data ``ctxlab.io.checkpoint`` reads (headers are free)."""
    reads: list[str] = []
    real_safe_open = checkpoint_io.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, name):
            return self._f.get_slice(name)

        def get_tensor(self, name):
            reads.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(checkpoint_io, "safe_open", Spy)
    return reads


def test_spy_sees_tensor_reads_of_a_valid_load(saved, monkeypatch):
    """(Checks the spy above: a successful load does read every tensor through it.)"""
    reads = spy_on_tensor_reads(monkeypatch)
    ctxlab.from_pretrained(saved[0])
    assert set(reads) == set(saved[1].state_dict())


def test_pickle_only_checkpoint_is_refused_without_unpickling(saved, tmp_path, monkeypatch):
    """A directory with only pytorch_model.bin: CheckpointError about pickle/safetensors; torch.load never runs."""
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_bytes((saved[0] / "config.json").read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    calls = []

    def forbidden_load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", forbidden_load)
    with pytest.raises(ctxlab.CheckpointError) as info:
        ctxlab.from_pretrained(d)
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg
    assert calls == []


def test_index_naming_a_missing_shard(saved, tmp_path):
    """A sharded index naming a shard file that does not exist: CheckpointError naming the file."""
    d = tmp_path / "sharded"
    saved[1].save_pretrained(d, max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (d / shards[-1]).unlink()
    with pytest.raises(ctxlab.CheckpointError, match=re.escape(shards[-1])):
        ctxlab.from_pretrained(d)


def test_index_listing_a_tensor_its_shard_lacks(saved, tmp_path):
    """An index entry for a tensor that is not in the named shard is a CheckpointError naming it."""
    d = tmp_path / "sharded"
    saved[1].save_pretrained(d, max_shard_bytes=20_000)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = next(iter(index["weight_map"].values()))
    path.write_text(json.dumps(index))
    with pytest.raises(ctxlab.CheckpointError, match=r"model\.layers\.0\.mlp\.ghost\.weight"):
        ctxlab.from_pretrained(d)


@pytest.mark.parametrize("first_shards, then_shards", [(20_000, None), (None, 20_000)])
def test_saving_over_a_checkpoint_leaves_only_the_new_weights(saved, tmp_path, first_shards, then_shards):
    """Another model saved where a checkpoint is (sharded over single, or single over sharded): the old shards,
    index or single file are removed, and the directory loads as the new model (the old index was read first)."""
    other = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=1)
    saved[1].save_pretrained(tmp_path, max_shard_bytes=first_shards)
    other.save_pretrained(tmp_path, max_shard_bytes=then_shards)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != "config.json")
    assert (
        files == ["model.safetensors"]
        if then_shards is None
        else all(f.startswith("model-") or "index" in f for f in files)
    )
    back = ctxlab.from_pretrained(tmp_path)
    for name, t in other.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_a_single_file_wins_over_a_stale_index(saved, tmp_path):
    """model.safetensors beside an index whose shards are gone (transformers' own re-save leaves that): the single
    file is read, as transformers reads it."""
    d = copy_checkpoint(saved[0], tmp_path / "ckpt")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    assert ctxlab.from_pretrained(d).state_dict().keys() == saved[1].state_dict().keys()


def test_an_index_mapping_to_something_other_than_file_names(saved, tmp_path):
    d = tmp_path / "sharded"
    saved[1].save_pretrained(d, max_shard_bytes=20_000)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = 3
    path.write_text(json.dumps(index))
    with pytest.raises(ctxlab.CheckpointError, match="weight_map"):
        ctxlab.from_pretrained(d)


def test_truncated_safetensors_file_is_a_checkpoint_error(saved, tmp_path):
    """A truncated (e.g. half-downloaded) safetensors file gives a CheckpointError naming the file."""
    d = copy_checkpoint(saved[0], tmp_path / "ckpt")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ctxlab.CheckpointError, match="model.safetensors"):
        ctxlab.from_pretrained(d)


def test_directory_without_config_json(saved, tmp_path):
    """A checkpoint directory without config.json is a ConfigError that says so."""
    d = tmp_path / "no-config"
    d.mkdir()
    (d / "model.safetensors").write_bytes((saved[0] / "model.safetensors").read_bytes())
    with pytest.raises(ctxlab.ConfigError, match="config.json"):
        ctxlab.from_pretrained(d)


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    """A path that is not a directory gives a CheckpointError naming it."""
    with pytest.raises(ctxlab.CheckpointError, match="not a directory"):
        ctxlab.from_pretrained(tmp_path / "nowhere")


def test_valid_load_after_a_failed_load(saved, tmp_path):
    """A failed load leaves nothing behind: fixing the file and loading again gives the saved weights."""
    d = copy_checkpoint(saved[0], tmp_path / "ckpt")
    good = (d / "model.safetensors").read_bytes()
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    model = None
    with pytest.raises(ctxlab.CheckpointError, match="model.norm.weight"):
        model = ctxlab.from_pretrained(d)
    assert model is None

    (d / "model.safetensors").write_bytes(good)
    model = ctxlab.from_pretrained(d)
    expected = saved[1].state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())
    ids = torch.arange(5, 17)[None]
    assert torch.equal(model(ids), saved[1](ids))


# --- cache ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3-sliding"])
def model(request):
    return ctxlab.build_model(ctxlab.load_config(request.param), seed=0)


IDS = torch.arange(3, 40)[None]  # 37 tokens


@torch.no_grad()
def test_overflow_names_capacity_and_step_and_leaves_the_cache_usable(model):
    """Overflow: CacheOverflowError with max_tokens and the steps asked for; length unchanged; still usable."""
    cache = model.new_cache(1, 10)
    model(IDS[:, :9], cache=cache)
    with pytest.raises(ctxlab.CacheOverflowError) as info:
        model(IDS[:, 9:12], cache=cache)  # steps 9, 10, 11; capacity 10
    msg = str(info.value)
    assert "max_tokens=10" in msg and re.search(r"\b11\b", msg)
    assert isinstance(info.value, IndexError)
    assert len(cache) == 9

    logits = model(IDS[:, 9:10], cache=cache)  # exactly fits
    assert len(cache) == 10
    assert (logits[0, -1] - model(IDS[:, :10])[0, -1]).abs().max().item() <= 1e-4
    with pytest.raises(ctxlab.CacheOverflowError, match=r"max_tokens=10(.|\n)*step\S* 10\b"):
        model(IDS[:, 10:11], cache=cache)
    assert len(cache) == 10


@torch.no_grad()
def test_prefill_longer_than_the_cache_overflows_before_writing(model):
    """A prefill longer than the whole cache overflows before anything is written."""
    cache = model.new_cache(1, 8)
    with pytest.raises(ctxlab.CacheOverflowError, match="max_tokens=8"):
        model(IDS[:, :9], cache=cache)
    assert len(cache) == 0
    assert all(not t.any() for c in cache.layers for t in c.tensors())


@torch.no_grad()
def test_wrong_batch_size_for_the_cache(model):
    """Input batch size != the cache's: ValueError naming both; the cache is unchanged and still works."""
    cache = model.new_cache(2, 16)
    model(IDS[:, :4].expand(2, -1), cache=cache)
    with pytest.raises(ValueError, match=r"batch size 1.*2"):
        model(IDS[:, 4:5], cache=cache)
    assert len(cache) == 4
    logits = model(IDS[:, 4:5].expand(2, -1), cache=cache)
    assert (logits[:, -1] - model(IDS[:, :5])[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("batch,tokens,name", [(0, 10, "batch_size"), (-1, 10, "batch_size"), (1, 0, "max_tokens")])
def test_new_cache_needs_positive_sizes(model, batch, tokens, name):
    """``new_cache`` with a non-positive batch size or capacity is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=f"{name} = {batch if name == 'batch_size' else tokens}"):
        model.new_cache(batch, tokens)


# --- model input ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [128, 1000, -1])
def test_token_ids_out_of_range(model, bad_id):
    """A token id >= vocab_size or negative is a ValueError naming the allowed range."""
    ids = torch.tensor([[5, bad_id, 7]])
    with pytest.raises(ValueError, match=re.escape("[0, 128)")):
        model(ids)


def test_out_of_range_ids_leave_the_cache_untouched(model):
    """Rejected input does not advance the cache."""
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(IDS[:, :3], cache=cache)
        with pytest.raises(ValueError):
            model(torch.tensor([[128]]), cache=cache)
    assert len(cache) == 3


@pytest.mark.parametrize(
    "ids",
    [torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]], dtype=torch.uint8), torch.tensor([1, 2]), [[1, 2]]],
    ids=["float", "uint8", "1-d", "list"],
)
def test_non_integer_or_badly_shaped_input(model, ids):
    """Float / non-index dtypes, 1-D tensors and plain lists are ValueErrors describing input_ids."""
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


def test_empty_input(model):
    """A [B, 0] input is a ValueError."""
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.empty(2, 0, dtype=torch.long))


def test_errors_share_a_base_class():
    """Every deliberate error is a CtxlabError and still the matching builtin (ValueError / IndexError)."""
    assert issubclass(ctxlab.ConfigError, ctxlab.CtxlabError) and issubclass(ctxlab.ConfigError, ValueError)
    assert issubclass(ctxlab.CheckpointError, ctxlab.CtxlabError) and issubclass(ctxlab.CheckpointError, ValueError)
    assert issubclass(ctxlab.CacheOverflowError, ctxlab.CtxlabError)
    assert issubclass(ctxlab.CacheOverflowError, IndexError)


# --- combinations of mechanisms the code does not implement: refused up front -------------------


def test_mechanism_combinations_are_refused_with_the_field_named():
    import dataclasses

    from ctxlab.config import MoESpec

    v32 = ctxlab.load_config("deepseek-v3.2")
    layers = list(v32.layers)
    layers[1] = dataclasses.replace(layers[1], kv_source=0)
    with pytest.raises(ctxlab.ConfigError, match=r"layers\[1\].*kv_source.*'gqa' only"):
        v32.replace(layers=tuple(layers))
    no_q_lora = dataclasses.replace(v32.layers[0], mla=dataclasses.replace(v32.layers[0].mla, q_lora_rank=None))
    with pytest.raises(ctxlab.ConfigError, match="q_lora_rank must be set"):
        v32.replace(layers=(no_q_lora,))
    bad_groups = dataclasses.replace(v32.layers[5], moe=MoESpec(8, 3, 4, "biased_topk", n_group=4, topk_group=1))
    with pytest.raises(ctxlab.ConfigError, match="group-limited routing"):
        v32.replace(layers=(bad_groups,))


def test_malformed_native_config_is_a_config_error(tmp_path):
    import json

    for bad in ([1, 2], {"model_type": "ctxlab"}, {"model_type": "ctxlab", "ctxlab": {"layers": [1]}}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ctxlab.ConfigError):
            ctxlab.load_config(tmp_path)


def test_float32_residual_stream_works_with_bf16_weights_in_every_block_kind():
    cfg = ctxlab.load_config("tiny-llama").replace(residual_fp32=True)
    model = ctxlab.build_model(cfg, dtype=torch.bfloat16)
    assert model(torch.arange(8)[None]).dtype == torch.bfloat16


def test_integer_weights_are_listed_with_the_other_problems_before_any_data_is_read(saved, tmp_path, monkeypatch):
    """An integer tensor where the model has a floating-point weight is a CheckpointError naming it, in the same
    error as a mis-shaped tensor, from the headers alone (it was a torch RuntimeError, then a second error)."""
    from safetensors.torch import load_file, save_file

    d = copy_checkpoint(saved[0], tmp_path / "ckpt")
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"] = torch.ones_like(state["model.norm.weight"], dtype=torch.int32)
    state["model.layers.0.input_layernorm.weight"] = torch.ones(3)
    save_file(state, d / "model.safetensors")
    reads = spy_on_tensor_reads(monkeypatch)
    with pytest.raises(ctxlab.CheckpointError) as info:
        ctxlab.from_pretrained(d)
    message = str(info.value)
    assert "stored as integers, not floating point (1):\n    model.norm.weight" in message
    assert "model.layers.0.input_layernorm.weight: checkpoint [3]" in message and reads == []
