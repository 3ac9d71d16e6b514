"""Residual kinds: how a block's branch output is added back to the residual stream.

A residual kind (``ModelConfig.residual``) answers for itself: how many streams the residual
has (``streams``), how embeddings become the residual (``expand``), which modules the decoder
stack needs to collapse it before the final norm (``stack_modules`` / ``collapse``), the
per-connection module a block uses to split the residual into its branch input and merge the
branch back (``from_config``, ``split`` / ``merge``), and what all of that costs (parameters,
decode FLOPs). ``ResidualScaling`` (ZAYA) is a block-level add, not a residual kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import init
from ..errors import InputError
from ..registry import BLOCK_KINDS, RESIDUAL_KINDS
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

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Unit scales; the biases drawn normal(0, std), as ctxlab always has (seeded builds stay the same)."""
        self.hidden_states_scale.fill_(1.0)
        init.normal_(self.hidden_states_bias, generator, std)
        self.residual_scale.fill_(1.0)
        init.normal_(self.residual_bias, generator, std)

    def forward(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        branch = (branch + self.hidden_states_bias) * self.hidden_states_scale
        return branch + (residual + self.residual_bias) * self.residual_scale

    @staticmethod
    def param_count(hidden_size: int) -> int:
        return 4 * hidden_size


@RESIDUAL_KINDS.register("plain")
class PlainResidual(nn.Module):
    """One residual stream, ``x + branch``, behind the same interface as :class:`HyperConnection`
    (``split`` -> block input, ``merge`` -> new residual), so a config swaps one for the other."""

    @staticmethod
    def from_config(cfg) -> PlainResidual:
        return PlainResidual()

    @staticmethod
    def streams(cfg) -> int:
        return 1

    @staticmethod
    def expand(x: torch.Tensor, cfg) -> torch.Tensor:  # [B, T, H]
        return x

    @staticmethod
    def stack_modules(cfg) -> dict[str, nn.Module]:
        return {}

    @staticmethod
    def collapse(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def stack_param_count(cfg) -> int:
        return 0

    @staticmethod
    def connection_flops(cfg) -> int:
        return 0

    @staticmethod
    def stack_flops(cfg) -> int:
        return 0

    @staticmethod
    def validate(cfg) -> list[str]:
        if cfg.hc_mult != 1:
            return [f"residual = 'plain', hc_mult = {cfg.hc_mult!r}: a plain residual has exactly 1 stream"]
        return []

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


@RESIDUAL_KINDS.register("mhc")
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

    keep_in_fp32 = ("fn", "base", "scale")  # HF: attn_hc / ffn_hc in _keep_in_fp32_modules_strict

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.fn, generator, std)
        init.normal_(self.base, generator, std)
        self.scale.fill_(1.0)

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
        return pre, post, self.project(comb, a_comb, comb_b.view(n, n))

    def project(self, comb: torch.Tensor, gain: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Mixing logits [..., n*n] -> the stream mix [..., n, n]: Sinkhorn-projected (mHC)."""
        n = self.n
        return sinkhorn(comb.view(*comb.shape[:-1], n, n) * gain + base, self.iters, self.eps)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B, T, n, H] -> the block input u [B, T, H] and the mixing weights for :meth:`merge`:
        (post [B, T, n], comb [B, T, n, n]), and on the fused native training path a view of x as
        the third entry (see :func:`ctxlab.nn.mhc_fused.split`)."""
        if self.impl == "fused":
            return mhc_fused.split(self, x)
        pre, post, comb = self.mixing(x)
        return (pre[..., None] * x).sum(dim=2).to(x.dtype), (post, comb)

    def merge(self, x: torch.Tensor, branch: torch.Tensor, mixing: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``X' = post ⊗ branch + combᵀ X`` [B, T, n, H], with x the input of the :meth:`split` that
        gave ``mixing``."""
        if self.impl == "fused":
            return mhc_fused.merge(x, branch, mixing)
        post, comb = (m.to(x.dtype) for m in mixing)
        return post[..., None] * branch[..., None, :] + comb.transpose(-1, -2) @ x

    @staticmethod
    def param_count(hidden_size: int, streams: int) -> int:
        width = (2 + streams) * streams
        return width * streams * hidden_size + width + 3

    # --- the residual kind's answers, read by the decoder stack, blocks and accounting -------

    @staticmethod
    def from_config(cfg) -> HyperConnection:
        return HyperConnection(cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)

    @staticmethod
    def streams(cfg) -> int:
        return cfg.hc_mult

    @staticmethod
    def expand(x: torch.Tensor, cfg) -> torch.Tensor:  # [B, T, H] -> n identical streams [B, T, n, H]
        return x[:, :, None].expand(-1, -1, cfg.hc_mult, -1).contiguous()

    @staticmethod
    def stack_modules(cfg) -> dict[str, nn.Module]:  # collapses the streams before the final norm
        return {"hc_head": HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.norm_eps)}

    @staticmethod
    def collapse(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [B, T, n, H] -> [B, T, H]
        return stack.hc_head(x)

    @staticmethod
    def stack_param_count(cfg) -> int:
        return HyperHead.param_count(cfg.hidden_size, cfg.hc_mult)

    @staticmethod
    def connection_flops(cfg) -> int:
        """Decode FLOPs of one connection: the mixing projection, the collapse (pre X) and the
        stream mix (comb^T X), all matmuls on the fused path."""
        n, h = cfg.hc_mult, cfg.hidden_size
        return 2 * n * h * (2 + n) * n + 2 * n * h + 2 * n * n * h

    @staticmethod
    def stack_flops(cfg) -> int:
        """The head's map and its collapse of the streams."""
        return 2 * cfg.hc_mult * cfg.hidden_size * (cfg.hc_mult + 1)

    @staticmethod
    def validate(cfg) -> list[str]:
        p = []
        if not (isinstance(cfg.hc_mult, int) and cfg.hc_mult >= 1):
            p.append(f"residual = 'mhc', hc_mult = {cfg.hc_mult!r}: mHC needs hc_mult >= 1 streams")
        joining = [name for name, block in BLOCK_KINDS.items() if block.JOINS_STREAMS]
        if any(not BLOCK_KINDS[s.block].JOINS_STREAMS for s in cfg.layers if s.block in BLOCK_KINDS):
            p.append(
                f"residual = 'mhc' needs block = {' or '.join(map(repr, joining))} in every layer "
                "(the block that joins the streams)"
            )
        if cfg.per_layer_input_size:
            p.append(
                f"residual = 'mhc' with per_layer_input_size = {cfg.per_layer_input_size}: per-layer embeddings "
                "are added to one residual stream, not to mHC's streams (no model combines them); set one of them off"
            )
        return p


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

    keep_in_fp32 = ("hc_fn", "hc_base", "hc_scale")  # HF: hc_head in _keep_in_fp32_modules_strict

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.hc_fn, generator, std)
        init.normal_(self.hc_base, generator, std)
        self.hc_scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, n, H] -> [B, T, H]
        if self.impl == "fused":
            return mhc_fused.collapse(self, x)
        flat = x.flatten(2).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre = (
            torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        )
        return (pre[..., None] * x).sum(dim=2).to(x.dtype)

    @staticmethod
    def param_count(hidden_size: int, streams: int) -> int:
        return streams * streams * hidden_size + streams + 1


def set_hc_impl(model: nn.Module, impl: str) -> nn.Module:
    """Run every mHC module of ``model`` (:class:`HyperConnection`, :class:`HyperHead`) on ``impl``:
    ``"fused"`` (the default) or ``"reference"``. Returns ``model``."""
    if impl not in HC_IMPLS:
        raise InputError(f"hc impl = {impl!r}: allowed {list(HC_IMPLS)}")
    for module in model.modules():
        if isinstance(module, (HyperConnection, HyperHead)):
            module.impl = impl
    return model
