"""The numbers behind ``ctxlab report`` and ``ctxlab inspect``, as plain dicts (exact integers).

Each function answers one question about a model (its cost, what KV sharing saves, what its head
budget saves, ...) from the accounting and the named conventions; ``tables.py`` renders them and
``--json`` prints them as they are.
"""

from __future__ import annotations

import math

from ..accounting import count_params, decode_flops, decode_flops_terms, kv_cache_bytes, kv_cache_bytes_per_layer
from ..accounting.formats import kv_cache_bytes_stored
from ..accounting.savings import kv_sharing_saving, same_width_baselines, uniform_head_budget
from ..io.config_file import load_config
from ..planner import layer_cache_spec
from .published import (
    DEPLOYED_FORMATS,
    PRECISION_WEIGHTS,
    PUBLISHED_RATIOS,
    PUBLISHED_SHARING_ESTIMATES,
    SAME_WIDTH_COMPARISONS,
)


def report_row(name: str, context: int, dtype: str, batch_size: int) -> dict:
    cfg = load_config(name)
    params = count_params(cfg)
    return {
        "model": name,
        "family": cfg.family,
        "num_layers": cfg.num_layers,
        "params_total": params["total"],
        "params_effective": params["effective"],
        "params_active": params["active"],
        "kv_bytes_per_token_naive": naive_growth_per_token(cfg, dtype),
        "kv_bytes_realized": kv_cache_bytes(cfg, context, dtype, batch_size),
        "kv_bytes_naive": kv_cache_bytes(cfg, context, dtype, batch_size, convention="naive"),
        "decode_flops": decode_flops(cfg, context),
        "context": context,
        "dtype": dtype,
        "batch_size": batch_size,
        "trained_context": cfg.max_position_embeddings,
        "beyond_trained_context": context > cfg.max_position_embeddings,
    }


def naive_growth_per_token(cfg, dtype: str) -> int:
    """The naive cache's growth per token, fixed decode state excluded: measured over a whole number of every
    layer's compression blocks (DeepSeek V4's entries pool 4 or 128 tokens), so entries count as they accrue."""
    span = math.lcm(1, *(s.compress.ratio for s in cfg.layers if s.compress is not None and s.compress.ratio > 0))
    grown = kv_cache_bytes(cfg, 1 + span, dtype, convention="naive") - kv_cache_bytes(cfg, 1, dtype, convention="naive")
    return grown // span


def sharing_row(name: str, context: int, dtype: str) -> dict | None:
    """KV bytes saved by cross-layer sharing under each convention (None: the model shares nothing)."""
    cfg = load_config(name)
    consumers = [i for i, s in enumerate(cfg.layers) if s.kv_source is not None]
    if not consumers:
        return None
    estimate = PUBLISHED_SHARING_ESTIMATES.get(name)
    return {
        "model": name,
        "consumer_layers": consumers,
        "saving_realized": kv_sharing_saving(cfg, context, dtype, "realized"),
        "saving_uncapped": kv_sharing_saving(cfg, context, dtype, "uncapped"),
        "saving_uniform_estimator": estimate.estimate.saving(cfg, context, dtype) if estimate else None,
        "published": estimate.published if estimate else None,
        "source": estimate.source if estimate else None,
    }


def head_budget_row(name: str, context: int) -> dict | None:
    """Decode attention FLOPs of a per-layer head budget vs the same heads spread evenly (None: uniform)."""
    cfg = load_config(name)
    uniform = uniform_head_budget(cfg)
    if uniform is None:
        return None
    return {
        "model": name,
        "heads_per_layer": [s.num_heads for s in cfg.layers],
        "uniform_heads": uniform.layers[0].num_heads,
        "attention_flops": decode_flops_terms(cfg, context)["attention"],
        "attention_flops_uniform": decode_flops_terms(uniform, context)["attention"],
    }


def layer_rows(cfg, context: int, dtype: str) -> list[dict]:
    per_layer = kv_cache_bytes_per_layer(cfg, context, dtype)
    return [
        {
            "layer": i,
            "attention": s.attention,
            "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "window": s.window,
            "rope_type": s.rope.type,
            "rope_theta": s.rope.theta,
            "kv_source": s.kv_source,
            "cache_kind": layer_cache_spec(s).kind,
            "cache_bytes": nbytes,
            "attention_variant": attention_variant(s),
            "compress_ratio": s.compress.ratio if s.compress else None,
        }
        for i, (s, nbytes) in enumerate(zip(cfg.layers, per_layer))
    ]


def attention_variant(s) -> str:
    """The attention kind, and for DeepSeek V4's compressed layers which one: CSA (overlapping blocks and
    the indexer), HCA (blocks pooled alone) or sliding only, with the compression ratio."""
    if s.compress is None:
        return s.attention
    if s.compress.ratio == 0:
        return "sliding only"
    return f"{'CSA' if s.compress.overlap else 'HCA'} ratio {s.compress.ratio}"


