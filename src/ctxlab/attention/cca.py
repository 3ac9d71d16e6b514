"""Compressed convolutional attention, CCA / CCGQA (Figliolia et al. 2025, arXiv 2510.04476;
HF ``ZayaCCAProjection``, ``ZayaQKNorm``, ``ZayaAttention``).

Queries, keys and values are projected straight into a narrow latent (``H_q·d`` and ``H_kv·d``
wide) and attention runs there; ``o_proj`` maps back up. What makes it CCA:

1. a causal two-stage convolution over the raw latent ``u = [q | k]`` (depthwise over time with
   kernel k0, then grouped per head with kernel k1), added to
2. "qk-mean" residuals: ``q_res = (q + k_of_its_group) / 2``, ``k_res = mean of its group's q_res``;
3. a value shift: the first half of the value channels come from the current token, the second
   half from the previous token (so with 2 KV heads, head 0 is current, head 1 delayed);
4. L2 normalisation of q and k to norm sqrt(d), keys times a learned per-KV-head temperature;
5. partial RoPE, then ordinary GQA attention with 1/sqrt(d) scaling.

The convolution needs the last ``(k0-1)+(k1-1)`` raw latent columns and the value shift the
previous token's delayed-value projection: both are the layer's fixed decode state, kept in its
cache next to the latent K/V, so chunked prefill and decode continue exactly where they stopped.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import init
from ..cache.spec import CacheSpec
from ..config import LayerSpec
from ..nn.fusion import project
from ..nn.packing import grouped_linear
from ..nn.rope import Rotary
from ..registry import ATTENTION_KINDS
from .context import ForwardContext, scope
from .kernels import grouped_attention


def _conv_shape(spec: LayerSpec) -> tuple[int, int]:
    """(latent channels C = (H_q + H_kv)·d, conv state columns P = (k0-1) + (k1-1))."""
    k0, k1 = spec.conv_kernels
    return (spec.num_heads + spec.num_kv_heads) * spec.head_dim, (k0 - 1) + (k1 - 1)


POSITION_MAJOR_FROM = 16  # grouped_conv1d gathers its windows position-major for more positions than this


def grouped_conv1d(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` for a grouped ``nn.Conv1d`` (stride 1, no padding or dilation) on channels-last input, as a
    block-diagonal linear map of its windows (:func:`~ctxlab.nn.packing.grouped_linear`): x [B, L, C_in] ->
    [B, L − k + 1, C_out] (= ``conv(x.mT).mT``). Each group's output is its weight [C_out/G, C_in/G·k] times the
    group's window. At a decode step (one window) that is one native matvec over the groups, where oneDNN's
    convolution cost 162 µs and a batched matmul 61 µs for CCA's 10 groups of 128 channels (measured); a
    prefill is a batched matmul. A window is gathered channel-major (the weight's own order, no copy of it)
    for a few positions, position-major for many: runs of C_in/G channels copy as blocks, where the
    channel-major gather of a 2048-token prefill moved k = 2 elements at a time (4.6 ms a layer, 2.3 GB/s;
    the weight, reordered to match, is one small copy per call)."""
    B, L, C = x.shape
    G, k, c_out = conv.groups, conv.kernel_size[0], conv.out_channels // conv.groups
    T, width = L - k + 1, C // G
    x = x if x.stride(-1) == 1 else x.contiguous()
    sb, st = x.stride(0), x.stride(1)
    weight = conv.weight.view(G, c_out, width, k)  # [G, C_out/G, C_in/G, k]
    if T <= POSITION_MAJOR_FROM:
        windows = x.as_strided((B, T, G, width, k), (sb, st, width, 1, st))  # [B, T, G, C_in/G, k]
    else:
        windows = x.as_strided((B, T, G, k, width), (sb, st, width, st, 1))  # [B, T, G, k, C_in/G]
        weight = weight.transpose(-1, -2)
    windows = windows.reshape(B, T, G, width * k)
    return grouped_linear(windows, weight.reshape(G, c_out, width * k), conv.bias)  # [B, T, C_out]


