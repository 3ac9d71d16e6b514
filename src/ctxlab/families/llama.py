"""Llama 3 (Meta 2024) and every Llama-shaped GQA decoder (HF ``LlamaForCausalLM``)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .gqa_decoder import REQUIRED, base_layer, model_config, uniform_to_hf
from .hf_fields import require

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "llama config"
    require(d, REQUIRED, where)
    layer = base_layer(d, where)
    # HF LlamaConfig's defaults for a file without them
    return model_config(d, MODEL_TYPE, [layer] * d["num_hidden_layers"], name, max_positions=2048, bos=1, eos=2)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = uniform_to_hf(cfg, MODEL_TYPE, ARCHITECTURE)
    out["mlp_bias"] = cfg.layers[0].mlp_bias
    return out