def compression_line(cfg) -> str:
    """One line for compressed-attention models: how many layers of each variant (else empty)."""
    variants = [attention_variant(s) for s in cfg.layers if s.compress is not None]
    if not variants:
        return ""
    counts = ", ".join(f"{variants.count(v)} {v}" for v in dict.fromkeys(variants))
    return f"compressed attention ({len(variants)} layers): {counts} (per layer in the table below)\n"


def kv_roles(cfg) -> str:
    """One line: which layers produce K/V and which producer each group of consumers reads."""
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(cfg.layers):
        if s.kv_source is not None:
            readers.setdefault(s.kv_source, []).append(i)
    if not readers:
        return "KV: every layer computes and caches its own K/V\n"
    producers = [i for i, s in enumerate(cfg.layers) if s.kv_source is None]
    reads = "; ".join(f"layers {', '.join(map(str, r))} read layer {src}" for src, r in sorted(readers.items()))
    return f"KV producers: layers {layer_ranges(producers)}; consumers (no K/V weights, no cache): {reads}\n"


def layer_ranges(layers: list[int]) -> str:
    """[0, 2, 3, 4, 7] -> "0, 2-4, 7": runs of consecutive layers as ranges."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def head_budget_line(cfg, context: int) -> str:
    uniform = uniform_head_budget(cfg)
    if uniform is None:
        return ""
    ours, even = (decode_flops_terms(c, context)["attention"] / 1e9 for c in (cfg, uniform))
    return (
        f"query heads per layer vary ({min(s.num_heads for s in cfg.layers)}-{max(s.num_heads for s in cfg.layers)}):"
        f" decode attention {ours:,.2f} GFLOP at position {context:,} vs {even:,.2f} with "
        f"{uniform.layers[0].num_heads} heads on every layer\n"
    )


def deployed_row(name: str, context: int) -> dict | None:
    """Cache bytes in the model's published deployment format next to a bf16 cache of this library."""
    fmt = DEPLOYED_FORMATS.get(name)
    if fmt is None:
        return None
    cfg = load_config(name)
    return {
        "model": name,
        "format": fmt.name,
        "source": fmt.source,
        "context": context,
        "bytes_per_token_per_layer": sorted({fmt.bytes_per_token(layer_cache_spec(s)) for s in cfg.layers}),
        "kv_bytes_deployed": kv_cache_bytes_stored(cfg, context, fmt),
        "kv_bytes_bf16": kv_cache_bytes(cfg, context, "bfloat16"),
    }


def baseline_rows(name: str, context: int, dtype: str, batch_size: int = 1) -> list[dict]:
    """For CCA models: the model beside standard attention of the same width (zaya.md §3); the cache of
    ``batch_size`` sequences."""
    cfg = load_config(name)
    if not any(s.attention in SAME_WIDTH_COMPARISONS for s in cfg.layers):
        return []
    rows = []
    for label, variant in {name: cfg, **same_width_baselines(cfg)}.items():
        per_token = kv_cache_bytes(variant, 2, dtype) - kv_cache_bytes(variant, 1, dtype)
        rows.append(
            {
                "model": name,
                "attention": label,
                "kv_bytes_per_token_per_layer": per_token // variant.num_layers,
                "kv_bytes": kv_cache_bytes(variant, context, dtype, batch_size),
                "attention_flops": decode_flops_terms(variant, context)["attention"],
            }
        )
    return rows


def published_ratio_row(name: str, context: int) -> dict | None:
    """A model's cache and decode FLOPs relative to the baseline its authors compare against, under
    the conventions that reproduce the published ratios, next to raw and bf16 figures."""
    if name not in PUBLISHED_RATIOS:
        return None
    baseline, published, source = PUBLISHED_RATIOS[name]
    cfg, base = load_config(name), load_config(baseline)
    terms, base_terms = decode_flops_terms(cfg, context - 1), decode_flops_terms(base, context - 1)
    kv = kv_cache_bytes_stored(cfg, context, DEPLOYED_FORMATS[name])
    base_kv = kv_cache_bytes_stored(base, context, DEPLOYED_FORMATS[baseline])
    return {
        "model": name,
        "baseline": baseline,
        "context": context,
        "published": published,
        "source": source,
        "kv_bytes_deployed": kv,
        "baseline_kv_bytes_deployed": base_kv,
        "kv_ratio_deployed": kv / base_kv,
        "kv_ratio_bf16": kv_cache_bytes(cfg, context, "bfloat16") / kv_cache_bytes(base, context, "bfloat16"),
        "flops_ratio_raw": sum(terms.values()) / sum(base_terms.values()),
        "flops_ratio_weighted": PRECISION_WEIGHTS[name].weigh(terms) / PRECISION_WEIGHTS[baseline].weigh(base_terms),
        "precision_convention": PRECISION_WEIGHTS[name].note,
        "baseline_precision_convention": PRECISION_WEIGHTS[baseline].note,
    }
