"""Families are wiring: HF ``config.json`` <-> :class:`~ctxlab.config.ModelConfig`, plus true
checkpoint-key quirks. Each family module exposes ``MODEL_TYPE`` (and ``MODEL_TYPES`` when it
reads several), ``ARCHITECTURE``, ``from_hf(dict, name) -> ModelConfig``,
``to_hf(ModelConfig) -> dict`` and optionally ``checkpoint_key(name) -> name | None``."""

from . import deepseek_v4, deepseek_v32, gemma3, gemma4, laguna, llama, qwen3, zaya

FAMILIES = {
    t: f
    for f in (llama, qwen3, gemma3, gemma4, laguna, zaya, deepseek_v32, deepseek_v4)
    for t in getattr(f, "MODEL_TYPES", (f.MODEL_TYPE,))
}

__all__ = ["FAMILIES"]
