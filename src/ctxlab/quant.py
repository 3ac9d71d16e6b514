"""Weight-only quantization for CPU decode: int8 per output channel, int4 per group.

Decode reads every weight once per token, so its time is set by weight bytes (docs/benchmarks.md).
Activations stay in the model's dtype; only the stored weights shrink:

* ``int8``: ``w ≈ q · s`` with ``q`` int8 and one scale ``s = max|w_row| / 127`` per output channel
  (symmetric). The matmul is ``torch.ops.aten._weight_int8pack_mm(x, q, s)`` (the CPU kernel
  torchchat calls in eager mode); the reference is ``F.linear(x, q.to(x.dtype)) * s``.
* ``int4``: per group of ``group_size`` input channels, asymmetric:
  ``w ≈ (q - 8) · scale + zero`` with ``q`` in 0..15, ``scale = (max - min) / 15`` and
  ``zero = min + 8 · scale`` (gpt-fast's ``group_quantize_tensor``). The matmul is
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the packed codes
  (``_convert_weight_to_int4pack_for_cpu``), bf16 activations only.

Both include the token embedding and the LM head (tied or not): for small models they are most
of the bytes (SmolLM2-135M: 28M of 135M parameters). A tied pair shares one set of codes; the
embedding dequantizes only the rows it looks up. Left as they are: expert tensors of MoE layers
(3-D parameters), projections whose weight the attention reads directly (MLA's ``kv_b_proj`` on
the absorbed path, DeepSeek V4's grouped ``o_a_proj``), convolutions, norms, routers' raw weights,
and int4 layers the kernel does not take (input width not a multiple of the group size, output
width not a multiple of 16: they stay in bf16). int8 layers whose input width is not a multiple of
16 keep int8 weights but run the reference path (the packed kernel crashes on them in torch 2.13).
A quantized model runs forward / generate / bench; it is not saved back (``save_pretrained`` refuses
nothing, but writes the HF names of the unquantized modules only), so quantize after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .nn.packing import READ_DIRECTLY, packed_bytes

MODES = ("int8", "int4")


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] int8, scales [N] fp32): symmetric, one scale per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8), scales


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] uint8 in 0..15, scales [N, K/g], zeros [N, K/g]) (fp32), asymmetric per group."""
    N, K = w.shape
    groups = w.float().view(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) / 15
    codes = ((groups - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return codes, scales, lo + 8 * scales


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [N, K] (rows may be any subset), scales / zeros [N, K/g] -> weights [N, K] in ``dtype``."""
    N, K = codes.shape
    groups = scales.shape[-1]
    w = (codes.view(N, groups, -1).to(dtype) - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
    return w.view(N, K)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights [out, in] and per-output-channel scales [out]."""

    def __init__(self, linear: nn.Linear, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None):
        super().__init__()
        if codes is None:
            codes, scales = int8_quantize(linear.weight.detach())
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # the packed kernel needs K % 16 == 0 (torch 2.13 crashes on other widths); else the reference path
        self.packed = self.packable

    @property
    def packable(self) -> bool:
        return self.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.packed:
            scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.codes, scales)
            y = y.view(*x.shape[:-1], self.out_features)
        elif torch.compiler.is_compiling():
            # the scales on the weight: inductor rewrites `F.linear(x, q) * s` into _weight_int8pack_mm, which is
            # what this width cannot take (torch 2.13 crashes)
            y = F.linear(x, self.codes.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        else:
            y = F.linear(x, self.codes.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Weight rows (e.g. embedding lookups) [..., in] in the scales' dtype."""
        return self.codes[rows].to(self.scales.dtype) * self.scales[rows][..., None]


class Int4Linear(nn.Module):
    """``nn.Linear`` with int4 group-quantized weights, packed for ``_weight_int4pack_mm_for_cpu`` (whose
    layout interleaves blocks of output channels). An embedding looks rows up: with ``rows``, the codes are
    also kept row by row, two to a byte (``row_codes`` [N, K/2], the even column in the low nibble); a table
    only looked up (an untied embedding: ``matmul=False``) keeps those alone."""

    def __init__(self, linear: nn.Linear, group_size: int, rows: bool = False, matmul: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        codes, scales, zeros = int4_quantize(linear.weight.detach(), group_size)
        dtype = linear.weight.dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1) if matmul else None
        self.register_buffer("packed_codes", packed)
        # [K/g, N, 2]: the kernel's layout of (scale, zero) per group and output channel
        self.register_buffer(
            "scales_and_zeros", torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)
        )
        self.register_buffer("row_codes", codes[:, 0::2] | (codes[:, 1::2] << 4) if rows or not matmul else None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise InputError(f"int4 weights need bfloat16 activations; got {x.dtype} (build the model in bfloat16)")
        if self.packed_codes is None:
            raise RuntimeError("this int4 table is kept for row lookups only (an untied embedding)")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).contiguous(), self.packed_codes, self.group_size, self.scales_and_zeros
        )
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Weight rows [..., in] in bf16, from the row codes and the group scales / zeros."""
        scales, zeros = self.scales_and_zeros[..., 0].t(), self.scales_and_zeros[..., 1].t()  # [N, K/g]
        flat = rows.reshape(-1)
        pairs = self.row_codes[flat]  # [R, K/2]
        codes = torch.stack((pairs & 15, pairs >> 4), dim=-1).view(len(flat), self.in_features)  # [R, K]
        w = int4_dequantize(codes, scales[flat], zeros[flat], self.scales_and_zeros.dtype)
        return w.view(*rows.shape, self.in_features)


class QuantEmbedding(nn.Module):
    """An embedding whose table is a quantized linear's weight (the tied LM head or its own):
    a lookup dequantizes only the rows it reads."""

    def __init__(self, table: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype
        self.weight = torch.empty(0, dtype=dtype)  # code reading `embed_tokens.weight.dtype` still works

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.dequantized_rows(ids).to(self.dtype)


def int4_refusal(out_features: int, in_features: int, group_size: int, matmul: bool = True) -> str | None:
    """Why int4 cannot take a weight [out, in] (None: it can): groups of ``group_size`` input channels share a
    scale, and the CPU kernel's layout (``matmul``; not for a table only looked up) packs blocks of 16 output
    channels."""
    if in_features % group_size:
        return f"in_features {in_features}, not a multiple of {group_size}"
    if matmul and out_features % 16:
        return f"out_features {out_features}, not a multiple of 16"
    return None


def _quantized(linear: nn.Linear, mode: str, group_size: int, rows: bool = False, matmul: bool = True):
    """(``linear`` quantized, None), an int4 one as :class:`Int4Linear` with ``rows`` / ``matmul``; or (None, why)
    where int4 cannot take its shape (it then stays as it is)."""
    if mode == "int8":
        return Int8Linear(linear), None
    refusal = int4_refusal(linear.out_features, linear.in_features, group_size, matmul)
    if refusal is not None:
        return None, refusal
    return Int4Linear(linear, group_size, rows=rows, matmul=matmul), None


def quantize_(model: nn.Module, mode: str, group_size: int = 32, embedding: str | None = None) -> nn.Module:
    """Replace the model's linear layers, embedding and LM head by weight-only quantized ones, in place.

    ``mode``: ``"int8"`` or ``"int4"`` (needs a bfloat16 model); ``embedding``: the mode of the token
    embedding and LM head when it differs from ``mode`` (``"int8"`` with ``"int4"`` layers keeps
    the head at 8 bits, as llama.cpp's ``Q4_K_M`` files keep it at Q8_0 / Q6_K); ``group_size``: input channels per
    int4 scale (32, 64, 128 or 256). The default 32 is the block of GGUF's 4-bit types (Q4_0, Q4_1,
    the sub-blocks of Q4_K): on a model loaded from such a file, int4 groups of 32 sit on the file's
    own blocks, and measured on SmolLM2-135M-Instruct Q4_1 (benchmarks/quant_perplexity.py) they cost
    +5.1% perplexity against bfloat16 where groups of 64 cost +66%. Returns the model, with
    ``model.quantize_skipped`` naming the linear weights left as they were, and why (:func:`int4_refusal`: int4
    takes in_features a multiple of ``group_size`` and out_features a multiple of 16); MoE expert banks are not
    linear layers and stay in the model's dtype, as do Gemma 4's per-layer embedding tables (a decode step
    looks up one row of them)."""
    embedding = mode if embedding is None else embedding
    for name, value in (("quantize", mode), ("embedding", embedding)):
        if value not in MODES:
            raise InputError(f"{name} = {value!r}: allowed: {list(MODES)}")
    if "int4" in (mode, embedding) and group_size not in (32, 64, 128, 256):
        raise InputError(f"group_size = {group_size}: allowed for int4: 32, 64, 128, 256")
    dtype = model.lm_head.weight.dtype
    if "int4" in (mode, embedding) and dtype != torch.bfloat16:
        raise InputError(
            f"int4 weights need a bfloat16 model (the CPU int4 kernel takes bf16 activations); got {dtype}"
        )
    embed = model.model.embed_tokens
    tied = model.lm_head.weight is embed.weight
    skipped: list[str] = []  # linear weights left as they were (a shape the mode does not take)
    with torch.no_grad():
        head, why = _quantized(model.lm_head, embedding, group_size, rows=tied)
        if head is None:
            skipped.append(f"lm_head ({why})")
        if head is not None:
            model.lm_head = head
            if tied:
                model.model.embed_tokens = QuantEmbedding(head, dtype)
        if not tied or head is None:
            as_linear = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False, dtype=dtype)
            as_linear.weight = embed.weight
            table, why = _quantized(as_linear, embedding, group_size, matmul=False)
            if table is not None:
                model.model.embed_tokens = QuantEmbedding(table, dtype)
            elif not tied:
                skipped.append(f"embed_tokens ({why})")
        for name, module in list(model.model.named_modules()):  # the layers, and stack-level ones (Gemma 4's PLE)
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child_name not in READ_DIRECTLY:
                    replacement, why = _quantized(child, mode, group_size)
                    if replacement is not None:
                        setattr(module, child_name, replacement)
                    else:
                        skipped.append(f"{name}.{child_name} ({why})" if name else f"{child_name} ({why})")
    model.quantization = mode if embedding == mode else f"{mode}, {embedding} embedding"
    model.quantize_skipped = skipped
    return model


def set_packed(model: nn.Module, packed: bool) -> None:
    """int8 only: use the packed kernel (True) or the reference ``F.linear(x, q) * s`` path (False)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.packed = packed and module.packable


def lookup_only_bytes(model: nn.Module) -> int:
    """Bytes of the weights only embedding lookups read (a row a token): an untied table, or the row codes
    of an int4 table tied to the head (the head's matmul reads its own layout), and Gemma 4's per-layer
    embedding table."""
    per_layer = getattr(model.model, "embed_tokens_per_layer", None)
    return _token_table_only_bytes(model) + (0 if per_layer is None else weight_bytes(per_layer))


def _token_table_only_bytes(model: nn.Module) -> int:
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, QuantEmbedding) and embed.table is head:
        row_codes = getattr(head, "row_codes", None)
        return 0 if row_codes is None else row_codes.numel() * row_codes.element_size()
    if isinstance(embed, QuantEmbedding) or not _reads_in_place(head, embed.weight):
        return weight_bytes(embed)
    return 0


def _reads_in_place(head: nn.Module, table: torch.Tensor) -> bool:
    """Whether the head's matmul reads ``table`` itself: a tied ``nn.Linear``, or one packed for the native kernel
    (which keeps the weight as it is; a oneDNN-packed head holds its own reordered copy)."""
    weight = getattr(head, "weight", None)
    if weight is None and getattr(head, "native", False):
        weight = head.packed_weight
    return weight is not None and weight.data_ptr() == table.data_ptr() and weight.shape == table.shape


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (each storage once): the weights a decode
    step reads at most."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_mkldnn:  # an opaque oneDNN weight (nn.packing) owns its memory alone
            total += packed_bytes(t)
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
