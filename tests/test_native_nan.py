"""A NaN into ctxlab's native kernels comes out as NaN, as it does from the PyTorch ops they replace, wherever it
sits (a full 16-lane tile or the scalar tail): ``vmaxps`` returns its second operand when one is NaN, so a clamp
or a ReLU written ``max(x, c)`` would turn it into ``c`` (``exp(NaN)`` into 0: the NaN key silently dropped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctxlab import native

pytestmark = pytest.mark.skipif(not native.available(), reason="ctxlab's native kernels did not build here")
NAN = float("nan")


@pytest.mark.parametrize("key", [5, 18], ids=["in-a-tile", "in-the-tail"])
def test_decode_attention_over_a_nan_key_is_nan(key):
    torch.manual_seed(0)
    q = torch.randn(1, 1, 2, 64).bfloat16()
    k, v = torch.randn(1, 1, 20, 64).bfloat16(), torch.randn(1, 1, 20, 64).bfloat16()
    k[0, 0, key, 3] = NAN
    out, lse = torch.ops.ctxlab.decode_attention(q, k, v, 0.125, None, None)
    assert out.isnan().all() and lse.isnan().all()


def test_sinkhorn_of_a_nan_logit_is_nan_for_that_token_only():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, 17)
    logits[1, 2, 3] = NAN
    comb = torch.ops.ctxlab.sinkhorn(logits, 20, 1e-6)
    grad = torch.ops.ctxlab.sinkhorn_backward(torch.randn(4, 4, 17), logits, 20, 1e-6)
    for t in (comb, grad):
        assert t[:, :, 3].isnan().any() and not t[:, :, [0, 1, 2, 4]].isnan().any()


def test_hc_split_with_a_nan_mixing_logit_gives_a_nan_mix():
    torch.manual_seed(0)
    n, H = 4, 64
    M = 2 * n + n * n
    base = torch.randn(M)
    base[2 * n + 1] = NAN  # the logit of comb[0, 1]
    _, _, comb, _, _ = torch.ops.ctxlab.hc_split(
        torch.randn(1, 2, n, H), torch.randn(M, n * H) * 0.1, base, torch.ones(3), 20, 1e-6, 1e-6
    )
    assert comb.isnan().any()


@pytest.mark.parametrize("key", [3, 18], ids=["in-a-tile", "in-the-tail"])
def test_indexer_score_of_a_nan_key_is_nan(key):
    torch.manual_seed(0)
    q, weights = torch.randn(1, 4, 1, 64).bfloat16(), torch.rand(1, 1, 4)
    keys = torch.randn(1, 1, 20, 64).bfloat16()
    keys[0, 0, key, 0] = NAN
    scores = torch.ops.ctxlab.indexer_scores(q, keys, weights, 64**-0.5)
    expected = torch.einsum("bth,bhts->bts", weights, F.relu(q.float() @ keys.float().transpose(-1, -2) * 64**-0.5))
    assert scores[0, 0, key].isnan() and expected[0, 0, key].isnan()
    assert not scores[0, 0, [s for s in range(20) if s != key]].isnan().any()
