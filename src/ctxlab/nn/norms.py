"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 as HF ``LlamaRMSNorm`` does."""

import torch
from torch import nn

from .. import native


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    The statistic is computed in fp32 and the normalised input cast back to its dtype before
    the weight multiplies (HF ``LlamaRMSNorm.forward``). ``with_scale=False`` gives the
    weight-less variant. ``unit_offset=True`` multiplies by ``1 + weight`` in fp32 and casts
    only the product (HF ``Gemma3RMSNorm.forward``); ``weight_float32=True`` multiplies by the weight
    in fp32 and casts only the product (HF ``Gemma4RMSNorm.forward``: one rounding, not two). The model
    sets them on every weighted norm when ``ModelConfig.norm_unit_offset`` / ``norm_weight_float32`` is on.

    At inference on the CPU the norm is one native call (``ctxlab::rms_norm``, :mod:`ctxlab.native`)
    with the same roundings, where PyTorch dispatches ~8 ops per norm.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        with_scale: bool = True,
        unit_offset: bool = False,
        weight_float32: bool = False,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.unit_offset, self.weight_float32 = unit_offset, weight_float32

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """A unit scale: weight 1, or 0 when the norm adds the 1 itself (``unit_offset``)."""
        self.weight.fill_(0.0 if self.unit_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.runs_at_inference(x) and (self.weight is None or self.weight.dtype == x.dtype):
            return torch.ops.ctxlab.rms_norm(
                x.contiguous(), self.weight, self.eps, self.unit_offset, self.weight_float32
            )
        return self.pytorch_forward(x)

    def pytorch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The norm in PyTorch ops: with autograd, under ``torch.compile``, and as the native kernel's oracle."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset and self.weight is not None:
            return (h * (1.0 + self.weight.float())).to(dtype)
        if self.weight_float32 and self.weight is not None:
            return (h * self.weight.float()).to(dtype)
        h = h.to(dtype)
        return h if self.weight is None else self.weight * h

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        mode = ", weight = 1 + w" if self.unit_offset else ", weight in float32" if self.weight_float32 else ""
        return f"{shape}, eps={self.eps}{mode}"
