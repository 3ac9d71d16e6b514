"""Validation of :class:`~ctxlab.config.ModelConfig`: every problem found, each naming the field,
its value and what is allowed. Called by ``ModelConfig.__post_init__``."""

from __future__ import annotations

import math
from typing import Any

from .config import (
    ACTIVATIONS,
    ATTENTION_KINDS,
    BLOCK_KINDS,
    MLP_KINDS,
    OUTPUT_GATES,
    RESIDUALS,
    ROPE_TYPES,
    ROUTER_PRECISIONS,
    ROUTERS,
    SCORE_FUNCTIONS,
    LayerSpec,
    ModelConfig,
)


def validate(cfg: ModelConfig) -> list[str]:
    """Every problem with ``cfg``, each naming the field, its value and what is allowed."""
    p: list[str] = []

    def positive(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            p.append(f"{name} = {value!r}: must be a positive integer")

    positive("vocab_size", cfg.vocab_size)
    positive("hidden_size", cfg.hidden_size)
    positive("max_position_embeddings", cfg.max_position_embeddings)
    if not cfg.layers:
        p.append("layers = (): a model needs at least one layer")
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps > 0):
        p.append(f"norm_eps = {cfg.norm_eps!r}: must be a positive number")
    if cfg.final_logit_softcap is not None and not cfg.final_logit_softcap > 0:
        p.append(f"final_logit_softcap = {cfg.final_logit_softcap!r}: must be > 0 or None (no softcap)")
    for tok in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, tok)
        if v is not None and not (isinstance(v, int) and 0 <= v < cfg.vocab_size):
            p.append(f"{tok} = {v!r}: must be None or a token id in [0, vocab_size={cfg.vocab_size})")
    if cfg.per_layer_input_size < 0 or (cfg.per_layer_input_size and not (cfg.per_layer_vocab_size or 0) > 0):
        p.append(
            f"per_layer_input_size = {cfg.per_layer_input_size}, per_layer_vocab_size = {cfg.per_layer_vocab_size}: "
            "per-layer embeddings need a size >= 0 and, when on, a positive table size"
        )
    if cfg.residual not in RESIDUALS or cfg.hc_mult < 1 or (cfg.residual == "plain" and cfg.hc_mult != 1):
        p.append(
            f"residual = {cfg.residual!r}, hc_mult = {cfg.hc_mult}: allowed residuals {list(RESIDUALS)}; "
            "'mhc' needs hc_mult >= 1 streams, 'plain' exactly 1"
        )
    if cfg.residual == "mhc" and any(s.block != "hyper" for s in cfg.layers):
        p.append("residual = 'mhc' needs block = 'hyper' in every layer (the block that joins the streams)")
    if cfg.embedding_scale is not None and not cfg.embedding_scale > 0:
        p.append(f"embedding_scale = {cfg.embedding_scale!r}: must be > 0, or None for no scaling")
    for v in cfg.eos_token_id:
        if not (isinstance(v, int) and 0 <= v < cfg.vocab_size):
            p.append(f"eos_token_id contains {v!r}: must be token ids in [0, vocab_size={cfg.vocab_size})")
    for i, layer in enumerate(cfg.layers):
        p.extend(_validate_layer(i, layer, cfg))
        p.extend(_validate_mechanisms(f"layers[{i}]", layer))
    return p


