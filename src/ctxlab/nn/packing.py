"""Linear weights in oneDNN's blocked layout, for eager CPU inference.

A decode step is a chain of matrix-vector products, so its speed is the speed at which the GEMV
kernel streams weights. Measured here (2 cores, AVX-512 BF16, torch 2.13): 16 bf16 weights of
5632 x 1024 (184 MB, far beyond the caches) take 12.8 ms through ``F.linear`` (14 GB/s) and 4.4 ms
(42 GB/s, the copy bandwidth) once reordered by ``torch.ops.mkldnn._reorder_linear_weight`` and
multiplied by ``torch.ops.mkldnn._linear_pointwise`` -- the pair inductor's weight prepacking uses
(``torch._inductor.fx_passes.mkldnn_fusion``). The results are the same numbers as ``F.linear``
(bit for bit on contiguous inputs in these measurements; the tests hold them to bf16 rounding).

:func:`pack_linears_` replaces every plain ``nn.Linear`` of a model (fused groups and the LM head
included) by a :class:`PackedLinear` whose weight is an opaque ``torch._mkldnn`` tensor, and the
expert banks of MoE layers by :class:`PackedExperts` (one packed matrix per expert). Such a
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

from .mlp import gated
from .moe import Experts, routed_sum

READ_DIRECTLY = ("kv_b_proj", "o_a_proj")  # MLA's absorbed path, V4's grouped output: their `.weight` is read


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a fast linear for ``dtype`` here (bf16 needs the CPU's BF16 instructions)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """A linear map with its weight [out, in] reordered for oneDNN (``torch._mkldnn`` layout)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, shared: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # the batch-size hint 1 picks the layout for decode; prefill runs on it as fast (measured)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.shared_weight = (weight,) if shared else ()  # a tied weight stays alive anyway: keep it to unpack

    @classmethod
    def of(cls, linear: nn.Linear, shared: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, oneDNN-packed"

    def dense_weight(self) -> torch.Tensor:
        """The weight in PyTorch's layout again: the tied weight itself, or a dense copy."""
        return self.shared_weight[0] if self.shared_weight else self.packed_weight.to_dense()

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = self.dense_weight()
        linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear


class PackedExperts(nn.Module):
    """:class:`~ctxlab.nn.moe.Experts` with each expert's two matrices a :class:`PackedLinear`: the same
    loop over the chosen experts (:func:`~ctxlab.nn.moe.routed_sum`), each matrix-vector product on
    oneDNN's kernel instead of ``F.linear`` on a slice of the 3-D tensor (1.3-1.6× faster per expert
    at one token, bf16, 2 threads: [2048, 1024] 250 → 154 µs)."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.act, self.limit, self.build_args = experts.act, experts.limit, experts.build_args
        self.gate_up_proj = nn.ModuleList(PackedLinear(w) for w in experts.gate_up_proj)  # [2·I, H] each
        self.down_proj = nn.ModuleList(PackedLinear(w) for w in experts.down_proj)  # [H, I] each

    def forward(self, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        return routed_sum(x, top_index, top_weight, len(self.gate_up_proj), self.expert)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        gate, up = self.gate_up_proj[e](x).chunk(2, dim=-1)
        return self.down_proj[e](gated(self.act, gate, up, self.limit))

    def unpacked(self) -> Experts:
        with torch.device("meta"):
            experts = Experts(*self.build_args)
        for name in ("gate_up_proj", "down_proj"):
            dense = torch.stack([linear.dense_weight() for linear in getattr(self, name)])
            setattr(experts, name, nn.Parameter(dense, requires_grad=False))
        return experts


def pack_linears_(model: nn.Module, shared: bool = False) -> int:
    """Replace every plain ``nn.Linear`` whose dtype :func:`packable` accepts by a :class:`PackedLinear`,
    and every MoE ``Experts`` by :class:`PackedExperts`, in place; returns how many matrices were
    packed. A linear whose weight another module also holds (a tied LM head) is packed only with
    ``shared=True``, as a copy. Run it last, after ``fuse_projections_`` and ``quantize_`` (the
    quantized layers keep their own kernels)."""
    uses = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    packed = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is Experts and packable(child.gate_up_proj.dtype):
                    setattr(module, name, PackedExperts(child))
                    packed += 2 * child.gate_up_proj.shape[0]
                    continue
                if type(child) is not nn.Linear or name in READ_DIRECTLY or not packable(child.weight.dtype):
                    continue
                is_shared = uses[id(child.weight)] > 1
                if is_shared and not shared:
                    continue
                setattr(module, name, PackedLinear.of(child, shared=is_shared))
                packed += 1
    model.packed_linears = (
        getattr(model, "packed_linears", 0) + packed
    )  # read by bench's report and compiled_decode_step
    return packed


@contextmanager
def unpacked_linears(model: nn.Module) -> Iterator[nn.Module]:
    """While the block runs, every :class:`PackedLinear` is an ``nn.Linear`` again (a dense copy of
    its weight, or the tied weight itself) and every :class:`PackedExperts` an ``Experts``; the packed
    modules come back afterwards."""
    undone = list(_packed_children(model))
    for module, name, child in undone:
        setattr(module, name, child.unpacked())
    try:
        yield model
    finally:
        for module, name, child in undone:
            setattr(module, name, child)


def _packed_children(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of every packed module under ``module``, not looking inside them."""
    for name, child in module.named_children():
        if isinstance(child, (PackedLinear, PackedExperts)):
            yield module, name, child
        else:
            yield from _packed_children(child)


def packed_bytes(tensor: torch.Tensor) -> int:
    """Bytes of an opaque oneDNN tensor (it has no storage to ask)."""
    return tensor.numel() * tensor.element_size()
