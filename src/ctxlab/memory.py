"""What a model needs in memory before it is built: weights in a dtype plus the KV cache of a generation.

This is the pre-flight estimate of ``ctxlab generate`` (``--max-memory-gb``). Models are built and
loaded straight into their dtype, tensor by tensor (``build_model``, ``from_pretrained``), so the
estimate is what they really take (tested against the peak resident memory of a process), tensors
declared ``keep_in_fp32`` (mHC's mixing projections, routing biases, attention sinks) at float32.
"""

from __future__ import annotations

import torch

from .accounting import kv_cache_bytes
from .config import ModelConfig
from .dtypes import dtype_name
from .model import CausalLM


def weights_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The bytes of the model's parameters and buffers (hash-routing tables among them) in ``dtype``, each
    ``keep_in_fp32`` tensor at float32: the model built on the meta device, where nothing is allocated (~0.1 s
    for DeepSeek V4 Pro's 1.6T parameters). A tied head counts once."""
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
