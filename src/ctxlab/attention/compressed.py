"""DeepSeek V4 attention: a sliding window of raw tokens plus compressed entries, one softmax with a
per-head sink (DeepSeek-V4 report §2.3; HF ``DeepseekV4Attention``, ``DeepseekV4HCACompressor``,
``DeepseekV4CSACompressor``, ``DeepseekV4Indexer``).

* One shared K=V head of ``head_dim`` (512): ``kv = RMSNorm(kv_proj(x))``, RoPE (interleaved) on the
  trailing ``rotary_dim`` channels; queries through a low-rank bottleneck and a weight-less
  per-head RMSNorm.
* Compression (``ratio`` > 0): each block of ``ratio`` tokens is pooled into one entry by a
  per-channel softmax over learned gates (+ a position bias per slot), RMS-normed and rotated at
  the block's first position. HCA (ratio 128) pools each block alone; CSA (ratio 4,
  ``overlap``) pools 2·ratio slots: the previous block's first half-channels and its own second
  half. An entry is visible to query t once its block has ended (``w < (t + 1) // ratio``).
* CSA adds a lightning indexer with its own (narrower) compressor: each query keeps its
  ``topk`` best-scoring visible entries; ties go to the earlier entry (stable sort).
* Softmax over [window keys | entries | sink]; the output's rope channels are rotated back by the
  query position (V = K carried the key's rotation); grouped low-rank output projection.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import init
from ..cache.spec import CacheSpec
from ..config import IndexerSpec, LayerSpec
from ..errors import InputError
from ..nn.fusion import project
from ..nn.norms import RMSNorm
from ..nn.packing import grouped_linear
from ..nn.rope import Rotary
from ..registry import ATTENTION_KINDS
from .context import ForwardContext
from .dsa import indexer_topk, tiny_indexer, validate_indexer
from .kernels import attention_with_sinks


def rotate_tail(rotary: Rotary, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Interleaved RoPE on the last ``rotary_dim`` channels of x; the rest pass through."""
    r = rotary.rotary_dim
    return torch.cat((x[..., :-r], rotary.apply_interleaved(x[..., -r:], cos, sin)), dim=-1)


