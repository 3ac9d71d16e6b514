"""ctxlab's native matrix-vector kernel (``ctxlab/csrc/matvec.cpp``) and the bf16 linears that use it
(``ctxlab.nn.packing``): x wᵀ + b within one bf16 rounding of the float64 product for any shape (tails of
the 16-row tiles and of the 32-column steps), weights read in place (row strides, a tied head, expert
slices: no copies), a decode step's rows to the kernel and a prefill's to ``F.linear``.

The kernel needs an x86 CPU with AVX512-BF16 and a C++ compiler; where either is absent the tests are
skipped (and bf16 linears keep oneDNN's layout, which tests/test_packing.py covers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxlab
from ctxlab import native
from ctxlab.nn import packing
from ctxlab.nn.packing import MATVEC_ROWS, PackedExperts, PackedLinear, pack_linears_
from ctxlab.quant import weight_bytes
from test_fusion import CONFIGS, decode_logits, randomized

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here"
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, MATVEC_ROWS),
    inputs=st.one_of(st.integers(1, 80), st.integers(1000, 1100)),  # tails of a 32-column step
    outputs=st.one_of(st.integers(1, 40), st.integers(500, 700)),  # tails of a 16-row tile, several threads' tiles
    row_padding=st.sampled_from([0, 3, 64]),  # the weight as a column slice of a wider matrix
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_is_the_product_within_one_bf16_rounding(rows, inputs, outputs, row_padding, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=gen).bfloat16()
    w = torch.randn(outputs, inputs + row_padding, generator=gen).bfloat16()[:, :inputs]
    b = torch.randn(outputs, generator=gen).bfloat16() if with_bias else None
    out = torch.ops.ctxlab.matvec(x, w, b, 1)
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    assert out.shape == (rows, outputs) and out.dtype == torch.bfloat16
    # rounding to bf16 (half an ulp: 2^-8 relative) plus float32 accumulation over the products' magnitudes
    bound = 2**-8 * expected.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T + 1)
    assert ((out.double() - expected).abs() <= bound).all()


def test_decode_rows_go_to_the_kernel_and_prefill_rows_to_f_linear(monkeypatch):
    calls = []
    real = torch.ops.ctxlab.matvec
    monkeypatch.setattr(packing, "F", type("F", (), {"linear": lambda *a: calls.append("F.linear") or F.linear(*a)}))
    monkeypatch.setattr(
        torch.ops.ctxlab, "matvec", lambda x, *a: calls.append(("matvec", x.shape[0])) or real(x, *a), raising=False
    )
    linear = torch.nn.Linear(96, 40).bfloat16()
    packed = PackedLinear.of(linear)
    assert packed.native and packed.packed_weight.data_ptr() == linear.weight.data_ptr()  # kept, not copied
    for shape in [(1, 1, 96), (2, 4, 96), (3, 3, 96)]:  # 1, 8 and 9 rows
        x = torch.randn(shape).bfloat16()
        torch.testing.assert_close(packed(x), linear(x), atol=2e-2, rtol=2e-2)
    assert calls == [("matvec", 1), ("matvec", MATVEC_ROWS), "F.linear"]


def test_a_tied_head_and_expert_slices_are_read_in_place():
    cfg = CONFIGS["llama-3-8b"].replace(tie_word_embeddings=True)
    model = ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0)
    before = weight_bytes(model)
    pack_linears_(model)  # without shared=True: the head needs no copy in PyTorch's layout
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.native
    assert model.lm_head.packed_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert weight_bytes(model) == before
    moe = ctxlab.build_model(CONFIGS["laguna-xs2"], dtype=torch.bfloat16, seed=0)
    before = weight_bytes(moe)
    pack_linears_(moe)
    banks = [m for m in moe.modules() if isinstance(m, PackedExperts)]
    assert banks and all(linear.native for bank in banks for linear in bank.gate_up_proj)
    assert weight_bytes(moe) == before


@pytest.mark.parametrize("name", ["llama-with-biases", "laguna-xs2", "deepseek-v4-flash"])
def test_bf16_models_on_the_kernel_give_the_unpacked_logits(name):
    """A full forward (prefill: F.linear) and cached decode (the kernel) of a packed bf16 model against the
    unpacked model, to bf16 rounding; the tiny models' widths leave tails in both of the kernel's loops."""
    cfg = CONFIGS[name]
    model = randomized(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0))
    packed = copy.deepcopy(model)
    assert pack_linears_(packed) > 0
    assert all(m.native for m in packed.modules() if isinstance(m, PackedLinear))
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(decode_logits(packed, ids, 5), decode_logits(model, ids, 5), atol=3e-2, rtol=3e-2)


def test_switch_off_keeps_onednn(monkeypatch):
    native._build.cache_clear()
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    try:
        packed = PackedLinear.of(torch.nn.Linear(64, 32).bfloat16())
        assert not packed.native and packed.packed_weight.is_mkldnn
    finally:
        native._build.cache_clear()


@pytest.mark.slow
def test_a_model_packed_for_compile_decodes_compiled_as_eager(fresh_dynamo):
    """``pack_linears_(for_compile=True)`` keeps only the native linears (the tied head and biases included),
    which inductor traces as the custom op: the compiled step (fullgraph) gives the eager logits."""
    from ctxlab.generate import compiled_decode_step, decode_step
    from test_compile import decode_logits as stepped

    cfg = CONFIGS["llama-with-biases"].replace(tie_word_embeddings=True)
    model = randomized(ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=0))
    assert pack_linears_(model, for_compile=True) > 0 and isinstance(model.lm_head, PackedLinear)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = stepped(model, ids, decode_step, steps=5)
        compiled = stepped(model, ids, compiled_decode_step(model), steps=5)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    moe = ctxlab.build_model(CONFIGS["laguna-xs2"], dtype=torch.bfloat16, seed=0)
    pack_linears_(moe, for_compile=True)
    assert not any(isinstance(m, PackedExperts) for m in moe.modules())  # routed on the host: left as they are
