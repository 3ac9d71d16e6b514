"""Gemma 4: parity with transformers, cross-layer KV sharing, PLE, K=V, MoE, accounting.

Tiny random ``Gemma4ForCausalLM`` models (every parameter randomised, the ``layer_scalar``
buffers too; fp32, eager attention) are saved by transformers and loaded by ctxlab.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctxlab
from ctxlab.io.config_file import config_from_dict

from conftest import assert_chunked_decode_matches, assert_matches_reference, assert_round_trip, randomize_

TOL = 1e-4
SEQ = 20  # longer than the window (8): sliding layers and their consumers wrap

BASE = dict(
    vocab_size=128,
    vocab_size_per_layer_input=128,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    sliding_window=8,
    num_kv_shared_layers=3,
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
CASES = {
    # layers 3 and 4 (sliding) both read layer 1, layer 5 (full) reads layer 2
    "ple-sharing-doublewide": {},
    "k_eq_v-global": dict(
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        use_double_wide_mlp=False,
    ),
    "moe": dict(
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=24,
        use_double_wide_mlp=False,
    ),
    "sharing-k_eq_v-ple": dict(
        attention_k_eq_v=True, num_global_key_value_heads=1, use_double_wide_mlp=False, num_kv_shared_layers=2
    ),
}


def randomize_gemma_(model, seed=0):
    """All parameters random; q/k norms kept moderate (no 1/sqrt(d) scaling, spec notes); layer scalars random."""
    randomize_(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.6 + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def hf_gemma(hf, case, seed=0):
    if not hasattr(hf, "Gemma4ForCausalLM"):
        pytest.skip("this transformers has no Gemma 4")
    torch.manual_seed(seed)
    model = hf.Gemma4ForCausalLM(hf.Gemma4TextConfig(**{**BASE, **CASES[case]}))
    model.config._attn_implementation = "eager"
    return randomize_gemma_(model, seed).eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_gemma(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path), tmp_path


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
    for i, spec in enumerate(ours.config.layers):
        if spec.kv_source is not None:
            assert cache[i].tensors() == []


def test_consumers_have_no_kv_weights_and_read_the_last_producer_of_their_type():
    cfg = ctxlab.load_config("gemma4-e2b")
    sources = {i: s.kv_source for i, s in enumerate(cfg.layers) if s.kv_source is not None}
    assert sorted(sources) == list(range(15, 35))
    assert {sources[i] for i in sources if cfg.layers[i].window} == {13}  # sliding consumers
    assert {sources[i] for i in sources if cfg.layers[i].window is None} == {14}  # full consumers
    e4b = ctxlab.load_config("gemma4-e4b")
    assert {s.kv_source for s in e4b.layers if s.kv_source is not None} == {22, 23}
    assert sum(s.kv_source is None for s in e4b.layers) == 24


def test_multimodal_checkpoint_loads_text_weights_and_skips_the_rest(hf, tmp_path, caplog):
    """Weights under model.language_model., vision/audio tensors and dead consumer K/V skipped with info lines."""
    ref = hf_gemma(hf, "ple-sharing-doublewide")
    ref.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    wrapped = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    wrapped["model.vision_tower.patch_embedder.weight"] = torch.zeros(4, 4)
    wrapped["model.embed_audio.proj.weight"] = torch.zeros(2, 2)
    wrapped["model.language_model.layers.4.self_attn.k_proj.weight"] = torch.zeros(32, 64)  # consumer's dead K
    save_file(wrapped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="ctxlab"):
        ours = ctxlab.from_pretrained(tmp_path)
    assert "not part of the text decoder" in caplog.text and "read another layer's K/V" in caplog.text
    ids = torch.arange(3, 3 + SEQ)[None]
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL

    wrapped["model.language_model.layers.0.mlp.surprise.weight"] = torch.zeros(1)
    save_file(wrapped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ctxlab.CheckpointError, match="surprise"):
        ctxlab.from_pretrained(tmp_path)


def test_sharing_is_a_switch_not_a_fork(hf, tmp_path):
    """Switching sharing off (kv_source=None, nothing else) gives HF's plain sliding/global model."""
    shared_cfg = config_from_dict(hf_gemma(hf, "sharing-k_eq_v-ple").config.to_dict())
    assert any(s.kv_source is not None for s in shared_cfg.layers)
    plain = hf.Gemma4ForCausalLM(
        hf.Gemma4TextConfig(**{**BASE, **CASES["sharing-k_eq_v-ple"], "num_kv_shared_layers": 0})
    )
    plain.config._attn_implementation = "eager"
    randomize_gemma_(plain, seed=5).eval().save_pretrained(tmp_path)
    ours = ctxlab.from_pretrained(tmp_path)
    switched = shared_cfg.replace(layers=tuple(dataclasses.replace(s, kv_source=None) for s in shared_cfg.layers))
    assert ours.config == switched.replace(name=str(tmp_path))
    ids = torch.arange(3, 3 + SEQ)[None]
    with torch.no_grad():
        assert (ours(ids) - plain(ids).logits).abs().max().item() <= TOL


