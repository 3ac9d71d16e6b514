"""Sibling projections of one input as one matmul, for inference.

A decode step multiplies one token by every weight matrix; at the widths of small models each
matrix-vector product is short, and the fixed cost of a kernel call is a large part of it. Linears
that read the same input -- attention's q / k / v (and an output gate), an MLP's gate / up -- can run
as ONE product with their weights stacked along the output axis, and the output is split back. Each
output row is the same dot product as before, so the result is the same up to the summation order
of the GEMM kernel, and quantization per output row (int8 per channel, int4 per group of inputs)
gives identical codes whether it runs before or after the stacking. vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear`` do this at load time; llama.cpp keeps them apart.

A module declares its groups in ``FUSIBLE`` (``{"qkv_proj": ("q_proj", "k_proj", "v_proj")}``) and
computes them through :func:`project`, which returns one output per name (``None`` for a projection
the module does not have). :func:`fuse_projections_` replaces each group by a
:class:`FusedProjections`; the names it replaced become ``None``. A fused model is for inference
(forward, generate, bench, quantize after fusing); its state dict no longer has the HF names, and
``save_pretrained`` writes it through :func:`separate_projections`, which puts the separate linears
back for the duration (views of the fused weights, no copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class FusedProjections(nn.Module):
    """The linears ``names`` (``None`` where absent) of one input as one ``nn.Linear`` [sum(out), in]."""

    def __init__(self, names: tuple[str, ...], linears: dict[str, nn.Linear]):
        super().__init__()
        first = next(iter(linears.values()))
        weight = torch.cat([linear.weight.detach() for linear in linears.values()])
        self.linear = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device="meta")
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if first.bias is not None:
            bias = torch.cat([linear.bias.detach() for linear in linears.values()])
            self.linear.bias = nn.Parameter(bias, requires_grad=False)
        self.names = tuple(linears)  # the projections present, in the order of the stacked weight
        self.sizes = [linear.out_features for linear in linears.values()]
        self.slots = [names.index(name) for name in linears]  # where each output goes in the result
        self.width = len(names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # [..., in] -> one [..., out_i] per name
        out: list[torch.Tensor | None] = [None] * self.width
        for slot, part in zip(self.slots, self.linear(x).split(self.sizes, dim=-1), strict=True):
            out[slot] = part
        return tuple(out)


def project(module: nn.Module, x: torch.Tensor, group: str) -> tuple[torch.Tensor | None, ...]:
    """``module.<name>(x)`` for each name of ``module.FUSIBLE[group]`` (``None`` where the module has no
    such projection), as one matmul once :func:`fuse_projections_` ran."""
    fused = module._modules.get(group)
    if fused is not None:
        return fused(x)
    return tuple(
        None if (linear := getattr(module, name, None)) is None else linear(x) for name in module.FUSIBLE[group]
    )


def fuse_projections_(model: nn.Module) -> int:
    """Fuse every declared group of plain ``nn.Linear`` siblings (two or more, all with or all without
    bias) in place; returns how many groups were fused. Run it before :func:`ctxlab.quant.quantize_`."""
    fused = 0
    for module in list(model.modules()):
        for group, names in getattr(module, "FUSIBLE", {}).items():
            linears = {name: getattr(module, name) for name in names if getattr(module, name, None) is not None}
            if (
                group in module._modules
                or len(linears) < 2
                or any(type(linear) is not nn.Linear for linear in linears.values())
                or len({linear.bias is None for linear in linears.values()}) > 1
            ):
                continue
            module.add_module(group, FusedProjections(names, linears))
            for name in linears:
                setattr(module, name, None)
            fused += 1
    model.fused_projections = getattr(model, "fused_projections", 0) + fused  # read by bench's report
    return fused


@contextmanager
def separate_projections(model: nn.Module) -> Iterator[nn.Module]:
    """While the block runs, every fused group is its separate ``nn.Linear`` modules again, whose weights
    are views of the fused weight (nothing is copied); the fused modules come back afterwards."""
    undone = []
    for module in list(model.modules()):
        for group in getattr(module, "FUSIBLE", {}):
            fused = module._modules.get(group)
            if fused is None:
                continue
            weights = fused.linear.weight.split(fused.sizes)
            biases = fused.linear.bias.split(fused.sizes) if fused.linear.bias is not None else [None] * len(weights)
            for name, weight, bias in zip(fused.names, weights, biases, strict=True):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
                linear.weight = nn.Parameter(weight, requires_grad=False)
                if bias is not None:
                    linear.bias = nn.Parameter(bias, requires_grad=False)
                setattr(module, name, linear)
            del module._modules[group]
            undone.append((module, group, fused))
    try:
        yield model
    finally:
        for module, group, fused in undone:
            module.add_module(group, fused)
            for name in fused.names:
                setattr(module, name, None)
