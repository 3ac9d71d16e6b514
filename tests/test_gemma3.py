"""Gemma 3: parity with transformers' ``Gemma3ForCausalLM``, caches across the window, the 270M preset.

Tiny random models (every parameter randomised, norms included; fp32, eager attention) are saved by
transformers and loaded by ctxlab.
"""

from __future__ import annotations

import logging

import pytest
import torch

import ctxlab
from ctxlab.io.config_file import config_from_dict, export_config

from conftest import assert_chunked_decode_matches, assert_matches_reference, assert_round_trip, randomize_

SEQ = 20  # longer than the window (8): sliding layers wrap

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 8,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
CASES = {
    # explicit pattern, final softcap, query_pre_attn_scalar != head_dim, linear scaling on the global RoPE;
    # attn_logit_softcapping is set and (as in transformers) has no effect
    "softcaps-linear-rope": {
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    },
    # MQA, the default 5:1 pattern (7 layers: layer 5 global), no softcaps: the 270M shape
    "mqa-default-pattern": {"num_hidden_layers": 7, "num_key_value_heads": 1, "query_pre_attn_scalar": 16},
}


def randomize_gemma3_(model, seed=0):
    """Every parameter random; norm weights are offsets from 1 here (the norm adds the 1)."""
    randomize_(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def hf_gemma3(hf, case, seed=0):
    torch.manual_seed(seed)
    model = hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**{**BASE, **CASES[case]}))
    model.config._attn_implementation = "eager"
    return randomize_gemma3_(model, seed).eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_gemma3(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path), tmp_path


def test_config_is_wired_from_the_mechanisms(pair):
    ref, ours, _ = pair
    cfg, hc = ours.config, ref.config
    assert cfg.family == "gemma3_text" and cfg.norm_unit_offset and cfg.tie_word_embeddings
    assert [s.window for s in cfg.layers] == [8 if t == "sliding_attention" else None for t in hc.layer_types]
    assert {s.rope.theta for s in cfg.layers if s.window} == {10_000.0}
    assert {s.rope.theta for s in cfg.layers if s.window is None} == {1_000_000.0}
    assert all(s.scale == hc.query_pre_attn_scalar**-0.5 and s.qk_norm and s.block == "sandwich" for s in cfg.layers)
    assert cfg.embedding_scale == 64**0.5


def test_logits_and_greedy_tokens_match_transformers(pair):
    ref, ours, _ = pair
    assert_matches_reference(
        ref, ours, torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(1)), 5, 12
    )


def test_save_pretrained_loads_back_in_transformers(pair, hf, tmp_path_factory):
    ref, ours, _ = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    assert_round_trip(hf, ref, ours, tmp_path_factory.mktemp("ours"), ids, attn_implementation="eager")


@pytest.mark.parametrize("chunks", [[SEQ], [3, 9], [1] * 4, [12]])
def test_chunked_prefill_then_decode_equals_full_forward(pair, chunks):
    _, ours, _ = pair
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = assert_chunked_decode_matches(ours, ids, chunks)
    assert cache.nbytes() == sum(ctxlab.kv_cache_bytes_per_layer(ours.config, 30, "float32"))


def test_build_model_norms_start_at_identity():
    """Random init puts norm weights at 0, so (1 + w) = 1, as transformers initialises them."""
    model = ctxlab.build_model(config_from_dict({"model_type": "gemma3_text", **BASE, **CASES["mqa-default-pattern"]}))
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert norms and all(torch.all(p == 0) for p in norms.values())
    x = torch.randn(2, 3, 64)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(model.model.norm(x), rms, atol=1e-6)


def test_legacy_rope_fields_and_multimodal_wrapper_parse_like_transformers(hf):
    """4.x configs (rope_theta, rope_local_base_freq, rope_scaling) and a nested text_config."""
    legacy = {
        **BASE,
        "rope_theta": 500_000.0,
        "rope_local_base_freq": 20_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    ref = hf.Gemma3TextConfig(**legacy).rope_parameters
    cfg = config_from_dict({"model_type": "gemma3_text", **legacy})
    sliding, full = cfg.layers[0], cfg.layers[5]
    assert (sliding.rope.type, sliding.rope.theta) == (ref["sliding_attention"]["rope_type"], 20_000.0)
    assert (full.rope.type, full.rope.theta, full.rope.factor) == ("linear", 500_000.0, 8.0)
    wrapped = config_from_dict({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **legacy}})
    assert wrapped.layers == cfg.layers


def test_a_multimodal_checkpoint_loads_its_text_decoder_with_transformers_logits(hf, tmp_path):
    """transformers writes Gemma3ForConditionalGeneration's text weights as ``language_model.model.*`` (as the
    published multimodal repos name them) beside ``vision_tower.*`` and ``multi_modal_projector.*``."""
    text = {**BASE, **CASES["mqa-default-pattern"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    config = hf.Gemma3Config(text_config=text, vision_config={**vision, "patch_size": 8}, mm_tokens_per_image=4)
    ref = randomize_gemma3_(hf.Gemma3ForConditionalGeneration(config)).eval()
    ref.config.text_config._attn_implementation = "eager"
    ref.save_pretrained(tmp_path)
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_bidirectional_attention_is_refused_with_the_field_named():
    with pytest.raises(ctxlab.ConfigError, match="use_bidirectional_attention"):
        config_from_dict({"model_type": "gemma3_text", **BASE, "use_bidirectional_attention": True})


def test_attention_softcap_is_ignored_with_a_warning_as_transformers_does(caplog):
    with caplog.at_level(logging.WARNING, logger="ctxlab"):
        capped = config_from_dict({"model_type": "gemma3_text", **BASE, "attn_logit_softcapping": 5.0})
    assert "attn_logit_softcapping = 5.0 is ignored" in caplog.text
    assert capped == config_from_dict({"model_type": "gemma3_text", **BASE})


def test_270m_preset_matches_transformers_parameter_count_and_caps_sliding_layers(hf):
    cfg = ctxlab.load_config("gemma3-270m")
    with torch.device("meta"):
        ref = hf.Gemma3ForCausalLM(
            hf.Gemma3TextConfig(
                **{k: v for k, v in export_config(cfg).items() if k not in ("architectures", "model_type")}
            )
        )
    unique = {id(p): p.numel() for p in ref.parameters()}
    assert ctxlab.count_params(cfg)["total"] == sum(unique.values()) == 268_098_176
    n = 32768
    per_layer = ctxlab.kv_cache_bytes_per_layer(cfg, n, "bfloat16")
    token_bytes = 2 * 1 * 256 * 2  # K and V, one KV head of 256, bf16
    assert per_layer == [token_bytes * (512 if s.window else n) for s in cfg.layers]
    assert sum(s.window is None for s in cfg.layers) == 3
