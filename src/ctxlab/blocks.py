"""Decoder blocks: how one layer wires attention, feed-forward and the residual stream.

* ``pre_norm`` (Llama, Qwen3; HF ``LlamaDecoderLayer``): ``x += attn(norm(x)); x += mlp(norm(x))``.
* ``sandwich`` (Gemma 4; HF ``Gemma4TextDecoderLayer``): every sub-block is normed before and
  after: ``x += norm(attn(norm(x)))``; ``x += norm(ffn(x))`` where ``ffn`` is the dense MLP, or
  with ``moe`` the sum of the normed dense MLP and the normed routed experts, both reading the
  same residual.
* ``hyper`` (DeepSeek V4): pre-norm with a pluggable residual (plain, or mHC streams).
* ``scaled_residual`` (ZAYA1; HF ``ZayaDecoderLayer``): pre-norm, but each add is
  ``(branch + b) * s + (residual + b') * s'`` with learned vectors; the norms read the residual
  cast to the weights' dtype, so the stream itself may stay in float32.

Both then apply the optional per-layer-embedding gate (PLE) and ``layer_scalar``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import ATTENTION_KINDS
from .attention.context import ForwardContext
from .config import LayerSpec, ModelConfig
from .nn import ple
from .nn.moe import MLP_KINDS, ROUTERS, Experts, make_router
from .nn.norms import RMSNorm
from .nn.residual import HyperConnection, PlainResidual, ResidualScaling


class Block(nn.Module):
    """What every block kind shares: attention, MLP, and the optional PLE gate and layer scalar."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.norm_eps)
        self.self_attn = ATTENTION_KINDS[spec.attention](h, spec, layer_idx, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.norm_eps)
        self.mlp = MLP_KINDS[spec.mlp].from_spec(h, spec, cfg.norm_eps, cfg.vocab_size)
        self.has_ple = bool(cfg.per_layer_input_size)
        if self.has_ple:
            for name, module in ple.block_modules(cfg).items():
                self.add_module(name, module)
        if spec.layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))

    @staticmethod
    def normed(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """A norm of the residual, read in the weights' dtype (the residual may be float32)."""
        return norm(x.to(norm.weight.dtype))

    def finish(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.has_ple:
            x = ple.gate(self, x, ctx.per_layer_inputs[:, :, self.layer_idx], self.spec.activation)
        if self.spec.layer_scalar:
            x = x * self.layer_scalar
        return x

    @staticmethod
    def param_count(cfg: ModelConfig, spec: LayerSpec) -> dict[str, int]:
        """Parameters of one layer of this kind: ``total`` and ``active`` (per token)."""
        h = cfg.hidden_size
        n = ATTENTION_KINDS[spec.attention].param_count(h, spec)
        n += 2 * h + ple.block_param_count(cfg)  # input / post-attention norms, PLE gate
        mlp = MLP_KINDS[spec.mlp].param_count(h, spec)
        return {"total": n + mlp["total"], "active": n + mlp["active"]}

    @staticmethod
    def decode_flops(cfg: ModelConfig, spec: LayerSpec, positions: int) -> dict[str, int]:
        """Matmul FLOPs of one token through this layer, seeing ``positions`` earlier-or-own tokens."""
        h = cfg.hidden_size
        terms = dict(ATTENTION_KINDS[spec.attention].decode_flops(h, spec, positions))
        terms["mlp"] = MLP_KINDS[spec.mlp].flops_per_token(h, spec)
        if cfg.per_layer_input_size:  # gate and projection, [H -> Dp -> H]
            terms["per_layer_embedding"] = 2 * 2 * h * cfg.per_layer_input_size
        if spec.moe is not None and spec.mlp == "gated":  # the expert branch beside the MLP
            m = spec.moe
            terms["experts"] = 2 * Experts.active_param_count(h, m) + 2 * h * m.num_experts  # + router logits
        return terms


class PreNormBlock(Block):
    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [B, T, H]
        x = x + self.self_attn(self.normed(self.input_layernorm, x), ctx)
        x = x + self.mlp(self.normed(self.post_attention_layernorm, x), ctx)
        return self.finish(x, ctx)


class SandwichBlock(Block):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_idx: int):
        super().__init__(cfg, spec, layer_idx)
        h, eps = cfg.hidden_size, cfg.norm_eps
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.has_expert_branch = spec.moe is not None and spec.mlp == "gated"
        if self.has_expert_branch:
            self.router = make_router(h, spec.moe, eps, cfg.vocab_size)
            self.experts = Experts(h, spec.moe, spec.activation, spec.swiglu_limit)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [B, T, H]
        x = x + self.post_attention_layernorm(self.self_attn(self.normed(self.input_layernorm, x), ctx))
        f = self.mlp(self.normed(self.pre_feedforward_layernorm, x), ctx)
        if self.has_expert_branch:
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(self._experts(x, ctx))
        x = x + self.post_feedforward_layernorm(f)
        return self.finish(x, ctx)

    def _experts(self, residual: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Routed experts on the residual [B, T, H]; the router reads it un-normed."""
        flat = residual.reshape(-1, residual.shape[-1]).to(self.pre_feedforward_layernorm_2.weight.dtype)  # [N, H]
        index, weight = self.router(flat, ctx)
        return self.experts(self.pre_feedforward_layernorm_2(flat), index, weight).reshape(residual.shape)

    @staticmethod
    def param_count(cfg: ModelConfig, spec: LayerSpec) -> dict[str, int]:
        h = cfg.hidden_size
        counts = Block.param_count(cfg, spec)
        counts = {k: v + 2 * h for k, v in counts.items()}  # pre/post feed-forward norms
        if spec.moe is not None and spec.mlp == "gated":
            router = ROUTERS[spec.moe.router].param_count(h, spec.moe) + 3 * h  # + three branch norms
            counts["total"] += router + Experts.param_count(h, spec.moe)
            counts["active"] += router + Experts.active_param_count(h, spec.moe)
        return counts


class ScaledResidualBlock(Block):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_idx: int):
        super().__init__(cfg, spec, layer_idx)
        self.post_attention_residual_scale = ResidualScaling(cfg.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(cfg.hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [B, T, H], maybe float32
        x = self.post_attention_residual_scale(self.self_attn(self.normed(self.input_layernorm, x), ctx), x)
        x = self.post_mlp_residual_scale(self.mlp(self.normed(self.post_attention_layernorm, x), ctx), x)
        return self.finish(x, ctx)

    @staticmethod
    def param_count(cfg: ModelConfig, spec: LayerSpec) -> dict[str, int]:
        extra = 2 * ResidualScaling.param_count(cfg.hidden_size)
        return {k: v + extra for k, v in Block.param_count(cfg, spec).items()}


class HyperBlock(Block):
    """Pre-norm block whose residual is a pluggable kind (DeepSeek V4; HF ``DeepseekV4DecoderLayer``):
    ``attn_hc`` / ``ffn_hc`` split the residual into the sub-block's input and merge the output
    back. With ``residual = "mhc"`` they are hyper-connections over ``hc_mult`` streams; with
    ``"plain"`` the same code is an ordinary residual, so the swap is a config change."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_idx: int):
        super().__init__(cfg, spec, layer_idx)
        self.attn_hc, self.ffn_hc = make_residual(cfg), make_residual(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [B, T, (n,) H]
        u, mixing = self.attn_hc.split(x)
        x = self.attn_hc.merge(x, self.self_attn(self.normed(self.input_layernorm, u), ctx), mixing)
        u, mixing = self.ffn_hc.split(x)
        x = self.ffn_hc.merge(x, self.mlp(self.normed(self.post_attention_layernorm, u), ctx), mixing)
        return self.finish(x, ctx)

    @staticmethod
    def param_count(cfg: ModelConfig, spec: LayerSpec) -> dict[str, int]:
        extra = 2 * RESIDUALS[cfg.residual].param_count(cfg.hidden_size, cfg.hc_mult)
        return {k: v + extra for k, v in Block.param_count(cfg, spec).items()}

    @staticmethod
    def decode_flops(cfg: ModelConfig, spec: LayerSpec, positions: int) -> dict[str, int]:
        terms = Block.decode_flops(cfg, spec, positions)
        if cfg.residual == "mhc":  # per connection: the mixing projection, the collapse (pre X), the mix (comb^T X)
            n, h = cfg.hc_mult, cfg.hidden_size
            terms["hyper_connections"] = 2 * (2 * n * h * (2 + n) * n + 2 * n * h + 2 * n * n * h)
        return terms


RESIDUALS = {"plain": PlainResidual, "mhc": HyperConnection}


def make_residual(cfg: ModelConfig) -> nn.Module:
    if cfg.residual == "mhc":
        return HyperConnection(cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
    return PlainResidual()


BLOCK_KINDS = {
    "pre_norm": PreNormBlock,
    "sandwich": SandwichBlock,
    "scaled_residual": ScaledResidualBlock,
    "hyper": HyperBlock,
}
