"""Grouped-query attention (Ainslie et al. 2023): MHA, GQA and MQA by the ratio of query to KV heads.

Optional per-head q/k RMSNorm before RoPE (Qwen3, HF ``Qwen3Attention``), optional projection
biases (HF ``attention_bias``: q, k, v and o),
a per-layer sliding window, and cross-layer KV sharing: a layer with ``kv_source`` has no K/V
projections and attends over the K/V its producer computed in the same forward. An optional softplus output gate scales each
head's output before ``o_proj``, per head or per element (HF ``LagunaAttention``). Query heads
come from the layer's own spec, so layers may have different head budgets over the same KV heads.
K/V are cached with ``H_kv`` heads and never expanded: decode folds each KV group's query heads
into the query axis (``attention.kernels.grouped_attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.spec import CacheSpec
from ..config import LayerSpec
from ..nn.fusion import project
from ..nn.norms import RMSNorm
from ..nn.rope import Rotary
from ..registry import ATTENTION_KINDS
from .context import ForwardContext, scope
from .kernels import grouped_attention

OUTPUT_GATES = ("per_head", "per_element")


@ATTENTION_KINDS.register("gqa")
class GQAttention(nn.Module):
    OPTIONS = frozenset({"qk_norm", "v_norm", "k_eq_v", "output_gate", "kv_source"})  # optional LayerSpec fields
    OWNS = ()  # sub-specs only this kind reads
    FUSIBLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj", "g_proj")}  # one matmul after nn.fusion.fuse_projections_

    def __init__(self, hidden_size: int, spec: LayerSpec, layer_idx: int, norm_eps: float):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        h, hq, hkv, d, bias = hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(h, hq * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, h, bias=bias)
        self.q_norm = RMSNorm(d, norm_eps) if spec.qk_norm else None
        self.produces_kv = spec.kv_source is None
        if self.produces_kv:
            self.k_proj = nn.Linear(h, hkv * d, bias=bias)
            self.v_proj = None if spec.k_eq_v else nn.Linear(h, hkv * d, bias=bias)
            self.k_norm = RMSNorm(d, norm_eps) if spec.qk_norm else None
            self.v_norm = RMSNorm(d, norm_eps, with_scale=False) if spec.v_norm else None
        self.rotary = Rotary(spec)
        if spec.output_gate is not None:
            self.g_proj = nn.Linear(h, hq if spec.output_gate == "per_head" else hq * d, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.spec
        cos, sin = ctx.rope_tables(self.rotary, x.dtype)
        q, k_new, v_new, gate = project(self, x, "qkv_proj")  # [B, T, H·D] each (None: not this layer's)
        q = q.view(B, T, s.num_heads, s.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = self.rotary.apply(q.transpose(1, 2), cos, sin)  # [B, H_q, T, D]

        if self.produces_kv:
            k, v, k_pos = self._new_kv(k_new, v_new, ctx, cos, sin)
            if self.layer_idx in ctx.sources:
                ctx.shared_kv[self.layer_idx] = (k, v, k_pos)
        else:
            k, v, k_pos = ctx.shared_kv[s.kv_source]

        mask, causal = ctx.sdpa_mask(k_pos, s.window)  # [B, 1, T, S] or None
        out = grouped_attention(q, k, v, mask, s.scale, causal, s.window).transpose(1, 2)  # [B, T, H_q, D]
        if s.output_gate is not None:
            gate = F.softplus(gate.float()).to(out.dtype)  # [B, T, H_q] or [B, T, H_q * D]
            out = out * gate.view(B, T, s.num_heads, -1)
        return self.o_proj(out.reshape(B, T, s.num_heads * s.head_dim))

    def _new_kv(self, k, v, ctx: ForwardContext, cos, sin):
        """K/V of the new tokens (projected, [B, T, H_kv·D]; ``v`` None when K = V), appended to this layer's
        cache; returns what to attend over."""
        B, T, _ = k.shape
        s = self.spec
        k = k.view(B, T, s.num_kv_heads, s.head_dim)
        v = k if v is None else v.view(B, T, s.num_kv_heads, s.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = self.rotary.apply(k.transpose(1, 2), cos, sin)  # [B, H_kv, T, D]
        if self.v_norm is not None:
            v = self.v_norm(v)
        v = v.transpose(1, 2)  # [B, H_kv, T, D]
        if ctx.cache is None:
            return k, v, ctx.positions
        kv, k_pos = ctx.cache[self.layer_idx].update({"k": k, "v": v}, ctx.cache)
        return kv["k"], kv["v"], k_pos

    # --- declarations read by the validation, the cache planner and the accounting --------

    @staticmethod
    def label(spec: LayerSpec) -> str:
        """What the layer keeps, for tables and plots."""
        return f"gqa {scope(spec)}"

    @staticmethod
    def shrink(spec: LayerSpec) -> dict:
        """Changes that give a tiny layer of the same structure (measured caches of tiny models)."""
        return {}

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        if spec.output_gate not in (None, *OUTPUT_GATES):
            allowed = ", ".join(map(repr, OUTPUT_GATES))
            return [f"{at}.output_gate = {spec.output_gate!r}: allowed: None, {allowed}"]
        return []

    @staticmethod
    def cache_spec(spec: LayerSpec) -> CacheSpec:
        shape = (spec.num_kv_heads, spec.head_dim)
        return CacheSpec.for_tokens((("k", shape), ("v", shape)), spec.window)

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> int:
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        n = 2 * hidden_size * q_out  # q_proj, o_proj
        n += q_out + hidden_size if spec.attention_bias else 0
        n += spec.head_dim if spec.qk_norm else 0
        n += GQAttention._gate_width(spec) * hidden_size
        if spec.kv_source is None:
            kv_projections = 1 if spec.k_eq_v else 2
            n += kv_projections * (hidden_size * kv_out + (kv_out if spec.attention_bias else 0))
            n += spec.head_dim if spec.qk_norm else 0
        return n

    @staticmethod
    def _gate_width(spec: LayerSpec) -> int:
        if spec.output_gate is None:
            return 0
        return spec.num_heads * (1 if spec.output_gate == "per_head" else spec.head_dim)

    @staticmethod
    def decode_flops(hidden_size: int, spec: LayerSpec, positions: int) -> dict[str, int]:
        """Matmul FLOPs (2 per multiply-add) of one new token; it sees ``positions`` keys, capped by the window."""
        keys = positions if spec.window is None else min(positions, spec.window)
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        kv_projections = 0 if spec.kv_source is not None else (1 if spec.k_eq_v else 2)
        proj = 2 * hidden_size * (2 * q_out + kv_projections * kv_out + GQAttention._gate_width(spec))
        scores_and_mix = 2 * 2 * spec.num_heads * spec.head_dim * keys  # q.k^T and p.v
        return {"projections": proj, "attention": scores_and_mix}
