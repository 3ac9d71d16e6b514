"""config.json files as transformers 5.23 reads them, where a file leaves a field out or says it twice.

Each case saves a tiny random transformers model, edits its config.json the way files in the wild are
written (a top-level ``rope_theta`` beside ``rope_parameters``, a 4.x ``rope_scaling`` beside it, a field
left to the config class's default), and holds ctxlab's logits to transformers' on the edited directory.
"""

from __future__ import annotations

import json

import pytest
import torch

import ctxlab
import test_deepseek_v4
import test_gemma3
import test_gemma4
import test_laguna
from ctxlab.errors import ConfigError
from ctxlab.io.config_file import config_from_dict
from test_hf_parity import tiny_llama, tiny_qwen3

from conftest import randomize_

TOL = 1e-4


def without(*fields):
    def edit(c):
        for field in fields:
            c.pop(field)

    return edit


def llama_theta_outside(c):  # rope_parameters without rope_theta, a top-level one beside it
    c["rope_parameters"].pop("rope_theta")
    c["rope_theta"] = 10.0


def gemma3_thetas_outside(c):  # nested rope_parameters without rope_theta, the 4.x top-level fields beside them
    for kind in ("sliding_attention", "full_attention"):
        c["rope_parameters"][kind].pop("rope_theta")
    c["rope_theta"], c["rope_local_base_freq"] = 70.0, 50.0


def llama_rope_scaling_beside_parameters(c):  # a 4.x rope_scaling beside other rope_parameters: the first wins
    c["rope_parameters"] = {"rope_type": "linear", "factor": 3.0, "rope_theta": 50.0}
    c["rope_scaling"] = {"rope_type": "linear", "factor": 7.0}


def gemma3(hf, **fields):
    return hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**{**test_gemma3.BASE, **fields}))


CASES = {  # name: (the transformers model, saved as it is; the edit of its config.json)
    "llama: top-level rope_theta fills rope_parameters": (
        lambda hf: tiny_llama(hf, rope_parameters={"rope_type": "default", "rope_theta": 10.0}),
        llama_theta_outside,
    ),
    "llama: a 4.x rope_scaling wins over rope_parameters": (
        lambda hf: tiny_llama(hf, rope_parameters={"rope_type": "linear", "factor": 7.0, "rope_theta": 10000.0}),
        llama_rope_scaling_beside_parameters,
    ),
    "gemma3: rope_theta and rope_local_base_freq fill the nested rope_parameters": (
        lambda hf: gemma3(
            hf,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                "full_attention": {"rope_type": "default", "rope_theta": 70.0},
            },
        ),
        gemma3_thetas_outside,
    ),
    "gemma3: num_key_value_heads left out is 4": (
        lambda hf: gemma3(hf, num_attention_heads=8, num_key_value_heads=4),
        without("num_key_value_heads"),
    ),
    "qwen3: head_dim left out is 128": (lambda hf: tiny_qwen3(hf, head_dim=128), without("head_dim")),
    "laguna: gating false is a per-element gate": (
        lambda hf: hf.LagunaForCausalLM(hf.LagunaConfig(**{**test_laguna.BASE, "gating": False})),
        lambda c: None,
    ),
    "gemma4: global layers as wide as the others (transformers saves per_layer_config {})": (
        lambda hf: hf.Gemma4ForCausalLM(hf.Gemma4TextConfig(**{**test_gemma4.BASE, "global_head_dim": 16})),
        lambda c: None,
    ),
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}


def original_max_outside(c):  # a top-level original_max_position_embeddings beside the rope dict's: it wins
    c["original_max_position_embeddings"] = 2


def original_max_left_out(c):  # a scaled rope without original_max_position_embeddings: max_position_embeddings
    c["rope_parameters"].pop("original_max_position_embeddings")


CASES.update(
    {
        "llama yarn: a top-level original_max_position_embeddings wins": (
            lambda hf: tiny_llama(
                hf, rope_parameters={**YARN, "original_max_position_embeddings": 128}, max_position_embeddings=128
            ),
            original_max_outside,
        ),
        "llama yarn: original_max_position_embeddings left out is max_position_embeddings": (
            lambda hf: tiny_llama(hf, rope_parameters=YARN, max_position_embeddings=32),
            original_max_left_out,
        ),
        "llama llama3: original_max_position_embeddings left out is max_position_embeddings": (
            lambda hf: tiny_llama(hf, rope_parameters=LLAMA3, max_position_embeddings=32),
            original_max_left_out,
        ),
    }
)
RANDOMIZE = {"Gemma3ForCausalLM": test_gemma3.randomize_gemma3_, "Gemma4ForCausalLM": test_gemma4.randomize_gemma_}


