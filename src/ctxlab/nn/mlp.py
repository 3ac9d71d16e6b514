"""Gated feed-forward block: ``down(act(gate(x)) * up(x))`` (SwiGLU, Shazeer 2020; HF ``LlamaMLP``)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # [..., H] -> [..., H]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @classmethod
    def from_spec(cls, hidden_size: int, spec: LayerSpec, norm_eps: float) -> "GatedMLP":
        return cls(hidden_size, spec.intermediate_size, spec.activation, spec.mlp_bias)

    @staticmethod
    def size(hidden_size: int, intermediate_size: int, bias: bool = False) -> int:
        return 3 * hidden_size * intermediate_size + ((2 * intermediate_size + hidden_size) if bias else 0)

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> dict[str, int]:
        n = GatedMLP.size(hidden_size, spec.intermediate_size, spec.mlp_bias)
        return {"total": n, "active": n}

    @staticmethod
    def flops_per_token(hidden_size: int, spec: LayerSpec) -> int:
        return 2 * 3 * hidden_size * spec.intermediate_size
