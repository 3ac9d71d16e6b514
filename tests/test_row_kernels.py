"""ctxlab's inference kernels for the element-wise steps around the products: ``ctxlab::rms_norm``
(``ctxlab/csrc/rms_norm.cpp``) against :meth:`RMSNorm.pytorch_forward`, ``ctxlab::rope``
(``ctxlab/csrc/rope.cpp``) against :meth:`Rotary.pytorch_apply` (bit for bit), ``ctxlab::gated_act``
(``ctxlab/csrc/gated_act.cpp``) against :func:`ctxlab.nn.mlp.pytorch_gated`, and where the modules take
them: at inference only, eager only.

The kernels need an x86 CPU with AVX512-BF16 and a C++ compiler; where either is absent the tests that call
them are skipped (the modules then keep their PyTorch ops, which every other test covers)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ctxlab import native
from ctxlab.config import LayerSpec, RopeSpec
from ctxlab.nn.mlp import GatedMLP, gated, gelu_tanh, pytorch_gated
from ctxlab.nn.norms import RMSNorm
from ctxlab.nn.rope import Rotary

needs_kernel = pytest.mark.skipif(
    not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here"
)


def layer(head_dim: int, rotary_fraction: float = 1.0) -> LayerSpec:
    rope = RopeSpec(theta=10000.0, partial_rotary_factor=rotary_fraction)
    return LayerSpec(num_heads=4, num_kv_heads=2, head_dim=head_dim, intermediate_size=64, rope=rope)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of bf16 at b's magnitude (a, b bf16)."""
    ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
    return (a.float() - b.float()).abs() / ulp


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    dim=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    weighted=st.sampled_from(["none", "weight", "unit_offset", "weight_float32"]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
@example(rows=1, dim=1024, dtype=torch.bfloat16, weighted="weight", scale=1.0, seed=0)  # a decode step's row
def test_rms_norm_kernel_equals_the_module(rows, dim, dtype, weighted, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(
        dim,
        eps=1e-6,
        with_scale=weighted != "none",
        unit_offset=weighted == "unit_offset",
        weight_float32=weighted == "weight_float32",
    ).to(dtype)
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=gen))
    x = (torch.randn(rows, dim, generator=gen) * scale).to(dtype)
    with torch.no_grad():
        expected = norm.pytorch_forward(x)
        out = torch.ops.ctxlab.rms_norm(x, norm.weight, norm.eps, norm.unit_offset, norm.weight_float32)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:  # the sum of squares in another order: the inverse RMS within a few ulps
        torch.testing.assert_close(out, expected, rtol=4e-7, atol=0)
    else:  # ... which moves a bf16 rounding by one ulp where x·r sits at a rounding boundary, rarely
        ulps = bf16_ulps(out, expected)
        assert ulps.max() <= 1.0 and (ulps > 0).sum() <= 1 + 0.02 * ulps.numel()  # rare: not a fraction of a few


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 5),
    tokens=st.integers(1, 20),
    head_dim=st.sampled_from([32, 64, 80, 128, 256]),
    rotary_fraction=st.sampled_from([0.25, 0.5, 1.0]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_kernel_equals_the_pytorch_ops_bit_for_bit(
    batch, heads, tokens, head_dim, rotary_fraction, transposed, seed
):
    gen = torch.Generator().manual_seed(seed)
    rotary = Rotary(layer(head_dim, rotary_fraction))
    rotary_dim = rotary.rotary_dim
    positions = torch.randint(0, 5000, (batch, tokens), generator=gen)
    cos, sin = rotary.cos_sin(positions, torch.bfloat16)
    x = (torch.randn(batch, tokens, heads, head_dim, generator=gen) * 3).bfloat16()
    x = x.transpose(1, 2) if transposed else x.permute(0, 2, 1, 3).contiguous()  # [B, H, T, D], as projected
    out = torch.ops.ctxlab.rope(x, cos, sin, rotary_dim)
    assert out.is_contiguous()
    assert torch.equal(out, rotary.pytorch_apply(x, cos, sin))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    width=st.integers(1, 300),
    activation=st.sampled_from(["silu", "gelu_tanh"]),
    limit=st.sampled_from([None, 0.5, 7.0]),
    layout=st.sampled_from(["halves", "contiguous", "uneven", "size-1 dim between", "size-1 dim moved"]),
    scale=st.sampled_from([1e-2, 1.0, 4.0, 60.0]),
    seed=st.integers(0, 2**16),
)
@example(rows=1, width=2816, activation="silu", limit=None, layout="halves", scale=1.0, seed=0)  # a decode step
@example(rows=1, width=3, activation="gelu_tanh", limit=None, layout="contiguous", scale=60.0, seed=3)  # 1 in 9 differs
@example(rows=3, width=32, activation="silu", limit=None, layout="size-1 dim between", scale=1.0, seed=0)
@example(rows=3, width=32, activation="silu", limit=None, layout="size-1 dim moved", scale=1.0, seed=0)
def test_gated_act_kernel_equals_the_pytorch_ops(rows, width, activation, limit, layout, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    act = torch.nn.functional.silu if activation == "silu" else gelu_tanh
    if layout == "halves":  # the fused gate / up product's halves: rows 2·width apart
        gate, up = (torch.randn(rows, 2 * width, generator=gen) * scale).bfloat16().chunk(2, dim=-1)
    elif layout == "contiguous":
        gate, up = (torch.randn(2, 3, rows, width, generator=gen) * scale).bfloat16().unbind(0)
    elif layout == "uneven":  # rows not evenly spaced (a slice of a slice): the kernel copies them first
        gate, up = (torch.randn(2, 3, rows + 1, width + 2, generator=gen) * scale).bfloat16()[:, :, 1:, 1:-1].unbind(0)
    elif layout == "size-1 dim between":  # [3, 1, rows, I] halves of a sliced [3, 1, rows + 1, 2I]: 3 uneven blocks
        base = (torch.randn(3, 1, rows + 1, 2 * width, generator=gen) * scale).bfloat16()
        gate, up = base[:, :, :rows].chunk(2, dim=-1)
    else:  # [rows, 1, I] from a transpose, contiguous, its size-1 dim's stride rows·I
        gate, up = (torch.randn(2, 1, rows, width, generator=gen) * scale).bfloat16().transpose(1, 2).unbind(0)
    out = torch.ops.ctxlab.gated_act(gate, up, activation, float("inf") if limit is None else limit)
    expected = pytorch_gated(act, gate, up, limit)
    assert out.shape == gate.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    differs = (out.float() - expected.float()).abs() > 1e-30  # below: exp's underflow, handled differently
    if activation == "silu":  # σ from another exp than PyTorch's: equal after the rounding to bf16 but rarely
        torch.testing.assert_close(out, expected, atol=1e-30, rtol=2**-8)
        assert differs.sum() <= 1 + 0.01 * differs.numel()
    else:  # 1 + tanh z cancels for gate < -3 in both (< 3e-3): only there outputs differ, in absolute terms only
        torch.testing.assert_close(out, expected, atol=2e-5 * max(scale, 1.0), rtol=2**-7)
        assert not differs[gate.float() > -3].any()


@needs_kernel
@pytest.mark.parametrize("limit", [None, 5.0])
def test_gated_act_kernel_on_nan_and_infinities(limit):
    gate = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 3.0]).bfloat16()
    up = torch.tensor([1.0, 1.0, 1.0, float("nan"), float("inf")]).bfloat16()
    out = torch.ops.ctxlab.gated_act(gate, up, "silu", float("inf") if limit is None else limit)
    torch.testing.assert_close(out, pytorch_gated(torch.nn.functional.silu, gate, up, limit), equal_nan=True)