class Compressor(nn.Module):
    """Pools blocks of ``ratio`` tokens into entries of ``dim`` channels (HF names)."""

    FUSIBLE = {"kv_gate_proj": ("kv_proj", "gate_proj")}  # see nn.fusion

    def __init__(self, hidden_size: int, dim: int, ratio: int, overlap: bool, norm_eps: float):
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))
        self.kv_norm = RMSNorm(dim, norm_eps)

    keep_in_fp32 = ("position_bias",)  # HF: _keep_in_fp32_modules_strict

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.position_bias, generator, std)

    @staticmethod
    def state_shapes(dim: int, ratio: int, overlap: bool, prefix: str = "") -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The pending partial block (raw kv and gate) and, with overlap, the previous block's half."""
        width = 2 * dim if overlap else dim
        shapes = [(f"{prefix}pending_kv", (ratio, width)), (f"{prefix}pending_gate", (ratio, width))]
        if overlap:
            shapes += [(f"{prefix}overlap_kv", (ratio, dim)), (f"{prefix}overlap_gate", (ratio, dim))]
        return tuple(shapes)

    def forward(self, x: torch.Tensor, start: int, state: dict | None, prefix: str, rotary: Rotary) -> torch.Tensor:
        """New tokens x [B, T, H] from step ``start`` -> entries of the blocks they complete [B, 1, n, dim]."""
        if state is not None and x.shape[1] == 1:
            return self._step(x, start, state, prefix, rotary)
        B, r = x.shape[0], self.ratio
        kv, gate = project(self, x, "kv_gate_proj")
        pending = start % r
        if state is not None:  # the partial block left by earlier calls comes first
            kv = torch.cat((state[f"{prefix}pending_kv"][:, :pending], kv), dim=1)
            gate = torch.cat((state[f"{prefix}pending_gate"][:, :pending], gate), dim=1)
        usable = kv.shape[1] // r * r
        if state is not None:
            left = kv.shape[1] - usable
            state[f"{prefix}pending_kv"][:, :left] = kv[:, usable:]
            state[f"{prefix}pending_gate"][:, :left] = gate[:, usable:]
        n = usable // r
        if n == 0:
            return kv.new_zeros(B, 1, 0, self.dim)
        return self._pool(
            kv[:, :usable].view(B, n, r, -1), gate[:, :usable].view(B, n, r, -1), start // r, state, prefix, rotary
        )

    def _step(self, x: torch.Tensor, start: int, state: dict, prefix: str, rotary: Rotary) -> torch.Tensor:
        """One decode token: written into its slot ``start % ratio`` of the pending block, which is
        pooled when the token completes it. The shapes never depend on the slot, so a compiled step
        specializes on whether the block completes (two graphs), not on the position within it."""
        B, r = x.shape[0], self.ratio
        kv, gate = project(self, x, "kv_gate_proj")  # [B, 1, width]
        pending_kv, pending_gate = state[f"{prefix}pending_kv"], state[f"{prefix}pending_gate"]  # [B, r, width]
        slot = torch.arange(start, start + 1, device=x.device) % r  # a tensor: an int index would specialize
        pending_kv.index_copy_(1, slot, kv.to(pending_kv.dtype))
        pending_gate.index_copy_(1, slot, gate.to(pending_gate.dtype))
        if start % r < r - 1:
            return kv.new_zeros(B, 1, 0, self.dim)
        return self._pool(pending_kv[:, None], pending_gate[:, None], start // r, state, prefix, rotary)

    def _pool(self, kv, gate, first: int, state: dict | None, prefix: str, rotary: Rotary) -> torch.Tensor:
        """Complete blocks kv, gate [B, n, r, width], the first one block number ``first`` -> their
        entries [B, 1, n, dim], rotated at each block's first position."""
        B, n, r = kv.shape[:3]
        gate = gate + self.position_bias
        if self.overlap:
            kv, gate = self._overlap(kv, gate, first, state, prefix)
        pooled = self.kv_norm((kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))  # [B, n, dim]
        positions = ((first + torch.arange(n, device=kv.device)) * r).expand(B, n)
        cos, sin = rotary.cos_sin(positions, pooled.dtype)
        return rotate_tail(rotary, pooled[:, None], cos, sin)

    def _overlap(self, kv, gate, first: int, state, prefix: str):
        """[B, n, r, 2·dim] -> [B, n, 2r, dim]: slots 0..r-1 from the previous block's first half
        (gate -inf before the first block), slots r..2r-1 from this block's second half."""
        B, n, r, d = *kv.shape[:3], self.dim
        slots_kv = kv.new_zeros(B, n, 2 * r, d)
        slots_gate = gate.new_full((B, n, 2 * r, d), float("-inf"))
        slots_kv[:, :, r:], slots_gate[:, :, r:] = kv[..., d:], gate[..., d:]
        slots_kv[:, 1:, :r], slots_gate[:, 1:, :r] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
        if state is not None:
            if first > 0:
                slots_kv[:, 0, :r] = state[f"{prefix}overlap_kv"]
                slots_gate[:, 0, :r] = state[f"{prefix}overlap_gate"]
            state[f"{prefix}overlap_kv"].copy_(kv[:, -1, :, :d])
            state[f"{prefix}overlap_gate"].copy_(gate[:, -1, :, :d])
        return slots_kv, slots_gate


class Indexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor at ``head_dim``, queries from the
    attention's query bottleneck, scores ``sum_h w_h ReLU(q_h · k) / sqrt(D_I)``."""

    def __init__(self, hidden_size: int, q_lora_rank: int, spec: IndexerSpec, ratio: int, norm_eps: float):
        super().__init__(hidden_size, spec.head_dim, ratio, overlap=True, norm_eps=norm_eps)
        self.spec = spec
        self.q_b_proj = nn.Linear(q_lora_rank, spec.n_heads * spec.head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden_size, spec.n_heads, bias=False)

    def select(self, x, q_res, keys, visible, rotary: Rotary, cos, sin) -> torch.Tensor:
        """keys [B, 1, E, D_I], visible [B, T, E] -> indices [B, T, k] of each query's best entries."""
        B, T, _ = x.shape
        s = self.spec
        q = rotate_tail(rotary, self.q_b_proj(q_res).view(B, T, s.n_heads, s.head_dim).transpose(1, 2), cos, sin)
        return indexer_topk(q, keys, self.weights_proj(x), visible, s.topk)


@ATTENTION_KINDS.register("compressed")
class CompressedAttention(nn.Module):
    OPTIONS = frozenset({"indexer"})  # optional LayerSpec fields it implements
    OWNS = ("compress",)  # sub-specs only this kind reads
    FUSIBLE = {"q_a_kv_proj": ("q_a_proj", "kv_proj")}  # see nn.fusion

    def __init__(self, hidden_size: int, spec: LayerSpec, layer_idx: int, norm_eps: float):
        super().__init__()
        c, h, d = spec.compress, spec.num_heads, spec.head_dim
        self.spec, self.layer_idx = spec, layer_idx
        self.q_a_proj = nn.Linear(hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, h * d, bias=False)
        self.q_b_norm = RMSNorm(d, norm_eps, with_scale=False)
        self.kv_proj = nn.Linear(hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, norm_eps)
        self.o_a_proj = nn.Linear(h * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)  # grouped
        self.o_b_proj = nn.Linear(c.o_groups * c.o_lora_rank, hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        self.rotary = Rotary(spec)
        if c.ratio:
            self.compressor = Compressor(hidden_size, d, c.ratio, c.overlap, norm_eps)
            if spec.indexer is not None:
                self.compressor.indexer = Indexer(hidden_size, c.q_lora_rank, spec.indexer, c.ratio, norm_eps)

    keep_in_fp32 = ("sinks",)  # HF: _keep_in_fp32_modules_strict

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.sinks, generator, std)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.spec
        if ctx.padded:
            raise InputError(
                "compressed attention (CSA/HCA) pools tokens by position: left-padded batches "
                "(prompts of different lengths) are not supported; run them one at a time"
            )
        cos, sin = ctx.rope_tables(self.rotary, x.dtype)
        q_a, kv = project(self, x, "q_a_kv_proj")
        q_res = self.q_a_norm(q_a)
        q = rotate_tail(
            self.rotary, self.q_b_norm(self.q_b_proj(q_res).view(B, T, s.num_heads, -1).transpose(1, 2)), cos, sin
        )
        kv = rotate_tail(self.rotary, self.kv_norm(kv)[:, None], cos, sin)  # [B, 1, T, D]
        layer_cache = None if ctx.cache is None else ctx.cache[self.layer_idx]
        if layer_cache is None:
            keys, k_pos = kv, ctx.positions
        else:
            stored, k_pos = layer_cache.update({"kv": kv}, ctx.cache)
            keys = stored["kv"]
        # decode: the ring returns only the window's written slots and every stored entry is complete,
        # so nothing needs masking
        allowed = None if ctx.decoding else ctx.mask(k_pos, s.window)  # [B, 1, T, S]
        if s.compress.ratio:
            keys, allowed = self._with_entries(x, q_res, keys, allowed, ctx, layer_cache)
        out = attention_with_sinks(q, keys, allowed, s.scale, self.sinks)  # [B, H, T, D]; values = keys (K = V)
        out = rotate_tail(self.rotary, out, cos, -sin)  # undo the keys' rotation carried by V = K
        return self.o_b_proj(self._grouped_out(out.transpose(1, 2).reshape(B, T, -1)))

    def _with_entries(self, x, q_res, keys, allowed, ctx: ForwardContext, layer_cache):
        """Append the compressed entries (and their visibility, unless ``allowed`` is None: all
        visible) to the window's keys and mask."""
        comp, ratio = self.compressor, self.spec.compress.ratio
        start = 0 if ctx.cache is None else ctx.cache.length
        state = None if layer_cache is None else layer_cache.state
        entries = comp(x, start, state, "", self.rotary)
        if layer_cache is not None:
            entries = layer_cache.append_entries("kv", entries, start)
        visible = None
        if allowed is not None:
            visible = (
                torch.arange(entries.shape[-2], device=x.device) < ((ctx.positions + 1) // ratio)[..., None]
            )  # [B, T, E]
        if self.spec.indexer is not None:  # its compressor runs on every call: it keeps its own pending block
            index_keys = comp.indexer(x, start, state, "index_", self.rotary)
            if layer_cache is not None:
                index_keys = layer_cache.append_entries("index_kv", index_keys, start)
        if self.spec.indexer is not None and entries.shape[-2]:
            cos, sin = ctx.rope_tables(self.rotary, x.dtype)
            chosen = comp.indexer.select(x, q_res, index_keys, visible, self.rotary, cos, sin)  # [B, T, k]
            if x.shape[1] == 1 and chosen.shape[-1] < entries.shape[-2]:  # decode: read only the chosen entries
                entries = entries[:, 0].gather(1, chosen[:, 0, :, None].expand(-1, -1, entries.shape[-1]))[:, None]
                visible = None if visible is None else visible.gather(-1, chosen)
            elif visible is not None:
                visible = visible & torch.zeros_like(visible).scatter(-1, chosen, True)
        keys = torch.cat((keys, entries), dim=2)
        return keys, None if allowed is None else torch.cat((allowed, visible[:, None]), dim=-1)

    def _grouped_out(self, out: torch.Tensor) -> torch.Tensor:
        """[B, T, H·D] -> g groups, each through its own block of ``o_a_proj`` -> [B, T, g·c]."""
        g = self.spec.compress.o_groups
        weight = self.o_a_proj.weight.view(g, -1, self.o_a_proj.in_features)  # [g, c, H·D/g]
        return grouped_linear(out.view(*out.shape[:2], g, -1), weight)

    # --- declarations read by the validation, the cache planner and the accounting --------

    @staticmethod
    def label(spec: LayerSpec) -> str:
        """What the layer keeps, for tables and plots: sliding window only, CSA or HCA, and the ratio."""
        ratio = spec.compress.ratio
        if ratio == 0:
            return f"compressed: sliding window only (w={spec.window})"
        return f"compressed {'CSA' if spec.indexer is not None else 'HCA'} (ratio {ratio})"

    @staticmethod
    def shrink(spec: LayerSpec) -> dict:
        """Changes that give a tiny layer of the same structure (measured caches of tiny models)."""
        changes = dict(
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            compress=dataclasses.replace(spec.compress, q_lora_rank=8, o_groups=2, o_lora_rank=4),
            rope=dataclasses.replace(spec.rope, partial_rotary_factor=0.25),
        )
        if spec.indexer is not None:
            changes["indexer"] = tiny_indexer(spec.indexer)
        return changes

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        c = spec.compress
        if c is None:
            return [f"{at}: attention = 'compressed' with compress = None: needs a CompressSpec"]
        p = validate_indexer(at, spec) if spec.indexer is not None else []
        if min(c.q_lora_rank, c.o_groups, c.o_lora_rank) <= 0:
            p.append(f"{at}.compress = {c}: q_lora_rank, o_groups and o_lora_rank must be positive")
        elif c.ratio < 0 or (spec.num_heads * spec.head_dim) % c.o_groups or spec.window is None:
            p.append(
                f"{at}.compress = {c}: ratio must be >= 0 (0 = window only), o_groups must divide "
                f"num_heads * head_dim = {spec.num_heads * spec.head_dim}, and the layer needs a window"
            )
        return p

    @staticmethod
    def cache_spec(spec: LayerSpec) -> CacheSpec:
        c, d = spec.compress, spec.head_dim
        window = (("kv", (1, d)),)
        if not c.ratio:
            return CacheSpec(kind="ring", token_shapes=window, window=spec.window)
        entries, state = [("kv", (1, d))], list(Compressor.state_shapes(d, c.ratio, c.overlap))
        if spec.indexer is not None:
            entries.append(("index_kv", (1, spec.indexer.head_dim)))
            state += Compressor.state_shapes(spec.indexer.head_dim, c.ratio, True, "index_")
        return CacheSpec(
            kind="compressed",
            token_shapes=window,
            window=spec.window,
            compress_ratio=c.ratio,
            entry_shapes=tuple(entries),
            state_shapes=tuple(state),
        )

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> int:
        c, h, d = spec.compress, spec.num_heads, spec.head_dim
        n = hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * d  # query
        n += (
            hidden_size * d + d + h * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * hidden_size + h
        )  # kv, out, sinks
        if c.ratio:
            width = 2 * d if c.overlap else d
            n += 2 * hidden_size * width + c.ratio * width + d
            if spec.indexer is not None:
                i = spec.indexer
                n += 2 * hidden_size * 2 * i.head_dim + c.ratio * 2 * i.head_dim + i.head_dim
                n += c.q_lora_rank * i.n_heads * i.head_dim + hidden_size * i.n_heads
        return n

    @staticmethod
    def decode_flops(hidden_size: int, spec: LayerSpec, positions: int) -> dict[str, int]:
        """One token at position ``positions - 1``: window keys, visible entries (top-k of them with an
        indexer), compressor and indexer projections, the indexer's scan over all entries."""
        c, h, d = spec.compress, spec.num_heads, spec.head_dim
        proj = 2 * (hidden_size * c.q_lora_rank + c.q_lora_rank * h * d + hidden_size * d)
        proj += 2 * (h * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * hidden_size)
        attended = min(positions, spec.window)
        terms = {"projections": proj}
        if c.ratio:
            entries = positions // c.ratio
            terms["compressor"] = 2 * 2 * hidden_size * (2 * d if c.overlap else d)
            if spec.indexer is not None:
                i = spec.indexer
                queries = c.q_lora_rank * i.n_heads * i.head_dim + hidden_size * i.n_heads  # only once entries exist
                terms["indexer_projections"] = 2 * (2 * hidden_size * 2 * i.head_dim + (queries if entries else 0))
                terms["indexer_scan"] = 2 * entries * i.n_heads * (i.head_dim + 1)
                entries = min(entries, i.topk)
            attended += entries
        terms["attention"] = 2 * 2 * h * d * attended
        return terms