def test_float16_is_refused_and_bfloat16_works(tmp_path):
    cfg = ctxlab.load_config("gemma4-e2b").replace(
        hidden_size=64,
        per_layer_input_size=4,
        per_layer_vocab_size=64,
        vocab_size=64,
        layers=tuple(
            dataclasses.replace(s, num_heads=2, head_dim=8, intermediate_size=32, num_kv_heads=1)
            for s in ctxlab.load_config("gemma4-e2b").layers[:5]
        ),
    )
    with pytest.raises(ValueError, match="float16 is refused"):
        ctxlab.build_model(cfg, dtype=torch.float16)
    model = ctxlab.build_model(cfg, dtype=torch.bfloat16)
    assert model(torch.arange(10)[None]).dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="float16 is refused"):
        ctxlab.from_pretrained(tmp_path, dtype=torch.float16)


GIB = 1 << 30


def test_parameter_counts_match_the_published_decoders():
    """Spec §3.2: text decoder totals to the unit; effective (Google) and active (26B) parameters."""
    expected_totals = {
        "gemma4-e2b": 4_628_569_344,
        "gemma4-e4b": 7_463_013_376,
        "gemma4-26b-a4b": 25_233_141_760,
        "gemma4-31b": 30_697_345_280,
    }
    counts = {name: ctxlab.count_params(ctxlab.load_config(name)) for name in expected_totals}
    assert {n: c["total"] for n, c in counts.items()} == expected_totals
    assert round(counts["gemma4-e2b"]["effective"] / 1e9, 2) == 2.35  # published "2.3B effective"
    assert round(counts["gemma4-e4b"]["effective"] / 1e9, 2) == 4.45  # published "4.5B effective"
    assert round((counts["gemma4-e2b"]["total"] + counts["gemma4-e2b"]["non_text"]) / 1e9, 1) == 5.1
    assert round(counts["gemma4-e2b"]["per_layer_embedding"] / 1e9, 2) == 2.35
    assert round(counts["gemma4-26b-a4b"]["active"] / 1e9, 2) == 3.82


def test_realized_kv_cache_at_128k():
    """Spec §3.1 B: sliding layers capped at their window, consumers zero: E2B 0.81 GB, E4B 2.17 GB."""
    e2b, e4b = ctxlab.load_config("gemma4-e2b"), ctxlab.load_config("gemma4-e4b")
    n = 131072
    assert ctxlab.kv_cache_bytes(e2b, n, "bfloat16") == 12 * 1024 * 512 + 3 * 2048 * n
    assert round(ctxlab.kv_cache_bytes(e2b, n, "bfloat16") / 1e9, 2) == 0.81
    assert round(ctxlab.kv_cache_bytes(e4b, n, "bfloat16") / 1e9, 2) == 2.17
    # naive: every layer, every token, own K/V (spec §3.1 A, no sharing): 5.64 GB and 13.15 GB
    assert round(ctxlab.kv_cache_bytes(e2b, n, "bfloat16", convention="naive") / 1e9, 2) == 5.64
    assert round(ctxlab.kv_cache_bytes(e4b, n, "bfloat16", convention="naive") / 1e9, 2) == 13.15


@pytest.mark.parametrize("native_kernel", [True, False])
def test_bf16_norms_round_once_as_gemma4rmsnorm_does(hf, tmp_path, native_kernel, monkeypatch):
    """Gemma4RMSNorm multiplies the weight in float32 and rounds the product once; ctxlab rounded the normalised
    input first, then the product (Llama's arithmetic): 26% of a bf16 norm's outputs one ulp off, ~7% more bf16
    error in the logits (found by a bug hunt). Every weighted norm of the model, bit for bit, on the native kernel
    and on PyTorch's ops."""
    from ctxlab import native
    from ctxlab.nn.norms import RMSNorm

    ref = hf_gemma(hf, sorted(CASES)[0]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    ours = ctxlab.from_pretrained(tmp_path, dtype=torch.bfloat16)
    if not native_kernel:
        monkeypatch.setattr(native, "runs_at_inference", lambda *a, **k: False)
    theirs = dict(ref.named_modules())
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, RMSNorm) and module.weight is not None and name in theirs:
            x = torch.randn(3, module.weight.shape[0], generator=torch.Generator().manual_seed(checked))
            x = x.to(torch.bfloat16)
            with torch.no_grad():
                assert torch.equal(module(x), theirs[name](x)), name
            checked += 1
    assert checked >= 4
