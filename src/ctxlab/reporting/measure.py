"""Measured caches: a tiny model with a preset's exact layer pattern (kinds, windows, sharing,
compression ratios, per-layer head budgets, all layers), prefilled with real tokens, and the bytes
its cache holds next to the analytic figure for the same tiny config."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..accounting import kv_cache_bytes
from ..config import LayerSpec, ModelConfig
from ..io.config_file import load_config
from ..model import build_model
from ..registry import ATTENTION_KINDS

FAMILY_PRESETS = (
    "llama-3-8b",
    "qwen3-8b",
    "gemma4-e2b",
    "laguna-xs2",
    "zaya1-8b",
    "deepseek-v3.2",
    "deepseek-v4-flash",
)


def tiny_like(cfg: ModelConfig, hidden: int = 32, vocab: int = 64) -> ModelConfig:
    """The same layer pattern with tiny widths: every layer keeps its kind, window, KV source,
    compression ratio and relative head budget; dimensions shrink deterministically, so layers
    that share K/V still agree."""
    layers = tuple(_tiny_layer(s) for s in cfg.layers)
    return cfg.replace(
        hidden_size=hidden,
        vocab_size=vocab,
        layers=layers,
        bos_token_id=None,
        eos_token_id=(),
        pad_token_id=None,
        per_layer_input_size=4 if cfg.per_layer_input_size else 0,
        per_layer_vocab_size=vocab if cfg.per_layer_input_size else None,
        name=f"tiny {cfg.name}",
    )


def _tiny_layer(s: LayerSpec) -> LayerSpec:
    kv = min(s.num_kv_heads, 2)
    group = max(1, (s.num_heads // s.num_kv_heads) // 4)  # keeps budget differences (48 vs 64 -> 1 vs 2)
    head_dim = max(8, s.head_dim // 32)
    moe = None
    if s.moe is not None:
        m = s.moe
        moe = dataclasses.replace(
            m,
            num_experts=4,
            top_k=min(m.top_k, 2),
            intermediate_size=8,
            n_group=1,
            topk_group=1,
            shared_expert_size=8 if m.shared_expert_size else 0,
            router_hidden_size=8 if m.router_hidden_size else 0,
        )
    changes = dict(num_heads=kv * group, num_kv_heads=kv, head_dim=head_dim, intermediate_size=16, moe=moe)
    changes.update(ATTENTION_KINDS[s.attention].shrink(s))  # the kind's own sub-specs, shrunk
    return dataclasses.replace(s, **changes)


def measured_cache(name: str, tokens: int = 2048, seed: int = 0) -> dict:
    """Prefill ``tokens`` random tokens into a tiny model of preset ``name``; compare bytes."""
    tiny = tiny_like(load_config(name))
    model = build_model(tiny, seed=seed)
    ids = torch.randint(0, tiny.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(1, tokens)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, cache=cache, last_only=True)
    return {
        "model": name,
        "tokens": tokens,
        "layers": tiny.num_layers,
        "cache_nbytes": cache.nbytes(),
        "analytic_bytes": kv_cache_bytes(tiny, tokens, "float32"),
        "seconds": time.perf_counter() - start,
    }


__all__ = ["FAMILY_PRESETS", "measured_cache", "tiny_like"]
