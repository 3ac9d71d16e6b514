"""Residual kinds: how a block's branch output is added back to the residual stream."""

import torch
from torch import nn


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
