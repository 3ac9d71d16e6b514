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
    def __init__(self, hidden_size: int, spec: LayerSpec):
        super().__init__()
        inter, bias = spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(hidden_size, inter, bias=bias)
        self.up_proj = nn.Linear(hidden_size, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden_size, bias=bias)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> int:
        bias = spec.intermediate_size * 2 + hidden_size if spec.mlp_bias else 0
        return 3 * hidden_size * spec.intermediate_size + bias

    @staticmethod
    def flops_per_token(hidden_size: int, spec: LayerSpec) -> int:
        return 2 * 3 * hidden_size * spec.intermediate_size


MLP_KINDS = {"gated": GatedMLP}
