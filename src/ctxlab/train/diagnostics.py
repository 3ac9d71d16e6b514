"""Training diagnostics of hyper-connections, as in the mHC paper (Xie et al. 2025, arXiv 2512.24880, §4.3):
the gain magnitude of the composite residual mapping across layers.

Each connection maps the streams by ``X' = combᵀ X + ...`` (``HyperConnection.merge``), so the residual
path through every connection of the model is ``M = comb_Lᵀ ··· comb_1ᵀ`` (per token). Its forward gain
is the largest absolute row sum of ``M`` and its backward gain the largest absolute column sum; the
paper's "Amax gain magnitude" is the maximum over tokens. A doubly stochastic ``comb`` (mHC) keeps both
near 1; unconstrained hyper-connections can blow up.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.residual import HyperConnection


def hyper_connections(model: nn.Module) -> list[HyperConnection]:
    return [m for m in model.modules() if isinstance(m, HyperConnection)]


@torch.no_grad()
def residual_gains(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Forward ``inputs`` [B, T] once, capturing every connection's ``comb`` [B, T, n, n] in model order;
    returns the composite and the largest single-layer gains (empty for models without connections)."""
    connections = hyper_connections(model)
    if not connections:
        return {}
    combs: list[torch.Tensor] = []

    def capture(hc: HyperConnection):
        original = type(hc).mixing

        def mixing(x):
            out = original(hc, x)
            combs.append(out[2])
            return out

        return mixing

    impls = {hc: hc.impl for hc in connections}
    for hc in connections:  # instance attribute shadows the class method for this forward only
        hc.mixing = capture(hc)
        hc.impl = "reference"  # the path that computes ``comb`` through ``mixing`` (the fused one equals it)
    try:
        model(inputs)
    finally:
        for hc in connections:
            del hc.mixing
            hc.impl = impls[hc]
    composite = torch.eye(combs[0].shape[-1], dtype=torch.float64).expand_as(combs[0]).double()
    single = 0.0
    for comb in combs:
        h = comb.double().transpose(-1, -2)  # [B, T, n, n], the residual map of this connection
        composite = h @ composite
        single = max(single, float(h.abs().sum(-1).amax()))
    return {
        "hc_composite_gain_fwd": float(composite.abs().sum(-1).amax()),
        "hc_composite_gain_bwd": float(composite.abs().sum(-2).amax()),
        "hc_max_layer_gain": single,
    }
