"""Logits and greedy tokens equal transformers 5.23 on tiny random Llama and Qwen3 models.

Every parameter is randomised; HF runs in fp32 with eager attention. The checkpoint goes
HF save_pretrained -> ctxlab.from_pretrained, and back: ctxlab save_pretrained -> HF load.
"""

from __future__ import annotations

import pytest
import torch

import ctxlab

from conftest import randomize_

TOL = 1e-4
SEQ = 24  # longer than every test window below


def tiny_llama(hf, **kw):
    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(kw)
    return hf.LlamaForCausalLM(hf.LlamaConfig(**cfg))


def tiny_qwen3(hf, **kw):
    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(kw)
    return hf.Qwen3ForCausalLM(hf.Qwen3Config(**cfg))


CASES = {
    "llama-llama3-rope-bias": lambda hf: tiny_llama(hf),
    "llama-mha-default-rope": lambda hf: tiny_llama(
        hf,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
    ),
    "llama-mqa-linear-rope": lambda hf: tiny_llama(
        hf, num_key_value_heads=1, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    ),
    "qwen3-sliding-yarn": lambda hf: tiny_qwen3(hf),
    # keys transformers' Llama / Qwen3 keep in the config but do not act on: the whole head rotates, Qwen3's MLP
    # has no biases
    "llama-partial-rotary-factor-unused": lambda hf: tiny_llama(
        hf, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, partial_rotary_factor=0.5
    ),
    "qwen3-partial-rotary-factor-and-mlp-bias-unused": lambda hf: tiny_qwen3(
        hf, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, mlp_bias=True
    ),
    "qwen3-all-sliding-untied": lambda hf: tiny_qwen3(
        hf,
        layer_types=["sliding_attention"] * 4,
        sliding_window=3,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}


def hf_model(hf, case: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CASES[case](hf)
    model.config._attn_implementation = "eager"
    return randomize_(model, seed=seed).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_match_transformers(hf, case, tmp_path):
    ref = hf_model(hf, case)
    ref.save_pretrained(tmp_path)
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= TOL

    with torch.no_grad():
        hf_tokens = ref.generate(ids[:, :6], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours_tokens = ctxlab.generate(ours, ids[:, :6], max_new_tokens=12, eos_token_id=[])
    assert torch.equal(ours_tokens, hf_tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_checkpoint_loads_in_transformers(hf, case, tmp_path):
    ref = hf_model(hf, case, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours = ctxlab.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= TOL
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= TOL


def test_sharded_checkpoint_round_trip(hf, tmp_path):
    ref = hf_model(hf, "qwen3-sliding-yarn")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = ctxlab.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    again = ctxlab.from_pretrained(tmp_path / "ours")
    ids = torch.arange(10)[None]
    assert torch.equal(again(ids), ours(ids))


def test_bfloat16_load_runs_close_to_float32(hf, tmp_path):
    """dtype=bfloat16 loads, caches in bf16 (bytes as analytic) and stays close to the fp32 logits."""
    ref = hf_model(hf, "qwen3-sliding-yarn")
    ref.save_pretrained(tmp_path)
    fp32, bf16 = ctxlab.from_pretrained(tmp_path), ctxlab.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    ids = torch.randint(0, ref.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(5))
    cache = bf16.new_cache(1, SEQ)
    assert cache.nbytes() == ctxlab.kv_cache_bytes(bf16.config, SEQ, "bfloat16")
    with torch.no_grad():
        got = torch.cat(
            [bf16(ids[:, :10], cache=cache)] + [bf16(ids[:, i : i + 1], cache=cache) for i in range(10, SEQ)], 1
        )
        expected = fp32(ids)
    assert (got.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()