def _validate_layer(i: int, s: LayerSpec, cfg: ModelConfig) -> list[str]:
    p: list[str] = []
    at = f"layers[{i}]"
    for name in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            p.append(f"{at}.{name} = {v!r}: must be a positive integer")
    if not p and s.num_heads % s.num_kv_heads:
        p.append(
            f"{at}.num_heads = {s.num_heads} is not divisible by num_kv_heads = {s.num_kv_heads}: "
            f"every KV head must serve the same number of query heads "
            f"(allowed num_kv_heads: divisors of {s.num_heads})"
        )
    if s.attention not in ATTENTION_KINDS:
        p.append(f"{at}.attention = {s.attention!r}: unknown attention kind; allowed: {list(ATTENTION_KINDS)}")
    if s.window is not None and (not isinstance(s.window, int) or s.window <= 0):
        p.append(f"{at}.window = {s.window!r}: must be a positive number of tokens, or None for global attention")
    if s.block not in BLOCK_KINDS:
        p.append(f"{at}.block = {s.block!r}: unknown block kind; allowed: {list(BLOCK_KINDS)}")
    if s.moe is not None:
        m = s.moe
        if not (0 < m.top_k <= m.num_experts and m.intermediate_size > 0):
            p.append(f"{at}.moe = {m}: need 0 < top_k <= num_experts and intermediate_size > 0")
        if m.router not in ROUTERS:
            p.append(f"{at}.moe.router = {m.router!r}: allowed: {list(ROUTERS)}")
        if s.mlp == "gated" and s.block != "sandwich":
            p.append(
                f"{at}.moe with mlp = 'gated' (experts beside the dense MLP) needs block = 'sandwich', "
                f"got {s.block!r}; use mlp = 'moe' to replace the MLP by the experts"
            )
    elif s.mlp == "moe":
        p.append(f"{at}.mlp = 'moe' needs a MoESpec in {at}.moe")
    if s.attention == "cca":
        if (s.num_kv_heads * s.head_dim) % 2 or min(s.conv_kernels) < 1 or len(s.conv_kernels) != 2:
            p.append(
                f"{at}: CCA needs an even num_kv_heads * head_dim (half current, half delayed values) and "
                f"two conv kernels >= 1; got {s.num_kv_heads} x {s.head_dim}, conv_kernels = {s.conv_kernels}"
            )
    if (s.attention == "mla") != (s.mla is not None):
        p.append(f"{at}: attention = {s.attention!r} with mla = {s.mla}: MLA attention needs an MLASpec, and only it")
    elif s.mla is not None and s.head_dim != s.mla.qk_nope_head_dim + s.mla.qk_rope_head_dim:
        p.append(f"{at}.head_dim = {s.head_dim}: MLA's must equal qk_nope_head_dim + qk_rope_head_dim")
    if s.indexer is not None and s.attention not in ("mla", "compressed"):
        p.append(f"{at}.indexer: a lightning indexer needs attention = 'mla' or 'compressed'")
    if (s.attention == "compressed") != (s.compress is not None):
        p.append(f"{at}: attention = {s.attention!r} with compress = {s.compress}: needs a CompressSpec, and only it")
    elif s.compress is not None:
        c = s.compress
        if min(c.q_lora_rank, c.o_groups, c.o_lora_rank) <= 0:
            p.append(f"{at}.compress = {c}: q_lora_rank, o_groups and o_lora_rank must be positive")
        elif c.ratio < 0 or (s.num_heads * s.head_dim) % c.o_groups or s.window is None:
            p.append(
                f"{at}.compress = {c}: ratio must be >= 0 (0 = window only), o_groups must divide "
                f"num_heads * head_dim = {s.num_heads * s.head_dim}, and the layer needs a window"
            )
    if s.moe is not None and s.moe.router_precision not in ROUTER_PRECISIONS:
        p.append(f"{at}.moe.router_precision = {s.moe.router_precision!r}: allowed: {list(ROUTER_PRECISIONS)}")
    if s.moe is not None and s.moe.score_fn not in SCORE_FUNCTIONS:
        p.append(f"{at}.moe.score_fn = {s.moe.score_fn!r}: allowed: {list(SCORE_FUNCTIONS)}")
    if s.moe is not None and s.moe.num_experts % max(s.moe.n_group, 1):
        p.append(f"{at}.moe.n_group = {s.moe.n_group}: must divide num_experts = {s.moe.num_experts}")
    if s.moe is not None and s.moe.router == "mlp_eda" and s.moe.router_hidden_size <= 0:
        p.append(f"{at}.moe.router_hidden_size = {s.moe.router_hidden_size}: the mlp_eda router needs a positive width")
    if s.output_gate not in (None, *OUTPUT_GATES):
        p.append(f"{at}.output_gate = {s.output_gate!r}: allowed: None, {', '.join(map(repr, OUTPUT_GATES))}")
    if s.mlp not in MLP_KINDS:
        p.append(f"{at}.mlp = {s.mlp!r}: unknown MLP kind; allowed: {list(MLP_KINDS)}")
    if s.activation not in ACTIVATIONS:
        p.append(f"{at}.activation = {s.activation!r}: allowed: {list(ACTIVATIONS)}")
    if s.attn_scale is not None and not (isinstance(s.attn_scale, (int, float)) and s.attn_scale > 0):
        p.append(f"{at}.attn_scale = {s.attn_scale!r}: must be > 0, or None for 1/sqrt(head_dim)")
    p.extend(_validate_rope(at, s))
    if s.kv_source is not None:
        src = s.kv_source
        if not isinstance(src, int) or not 0 <= src < i:
            p.append(f"{at}.kv_source = {src!r}: must be the index of an earlier layer (0..{i - 1})")
        else:
            o = cfg.layers[src]
            if o.kv_source is not None:
                p.append(f"{at}.kv_source = {src}: layer {src} itself reads layer {o.kv_source}; point at the producer")
            mismatched = [
                f"{n} {getattr(s, n)!r} vs {getattr(o, n)!r}"
                for n in ("attention", "num_kv_heads", "head_dim", "window", "rope", "v_norm")
                if getattr(s, n) != getattr(o, n)
            ]
            if mismatched:
                p.append(f"{at}.kv_source = {src}: a consumer must match its producer; differs in {', '.join(mismatched)}")
    return p


