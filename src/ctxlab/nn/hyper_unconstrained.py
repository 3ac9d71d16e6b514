"""Unconstrained hyper-connections (Zhu et al. 2024, "Hyper-Connections", arXiv 2409.19606): the
residual mixing matrix is learned freely instead of being projected onto doubly stochastic matrices.

This is the baseline the mHC paper (arXiv 2512.24880, §3) measures against: without the Sinkhorn
projection the product of the mixing matrices across layers can grow without bound (their figure:
composite gain ~3000 vs ~1.6 for mHC). Same parameters as :class:`~ctxlab.nn.residual.HyperConnection`
(so a checkpoint and the parameter count are unchanged); ``comb = I + base + tanh(a * dynamic)``
(HC's identity initialisation of the static residual matrix plus its tanh-bounded dynamic part),
``pre`` and ``post`` as in mHC. Used by the lab's HC-vs-mHC diagnostic; not a config kind.
"""

from __future__ import annotations

import torch
from torch import nn

from .residual import HyperConnection


class UnconstrainedHyperConnection(HyperConnection):
    """HC: the reference mHC computation with the Sinkhorn projection replaced. Always on the
    reference path (the fused path is Sinkhorn's), whatever ``set_hc_impl`` says."""

    impl = "reference"

    def project(self, comb: torch.Tensor, gain: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        n = self.n
        eye = torch.eye(n, dtype=comb.dtype, device=comb.device)
        return eye + base + torch.tanh(comb * gain).view(*comb.shape[:-1], n, n)

    def split(self, x: torch.Tensor):
        pre, post, comb = self.mixing(x)
        return (pre[..., None] * x).sum(dim=2).to(x.dtype), (post, comb)

    def merge(self, x: torch.Tensor, branch: torch.Tensor, mixing):
        post, comb = (m.to(x.dtype) for m in mixing)
        return post[..., None] * branch[..., None, :] + comb.transpose(-1, -2) @ x


def unconstrain(model: nn.Module) -> int:
    """Turn every mHC connection of ``model`` into an unconstrained one, in place (same parameters);
    returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is HyperConnection:
            module.__class__ = UnconstrainedHyperConnection
            changed += 1
    return changed
