"""Gated feed-forward block: ``down(act(gate(x)) * up(x))`` (SwiGLU, Shazeer 2020; HF ``LlamaMLP``)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import LayerSpec
from ..registry import ACTIVATIONS, MLP_KINDS
from .fusion import project


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS.register("silu")(F.silu)
ACTIVATIONS.register("gelu")(F.gelu)
ACTIVATIONS.register("gelu_pytorch_tanh")(gelu_tanh)
NATIVE_ACTIVATIONS = {F.silu: "silu", gelu_tanh: "gelu_tanh"}  # what ctxlab::gated_act computes


def gated(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """``act(gate) * up``; with ``limit``, gate capped above and up clipped to [-limit, limit]
    (DeepSeek V4's clamped SwiGLU, ``swiglu_limit``). [..., I], [..., I] -> [..., I].

    At inference on the CPU (SiLU or tanh-GELU) it is one native pass (``ctxlab::gated_act``), where PyTorch
    writes the activation and reads it back, over strided halves of the fused gate / up product: a 2048-token
    prefill of the wide llama spent ~7 ms a layer in the two ops (``torch.profiler``)."""
    kind = NATIVE_ACTIVATIONS.get(act)
    if kind is not None and native.runs_at_inference(gate, (torch.bfloat16,)) and up.dtype == gate.dtype:
        return torch.ops.ctxlab.gated_act(gate, up, kind, math.inf if limit is None else limit)  # one pass
    return pytorch_gated(act, gate, up, limit)


def pytorch_gated(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """:func:`gated` in PyTorch ops: with autograd, under ``torch.compile``, and as the native kernel's oracle."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return act(gate) * up


@MLP_KINDS.register("gated")
class GatedMLP(nn.Module):
    EXPERTS_INSIDE = False  # a LayerSpec.moe beside this MLP is a separate branch of the block
    FUSIBLE = {"gate_up_proj": ("gate_proj", "up_proj")}  # one matmul after nn.fusion.fuse_projections_

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        limit: float | None = None,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act, self.limit = ACTIVATIONS[activation], limit

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # [..., H] -> [..., H]
        gate, up = project(self, x, "gate_up_proj")
        return self.down_proj(gated(self.act, gate, up, self.limit))

    @classmethod
    def from_spec(cls, hidden_size: int, spec: LayerSpec, norm_eps: float, vocab_size: int = 0) -> "GatedMLP":
        return cls(hidden_size, spec.intermediate_size, spec.activation, spec.mlp_bias, spec.swiglu_limit)

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        return []

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
