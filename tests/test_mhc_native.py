"""ctxlab's native Sinkhorn kernel (``ctxlab/csrc/sinkhorn.cpp``), which mHC's fast path
(``ctxlab.nn.mhc_fused``) uses for its Sinkhorn projection: forward and recomputing backward equal the
PyTorch steps (``sinkhorn_forward_pytorch`` / ``sinkhorn_backward_pytorch``, run in float64 as the
oracle) within float32 rounding, for any number of streams up to 8, any number of tokens (the 16-token
blocks' tails), any iteration count, logits from flat to sharp, and logits or gradients that are strided
views; clear errors for what it does not take, and the PyTorch steps beyond 8 streams.

The kernel needs an x86 CPU with AVX512 and a C++ compiler (it is built with ctxlab's other native
kernels); where they are absent the tests are skipped, and the fast path keeps the PyTorch steps, which
tests/test_mhc_fused.py covers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxlab import native
from ctxlab.nn import mhc_fused

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here"
)

EPS = 1e-6


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t [n, n, N] as a tokens-last tensor ("contiguous"), a transposed view ("transposed", rows and
    columns swapped in memory, tokens still last) or a token-major view ("token_major", token stride n²)."""
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "token_major":
        return t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return t.contiguous()


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, native.SINKHORN_MAX_STREAMS),
    tokens=st.one_of(st.integers(1, 40), st.integers(200, 300)),  # block tails; several threads' blocks
    iters=st.integers(0, 30),
    sharpness=st.sampled_from([0.01, 1.0, 4.0, 12.0]),  # flat to far from converged
    layout=st.sampled_from(["contiguous", "transposed", "token_major"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_pytorch_steps(n, tokens, iters, sharpness, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(n, n, tokens, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, n, tokens, generator=gen, dtype=torch.float64)
    expected = mhc_fused.sinkhorn_forward_pytorch(logits.clone(), iters, EPS)
    expected_grad = mhc_fused.sinkhorn_backward_pytorch(grad, logits, iters, EPS)
    got = mhc_fused.sinkhorn_forward(strided(logits.float(), layout), iters, EPS)
    got_grad = mhc_fused.sinkhorn_backward(strided(grad.float(), layout), strided(logits.float(), layout), iters, EPS)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    # the backward divides by sums as small as eps-sized entries allow: scale the tolerance with the gradient
    scale = max(1.0, expected_grad.abs().max().item())
    torch.testing.assert_close(got_grad.double(), expected_grad, atol=2e-5 * scale, rtol=1e-4)


def test_kernel_result_is_doubly_stochastic():
    """Independent of the oracle: after 20 iterations of init-sized logits every column sums to 1
    (the last step normalises columns) and every row nearly so."""
    logits = torch.randn(4, 4, 100, generator=torch.Generator().manual_seed(0))
    comb = torch.ops.ctxlab.sinkhorn(logits, 20, EPS)
    assert comb.min() > 0
    torch.testing.assert_close(comb.sum(0), torch.ones(4, 100), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(1), torch.ones(4, 100), atol=1e-3, rtol=0)


def test_autograd_node_uses_the_kernel_and_gradchecks_in_float64():
    """The fast path's autograd node in float32 (the kernel) matches its float64 self (the PyTorch
    steps, which tests/test_mhc_fused.py gradchecks)."""
    logits = 3.0 * torch.randn(4, 4, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = torch.randn(4, 4, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for dtype in (torch.float64, torch.float32):
        z = logits.to(dtype).clone().requires_grad_()
        mhc_fused.Sinkhorn.apply(z, 20, EPS).backward(grad.to(dtype))
        grads.append(z.grad.double())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_more_streams_than_the_kernel_takes_use_the_pytorch_steps():
    n = native.SINKHORN_MAX_STREAMS + 1
    logits = torch.randn(n, n, 5, generator=torch.Generator().manual_seed(3))
    expected = mhc_fused.sinkhorn_forward_pytorch(logits.clone(), 20, EPS)
    torch.testing.assert_close(mhc_fused.sinkhorn_forward(logits, 20, EPS), expected)


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (torch.randn(4, 4, 3, dtype=torch.float64), "must be float32"),
        (torch.randn(4, 3, 3), r"must be \[n, n, N\]"),
        (torch.randn(4, 4), r"must be \[n, n, N\]"),
        (torch.randn(3, 4, 4).permute(1, 2, 0), "tokens last"),
        (torch.randn(9, 9, 3), "at most 8"),
    ],
)
def test_kernel_rejects_what_it_does_not_take(logits, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ctxlab.sinkhorn(logits, 20, EPS)
