"""Families are wiring: HF ``config.json`` <-> :class:`~ctxlab.config.ModelConfig`, plus true
checkpoint-key quirks. Each family module exposes ``MODEL_TYPE``, ``ARCHITECTURE``,
``from_hf(dict, name) -> ModelConfig`` and ``to_hf(ModelConfig) -> dict``."""

from . import llama, qwen3

FAMILIES = {f.MODEL_TYPE: f for f in (llama, qwen3)}

__all__ = ["FAMILIES"]
