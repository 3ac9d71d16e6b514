"""What a model needs in memory before it is built: weights in a dtype plus the KV cache of a generation.

This is the pre-flight estimate of ``ctxlab generate`` (``--max-memory-gb``). Models are built and
loaded straight into their dtype, tensor by tensor (``build_model``, ``from_pretrained``), so the
estimate is what they really take (tested against the peak resident memory of a process).
Tensors kept in float32 (routing biases, ``keep_in_fp32``) are vectors, negligible here.
"""

from __future__ import annotations

import torch

from .accounting import count_params, kv_cache_bytes
from .config import ModelConfig
from .dtypes import dtype_name


def weights_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Parameters (text decoder) x element size; buffers such as hash-routing tables added."""
    size = torch.empty((), dtype=dtype).element_size()
    tables = sum(cfg.vocab_size * s.moe.top_k * 8 for s in cfg.layers if s.moe is not None and s.moe.router == "hash")
    return count_params(cfg)["total"] * size + tables


def rope_table_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int) -> int:
    """The cos / sin tables a cache of ``tokens`` positions precomputes, one pair per distinct rotation
    (``Cache.rope_nbytes``): 2 x tokens x rotary dims each."""
    size = torch.empty((), dtype=dtype).element_size()
    rotations = {(s.rope, s.rotary_dim) for s in cfg.layers if s.rotary_dim}
    return sum(2 * tokens * dims * size for _, dims in rotations)


def generation_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int, batch_size: int = 1) -> dict[str, int]:
    """{weights, cache, total}: a model in ``dtype`` and a cache of ``tokens`` positions per sequence (its
    K/V state and its RoPE tables)."""
    weights = weights_bytes(cfg, dtype)
    tokens = max(tokens, 1)
    cache = kv_cache_bytes(cfg, tokens, dtype_name(dtype), batch_size) + rope_table_bytes(cfg, dtype, tokens)
    return {"weights": weights, "cache": cache, "total": weights + cache}
