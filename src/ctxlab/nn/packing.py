"""Linear weights in oneDNN's blocked layout, for eager CPU inference.

A decode step is a chain of matrix-vector products, so its speed is the speed at which the GEMV
kernel streams weights. Measured here (2 cores, AVX-512 BF16, torch 2.13): 16 bf16 weights of
5632 x 1024 (184 MB, far beyond the caches) take 12.8 ms through ``F.linear`` (14 GB/s) and 4.4 ms
(42 GB/s, the copy bandwidth) once reordered by ``torch.ops.mkldnn._reorder_linear_weight`` and
multiplied by ``torch.ops.mkldnn._linear_pointwise`` -- the pair inductor's weight prepacking uses
(``torch._inductor.fx_passes.mkldnn_fusion``). The results are the same numbers as ``F.linear``
(bit for bit on contiguous inputs in these measurements; the tests hold them to bf16 rounding).

:func:`pack_linears_` replaces every plain ``nn.Linear`` of a model (fused groups and the LM head
included) by a :class:`PackedLinear` whose weight is an opaque ``torch._mkldnn`` tensor. Such a
model is for eager inference: no gradients, no ``torch.compile`` (inductor does not lower ops on
opaque tensors; compile the unpacked model instead). ``save_pretrained`` writes it through
:func:`unpacked_linears`. A linear whose weight is shared (a tied LM head: the embedding lookup
reads the same table) stays as it is unless ``shared=True``, which gives it a packed copy at
``vocab x hidden`` more bytes (Gemma 3 270M: +336 MB on 536 MB of weights). Also left as they are:
projections whose weight the attention reads directly (:data:`READ_DIRECTLY`), and dtypes oneDNN
has no fast kernel for on this CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

READ_DIRECTLY = ("kv_b_proj", "o_a_proj")  # MLA's absorbed path, V4's grouped output: their `.weight` is read


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a fast linear for ``dtype`` here (bf16 needs the CPU's BF16 instructions)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """``nn.Linear`` [out, in] with its weight reordered for oneDNN (``torch._mkldnn`` layout)."""

    def __init__(self, linear: nn.Linear, shared: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        # the batch-size hint 1 picks the layout for decode; prefill runs on it as fast (measured)
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.shared_weight = (linear.weight,) if shared else ()  # a tied weight stays alive anyway: keep it to unpack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, oneDNN-packed"


def pack_linears_(model: nn.Module, shared: bool = False) -> int:
    """Replace every plain ``nn.Linear`` whose dtype :func:`packable` accepts by a :class:`PackedLinear`,
    in place; returns how many. A linear whose weight another module also holds (a tied LM head) is
    packed only with ``shared=True``, as a copy. Run it last, after ``fuse_projections_`` and
    ``quantize_`` (the quantized layers keep their own kernels)."""
    uses = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    packed = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is not nn.Linear or name in READ_DIRECTLY or not packable(child.weight.dtype):
                    continue
                is_shared = uses[id(child.weight)] > 1
                if is_shared and not shared:
                    continue
                setattr(module, name, PackedLinear(child, shared=is_shared))
                packed += 1
    model.packed_linears = (
        getattr(model, "packed_linears", 0) + packed
    )  # read by bench's report and compiled_decode_step
    return packed


@contextmanager
def unpacked_linears(model: nn.Module) -> Iterator[nn.Module]:
    """While the block runs, every :class:`PackedLinear` is an ``nn.Linear`` again (a dense copy of
    its weight, or the tied weight itself); the packed modules come back afterwards."""
    undone = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                weight = child.shared_weight[0] if child.shared_weight else child.packed_weight.to_dense()
                linear.weight = (
                    weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
                )
                linear.bias = child.bias
                setattr(module, name, linear)
                undone.append((module, name, child))
    try:
        yield model
    finally:
        for module, name, child in undone:
            setattr(module, name, child)


def packed_bytes(tensor: torch.Tensor) -> int:
    """Bytes of an opaque oneDNN tensor (it has no storage to ask)."""
    return tensor.numel() * tensor.element_size()
