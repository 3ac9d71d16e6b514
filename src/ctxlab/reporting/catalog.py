"""The presets as a catalogue (``ctxlab list``, ``ctxlab.list_presets()``).

Each row is computed from the preset's config (family, parameters, layers, trained context); the
one-line descriptions are the only hand-written part.
"""

from __future__ import annotations

from ..accounting import count_params
from ..io.config_file import load_config
from ..presets import preset_names

DESCRIPTIONS = {
    "deepseek-v3.2": "DeepSeek V3.2-Exp: MLA + DeepSeek Sparse Attention (lightning indexer), 256-expert MoE",
    "deepseek-v4-flash": "DeepSeek V4 Flash: CSA/HCA compressed attention over a 128-token window, mHC, 256 experts",
    "deepseek-v4-pro": "DeepSeek V4 Pro: CSA/HCA compressed attention over a 128-token window, mHC, 384 experts",
    "gemma3-270m": "Gemma 3 270M: sliding/global GQA 5:1 (window 512), q/k norm, 1 KV head, tied 262K vocabulary",
    "cla2-tiny": "mechanism preset: cross-layer attention (CLA2 + MQA), each KV-producing layer shared by the next",
    "openelm-tiny": "mechanism preset: OpenELM layer-wise scaling, heads and FFN width growing with depth",
    "gemma4-26b-a4b": "Gemma 4 26B-A4B: sliding/global GQA, K=V global layers, 128 experts beside the dense MLP",
    "gemma4-31b": "Gemma 4 31B: dense, sliding/global GQA with K=V global layers",
    "gemma4-e2b": "Gemma 4 E2B: per-layer embeddings, cross-layer KV sharing, sliding/global GQA",
    "gemma4-e4b": "Gemma 4 E4B: per-layer embeddings, cross-layer KV sharing, sliding/global GQA",
    "laguna-xs2": "Poolside Laguna XS.2: per-layer head budgets, gated sliding/global GQA, sigmoid-routed MoE",
    "llama-3-8b": "Llama 3 8B: the GQA baseline (32 layers, 8 KV heads)",
    "qwen3-8b": "Qwen3 8B: GQA with q/k norm",
    "tiny-llama": "test preset: tiny Llama 3 shape (3 layers, hidden 32, vocab 128)",
    "tiny-qwen3-sliding": "test preset: tiny Qwen3 shape with sliding-window layers (window 8), tied head",
    "zaya1-8b": "Zyphra ZAYA1 8B: compressed convolutional attention (CCA), top-1 MoE with the EDA router",
}


def list_presets(include_tiny: bool = True) -> list[dict]:
    """One row per preset: name, family, params (total, active), layers, trained context, description."""
    rows = []
    for name in preset_names(include_tiny):
        cfg = load_config(name)
        params = count_params(cfg)
        rows.append(
            {
                "name": name,
                "family": cfg.family,
                "params_total": params["total"],
                "params_active": params["active"],
                "num_layers": cfg.num_layers,
                "trained_context": cfg.max_position_embeddings,
                "description": DESCRIPTIONS.get(name, ""),
            }
        )
    return rows
