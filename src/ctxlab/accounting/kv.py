"""KV-cache bytes under named conventions, from the same cache specs that allocate real caches.

``"realized"`` is what :meth:`CausalLM.new_cache` really allocates (sliding layers capped at their
window, layers that share K/V hold nothing); ``"uncapped"`` keeps sharing but lets sliding layers
hold every token; ``"naive"`` counts every layer's per-token bytes for every token (no window cap,
no sharing), the convention of most published per-token figures (e.g. Raschka's LLM Architecture
Gallery).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..dtypes import resolve_dtype
from ..errors import InputError
from ..planner import layer_cache_spec

KV_CONVENTIONS = ("realized", "uncapped", "naive")


def check_sizes(context_len: int, batch_size: int) -> None:
    """Both positive integers (not bools), or one InputError naming each that is not."""
    bad = [
        f"{name} = {value!r}: must be a positive integer"
        for name, value in (("context_len", context_len), ("batch_size", batch_size))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]
    if bad:
        raise InputError(bad[0] if len(bad) == 1 else "; ".join(bad))


def kv_cache_bytes_per_layer(
    cfg: ModelConfig,
    context_len: int,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 1,
    convention: str = "realized",
) -> list[int]:
    """Cache bytes of each layer for ``batch_size`` sequences of ``context_len`` tokens."""
    if convention not in KV_CONVENTIONS:
        raise InputError(f"convention = {convention!r}: allowed: {list(KV_CONVENTIONS)}")
    check_sizes(context_len, batch_size)
    dt = resolve_dtype(dtype)
    out = []
    for layer in cfg.layers:
        if convention != "realized":  # as if the layer had no window
            layer = dataclasses.replace(layer, window=None)
        if convention == "naive":  # ... and its own K/V
            layer = dataclasses.replace(layer, kv_source=None)
        out.append(layer_cache_spec(layer).nbytes(batch_size, context_len, dt))
    return out


def kv_cache_bytes(
    cfg: ModelConfig,
    context_len: int,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 1,
    convention: str = "realized",
) -> int:
    """Total cache bytes; with ``convention="realized"`` equals ``new_cache(batch_size, context_len).nbytes()``."""
    return sum(kv_cache_bytes_per_layer(cfg, context_len, dtype, batch_size, convention))
