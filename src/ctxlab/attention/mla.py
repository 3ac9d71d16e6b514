"""Multi-head latent attention, MLA (DeepSeek-V2 §2.1, arXiv 2405.04434; HF ``DeepseekV32Attention``),
optionally sparse through the lightning indexer (DeepSeek Sparse Attention, V3.2).

Per token the cache holds only the normalised KV latent (``kv_lora_rank``), one shared RoPE key
(``qk_rope_head_dim``, rotated in interleaved pairs) and, with DSA, the indexer key: nothing per
head. Two ways to attend over it, identical in exact arithmetic:

* ``expanded``: up-project every cached latent with ``kv_b_proj`` into per-head keys and values
  (what HF does at every step; used for prefill);
* ``absorbed``: fold the key up-projection into the query (``q_nope · W_UK`` lands in the latent
  space) and the value up-projection into the output, so attention runs directly against the
  cached latents as MQA with one 576-d key / 512-d value head (DeepSeek's inference code). It
  reads far fewer bytes per token and is the default for decode (one new token). With DSA it
  also gathers only the selected latents.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.full import FullCache
from ..cache.spec import CacheSpec
from ..config import LayerSpec, MLASpec
from ..errors import InputError
from ..nn.fusion import project
from ..nn.norms import RMSNorm
from ..nn.rope import Rotary
from ..registry import ATTENTION_KINDS
from . import decode_kernel
from .context import ForwardContext, attention_mask
from .dsa import LightningIndexer, tiny_indexer, validate_indexer
from .kernels import grouped_attention

DECODE_PATHS = ("absorbed", "expanded")
KEY_BLOCK = 64  # cached latents read in blocks of this many slots at decode (see MLAttention._absorbed)


@ATTENTION_KINDS.register("mla")
class MLAttention(nn.Module):
    OPTIONS = frozenset({"indexer"})  # optional LayerSpec fields it implements
    OWNS = ("mla",)  # sub-specs only this kind reads
    FUSIBLE = {"qkv_a_proj": ("q_a_proj", "q_proj", "kv_a_proj_with_mqa")}  # see nn.fusion
    decode_path = "absorbed"  # for one-token steps; set to "expanded" to compare

    def __init__(self, hidden_size: int, spec: LayerSpec, layer_idx: int, norm_eps: float):
        super().__init__()
        m, h, bias = spec.mla, spec.num_heads, spec.attention_bias
        self.spec, self.layer_idx = spec, layer_idx
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden_size, m.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, h * spec.head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden_size, h * spec.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * m.v_head_dim, hidden_size, bias=bias)
        self.indexer = LightningIndexer(hidden_size, m.q_lora_rank, spec.indexer) if spec.indexer else None
        self.rotary = Rotary(spec)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        s, m = self.spec, self.spec.mla
        q_a, q_full, kv_a = project(self, x, "qkv_a_proj")  # q_a with a q LoRA, q_full without
        q_res = self.q_a_layernorm(q_a) if m.q_lora_rank else None
        q = (self.q_b_proj(q_res) if q_res is not None else q_full).view(B, T, s.num_heads, -1).transpose(1, 2)
        q_nope, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)  # [B, H, T, *]
        latent, k_rot = kv_a.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        cos, sin = ctx.rope_tables(self.rotary, x.dtype)
        new = {
            "latent": self.kv_a_layernorm(latent)[:, None],  # [B, 1, T, L]
            "k_rope": self.rotary.apply_interleaved(k_rot[:, None], cos, sin),  # [B, 1, T, R]
        }
        q_rot = self.rotary.apply_interleaved(q_rot, cos, sin)
        if self.indexer is not None:
            new["index_k"] = self.indexer.keys(x, self.rotary, cos, sin)  # [B, 1, T, D_I]
        layer_cache = None if ctx.cache is None else ctx.cache[self.layer_idx]
        if layer_cache is None:
            stored, k_pos = new, ctx.positions
        else:
            stored, k_pos = layer_cache.update(new, ctx.cache)
        valid_only = ctx.decoding and not ctx.padded  # every returned key may be attended
        selected = None
        if self.indexer is not None:
            allowed = None if valid_only else ctx.mask(k_pos, s.window)  # [B, 1, T, S]
            selected = self.indexer.select(x, q_res, stored["index_k"], allowed, self.rotary, cos, sin)
        if T == 1 and self.decode_path == "absorbed":
            reads_all = selected is None or selected.shape[-1] >= k_pos.shape[-1]  # no gather of chosen keys
            if valid_only and reads_all and isinstance(layer_cache, FullCache):  # see _absorbed
                stored = layer_cache.filled_in_blocks(k_pos.shape[-1], KEY_BLOCK)
            out = self._absorbed(q_nope, q_rot, stored, k_pos, ctx, selected, valid_only)
        else:
            mask, causal = ctx.sdpa_mask(k_pos, s.window)
            if selected is not None:  # keep only the selected keys
                keep = torch.zeros_like(ctx.mask(k_pos, s.window)[:, 0]).scatter(-1, selected, True)[:, None]
                mask, causal = ctx.mask(k_pos, s.window) & keep, False
            out = self._expanded(q_nope, q_rot, stored, mask, causal)  # [B, H, T, v]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _expanded(self, q_nope, q_rot, stored, mask, causal: bool) -> torch.Tensor:
        """Per-head keys/values from every cached latent -> output [B, H, T, v]."""
        m = self.spec.mla
        B, _, S, _ = stored["latent"].shape
        kv = self.kv_b_proj(stored["latent"][:, 0]).view(B, S, self.spec.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)  # [B, H, S, *]
        k = torch.cat((k_nope, stored["k_rope"].expand(-1, self.spec.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        return grouped_attention(q, k, v, mask, self.spec.scale, causal, self.spec.window)

    def _absorbed(self, q_nope, q_rot, stored, k_pos, ctx: ForwardContext, selected, valid_only: bool) -> torch.Tensor:
        """Attention against the latents themselves (MQA, one head of L + R dims) -> [B, H, 1, v].

        The heads are folded into the query axis (``[B, 1, H, *]`` against ``[B, 1, S, *]``) and the
        scores are the sum of the latent and RoPE parts, so the cached latents are read in place
        (no concatenated key copy), once for the scores and once for the values. In bf16 with every key
        attended that runs in ctxlab's decode kernel (:mod:`ctxlab.attention.decode_kernel`, its two-part
        keys); otherwise as the matmuls below.

        The bf16 matmuls run on oneDNN, which builds a kernel for every new shape. With one more key at
        every step that happens at every step, so a full cache's keys are read in blocks of ``KEY_BLOCK``
        slots (``stored`` may hold more rows than ``k_pos``), the unwritten tail masked out of the
        softmax: deepseek_v32's benchmark model decoding from 600 / 700 tokens, the two alternating step
        by step, 39.8 ms (a read per key count) against 37.0 ms (blocks of 64), median, 2 threads."""
        m, H = self.spec.mla, self.spec.num_heads
        w = self.kv_b_proj.weight.view(H, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim :]  # [H, nope, L], [H, v, L]
        q_lat = torch.einsum("bhtn,hnl->bthl", q_nope, w_uk)  # [B, 1, H, L]
        latent, k_rope = stored["latent"], stored["k_rope"]  # [B, 1, S, L], [B, 1, S, R]
        if selected is not None and selected.shape[-1] < k_pos.shape[-1]:  # gather the chosen latents only
            index = selected[:, 0, :, None]  # [B, k, 1] (one query)
            latent = latent[:, 0].gather(1, index.expand(-1, -1, latent.shape[-1]))[:, None]
            k_rope = k_rope[:, 0].gather(1, index.expand(-1, -1, k_rope.shape[-1]))[:, None]
            k_pos = k_pos.gather(1, index[..., 0])
        q_rope = q_rot.transpose(1, 2)  # [B, 1, H, R]
        if valid_only and decode_kernel.applies(q_lat, latent, latent, None, q_rope, k_rope):
            keys = k_pos.shape[-1]  # the stored rows may run past it (filled_in_blocks)
            latent, k_rope = latent[:, :, :keys], k_rope[:, :, :keys]
            out = decode_kernel.decode_attention(q_lat, latent, latent, self.spec.scale, q_rope, k_rope)[0]
            return torch.einsum("bthl,hvl->bhtv", out, w_uv)
        # keys times queries ([S, L] @ [L, H]): the cached latents are the GEMM's row-major left operand, read
        # as stored; as the right operand (q @ latentᵀ) the kernel repacks all S x L of them every step
        scores = (latent @ q_lat.transpose(-1, -2)).float() + (k_rope @ q_rot.permute(0, 2, 3, 1)).float()
        scores = scores.transpose(-1, -2) * self.spec.scale  # [B, 1, H, S]
        if scores.shape[-1] > k_pos.shape[-1]:  # slots read past the cache length (filled_in_blocks)
            scores[..., k_pos.shape[-1] :] = float("-inf")
        if not valid_only:  # gathered key positions: a mask of their own
            scores = scores.masked_fill(~attention_mask(ctx.positions, k_pos, self.spec.window), float("-inf"))
        out = scores.softmax(dim=-1).to(latent.dtype) @ latent  # [B, 1, H, L]
        return torch.einsum("bthl,hvl->bhtv", out, w_uv)

    # --- declarations read by the validation, the cache planner and the accounting --------

    @staticmethod
    def label(spec: LayerSpec) -> str:
        """What the layer keeps, for tables and plots."""
        return "mla + indexer" if spec.indexer is not None else "mla"

    @staticmethod
    def shrink(spec: LayerSpec) -> dict:
        """Changes that give a tiny layer of the same structure (measured caches of tiny models)."""
        changes = dict(head_dim=8, num_kv_heads=1, mla=MLASpec(8, 4, 4, 4, q_lora_rank=8))
        if spec.indexer is not None:
            changes["indexer"] = tiny_indexer(spec.indexer)
        return changes

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        m = spec.mla
        if m is None:
            return [f"{at}: attention = 'mla' with mla = None: MLA attention needs an MLASpec"]
        p = []
        if spec.head_dim != m.qk_nope_head_dim + m.qk_rope_head_dim:
            p.append(f"{at}.head_dim = {spec.head_dim}: MLA's must equal qk_nope_head_dim + qk_rope_head_dim")
        if spec.indexer is not None:
            p.extend(validate_indexer(at, spec))
            if not m.q_lora_rank:
                p.append(f"{at}.indexer: the lightning indexer reads the query bottleneck; mla.q_lora_rank must be set")
        return p

    @staticmethod
    def cache_spec(spec: LayerSpec) -> CacheSpec:
        m = spec.mla
        shapes = [("latent", (1, m.kv_lora_rank)), ("k_rope", (1, m.qk_rope_head_dim))]
        if spec.indexer is not None:
            shapes.append(("index_k", (1, spec.indexer.head_dim)))
        return CacheSpec.for_tokens(tuple(shapes), spec.window)

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> int:
        m, h = spec.mla, spec.num_heads
        bias = spec.attention_bias
        if m.q_lora_rank:
            q = (
                hidden_size * m.q_lora_rank
                + (m.q_lora_rank if bias else 0)
                + m.q_lora_rank
                + m.q_lora_rank * h * spec.head_dim
            )
        else:
            q = hidden_size * h * spec.head_dim
        kv = hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim) + (
            (m.kv_lora_rank + m.qk_rope_head_dim) if bias else 0
        )
        kv += m.kv_lora_rank + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
        o = h * m.v_head_dim * hidden_size + (hidden_size if bias else 0)
        indexer = LightningIndexer.param_count(hidden_size, m.q_lora_rank, spec.indexer) if spec.indexer else 0
        return q + kv + o + indexer

    @staticmethod
    def decode_flops(hidden_size: int, spec: LayerSpec, positions: int) -> dict[str, int]:
        """One token on the absorbed path, attending to ``positions`` keys (``topk`` of them with DSA)."""
        keys = positions if spec.window is None else min(positions, spec.window)
        m, h = spec.mla, spec.num_heads
        q = (
            2 * (hidden_size * m.q_lora_rank + m.q_lora_rank * h * spec.head_dim)
            if m.q_lora_rank
            else 2 * hidden_size * h * spec.head_dim
        )
        proj = q + 2 * hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * h * m.v_head_dim * hidden_size
        absorb = 2 * h * m.kv_lora_rank * (m.qk_nope_head_dim + m.v_head_dim)  # W_UK into q, W_UV out of the latent
        attended = keys if spec.indexer is None else min(keys, spec.indexer.topk)
        terms = {
            "projections": proj + absorb,
            "attention": 2 * h * attended * (2 * m.kv_lora_rank + m.qk_rope_head_dim),  # q·k (L + R), p·v (L)
        }
        if spec.indexer is not None:
            terms.update(LightningIndexer.decode_flops(hidden_size, m.q_lora_rank, spec.indexer, keys))
        return terms


def set_decode_path(model: nn.Module, path: str) -> None:
    """Choose how every MLA layer of ``model`` decodes: ``"absorbed"`` (default) or ``"expanded"``."""
    if path not in DECODE_PATHS:
        raise InputError(f"decode path {path!r}: allowed: {list(DECODE_PATHS)}")
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.decode_path = path