@needs_kernel
def test_the_modules_take_the_kernels_at_inference_only(monkeypatch):
    calls = []
    for name in ("rms_norm", "rope", "gated_act"):
        real = getattr(torch.ops.ctxlab, name)
        monkeypatch.setattr(torch.ops.ctxlab, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    norm = RMSNorm(64).bfloat16()
    rotary = Rotary(layer(64))
    mlp = GatedMLP(64, 96).bfloat16()
    x = torch.randn(1, 4, 3, 64).bfloat16()
    cos, sin = rotary.cos_sin(torch.arange(3)[None], torch.bfloat16)
    with torch.no_grad():
        norm(x), rotary.apply(x, cos, sin), mlp(x)
        rotary.apply(x.float(), cos.float(), sin.float())  # float32 rope: PyTorch's ops (see rope.cpp)
        gated(torch.nn.functional.silu, x.float(), x.float())  # float32 gated activation: PyTorch's ops
        gated(torch.nn.functional.relu, x, x)  # an activation the kernel does not have
    assert calls == ["rms_norm", "rope", "gated_act"]
    calls.clear()
    y = norm(x.requires_grad_())  # autograd: the PyTorch ops, which have a backward
    (rotary.apply(y, cos, sin).float().sum() + mlp(y).float().sum()).backward()
    assert calls == [] and x.grad is not None


@needs_kernel
def test_compiled_modules_keep_the_pytorch_ops():
    """Under ``torch.compile`` inductor fuses the norm's and the rotation's ops itself (one graph, no call out)."""
    norm = RMSNorm(64).bfloat16()
    rotary = Rotary(layer(64, 0.5))
    x = torch.randn(1, 4, 3, 64).bfloat16()
    cos, sin = rotary.cos_sin(torch.arange(3)[None], torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(lambda t: rotary.apply(norm(t), cos, sin), fullgraph=True)
        expected = rotary.pytorch_apply(norm.pytorch_forward(x), cos, sin)
        # inductor rounds once per fused loop, where eager rounds after each bf16 op: equal to bf16's precision
        torch.testing.assert_close(compiled(x), expected, atol=4e-2, rtol=2e-2)


@needs_kernel
def test_kernels_refuse_what_they_cannot_take():
    x = torch.randn(2, 8).bfloat16()
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\[8\\] of x's dtype"):
        torch.ops.ctxlab.rms_norm(x, torch.ones(8), 1e-6, False, False)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 or bf16"):
        torch.ops.ctxlab.rms_norm(x.double(), None, 1e-6, False, False)
    q = torch.randn(1, 2, 3, 64).bfloat16()
    cos = torch.randn(1, 1, 3, 64).bfloat16()
    with pytest.raises(RuntimeError, match="rotary_dim must be even"):
        torch.ops.ctxlab.rope(q, cos, cos, 63)
    with pytest.raises(RuntimeError, match="cos and sin must be bf16 \\[1, 1, 3, 32\\]"):
        torch.ops.ctxlab.rope(q, cos, cos, 32)
    with pytest.raises(RuntimeError, match="gate and up must be bf16 \\[..., I\\] of one shape"):
        torch.ops.ctxlab.gated_act(x, x[:, :4], "silu", 1.0)
    with pytest.raises(RuntimeError, match="activation must be 'silu' or 'gelu_tanh', got 'relu'"):
        torch.ops.ctxlab.gated_act(x, x, "relu", 1.0)
    with pytest.raises(RuntimeError, match="limit must be positive"):
        torch.ops.ctxlab.gated_act(x, x, "silu", 0.0)


@needs_kernel
def test_native_op_schemas_take_every_argument_explicitly():
    """The compiled decode step's C++ wrapper (``generate.compiled_decode_step``: Inductor's ``cpp_wrapper``) calls
    each custom op through the dispatcher with the arguments the traced call gave: one given by a schema default
    and left out there fails at run time. No ctxlab op has defaults, so every call site names every argument."""
    defaults = {
        name: [a.name for a in getattr(torch.ops.ctxlab, name).default._schema.arguments if a.has_default_value()]
        for name in native.OUTPUT_SHAPES  # every native op
    }
    assert not {name: args for name, args in defaults.items() if args}
