"""What a model costs, derived from the same layer specs and cache specs that build it.

* :func:`kv_cache_bytes`: cache bytes at a context length, under a named *convention*:
  ``"realized"`` is what :meth:`CausalLM.new_cache` really allocates (sliding layers capped at
  their window, layers that share K/V hold nothing); ``"uncapped"`` keeps sharing but lets
  sliding layers hold every token; ``"naive"`` counts every layer's per-token bytes for every
  token (no window cap, no sharing), the convention of most published per-token figures
  (e.g. Raschka's LLM Architecture Gallery).
* :func:`count_params`: total, embedding, non-embedding ("effective") and active parameters.
* :func:`decode_flops`: matmul FLOPs of decoding one token.
"""

from __future__ import annotations

import dataclasses

import torch

from .blocks import BLOCK_KINDS
from .cache import layer_cache_spec
from .config import ModelConfig
from .nn import ple
from .nn.residual import HyperHead

KV_CONVENTIONS = ("realized", "uncapped", "naive")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype = {dtype!r}: allowed: {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def kv_cache_bytes_per_layer(
    cfg: ModelConfig,
    context_len: int,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 1,
    convention: str = "realized",
) -> list[int]:
    """Cache bytes of each layer for ``batch_size`` sequences of ``context_len`` tokens."""
    if convention not in KV_CONVENTIONS:
        raise ValueError(f"convention = {convention!r}: allowed: {list(KV_CONVENTIONS)}")
    if not (isinstance(context_len, int) and context_len > 0):
        raise ValueError(f"context_len = {context_len!r}: must be a positive integer")
    dt = as_dtype(dtype)
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


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no model is built).

    ``embedding``: the input token table. ``head``: the output projection when untied (0 when
    tied, since it is then the embedding table). ``per_layer_embedding``: the packed PLE table
    (Gemma 4 E2B/E4B). ``non_embedding``: total minus those tables (Kaplan et al. 2020; the
    "Non-Embedding" figure of the Qwen3 model cards). ``non_text``: towers outside the text
    decoder that published totals include (vision, audio; from the family's data).
    ``effective``: text decoder plus towers minus every embedding table (Google's "effective
    parameters" of Gemma 4 E2B/E4B; = non_embedding when there are no towers). ``active``:
    parameters used per token (routed experts counted at top-k; = total for dense models).
    """
    h = cfg.hidden_size
    embedding = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    per_layer = [BLOCK_KINDS[s.block].param_count(cfg, s) for s in cfg.layers]
    ple_counts = ple.stack_param_count(cfg)
    stack = h + (2 * h if cfg.input_affine else 0)  # final norm, embedding affine
    stack += HyperHead.param_count(h, cfg.hc_mult) if cfg.residual == "mhc" else 0
    total = embedding + head + sum(c["total"] for c in per_layer) + stack + ple_counts["table"] + ple_counts["projection"]
    tables = embedding + head + ple_counts["table"]
    return {
        "total": total,
        "embedding": embedding,
        "head": head,
        "per_layer_embedding": ple_counts["table"],
        "blocks": sum(c["total"] for c in per_layer),
        "non_embedding": total - tables,
        "non_text": cfg.non_text_params,
        "effective": total + cfg.non_text_params - tables,
        "active": total - sum(c["total"] - c["active"] for c in per_layer),
    }


def decode_flops_terms(cfg: ModelConfig, context_len: int) -> dict[str, int]:
    """Matmul FLOPs of decoding the token at position ``context_len``, by term.

    Convention: 2 FLOPs per multiply-add of every matmul (projections, q·kᵀ, p·v, MLP, experts
    at top-k plus router logits, PLE projections, LM head), the way
    ``torch.utils.flop_counter.FlopCounterMode`` counts; elementwise work (norms, RoPE,
    softmax, activations, pooling) and embedding lookups are not counted. The token sees
    ``context_len + 1`` positions (itself included); each attention kind caps that at its window
    and adds what else it reads (compressed entries, top-k selections). Routed experts count at
    top-k per token: an upper bound for routers with a "skip" class (ZAYA1), whose skipped tokens
    run no expert.
    """
    if not (isinstance(context_len, int) and context_len >= 0):
        raise ValueError(f"context_len = {context_len!r}: must be a non-negative integer")
    h = cfg.hidden_size
    terms = {"lm_head": 2 * h * cfg.vocab_size}
    if cfg.residual == "mhc":
        terms["hyper_connections"] = 2 * cfg.hc_mult * h * (cfg.hc_mult + 1)  # the head's map and collapse
    if cfg.per_layer_input_size:
        terms["per_layer_embedding"] = 2 * cfg.hidden_size * cfg.num_layers * cfg.per_layer_input_size  # context projection
    for s in cfg.layers:  # every layer gets all context_len + 1 positions; windows cap inside
        for name, value in BLOCK_KINDS[s.block].decode_flops(cfg, s, context_len + 1).items():
            terms[name] = terms.get(name, 0) + value
    return terms


def decode_flops(cfg: ModelConfig, context_len: int) -> int:
    """Total of :func:`decode_flops_terms`."""
    return sum(decode_flops_terms(cfg, context_len).values())