@pytest.mark.parametrize("case", sorted(CASES))
def test_edited_config_gives_transformers_logits(hf, case, tmp_path):
    build, edit = CASES[case]
    torch.manual_seed(0)
    model = build(hf)
    RANDOMIZE.get(type(model).__name__, randomize_)(model, seed=0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    ref = hf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL


V4_CASES = {  # name: (fields of the transformers config, the edit of its config.json)
    "no partial_rotary_factor nor qk_rope_head_dim: 64 / 512 of the head rotates": (
        {"qk_rope_head_dim": None},
        without("partial_rotary_factor", "qk_rope_head_dim"),
    ),
    "n_shared_experts 2: transformers builds one shared expert": ({"n_shared_experts": 2}, lambda c: None),
    "a per-kind rope dict naming its type with the legacy key 'type' only": (
        {},
        lambda c: c["rope_parameters"]["compress"].pop("rope_type"),
    ),
}


@pytest.mark.parametrize("case", sorted(V4_CASES))
def test_deepseek_v4_config_gives_transformers_logits(hf, case, tmp_path, monkeypatch):
    fields, edit = V4_CASES[case]
    monkeypatch.setitem(test_deepseek_v4.CASES, case, fields)
    model = test_deepseek_v4.hf_v4(hf, case)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = hf.DeepseekV4ForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL


def test_qwen3_sliding_window_left_out_is_4096(hf, tmp_path):
    """``use_sliding_window`` without ``sliding_window``: transformers' default window, on the layers from
    ``max_window_layers`` on."""
    config = {**tiny_qwen3(hf).config.to_dict(), "layer_types": None}
    config.pop("sliding_window")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = hf.Qwen3Config.from_pretrained(tmp_path)
    ours = ctxlab.load_config(tmp_path / "config.json")
    expected = [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
    assert [s.window for s in ours.layers] == expected and 4096 in expected


def test_llama_token_ids_left_out_take_transformers_defaults(hf, tmp_path):
    config = tiny_llama(hf).config.to_dict()
    for field in ("bos_token_id", "eos_token_id"):
        config.pop(field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = hf.LlamaConfig.from_pretrained(tmp_path)
    ours = ctxlab.load_config(tmp_path / "config.json")
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, (ref.eos_token_id,)) == (1, (2,))


@pytest.mark.parametrize("head_differs", [True, False])
def test_tied_config_with_a_stored_head(hf, tmp_path, caplog, head_differs):
    """A tied config whose checkpoint also holds ``lm_head.weight``: transformers unties the model when the two
    differ (and ties it when they are equal); ctxlab loads the same logits and says so."""
    model = randomize_(tiny_llama(hf, tie_word_embeddings=False), seed=0).eval()
    if not head_differs:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    ref = hf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (not head_differs)
    assert ours.config.tie_word_embeddings == (not head_differs)
    assert ("loading it untied" in caplog.text) == head_differs


@pytest.mark.parametrize("value", ["all", True])
def test_gemma4_bidirectional_attention_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        config_from_dict({"model_type": "gemma4_text", **test_gemma4.BASE, "use_bidirectional_attention": value})


def test_gemma4_bidirectional_attention_on_images_only_is_accepted():
    """``"vision"`` (the 26B / 31B files) lets image tokens see each other: the text decoder is unchanged."""
    base = {"model_type": "gemma4_text", **test_gemma4.BASE}
    assert config_from_dict({**base, "use_bidirectional_attention": "vision"}).layers == config_from_dict(base).layers


def _load_both(hf, d, **kwargs):
    ref = hf.AutoModelForCausalLM.from_pretrained(d, **kwargs).eval()
    ours = ctxlab.from_pretrained(d)
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL
    return ours


def test_a_tied_model_stored_as_its_head_only(hf, tmp_path):
    """A tied checkpoint that stores the shared matrix as ``lm_head.weight`` and no embedding: transformers ties
    it the other way (ctxlab reported the embedding missing)."""
    from safetensors.torch import load_file, save_file

    randomize_(tiny_llama(hf, tie_word_embeddings=True), seed=0).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = _load_both(hf, tmp_path, attn_implementation="eager")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_a_tied_deepseek_v4_with_its_head_stored_under_deepseeks_name(hf, tmp_path, monkeypatch):
    """DeepSeek V4 names the head ``head.weight``: stored beside the embedding with the same values in a tied
    config, it is dropped as a tied head (it was refused as unexpected)."""
    from safetensors.torch import load_file, save_file

    case = sorted(test_deepseek_v4.CASES)[0]
    test_deepseek_v4.hf_v4(hf, case).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = load_file(tmp_path / "model.safetensors")
    state["head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = _load_both(hf, tmp_path, experts_implementation="eager")
    assert ours.config.tie_word_embeddings
