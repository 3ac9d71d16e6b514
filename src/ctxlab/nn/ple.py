"""Per-layer embeddings (PLE), Gemma 3n / Gemma 4 E2B and E4B (HF ``Gemma4TextModel.
get_per_layer_inputs``, ``project_per_layer_inputs`` and the gate in ``Gemma4TextDecoderLayer``).

Each layer ``i`` receives a small vector ``ple_i`` [B, T, Dp]: a token-identity part looked up
in one packed table [Vp, L·Dp] (scaled by sqrt(Dp)), plus a context part projected from the
scaled main embedding (times H^-1/2, RMS-normed over Dp with one weight shared by all layers),
summed and scaled by 2^-1/2. Inside the layer, after the FFN:
``x += rms(W_proj (gelu(W_gate x) * ple_i); post_per_layer_input_norm)``.

Parameter names follow HF, so the modules live directly on the stack and the block; these
helpers build them and do the arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..registry import ACTIVATIONS, MODEL_CHECKS
from .norms import RMSNorm


def stack_modules(cfg: ModelConfig) -> dict[str, nn.Module]:
    """The model-level PLE modules, by their HF names (attributes of ``model.``)."""
    dp, n = cfg.per_layer_input_size, cfg.num_layers
    return {
        "embed_tokens_per_layer": nn.Embedding(cfg.per_layer_vocab_size, n * dp),
        "per_layer_model_projection": nn.Linear(cfg.hidden_size, n * dp, bias=False),
        "per_layer_projection_norm": RMSNorm(dp, cfg.norm_eps),
    }


def per_layer_inputs(stack: nn.Module, ids: torch.Tensor, embedded: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """ids [B, T], scaled main embedding [B, T, H] -> per-layer inputs [B, T, L, Dp]."""
    dp, n = cfg.per_layer_input_size, cfg.num_layers
    table = stack.embed_tokens_per_layer.weight
    token_part = stack.embed_tokens_per_layer(ids) * torch.tensor(dp**0.5, dtype=table.dtype)
    context = stack.per_layer_model_projection(embedded) * cfg.hidden_size**-0.5
    context = stack.per_layer_projection_norm(context.reshape(*ids.shape, n, dp))
    return (context + token_part.reshape(*ids.shape, n, dp)) * 2.0**-0.5


def block_modules(cfg: ModelConfig) -> dict[str, nn.Module]:
    """The per-layer gate modules, by their HF names (attributes of ``model.layers.i.``)."""
    h, dp = cfg.hidden_size, cfg.per_layer_input_size
    return {
        "per_layer_input_gate": nn.Linear(h, dp, bias=False),
        "per_layer_projection": nn.Linear(dp, h, bias=False),
        "post_per_layer_input_norm": RMSNorm(h, cfg.norm_eps),
    }


def gate(block: nn.Module, x: torch.Tensor, ple_i: torch.Tensor, activation: str) -> torch.Tensor:
    """x [B, T, H], ple_i [B, T, Dp] -> x + rms(W_proj (act(W_gate x) * ple_i))."""
    g = ACTIVATIONS[activation](block.per_layer_input_gate(x)) * ple_i
    return x + block.post_per_layer_input_norm(block.per_layer_projection(g))


def stack_param_count(cfg: ModelConfig) -> dict[str, int]:
    """``table`` (the packed embedding) and ``projection`` (context projection + its norm)."""
    if not cfg.per_layer_input_size:
        return {"table": 0, "projection": 0}
    dp, n, h = cfg.per_layer_input_size, cfg.num_layers, cfg.hidden_size
    return {"table": cfg.per_layer_vocab_size * n * dp, "projection": h * n * dp + dp}


def block_param_count(cfg: ModelConfig) -> int:
    h, dp = cfg.hidden_size, cfg.per_layer_input_size
    return 2 * h * dp + h if dp else 0


def block_decode_flops(cfg: ModelConfig) -> int:
    """Gate and projection of one layer for one token, [H -> Dp -> H]."""
    return 2 * 2 * cfg.hidden_size * cfg.per_layer_input_size


def stack_decode_flops(cfg: ModelConfig) -> int:
    """The context projection of one token to every layer's Dp."""
    return 2 * cfg.hidden_size * cfg.num_layers * cfg.per_layer_input_size


@MODEL_CHECKS.register("per_layer_embeddings")
def validate(cfg: ModelConfig) -> list[str]:
    size, table = cfg.per_layer_input_size, cfg.per_layer_vocab_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or (size and not (table or 0) > 0):
        return [
            f"per_layer_input_size = {size!r}, per_layer_vocab_size = {table!r}: per-layer embeddings need "
            "a size >= 0 and, when on, a positive table size"
        ]
    return []
