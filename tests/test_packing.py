"""Linear weights packed for oneDNN (``ctxlab.nn.packing``): a packed model gives the unpacked model's
logits in a full forward and in cached decode for a tiny model of every family (fused and quantized
models included); a tied head keeps its embedding; a packed model saves the checkpoint's tensors and
stays packed; the CLI packs by default, not with ``--no-pack``, and with ``--compile`` only for the native kernel."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import ctxlab
from ctxlab import native
from ctxlab.nn import packing
from ctxlab.nn.fusion import fuse_projections_
from ctxlab.nn.moe import Experts
from ctxlab.nn.packing import MATVEC_ROWS, READ_DIRECTLY, PackedLinear, grouped_linear, pack_linears_, packable
from ctxlab.quant import quantize_, weight_bytes
from test_fusion import CONFIGS, decode_logits, randomized

pytestmark = pytest.mark.skipif(not packable(torch.float32), reason="this torch build has no oneDNN (mkldnn)")


def plain_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_packed_model_gives_the_unpacked_logits(name, fuse):
    cfg = CONFIGS[name]
    model = randomized(ctxlab.build_model(cfg, seed=0))
    if fuse:
        fuse_projections_(model)
    packed = copy.deepcopy(model)
    count = pack_linears_(packed, shared=True)
    assert count > 0 and count == packed.packed_linears
    # every plain linear left is one whose weight the attention reads directly; no expert bank is left
    assert all(name.rsplit(".", 1)[-1] in READ_DIRECTLY for name in plain_linears(packed))
    assert not any(type(m) is Experts for m in packed.modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), atol=1e-5, rtol=1e-5)
        # across a window / compression-block boundary: the tiny windows and CSA ratio are small
        torch.testing.assert_close(decode_logits(packed, ids, 9), decode_logits(model, ids, 9), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packable(torch.bfloat16), reason="oneDNN has no bf16 linear on this CPU")
def test_bf16_packed_logits_match_to_bf16_rounding():
    cfg = CONFIGS["llama-with-biases"]
    model = randomized(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0))
    fuse_projections_(model)
    packed = copy.deepcopy(model)
    pack_linears_(packed)
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(decode_logits(packed, ids, 5), decode_logits(model, ids, 5), atol=2e-2, rtol=2e-2)


def test_a_tied_head_is_packed_only_on_request_as_a_copy():
    cfg = CONFIGS["llama-3-8b"].replace(tie_word_embeddings=True)
    model = ctxlab.build_model(cfg, seed=0)
    table = model.model.embed_tokens.weight
    before = weight_bytes(model)
    pack_linears_(model)
    assert model.lm_head.weight is table and weight_bytes(model) == before  # no second copy by default
    model = ctxlab.build_model(cfg, seed=0)
    table = model.model.embed_tokens.weight
    pack_linears_(model, shared=True)
    assert isinstance(model.lm_head, PackedLinear) and model.model.embed_tokens.weight is table
    assert weight_bytes(model) == before + table.numel() * table.element_size()  # the packed copy


@pytest.mark.parametrize(
    ("name", "tied"), [("llama-with-biases", False), ("llama-with-biases", True), ("laguna-xs2", False)]
)
def test_a_packed_model_saves_the_checkpoint_layout_and_stays_packed(tmp_path, name, tied):
    cfg = CONFIGS[name].replace(tie_word_embeddings=tied)
    model = randomized(ctxlab.build_model(cfg, seed=0))
    model.save_pretrained(tmp_path / "plain")
    fuse_projections_(model)
    pack_linears_(model, shared=True)
    model.save_pretrained(tmp_path / "packed")
    assert isinstance(model.lm_head, PackedLinear) and not plain_linears(model)
    assert all(type(m) is not Experts for m in model.modules())  # MoE experts: packed again after saving
    plain, packed = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "packed"))
    assert plain.keys() == packed.keys() and all(torch.equal(plain[k], packed[k]) for k in plain)
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ctxlab.from_pretrained(tmp_path / "packed")(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packable(torch.bfloat16), reason="oneDNN has no bf16 linear on this CPU")
def test_quantized_layers_keep_their_kernels():
    model = ctxlab.build_model(CONFIGS["llama-3-8b"], dtype=torch.bfloat16, seed=0)
    quantize_(model, "int8")
    assert pack_linears_(model) == 0  # every linear is int8 already
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_nothing_is_packed_without_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = ctxlab.build_model(CONFIGS["llama-3-8b"], seed=0)
    assert pack_linears_(model) == 0 and plain_linears(model)


def test_cli_packs_by_default_but_not_with_no_pack_or_compile(capsys, monkeypatch):
    import ctxlab.nn.packing as packing
    from ctxlab.cli import main

    counts = []
    monkeypatch.setattr(packing, "pack_linears_", lambda model, **kw: counts.append(pack_linears_(model, **kw)))
    ids = {}
    for flags in ([], ["--no-pack"]):
        assert main(["generate", "tiny-llama", "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", *flags]) == 0
        ids[bool(flags)] = json.loads(capsys.readouterr().out)["generated_ids"]
    assert len(counts) == 1 and counts[0] > 0  # only the default run packed
    assert ids[False] == ids[True]
    from ctxlab.cli import _prepare_weights, build_parser

    args = build_parser().parse_args(["generate", "tiny-llama", "--prompt-ids", "1", "--compile"])
    _prepare_weights(ctxlab.build_model(CONFIGS["llama-3-8b"], seed=0), args)
    assert counts == [counts[0], 0]  # --compile packs only bf16 linears on the native kernel: none in float32


def test_a_onednn_packed_model_refuses_to_compile():
    from ctxlab.generate import compiled_decode_step

    model = ctxlab.build_model(CONFIGS["llama-3-8b"], seed=0)  # float32: oneDNN's layout
    pack_linears_(model)
    with pytest.raises(ctxlab.InputError, match="oneDNN-packed linears.*not packed, or packed with for_compile=True"):
        compiled_decode_step(model)


@pytest.mark.skipif(not native.available(), reason="ctxlab's native kernels did not build here (bf16 packs on them)")
def test_packed_moe_experts_refuse_to_compile_and_for_compile_leaves_them():
    """bf16 experts pack onto the native kernel, whose loop over the chosen experts reads the routing on the host:
    refused by name, as the oneDNN layout is, and left as they are by ``for_compile=True``."""
    from ctxlab.generate import compiled_decode_step

    model = ctxlab.build_model(CONFIGS["laguna-xs2"], dtype=torch.bfloat16, seed=0)
    pack_linears_(model)
    with pytest.raises(ctxlab.InputError, match="packed MoE experts"):
        compiled_decode_step(model)
    model = ctxlab.build_model(CONFIGS["laguna-xs2"], dtype=torch.bfloat16, seed=0)
    pack_linears_(model, for_compile=True)
    assert any(type(m) is Experts for m in model.modules()) and packing.uncompilable_packed(model) == 0


def test_cli_packs_a_tied_head_only_with_pack_tied_head(capsys, monkeypatch):
    import ctxlab.cli as cli
    import ctxlab.nn.packing as packing

    heads = []

    def pack(model, **kw):
        pack_linears_(model, **kw)
        heads.append(isinstance(model.lm_head, PackedLinear))

    monkeypatch.setattr(packing, "pack_linears_", pack)
    base = ["generate", "tiny-qwen3-sliding", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json"]
    ids = []
    for flags in ([], ["--pack-tied-head"]):
        assert cli.main([*base, *flags]) == 0
        ids.append(json.loads(capsys.readouterr().out)["generated_ids"])
    assert ctxlab.load_config("tiny-qwen3-sliding").tie_word_embeddings and heads == [False, True] and ids[0] == ids[1]
    monkeypatch.setattr(cli, "load_for_generation", lambda *a, **k: pytest.fail("loaded a model it then refused"))
    for clash in (["--no-pack"], ["--compile"], ["--quantize", "int8"]):
        assert cli.main([*base, "--pack-tied-head", *clash]) == 2
        assert f"--pack-tied-head with {' '.join(clash)}" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [1, MATVEC_ROWS, MATVEC_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out", [24, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_linear_is_each_group_through_its_own_block(rows, dtype, out, with_bias):
    """DeepSeek V4's grouped output projection and CCA's grouped convolution: a decode step's few bf16 rows go
    through the native matvec, in one call over the groups where each group's outputs are a multiple of 16 and
    one group at a time otherwise, everything else through one einsum; all are the block-diagonal map (+ bias),
    to float32 accumulation of bf16 products."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 4, 40, generator=gen).to(dtype)  # [B, T, g, in]
    weight = torch.randn(4, out, 40, generator=gen).to(dtype)  # [g, out, in]
    bias = torch.randn(4 * out, generator=gen).to(dtype) if with_bias else None
    got = grouped_linear(x, weight, bias)
    exact = torch.cat([x[..., k, :].double() @ weight[k].double().T for k in range(4)], dim=-1)
    exact = exact if bias is None else exact + bias.double()
    assert got.shape == (1, rows, 4 * out) and got.dtype == dtype
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.double(), exact, **tol)
    if dtype == torch.bfloat16 and rows <= MATVEC_ROWS and native.available():
        with torch.profiler.profile() as prof:
            grouped_linear(x, weight, bias)
        assert sum(e.count for e in prof.key_averages() if e.key == "ctxlab::matvec") == (4 if out % 16 else 1)


