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
import torch.nn.functional as F
from torch import nn

from .residual import HyperConnection


class UnconstrainedHyperConnection(HyperConnection):
    def mixing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, n, H] -> pre [B, T, n], post [B, T, n], comb [B, T, n, n] (float32, unprojected)."""
        n = self.n
        flat = x.flatten(2).float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre, post, comb = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        a_pre, a_post, a_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre * a_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post * a_post + post_b)
        eye = torch.eye(n, dtype=comb.dtype, device=comb.device)
        comb = eye + (comb_b + torch.tanh(comb * a_comb)).view(*comb.shape[:-1], n, n)
        return pre, post, comb


def unconstrain(model: nn.Module) -> int:
    """Turn every mHC connection of ``model`` into an unconstrained one, in place (same parameters);
    returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is HyperConnection:
            module.__class__ = UnconstrainedHyperConnection
            changed += 1
    return changed
