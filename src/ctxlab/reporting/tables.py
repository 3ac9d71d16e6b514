"""Rich tables for the rows of ``reporting.py`` (human output of ``ctxlab report`` / ``inspect``)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .rows import layer_ranges
from .table_fit import add_name_column, console_width  # noqa: F401  (console_width: the CLI's width)

UNITS_NOTE = (
    "bytes in binary units (KiB/MiB/GiB = 2^10/2^20/2^30 bytes); "
    "params and FLOPs in decimal units (K/M/B = 10^3/10^6/10^9)"
)
CONVENTIONS_NOTE = (
    "realized = the K/V state model.new_cache() allocates (sliding layers hold only their window, layers that "
    "share K/V hold nothing); naive = every layer stores every token (the convention of most published figures)"
)


def fmt_bytes(n: int) -> str:
    """Binary units: 17179869184 -> '16.00 GiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def fmt_count(n: int) -> str:
    """Decimal units: 8030261248 -> '8.03B'."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


REPORT_DROP_ORDER = ["Family", "KV @ context (naive)", "KV/token (naive)", "Layers", "Active params", "Trained context"]


def report_table(rows: list[dict], context: int, dtype: str, batch_size: int) -> Table:
    beyond = [r["model"] for r in rows if r.get("beyond_trained_context")]
    note = (
        f"\n* {context:,} tokens is beyond the context these models were trained for (max_position_embeddings): "
        "figures there are arithmetic, not what the model can use"
        if beyond
        else ""
    )
    table = Table(
        title=f"Cost at context {context:,} tokens ({dtype}, batch {batch_size})",
        caption=f"{UNITS_NOTE}.\n{CONVENTIONS_NOTE}. KV/token is per sequence; GFLOPs per decoded token. "
        f"Active params: used per token (routed experts at top-k).{note}",
    )
    add_name_column(table, "Model", [r["model"] for r in rows])
    for header in (
        "Family",
        "Layers",
        "Params",
        "Active params",
        "Trained context",
        "KV/token (naive)",
        "KV @ context (realized)",
        "KV @ context (naive)",
        "Decode GFLOPs @ context",
    ):
        table.add_column(header, justify="left" if header == "Family" else "right")
    for r in rows:
        active = fmt_count(r["params_active"]) if r["params_active"] != r["params_total"] else "= total"
        trained = f"{r['trained_context']:,}{'*' if r.get('beyond_trained_context') else ''}"
        table.add_row(
            escape(r["model"]),
            r["family"],
            str(r["num_layers"]),
            fmt_count(r["params_total"]),
            active,
            trained,
            fmt_bytes(r["kv_bytes_per_token_naive"]),
            fmt_bytes(r["kv_bytes_realized"]),
            fmt_bytes(r["kv_bytes_naive"]),
            f"{r['decode_flops'] / 1e9:,.2f}",
        )
    return table


def presets_table(rows: list[dict], width: int | None = None) -> Table:
    table = Table(
        title="Presets (ctxlab list)",
        caption="params in decimal units (K/M/B = 10^3/10^6/10^9); active: "
        "used per token (routed experts at top-k); trained context: max_position_embeddings",
    )
    add_name_column(table, "Name", [r["name"] for r in rows])
    for header in ("Family", "Params", "Active", "Layers", "Trained context", "Description"):
        table.add_column(header, justify="left" if header in ("Family", "Description") else "right")
    for r in rows:
        active = fmt_count(r["params_active"]) if r["params_active"] != r["params_total"] else "= total"
        table.add_row(
            escape(r["name"]),
            r["family"],
            fmt_count(r["params_total"]),
            active,
            str(r["num_layers"]),
            f"{r['trained_context']:,}",
            escape(r["description"]),
        )
    return table


PRESETS_DROP_ORDER = ["Family", "Layers", "Active", "Description"]


def fmt_number(x: float) -> str:
    """Whole numbers as integers (1024, not 1.02e+03); others to 3 significant digits."""
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return f"{int(x)}"
    return f"{x:.3g}"


def sharing_table(rows: list[dict], context: int, dtype: str) -> Table:
    table = Table(
        title=f"KV saved by cross-layer sharing at {context:,} tokens ({dtype}, per sequence, decimal GB = 10^9 B)",
        caption="realized: this library's caches without vs with sharing (sliding layers hold their window); "
        "true geometry: every layer holds every token; uniform estimator: head_dim = emb_dim / n_heads for every "
        "layer, no window cap (the assumptions behind the published figure; see ctxlab.accounting.savings)",
    )
    for header in ("Model", "Consumer layers", "Realized", "True geometry, no cap", "Uniform estimator", "Published"):
        table.add_column(header, justify="left" if header in ("Model", "Consumer layers") else "right")
    for r in rows:
        uniform = r["saving_uniform_estimator"]
        table.add_row(
            escape(r["model"]),
            f"{len(r['consumer_layers'])} ({layer_ranges(r['consumer_layers'])})",
            f"{r['saving_realized'] / 1e9:.2f} GB",
            f"{r['saving_uncapped'] / 1e9:.2f} GB",
            "-" if uniform is None else f"{uniform / 1e9:.2f} GB",
            r["published"] or "-",
        )
    return table


def head_budget_table(rows: list[dict], context: int) -> Table:
    table = Table(
        title=f"Per-layer query-head budgets: decode attention GFLOPs at position {context:,}",
        caption="q·kᵀ and p·v of one decoded token; 'uniform' spreads the same total of query heads "
        "evenly over the layers (ctxlab.accounting.savings.uniform_head_budget)",
    )
    for header in ("Model", "Heads per layer", "Budgeted", "Uniform", "Saving"):
        table.add_column(header, justify="left" if header in ("Model", "Heads per layer") else "right")
    for r in rows:
        counts = sorted(set(r["heads_per_layer"]))
        mix = ", ".join(f"{r['heads_per_layer'].count(h)}x{h}" for h in counts)
        table.add_row(
            escape(r["model"]),
            f"{mix} (uniform {r['uniform_heads']})",
            f"{r['attention_flops'] / 1e9:,.2f}",
            f"{r['attention_flops_uniform'] / 1e9:,.2f}",
            f"{1 - r['attention_flops'] / r['attention_flops_uniform']:.1%}",
        )
    return table


def layer_table(rows: list[dict], context: int, dtype: str) -> Table:
    table = Table(title=f"Layers (cache bytes at {context:,} tokens, {dtype}, batch 1, binary units)")
    table.add_column("Layer", justify="right", no_wrap=True)
    for header in (
        "Attention",
        "Q heads",
        "KV heads",
        "Head dim",
        "Window",
        "RoPE",
        "KV source",
        "Cache",
        "Cache bytes",
    ):
        table.add_column(
            header,
            justify="right"
            if header in ("Layer", "Q heads", "KV heads", "Head dim", "Window", "Cache bytes")
            else "left",
        )
    for r in rows:
        rope = "none" if r["rope_type"] == "none" else f"{r['rope_type']} θ={r['rope_theta']:g}"
        table.add_row(
            str(r["layer"]),
            r.get("attention_variant", r["attention"]),
            str(r["num_heads"]),
            str(r["num_kv_heads"]),
            str(r["head_dim"]),
            "global" if r["window"] is None else str(r["window"]),
            rope,
            "own" if r["kv_source"] is None else f"layer {r['kv_source']}",
            r["cache_kind"],
            fmt_bytes(r["cache_bytes"]),
        )
    return table


def deployed_table(rows: list[dict], context: int) -> Table:
    table = Table(
        title=f"KV cache in published deployment formats at {context:,} tokens (decimal GB = 10^9 B)",
        caption="bytes per token per layer as the deployment stores them (ctxlab.reporting.published.DEPLOYED_FORMATS)",
    )
    for header in ("Model", "Format", "B/token/layer", "Deployed", "bf16 cache here"):
        table.add_column(header, justify="left" if header in ("Model", "Format") else "right")
    for r in rows:
        table.add_row(
            escape(r["model"]),
            r["format"],
            "/".join(map(str, r["bytes_per_token_per_layer"])),
            f"{r['kv_bytes_deployed'] / 1e9:.2f} GB",
            f"{r['kv_bytes_bf16'] / 1e9:.2f} GB",
        )
    return table


def baseline_table(rows: list[dict], context: int, dtype: str, batch_size: int = 1) -> Table:
    batch = f", batch {batch_size}" if batch_size > 1 else ""
    table = Table(
        title=f"Compressed convolutional attention beside standard attention of the same width "
        f"({dtype}, {context:,} tokens{batch})",
        caption="every layer global; attention = q·kᵀ + p·v FLOPs of one decoded token (MLA on its "
        "absorbed decode path); the CCA cache also holds a small fixed conv/value state",
    )
    for header in ("Model", "Attention", "KV B/token/layer", "KV @ context", "Attention GFLOPs", "vs model"):
        table.add_column(header, justify="left" if header in ("Model", "Attention") else "right")
    base = {r["model"]: r["attention_flops"] for r in rows if r["attention"] == r["model"]}
    for r in rows:
        table.add_row(
            escape(r["model"]),
            escape(r["attention"]),
            str(r["kv_bytes_per_token_per_layer"]),
            fmt_bytes(r["kv_bytes"]),
            f"{r['attention_flops'] / 1e9:,.2f}",
            f"{r['attention_flops'] / base[r['model']]:.2f}x",
        )
    return table


def published_ratio_table(rows: list[dict], context: int) -> Table:
    table = Table(
        title=f"Against the published baseline at {context:,} tokens (the token at position {context - 1:,})",
        caption="deployed: each model's published cache format (ctxlab.reporting.published.DEPLOYED_FORMATS); "
        "weighted: decode FLOPs in BF16 equivalents (FP8 = 1/2, FP4 = 1/4; reporting.published.PRECISION_WEIGHTS)",
    )
    for header in (
        "Model",
        "Baseline",
        "KV deployed",
        "KV bf16",
        "FLOPs raw",
        "FLOPs weighted",
        "Published KV / FLOPs",
    ):
        table.add_column(header, justify="left" if header in ("Model", "Baseline") else "right")
    for r in rows:
        table.add_row(
            escape(r["model"]),
            escape(r["baseline"]),
            f"{r['kv_ratio_deployed']:.2%}",
            f"{r['kv_ratio_bf16']:.2%}",
            f"{r['flops_ratio_raw']:.1%}",
            f"{r['flops_ratio_weighted']:.1%}",
            f"{r['published']['kv']} / {r['published']['flops']}",
        )
    return table


def claims_table(rows: list[dict]) -> Table:
    table = Table(
        title="Published claims, checked against the real configs (ctxlab claims)",
        caption="convention: what the published figure assumes; under convention / real: ctxlab's figures "
        "computed from the presets (real = what the config says or a cache of this library holds)",
    )
    add_name_column(table, "Model", [r["model"] for r in rows])
    for header in ("Claim", "Published", "Under convention", "Real", "Verdict", "Source"):
        table.add_column(
            header, justify="right" if header in ("Published", "Under convention", "Real") else "left", overflow="fold"
        )
    for r in rows:
        table.add_row(
            escape(r["model"]),
            escape(r["claim"]),
            f"{fmt_number(r['published'])} ±{fmt_number(r['tolerance'])} {r['unit']}",
            fmt_number(r["under_convention"]),
            fmt_number(r["realized"]),
            escape(r["verdict"]),
            escape(r["source"] if len(r["source"]) <= 60 else r["source"][:57] + "..."),
        )
    return table


def measured_table(rows: list[dict]) -> Table:
    table = Table(
        title="Measured caches: a tiny model with each family's layer pattern, prefilled",
        caption="cache.nbytes() counts the unique storages the cache really holds; analytic = kv_cache_bytes()",
    )
    for header in ("Family preset", "Layers", "Tokens", "cache.nbytes()", "Analytic", "Equal", "Prefill s"):
        table.add_column(header, justify="left" if header == "Family preset" else "right")
    for r in rows:
        table.add_row(
            escape(r["model"]),
            str(r["layers"]),
            f"{r['tokens']:,}",
            f"{r['cache_nbytes']:,}",
            f"{r['analytic_bytes']:,}",
            "yes" if r["cache_nbytes"] == r["analytic_bytes"] else "NO",
            f"{r['seconds']:.1f}",
        )
    return table