@pytest.mark.skipif(not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here")
def test_grouped_matvec_refuses_groups_it_cannot_tile():
    x, w = torch.randn(1, 80).bfloat16(), torch.randn(40, 40).bfloat16()
    with pytest.raises(RuntimeError, match="each group's rows \\(N / groups\\) must be a multiple of 16"):
        torch.ops.ctxlab.matvec(x, w, None, 2)
    with pytest.raises(RuntimeError, match="x \\[M, groups·K\\], w \\[N, K\\]"):
        torch.ops.ctxlab.matvec(x, w, None, 3)


@pytest.mark.parametrize(
    "columns, blocked",
    [(30, True), (40, True), (16, False), (10**6, False)],
    ids=["four-blocks", "uneven-blocks", "too-many-blocks", "narrower-than-a-block"],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_many_rows_run_in_column_blocks_equal_to_one_product(monkeypatch, columns, blocked, with_bias):
    """A prefill's product through a wide bf16 weight runs as blocks of at most GEMM_COLUMNS output columns
    (oneDNN is faster on them, see column_blocked_linear), each the same dot products as F.linear's; one
    product where the weight is narrower than a block or wider than GEMM_BLOCKS blocks (an LM head)."""
    monkeypatch.setattr(packing, "GEMM_COLUMNS", columns)
    assert packing.GEMM_BLOCKS == 4
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 48, generator=gen).bfloat16()
    bias = torch.randn(100, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(2, MATVEC_ROWS + 3, 48, generator=gen).bfloat16()
    products = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: products.append(b.shape) or real_mm(a, b, **kw))
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda c, a, b, **kw: products.append(b.shape) or real_addmm(c, a, b, **kw))
    out = packing.native_linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=0, rtol=2**-7)  # bf16 rounding of the sums
    assert out.shape == (2, MATVEC_ROWS + 3, 100) and out.is_contiguous()
    widths = [shape[1] for shape in products]
    assert sum(widths) == (100 if blocked else 0) and all(w <= columns for w in widths)


@pytest.mark.skipif(not native.available(), reason="ctxlab's native kernels did not build here (bf16 packs on them)")
def test_a_tied_head_packed_in_place_still_counts_as_read_every_step():
    from ctxlab.bench import decode_read_bytes

    model = ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), dtype=torch.bfloat16, seed=0)
    assert model.config.tie_word_embeddings
    before = decode_read_bytes(model, 0)
    pack_linears_(model)
    assert model.lm_head.native and model.lm_head.packed_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert decode_read_bytes(model, 0) == before
