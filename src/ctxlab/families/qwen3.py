"""Qwen3 (Qwen team 2025): Llama-shaped GQA with per-head q/k RMSNorm before RoPE and optional
sliding-window layers (HF ``Qwen3ForCausalLM``; layers ``i >= max_window_layers`` slide when
``use_sliding_window``, unless ``layer_types`` says otherwise)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ModelConfig
from .gqa_decoder import REQUIRED, base_layer, check_layer_types, model_config, uniform_to_hf
from .hf_fields import require

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "qwen3 config"
    require(d, REQUIRED, where)
    n = d["num_hidden_layers"]
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None  # HF Qwen3Config's default
    layer_types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    check_layer_types(layer_types, n, where)
    # HF Qwen3MLP has no biases, whatever mlp_bias says; Qwen3Config's head_dim is 128 when the file has none
    full = base_layer(d, where, qk_norm=True, mlp_bias=False, head_dim=d.get("head_dim") or 128)
    sliding = dataclasses.replace(full, window=window)
    layers = [sliding if t == "sliding_attention" else full for t in layer_types]
    return model_config(d, MODEL_TYPE, layers, name, max_positions=32768)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = uniform_to_hf(cfg, MODEL_TYPE, ARCHITECTURE)
    windows = {s.window for s in cfg.layers if s.window is not None}
    out["use_sliding_window"] = bool(windows)
    out["sliding_window"] = windows.pop() if len(windows) == 1 else None
    out["max_window_layers"] = cfg.num_layers
    out["layer_types"] = ["sliding_attention" if s.window else "full_attention" for s in cfg.layers]
    return out
