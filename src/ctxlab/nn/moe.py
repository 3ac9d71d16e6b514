"""Routed mixture of experts: routers pick ``top_k`` experts per token, experts run as a loop
over experts (never over tokens), each on the tokens routed to it.

Expert weights are stored as 3-D tensors in HF's layout (``Gemma4TextExperts``):
``gate_up_proj`` [E, 2·I, H] with the gate rows first, ``down_proj`` [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoESpec
from .mlp import ACTIVATIONS
from .norms import RMSNorm


class Experts(nn.Module):
    def __init__(self, hidden_size: int, moe: MoESpec, activation: str):
        super().__init__()
        e, i = moe.num_experts, moe.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H], top_index / top_weight [N, K] -> weighted sum of the chosen experts [N, H]."""
        out = torch.zeros_like(x)
        for expert in top_index.unique().tolist():
            token, slot = torch.where(top_index == expert)  # tokens routed to this expert
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, (y * top_weight[token, slot, None]).to(out.dtype))
        return out

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return 3 * moe.num_experts * hidden_size * moe.intermediate_size

    @staticmethod
    def active_param_count(hidden_size: int, moe: MoESpec) -> int:
        return 3 * moe.top_k * hidden_size * moe.intermediate_size


class SoftmaxTopKRouter(nn.Module):
    """Gemma 4's router (HF ``Gemma4TextRouter``): weight-less RMSNorm of the residual, times a
    learned ``scale`` and ``H^-1/2``; softmax (fp32) over experts; top-k; renormalise; times
    a learned ``per_expert_scale``."""

    def __init__(self, hidden_size: int, moe: MoESpec, eps: float):
        super().__init__()
        self.top_k = moe.top_k
        self.norm = RMSNorm(hidden_size, eps, with_scale=False)
        self.proj = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts))
        self.root_size = hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (top_index [N, K], top_weight [N, K] fp32)."""
        probs = F.softmax(self.proj(self.norm(x) * self.scale * self.root_size), dim=-1, dtype=torch.float32)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight * self.per_expert_scale[index]

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return moe.num_experts * hidden_size + hidden_size + moe.num_experts


ROUTERS = {"softmax_topk": SoftmaxTopKRouter}
