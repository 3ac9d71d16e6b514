"""Linear weights laid out for eager CPU inference: bf16 for ctxlab's matrix-vector kernel, else oneDNN's.

A decode step is a chain of matrix-vector products, so its speed is the speed at which the kernel
streams weights. Measured here (2 cores, AVX-512 BF16, torch 2.13): 16 bf16 weights of 5632 x 1024
(184 MB, far beyond the caches) take 12.8 ms through ``F.linear`` (14 GB/s) and 4.4 ms (42 GB/s, the
copy bandwidth) once reordered by ``torch.ops.mkldnn._reorder_linear_weight`` and multiplied by
``torch.ops.mkldnn._linear_pointwise`` -- the pair inductor's weight prepacking uses
(``torch._inductor.fx_passes.mkldnn_fusion``). Over a decode step's mix of shapes (attention, MLP and
head weights of a ~150M model) oneDNN reads ~21-23 GB/s and ctxlab's native kernel
(``ctxlab::matvec``, :mod:`ctxlab.native`) ~25-27 GB/s, on the weights in PyTorch's own layout
(docs/benchmarks.md, "Weights").

:func:`pack_linears_` replaces every plain ``nn.Linear`` of a model (fused groups and the LM head
included) by a :class:`PackedLinear`, and the expert banks of MoE layers by :class:`PackedExperts`
(one such linear per expert matrix). A :class:`PackedLinear` keeps a bf16 weight as it is where the
native kernel runs (decode's few rows go to the kernel, prefill's many to ``F.linear``: oneDNN's
GEMM either way), and otherwise holds it as an opaque ``torch._mkldnn`` tensor. A packed model is
for inference (no gradients); with opaque weights, for eager inference only (inductor does not lower
ops on them): ``pack_linears_(model, for_compile=True)`` packs only what ``torch.compile`` traces.
``save_pretrained`` writes a packed model through :func:`unpacked_linears`. A linear whose weight is shared (a tied LM head: the embedding lookup reads
the same table) is packed when it can stay as it is (bf16, native kernel); in oneDNN's layout it
stays unpacked unless ``shared=True``, which gives it a packed copy at ``vocab x hidden`` more bytes
(Gemma 3 270M: +336 MB on 536 MB of weights). Also left as they are: projections whose weight the
attention reads directly (:data:`READ_DIRECTLY`), and dtypes neither kernel is fast for here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .mlp import gated
from .moe import Experts, routed_sum

READ_DIRECTLY = ("kv_b_proj", "o_a_proj")  # MLA's absorbed path, V4's grouped output: their `.weight` is read
MATVEC_ROWS = 8  # up to this many rows the native kernel beats F.linear on the same weights (benchmarks/linears.py)
GEMM_COLUMNS = 2816  # bf16 products of more rows run in blocks of at most this many output columns ...
GEMM_BLOCKS = 4  # ... where that makes at most this many blocks (column_blocked_linear)


def packable(dtype: torch.dtype) -> bool:
    """Whether a linear of ``dtype`` has a faster kernel here than ``F.linear``: ctxlab's native matvec or
    oneDNN's for bf16 (both need the CPU's BF16 instructions), oneDNN's for float32."""
    return stays_as_is(dtype) or _onednn_packable(dtype)


def stays_as_is(dtype: torch.dtype) -> bool:
    """Whether a :class:`PackedLinear` of ``dtype`` keeps PyTorch's layout (bf16, for the native kernel)."""
    return dtype == torch.bfloat16 and native.available()


