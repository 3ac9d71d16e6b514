"""Residual kinds: how a block's branch output is added back to the residual stream."""

import torch
import torch.nn.functional as F
from torch import nn

from . import mhc_fused

HC_IMPLS = ("fused", "reference")


class ResidualScaling(nn.Module):
    """``(branch + b_h) * s_h + (residual + b_r) * s_r`` with four learned [H] vectors
    (HF ``ZayaResidualScaling``); the sum is float32 when the residual is."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden_size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden_size))
        self.residual_scale = nn.Parameter(torch.ones(hidden_size))
        self.residual_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        branch = (branch + self.hidden_states_bias) * self.hidden_states_scale
        return branch + (residual + self.residual_bias) * self.residual_scale

    @staticmethod
    def param_count(hidden_size: int) -> int:
        return 4 * hidden_size


class PlainResidual(nn.Module):
    """One residual stream, ``x + branch``, behind the same interface as :class:`HyperConnection`
    (``split`` -> block input, ``merge`` -> new residual), so a config swaps one for the other."""

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None

    def merge(self, x: torch.Tensor, branch: torch.Tensor, mixing: None) -> torch.Tensor:
        return x + branch

    @staticmethod
    def param_count(hidden_size: int, streams: int) -> int:
        return 0


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] onto (nearly) doubly stochastic matrices, as HF's
    ``DeepseekV4HyperConnection`` does: row softmax + eps (the first row step), then alternately
    normalise columns and rows, ending on columns; ``iters`` column steps in all."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connections, mHC (Xie et al. 2025, arXiv 2512.24880; HF
    ``DeepseekV4HyperConnection``). The residual is ``n`` streams X [B, T, n, H]. From the
    weight-less RMS norm of the flattened streams, one projection ``fn`` (plus static ``base``,
    each part scaled by its gain in ``scale``) gives per token: ``pre`` = σ(.) + eps (how the
    streams collapse into the block input), ``post`` = 2σ(.) (how the block output spreads back)
    and ``comb`` = Sinkhorn(.) (how the streams mix, a doubly stochastic n x n matrix).
    New streams: ``X' = post ⊗ y + combᵀ X``. The mixing weights are computed in float32; the mix
    itself runs in the residual's dtype (as HF casts ``post`` and ``comb`` before mixing).

    ``impl`` picks the schedule: ``"fused"`` (default; :mod:`ctxlab.nn.mhc_fused`, fewer passes
    over the wide stream, Sinkhorn as one recomputing autograd node) or ``"reference"`` (the
    straightforward code below, kept as the oracle); :func:`set_hc_impl` sets it model-wide."""

    impl = "fused"

    def __init__(self, hidden_size: int, streams: int, iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = streams, iters, eps, norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + streams) * streams, streams * hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + streams) * streams))
        self.scale = nn.Parameter(torch.ones(3))

    def mixing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, n, H] -> pre [B, T, n], post [B, T, n], comb [B, T, n, n] (float32)."""
        n = self.n
        flat = x.flatten(2).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre, post, comb = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        a_pre, a_post, a_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre * a_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post * a_post + post_b)
        comb = sinkhorn((comb * a_comb + comb_b).view(*comb.shape[:-1], n, n), self.iters, self.eps)
        return pre, post, comb

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.impl == "fused":
            return mhc_fused.split(self, x)
        pre, post, comb = self.mixing(x)
        return (pre[..., None] * x).sum(dim=2).to(x.dtype), (post, comb)

    def merge(self, x: torch.Tensor, branch: torch.Tensor, mixing: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.impl == "fused":
            return mhc_fused.merge(x, branch, mixing)
        post, comb = (m.to(x.dtype) for m in mixing)
        return post[..., None] * branch[..., None, :] + comb.transpose(-1, -2) @ x

    @staticmethod
    def param_count(hidden_size: int, streams: int) -> int:
        width = (2 + streams) * streams
        return width * streams * hidden_size + width + 3


class HyperHead(nn.Module):
    """Collapse the streams before the final norm with a pre-style map (HF ``DeepseekV4HyperHead``).
    ``impl`` as in :class:`HyperConnection`."""

    impl = "fused"

    def __init__(self, hidden_size: int, streams: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(streams, streams * hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(streams))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, n, H] -> [B, T, H]
        if self.impl == "fused":
            return mhc_fused.collapse(self, x)
        flat = x.flatten(2).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre[..., None] * x).sum(dim=2).to(x.dtype)

    @staticmethod
    def param_count(hidden_size: int, streams: int) -> int:
        return streams * streams * hidden_size + streams + 1


def set_hc_impl(model: nn.Module, impl: str) -> nn.Module:
    """Run every mHC module of ``model`` (:class:`HyperConnection`, :class:`HyperHead`) on ``impl``:
    ``"fused"`` (the default) or ``"reference"``. Returns ``model``."""
    if impl not in HC_IMPLS:
        raise ValueError(f"hc impl = {impl!r}: allowed {list(HC_IMPLS)}")
    for module in model.modules():
        if isinstance(module, (HyperConnection, HyperHead)):
            module.impl = impl
    return model