def _validate_rope(at: str, s: LayerSpec) -> list[str]:
    r, p = s.rope, []
    if r.type not in ROPE_TYPES:
        return [f"{at}.rope.type = {r.type!r}: allowed: {list(ROPE_TYPES)}"]
    if r.type == "none":
        return []
    if not r.theta > 0:
        p.append(f"{at}.rope.theta = {r.theta!r}: must be > 0")
    if not 0 < r.partial_rotary_factor <= 1:
        p.append(f"{at}.rope.partial_rotary_factor = {r.partial_rotary_factor!r}: must be in (0, 1]")
    elif s.rotary_dim % 2 or s.rotary_dim == 0:
        p.append(
            f"{at}.rope: head_dim {s.head_dim} x partial_rotary_factor {r.partial_rotary_factor} = "
            f"{s.rotary_dim} rotary dims; must be a positive even number"
        )
    needs = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("factor", "original_max_position_embeddings"),
    }.get(r.type, ())
    for n in needs:
        if getattr(r, n) is None:
            p.append(f"{at}.rope.{n} is missing: rope type {r.type!r} needs {list(needs)}")
    if r.factor is not None and not (isinstance(r.factor, (int, float)) and math.isfinite(r.factor) and r.factor > 0):
        p.append(f"{at}.rope.factor = {r.factor!r}: must be > 0")
    return p


def _validate_mechanisms(at: str, s: LayerSpec) -> list[str]:
    """Combinations of mechanisms the code does not implement, and sub-spec values."""
    p: list[str] = []
    if s.attention != "gqa":
        unsupported = [n for n in ("qk_norm", "v_norm", "k_eq_v") if getattr(s, n)]
        unsupported += ["output_gate"] if s.output_gate else []
        unsupported += ["kv_source"] if s.kv_source is not None else []
        if unsupported:
            p.append(f"{at}: {unsupported} are implemented for attention = 'gqa' only (got {s.attention!r})")
    if s.indexer is not None:
        i = s.indexer
        if min(i.n_heads, i.head_dim, i.topk, i.rope_dims) <= 0:
            p.append(f"{at}.indexer = {i}: every field must be a positive integer")
        elif i.rope_dims != s.rotary_dim:
            p.append(f"{at}.indexer.rope_dims = {i.rope_dims}: must equal the layer's rotary dims ({s.rotary_dim})")
        if s.mla is not None and not s.mla.q_lora_rank:
            p.append(f"{at}.indexer: the lightning indexer reads the query bottleneck; mla.q_lora_rank must be set")
    m = s.moe
    if m is not None and m.n_group > 1:
        size = m.num_experts // m.n_group
        if size < 2 or not 1 <= m.topk_group <= m.n_group or m.top_k > m.topk_group * size:
            p.append(
                f"{at}.moe: group-limited routing needs groups of >= 2 experts, 1 <= topk_group <= n_group and "
                f"top_k <= topk_group x group size; got {m.num_experts} experts in {m.n_group} groups, "
                f"topk_group {m.topk_group}, top_k {m.top_k}"
            )
    return p