def depthwise_conv1d(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` for a depthwise ``nn.Conv1d`` (one input channel per group, stride 1, no padding or dilation) on
    channels-last input: x [B, L, C] -> [B, L − k + 1, C] (= ``conv(x.mT).mT``), as k multiply-adds over shifted
    views of x in float32 (as a bf16 convolution accumulates; float64 stays float64), rounded once to x's dtype.
    At a decode step (a few positions) oneDNN's convolution costs ~75 µs for CCA's 1280 channels (~130 µs inside
    a step: primitive setup), this a few small ops."""
    k = conv.kernel_size[0]
    L = x.shape[1] - k + 1
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, w = x.to(acc), conv.weight.to(acc)[:, 0, :]  # [B, L + k - 1, C], [C, k]
    out = xf[:, :L] * w[:, 0]  # [B, L, C]
    for j in range(1, k):
        out = out.addcmul_(xf[:, j : j + L], w[:, j])
    if conv.bias is not None:
        out = out.add_(conv.bias.to(acc))
    return out.to(x.dtype)


class CCAProjection(nn.Module):
    """The latent q/k/v of CCA (HF name ``qkv_proj``)."""

    FUSIBLE = {"fused": ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")}  # see nn.fusion

    def __init__(self, hidden_size: int, spec: LayerSpec):
        super().__init__()
        hq, hkv, d, bias = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_bias
        channels, self.state_columns = _conv_shape(spec)
        k0, k1 = spec.conv_kernels
        self.spec = spec
        self.q_proj = nn.Linear(hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hkv * d, bias=bias)
        self.v_proj_current = nn.Linear(hidden_size, hkv * d // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(hidden_size, hkv * d // 2, bias=bias)
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, k0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, k1, groups=hq + hkv)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_cache) -> tuple[torch.Tensor, ...]:
        """x [B, T, H] -> q [B, T, H_q, d], k [B, T, H_kv, d], v [B, T, H_kv, d]."""
        B, T, _ = x.shape
        s = self.spec
        group = s.num_heads // s.num_kv_heads
        q_raw, k_raw, current, delayed = project(self, x, "fused")  # [B, T, H_q·d], [B, T, H_kv·d], [B, T, H_kv·d/2] ×2

        q_res = (
            q_raw.view(B, T, s.num_heads, -1) + k_raw.view(B, T, s.num_kv_heads, -1).repeat_interleave(group, 2)
        ) / 2
        k_res = q_res.view(B, T, s.num_kv_heads, group, -1).mean(dim=-2)

        real = (ctx.positions >= 0).to(x.dtype)  # left padding contributes nothing, even through biases
        latent = torch.cat((q_raw, k_raw), dim=-1) * real[..., None]  # [B, T, C], channels last
        if layer_cache is None:  # no earlier tokens: the state is zeros
            before = latent.new_zeros(B, self.state_columns, latent.shape[-1])
        else:
            before = layer_cache.state["conv"].transpose(1, 2)  # stored [B, C, P] (HF's layout)
        latent = torch.cat((before, latent), dim=1)  # [B, P + T, C]
        if layer_cache is not None:
            layer_cache.state["conv"].copy_(latent[:, latent.shape[1] - self.state_columns :].transpose(1, 2))
        mixed = grouped_conv1d(depthwise_conv1d(latent, self.conv_qk_depthwise), self.conv_qk_grouped)  # [B, T, C]
        q = mixed[..., : q_raw.shape[-1]].view(B, T, s.num_heads, -1) + q_res
        k = mixed[..., q_raw.shape[-1] :].view(B, T, s.num_kv_heads, -1) + k_res

        # `delayed` is the value the *next* token uses
        if layer_cache is not None and ctx.cache.length > 0:
            previous = layer_cache.state["v_prev"][:, None]
        else:  # before the first token: the projection of a zero hidden state, i.e. the bias (or zero),
            # computed by projecting one zero token so it holds for separate, fused and quantized linears alike
            previous = project(self, x.new_zeros(B, 1, x.shape[-1]), "fused")[3]
        v = torch.cat((current, torch.cat((previous, delayed[:, :-1]), dim=1)), dim=-1)
        if layer_cache is not None:  # only now: `previous` may be a view of this state
            layer_cache.state["v_prev"].copy_(delayed[:, -1])
        return q, k, v.view(B, T, s.num_kv_heads, -1)


class KeyTemperature(nn.Module):
    """L2-normalise q and k to norm sqrt(d); keys times a learned per-KV-head ``temp`` (HF ``ZayaQKNorm``)."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.scale = spec.head_dim**0.5
        self.temp = nn.Parameter(torch.zeros(spec.num_kv_heads))

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.temp, generator, std)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, T, H, d]
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


@ATTENTION_KINDS.register("cca")
class CCAttention(nn.Module):
    OPTIONS = frozenset()  # optional LayerSpec fields it implements
    OWNS = ()  # sub-specs only this kind reads

    def __init__(self, hidden_size: int, spec: LayerSpec, layer_idx: int, norm_eps: float):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.qkv_proj = CCAProjection(hidden_size, spec)
        self.qk_norm = KeyTemperature(spec)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, hidden_size, bias=spec.attention_bias)
        self.rotary = Rotary(spec)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.spec
        x = x * (ctx.positions >= 0)[..., None].to(x.dtype)  # left padding contributes nothing (HF conv mask)
        layer_cache = None if ctx.cache is None else ctx.cache[self.layer_idx]
        q, k, v = self.qkv_proj(x, ctx, layer_cache)
        q, k = self.qk_norm(q, k)
        cos, sin = ctx.rope_tables(self.rotary, x.dtype)
        q = self.rotary.apply(q.transpose(1, 2), cos, sin)  # [B, H_q, T, d]
        k = self.rotary.apply(k.transpose(1, 2), cos, sin)  # [B, H_kv, T, d]
        v = v.transpose(1, 2)
        if layer_cache is None:
            k_pos = ctx.positions
        else:
            kv, k_pos = layer_cache.update({"k": k, "v": v}, ctx.cache)
            k, v = kv["k"], kv["v"]
        mask, causal = ctx.sdpa_mask(k_pos, s.window)
        out = grouped_attention(q, k, v, mask, s.scale, causal, s.window)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim))

    # --- declarations read by the validation, the cache planner and the accounting --------

    @staticmethod
    def label(spec: LayerSpec) -> str:
        """What the layer keeps, for tables and plots."""
        return f"cca {scope(spec)}"

    @staticmethod
    def shrink(spec: LayerSpec) -> dict:
        """Changes that give a tiny layer of the same structure (measured caches of tiny models)."""
        return {}

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        s = spec
        if (s.num_kv_heads * s.head_dim) % 2 or len(s.conv_kernels) != 2 or min(s.conv_kernels) < 1:
            return [
                f"{at}: CCA needs an even num_kv_heads * head_dim (half current, half delayed values) and "
                f"two conv kernels >= 1; got {s.num_kv_heads} x {s.head_dim}, conv_kernels = {s.conv_kernels}"
            ]
        return []

    @staticmethod
    def cache_spec(spec: LayerSpec) -> CacheSpec:
        channels, columns = _conv_shape(spec)
        kv = (spec.num_kv_heads, spec.head_dim)
        return CacheSpec.for_tokens(
            (("k", kv), ("v", kv)),
            spec.window,
            state_shapes=(("conv", (channels, columns)), ("v_prev", (spec.num_kv_heads * spec.head_dim // 2,))),
        )

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> int:
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        channels, _ = _conv_shape(spec)
        k0, k1 = spec.conv_kernels
        n = hidden_size * (q + 2 * kv) + q * hidden_size  # q, k, v (two halves), o
        n += (q + 2 * kv + hidden_size) if spec.attention_bias else 0
        n += channels * k0 + channels + channels * spec.head_dim * k1 + channels  # the two convs
        return n + spec.num_kv_heads  # key temperature

    @staticmethod
    def decode_flops(hidden_size: int, spec: LayerSpec, positions: int) -> dict[str, int]:
        """Matmul/conv FLOPs of one decoded token, as torch counts them: the grouped convolution's k1 taps
        of C_in/G channels per output channel. The depthwise stage (``k0·k1`` multiply-adds per channel: it
        recomputes its k1 output columns from the cached raw latent each step, as HF does) runs as elementwise
        multiply-adds (:func:`depthwise_conv1d`), which torch counts no more than a norm's."""
        keys = positions if spec.window is None else min(positions, spec.window)
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        channels, _ = _conv_shape(spec)
        k1 = spec.conv_kernels[1]
        # no earlier token: the delayed value starts from one zero token through the fused q / k / value projection
        zero_token = 2 * hidden_size * (q + 2 * kv) if positions == 1 else 0
        return {
            "projections": 2 * hidden_size * (2 * q + 2 * kv) + zero_token,
            "conv": 2 * channels * spec.head_dim * k1,
            "attention": 2 * 2 * spec.num_heads * spec.head_dim * keys,
        }