def _onednn_packable(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal linear map: x [..., g, in] through each group's own weight [g, out, in] (+ bias [g·out])
    -> [..., g·out] (DeepSeek V4's grouped output projection, HF ``DeepseekV4Attention``'s ``wo_a`` einsum;
    CCA's grouped convolution at a decode step). At a decode step (up to :data:`MATVEC_ROWS` rows, bf16 weight,
    native kernel here) it is one native matvec over the groups (``groups=g``; a call per group where ``out``
    is not a multiple of 16): PyTorch's bf16 batched matmul of one row per group reads the weights at ~6 GB/s
    (171 µs for 4 x [256, 512] per call, measured), the matvec at the copy bandwidth."""
    g, out, inner = weight.shape
    rows = x.numel() // (inner * g)
    if rows <= MATVEC_ROWS and stays_as_is(weight.dtype) and weight.is_contiguous() and x.dtype == weight.dtype:
        if out % 16:
            y = torch.cat([native_linear(x[..., k, :], weight[k], None) for k in range(g)], dim=-1)
            return y if bias is None else y + bias
        flat = x.reshape(rows, g * inner).contiguous()
        return torch.ops.ctxlab.matvec(flat, weight.view(g * out, inner), bias, g).view(*x.shape[:-2], g * out)
    y = torch.einsum("...gi,gci->...gc", x, weight).flatten(-2)
    return y if bias is None else y + bias


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for bf16 ``weight`` [out, in] with contiguous rows: up to :data:`MATVEC_ROWS` rows of x
    (a decode step) through ctxlab's native matvec, more through ``F.linear``. [..., in] -> [..., out]."""
    rows = x.numel() // x.shape[-1]
    if rows > MATVEC_ROWS:
        return column_blocked_linear(x, weight, bias)
    out = torch.ops.ctxlab.matvec(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias, 1)  # [rows, out]
    return out.view(*x.shape[:-1], weight.shape[0])


def column_blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` as products of at most :data:`GEMM_COLUMNS` output columns each, written into one output,
    for weights up to :data:`GEMM_BLOCKS` such blocks wide. oneDNN's bf16 GEMM of many rows slows down on a
    wide weight: through the wide llama's fused gate / up weight [5632, 1024], 2048 rows ran at 2.0 TFLOP/s
    against 2.4 for its two halves (the halves are what transformers multiplies; 512 rows: the same either
    way), while a [32000, 1024] LM head ran slower in blocks (1.09 → 0.98), so vocabulary-wide products stay
    whole (ad hoc, alternating, 2026-12-05; ``benchmarks/linears.py --rows 2048`` times a model's mix).
    [..., in] -> [..., out]."""
    out_features = weight.shape[0]
    blocks = -(-out_features // GEMM_COLUMNS)
    if blocks == 1 or blocks > GEMM_BLOCKS:
        return F.linear(x, weight, bias)
    step = -(-out_features // blocks)
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], out_features)  # [rows, out]
    for start in range(0, out_features, step):
        part = slice(start, start + step)
        if bias is None:
            torch.mm(x2, weight[part].t(), out=out[:, part])
        else:
            torch.addmm(bias[part], x2, weight[part].t(), out=out[:, part])
    return out.view(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """A linear map for eager inference: its weight [out, in] as it is for the native kernel (bf16, see
    :func:`stays_as_is`; a tied or sliced weight is not copied), or reordered for oneDNN (``torch._mkldnn``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, shared: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.native = stays_as_is(weight.dtype) and weight.stride(-1) == 1
        if self.native:
            packed = weight.detach()
        else:  # the batch-size hint 1 picks the layout for decode; prefill runs on it as fast (measured)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.shared_weight = (weight,) if shared else ()  # a tied weight stays alive anyway: keep it to unpack

    @classmethod
    def of(cls, linear: nn.Linear, shared: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.native:
            return native_linear(x, self.packed_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        layout = "native matvec" if self.native else "oneDNN-packed"
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, {layout}"

    def dense_weight(self) -> torch.Tensor:
        """The weight in PyTorch's layout again: the tied weight itself, the weight kept, or a dense copy."""
        if self.shared_weight:
            return self.shared_weight[0]
        return self.packed_weight if self.native else self.packed_weight.to_dense()

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = self.dense_weight()
        linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear


class PackedExperts(nn.Module):
    """:class:`~ctxlab.nn.moe.Experts` with each expert's two matrices a :class:`PackedLinear`: the same
    loop over the chosen experts (:func:`~ctxlab.nn.moe.routed_sum`), each matrix-vector product on
    oneDNN's kernel (or, bf16, the native one on the slice itself) instead of ``F.linear`` on a slice of
    the 3-D tensor (oneDNN: 1.3-1.6× faster per expert at one token, bf16, 2 threads: [2048, 1024]
    250 → 154 µs)."""

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


def pack_linears_(model: nn.Module, shared: bool = False, for_compile: bool = False) -> int:
    """Replace every plain ``nn.Linear`` whose dtype :func:`packable` accepts by a :class:`PackedLinear`,
    and every MoE ``Experts`` by :class:`PackedExperts`, in place; returns how many matrices were
    packed. A linear whose weight another module also holds (a tied LM head) is packed when its weight
    stays as it is (:func:`stays_as_is`), otherwise only with ``shared=True``, as a copy.

    ``for_compile=True`` packs only what ``torch.compile`` traces: the linears whose weight stays as it is
    (the native matvec is a custom op with a fake implementation); oneDNN's opaque weights and expert banks
    (:func:`~ctxlab.nn.moe.routed_sum` reads the routing on the host) are left as they are. The compiled
    decode step of ctxlab's llama benchmark model at 512 tokens: 14.3 ms unpacked, 9.7 ms packed so (an
    ad hoc probe; docs/benchmarks.md, "llama compiled, on the matvec kernel"). Run it last, after ``fuse_projections_`` and ``quantize_`` (the
    quantized layers keep their own kernels)."""
    uses = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    packed = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is Experts and packable(child.gate_up_proj.dtype) and not for_compile:
                    setattr(module, name, PackedExperts(child))
                    packed += 2 * child.gate_up_proj.shape[0]
                    continue
                if type(child) is not nn.Linear or name in READ_DIRECTLY or not packable(child.weight.dtype):
                    continue
                if for_compile and not stays_as_is(child.weight.dtype):
                    continue
                is_shared = uses[id(child.weight)] > 1
                if is_shared and not shared and not stays_as_is(child.weight.dtype):
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


def uncompilable_packed(model: nn.Module) -> int:
    """How many of the model's packed modules ``torch.compile`` cannot trace: linears whose weights are opaque
    oneDNN tensors, and packed MoE experts (whose loop over the chosen experts reads the routing on the host)."""
    return sum(
        1 for m in model.modules() if isinstance(m, PackedExperts) or (isinstance(m, PackedLinear) and not m.native)
    )


def packed_bytes(tensor: torch.Tensor) -> int:
    """Bytes of an opaque oneDNN tensor (it has no storage to ask)."""
    return tensor.numel() * tensor.element_size()
