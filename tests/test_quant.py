"""Weight-only quantization: the packed CPU kernels equal their reference paths, and quantized
logits stay close to bf16 on a tiny model of every family.

Tolerance: random tiny models amplify any perturbation differently (the tiny Gemma 4 turns bf16
rounding alone into a 3.8% logit error, Llama into 0.7%), so the quantization error is measured in
units of the model's own bf16 rounding error (bf16 logits vs float32 logits, same weights):
int8 within 4× that, int4 (group 32) within 30× (measured: 1.4-3.3× and 12-22×).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import ctxlab
from ctxlab.io.config_file import export_config
from ctxlab.quant import Int4Linear, Int8Linear, QuantEmbedding, int4_quantize, quantize_, set_packed, weight_bytes
from ctxlab.reporting.measure import FAMILY_PRESETS, tiny_like


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_quantized_logits_stay_close_to_bf16(name):
    cfg = tiny_like(ctxlab.load_config(name), hidden=128, vocab=256)
    cfg = cfg.replace(layers=cfg.layers[:4])
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    bf16 = ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0)
    with torch.no_grad():
        reference = bf16(ids)
        rounding = relative_error(reference, ctxlab.build_model(cfg, seed=0)(ids))
        int8 = relative_error(quantize_(copy.deepcopy(bf16), "int8")(ids), reference)
        int4 = relative_error(quantize_(copy.deepcopy(bf16), "int4", group_size=32)(ids), reference)
    assert 0 < int8 <= 4 * rounding
    assert int8 < int4 <= 30 * rounding


def test_int8_packed_kernel_equals_the_reference_path():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 3, 64, generator=gen).to(torch.bfloat16)
    q = Int8Linear(linear)
    assert q.packed
    packed = q(x)
    q.packed = False
    reference = q(x)
    expected = F.linear(x, q.codes.to(x.dtype)) * q.scales + linear.bias
    assert torch.equal(reference, expected)
    torch.testing.assert_close(packed, reference, atol=2e-2, rtol=2e-2)  # bf16 rounding of two summation orders


def test_int8_codes_reconstruct_the_weights_within_half_a_step():
    linear = torch.nn.Linear(64, 32)
    q = Int8Linear(linear)
    error = (q.codes.float() * q.scales[:, None] - linear.weight).abs()
    assert (error <= q.scales[:, None] / 2 + 1e-7).all()


def test_int4_packed_kernel_equals_the_dequantized_weights():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 32, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=gen)
    q = Int4Linear(linear, group_size=32, rows=True)
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    rows = torch.arange(32)
    dequantized = q.dequantized_rows(rows)  # [32, 128]
    torch.testing.assert_close(q(x), x @ dequantized.t(), atol=2e-2, rtol=2e-2)
    codes, scales, _ = int4_quantize(linear.weight.detach(), 32)
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantized.float() - linear.weight.float()).abs() <= step / 2 + 2e-2 * step + 1e-3).all()
    assert codes.min() >= 0 and codes.max() <= 15


def test_tied_embedding_and_head_share_one_set_of_codes():
    model = ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), dtype=torch.bfloat16, seed=0)
    assert model.config.tie_word_embeddings
    before = weight_bytes(model)
    quantize_(model, "int8")
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.table is model.lm_head
    ids = torch.tensor([[3, 7, 3]])
    expected = model.lm_head.codes[ids].to(torch.bfloat16) * model.lm_head.scales[ids][..., None]
    assert torch.equal(embed(ids), expected)
    assert weight_bytes(model) < before


def test_quantized_model_generates_with_the_packed_and_reference_paths_alike():
    model = quantize_(ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype=torch.bfloat16, seed=0), "int8")
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    packed = ctxlab.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    set_packed(model, False)
    reference = ctxlab.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    assert packed.shape == (2, 10)
    assert (packed == reference).float().mean() >= 0.9  # bf16 summation order may flip a near tie


def test_bad_quantization_settings_are_refused():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)  # float32
    with pytest.raises(ValueError, match="int4.*bfloat16"):
        quantize_(model, "int4")
    with pytest.raises(ValueError, match="quantize = 'int3'"):
        quantize_(model, "int3")
    bf16 = ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="group_size = 48"):
        quantize_(bf16, "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size = 48"):
        quantize_(bf16, "int8", group_size=48, embedding="int4")
    with pytest.raises(ValueError, match="embedding = 'int2'"):
        quantize_(bf16, "int8", embedding="int2")
    with pytest.raises(ValueError, match="int4.*bfloat16"):
        quantize_(model, "int8", embedding="int4")


@pytest.mark.parametrize("tied", [True, False])
def test_the_embedding_and_head_may_keep_more_bits_than_the_layers(tied):
    cfg = tiny_like(ctxlab.load_config("tiny-llama"), hidden=64, vocab=256).replace(tie_word_embeddings=tied)
    bf16 = ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    mixed = quantize_(copy.deepcopy(bf16), "int4", embedding="int8")
    assert isinstance(mixed.lm_head, Int8Linear) and isinstance(mixed.model.embed_tokens, QuantEmbedding)
    assert isinstance(mixed.model.embed_tokens.table, Int8Linear)
    assert {type(m) for m in mixed.model.layers.modules() if isinstance(m, (Int4Linear, Int8Linear))} == {Int4Linear}
    assert mixed.quantization == "int4, int8 embedding"
    with torch.no_grad():
        reference = bf16(ids)
        errors = {
            how: relative_error(quantize_(copy.deepcopy(bf16), "int4", embedding=how)(ids), reference)
            for how in ("int4", "int8")
        }
    assert errors["int8"] < errors["int4"]
    assert weight_bytes(mixed) < weight_bytes(bf16)


def test_cli_quantize_embedding_needs_quantize(capsys):
    from ctxlab.cli import main

    assert main(["generate", "tiny-llama", "--prompt-ids", "1,2", "--quantize-embedding", "int8"]) == 2
    assert "--quantize-embedding needs --quantize" in capsys.readouterr().err


def test_layers_int4_cannot_take_are_named_and_the_cli_warns(tmp_path, capsys):
    """hidden 72 is no multiple of the int4 group (32): every layer reading the hidden state stays bf16, and
    ``model.quantize_skipped`` says which; the CLI turns that into one warning instead of a silent no-op."""
    from ctxlab.cli import main

    cfg = tiny_like(ctxlab.load_config("llama-3-8b"), hidden=72, vocab=96)
    model = quantize_(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0), "int4")
    skipped = model.quantize_skipped
    reason = "(in_features 72, not a multiple of 32)"
    assert f"lm_head {reason}" in skipped and f"layers.0.self_attn.q_proj {reason}" in skipped
    assert quantize_(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0), "int8").quantize_skipped == []
    (tmp_path / "config.json").write_text(json.dumps(export_config(cfg)))
    argv = ["generate", str(tmp_path / "config.json"), "--prompt-ids", "1,2", "--max-new-tokens", "1"]
    assert main([*argv, "--dtype", "bfloat16", "--quantize", "int4", "--json"]) == 0
    err = capsys.readouterr().err
    assert "ctxlab generate: warning: --quantize int4 left" in err and f"lm_head {reason}" in err


@pytest.mark.parametrize("tied", [True, False])
def test_an_int4_embedding_keeps_half_a_byte_a_code_and_the_bench_counts_one_row_of_it(tied):
    """Rows are looked up from codes two to a byte (the kernel's layout interleaves output channels); an
    untied table keeps nothing else. A decode step reads one row of them, so the bench's bytes leave them out."""
    from ctxlab.bench import decode_read_bytes

    name = "tiny-qwen3-sliding" if tied else "tiny-llama"
    model = ctxlab.build_model(ctxlab.load_config(name), dtype=torch.bfloat16, seed=0)
    assert model.config.tie_word_embeddings == tied
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_(model, "int4")
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and (embed.table is model.lm_head) == tied
    rows = embed.table.row_codes
    assert rows.dtype == torch.uint8 and rows.shape == (table.shape[0], table.shape[1] // 2)
    assert (embed.table.packed_codes is not None) == tied  # the head's matmul layout, only where it is the head
    ids = torch.tensor([[0, 5, table.shape[0] - 1, 5]])
    codes, scales, zeros = int4_quantize(table, 32)
    expected = ((codes[ids[0]].float() - 8) * scales[ids[0]].repeat_interleave(32, 1)).bfloat16()
    expected = (expected.float() + zeros[ids[0]].repeat_interleave(32, 1)).bfloat16()
    torch.testing.assert_close(embed(ids)[0].float(), expected.float(), atol=2e-2, rtol=1e-2)
    looked_up = rows.numel() if tied else weight_bytes(embed)
    assert decode_read_bytes(model, 0) == weight_bytes(model) - looked_up


def test_a_layer_int4_cannot_take_for_its_output_width_is_named_for_it():
    """int4's kernel packs blocks of 16 output channels: a vocabulary of 250 keeps an untied head in bf16, and the
    reason names out_features (its in_features, 128, is a multiple of the group); the table, only looked up, is
    quantized anyway."""
    cfg = tiny_like(ctxlab.load_config("llama-3-8b"), hidden=128, vocab=250).replace(tie_word_embeddings=False)
    model = quantize_(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0), "int4")
    assert model.quantize_skipped[0] == "lm_head (out_features 250, not a multiple of 16)"
    assert isinstance(model.model.embed_tokens, QuantEmbedding)


def test_stack_level_linears_are_quantized_too():
    """Gemma 4's per-layer-embedding projection sits beside the layers and is read at every step."""
    cfg = tiny_like(ctxlab.load_config("gemma4-e2b"), hidden=64, vocab=96)
    model = quantize_(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0), "int8")
    assert isinstance(model.model.per_layer_model_projection, Int8Linear) and model.quantize_skipped == []


def test_an_int8_layer_off_the_packed_kernels_width_compiles():
    """in_features 24 (not a multiple of 16) takes the reference path; written as ``F.linear(x, q) * s`` inductor
    rewrote it into the packed kernel, which crashed the process on that width (torch 2.13)."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(24, 128, dtype=torch.bfloat16))
    assert not layer.packed
    x = torch.randn(2, 1, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(compiled.float(), layer(x).float(), atol=2e-2, rtol=1e-2)
