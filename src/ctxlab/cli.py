"""``ctxlab`` command line: ``report`` (cost of presets), ``inspect`` (one model, layer by layer), ``generate``.

Human tables go to stdout (rich), ``--json`` prints exact integers for machines, warnings go to
stderr. Errors a user can fix (bad name, bad value, missing file) exit with code 2 and a message,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .accounting import (
    as_dtype,
    count_params,
    decode_flops,
    decode_flops_terms,
    kv_cache_bytes,
    kv_cache_bytes_per_layer,
)
from .cache import layer_cache_spec
from .conventions import PUBLISHED_SHARING_ESTIMATES, kv_sharing_saving, uniform_head_budget
from .errors import ConfigError, CtxlabError
from .generate import stream
from .io.checkpoint import from_pretrained
from .io.config_file import load_config
from .io.tokenizer import decode, encode, load_tokenizer
from .model import build_model
from .presets import preset_names, preset_path

UNITS_NOTE = (
    "bytes in binary units (KiB/MiB/GiB = 2^10/2^20/2^30 bytes); "
    "params and FLOPs in decimal units (K/M/B = 10^3/10^6/10^9)"
)
CONVENTIONS_NOTE = (
    "realized = what model.new_cache() allocates (sliding layers hold only their window, layers that "
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


def count(text: str, minimum: int = 1, suffixes: bool = False) -> int:
    """An integer >= ``minimum``; with ``suffixes``, '128k' = 128 * 1024 and '1m' = 1024 * 1024."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1) if suffixes else 1
    try:
        n = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        n = minimum - 1
    if n < minimum:
        example = ", e.g. 4096 or 128k" if suffixes else ""
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}{example}")
    return n


tokens = partial(count, suffixes=True)  # argparse types
positive = partial(count, minimum=1)
nonnegative = partial(count, minimum=0)


def token_ids(text: str) -> list[int]:
    """'1,2,3' (or '1 2 3') -> [1, 2, 3]."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        ids = []
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids separated by commas, e.g. 1,2,3")
    return ids


# ---------------------------------------------------------------------------------------- report


def report_row(name: str, context: int, dtype: str, batch_size: int) -> dict:
    cfg = load_config(name)
    params = count_params(cfg)
    return {
        "model": name, "family": cfg.family, "num_layers": cfg.num_layers,
        "params_total": params["total"], "params_effective": params["effective"], "params_active": params["active"],
        "kv_bytes_per_token_naive": kv_cache_bytes(cfg, 1, dtype, convention="naive"),
        "kv_bytes_realized": kv_cache_bytes(cfg, context, dtype, batch_size),
        "kv_bytes_naive": kv_cache_bytes(cfg, context, dtype, batch_size, convention="naive"),
        "decode_flops": decode_flops(cfg, context), "context": context, "dtype": dtype, "batch_size": batch_size,
    }


def report_table(rows: list[dict], context: int, dtype: str, batch_size: int) -> Table:
    table = Table(
        title=f"Cost at context {context:,} tokens ({dtype}, batch {batch_size})",
        caption=f"{UNITS_NOTE}.\n{CONVENTIONS_NOTE}. KV/token is per sequence; GFLOPs per decoded token.",
    )
    for header in ("Model", "Family", "Layers", "Params", "KV/token (naive)", "KV @ context (realized)",
                   "KV @ context (naive)", "Decode GFLOPs @ context"):
        table.add_column(header, justify="left" if header in ("Model", "Family") else "right")
    for r in rows:
        table.add_row(
            escape(r["model"]), r["family"], str(r["num_layers"]), fmt_count(r["params_total"]),
            fmt_bytes(r["kv_bytes_per_token_naive"]), fmt_bytes(r["kv_bytes_realized"]),
            fmt_bytes(r["kv_bytes_naive"]), f"{r['decode_flops'] / 1e9:,.2f}",
        )
    return table


def sharing_row(name: str, context: int, dtype: str) -> dict | None:
    """KV bytes saved by cross-layer sharing under each convention (None: the model shares nothing)."""
    cfg = load_config(name)
    consumers = [i for i, s in enumerate(cfg.layers) if s.kv_source is not None]
    if not consumers:
        return None
    estimate = PUBLISHED_SHARING_ESTIMATES.get(name)
    return {
        "model": name, "consumer_layers": consumers,
        "saving_realized": kv_sharing_saving(cfg, context, dtype, "realized"),
        "saving_uncapped": kv_sharing_saving(cfg, context, dtype, "uncapped"),
        "saving_uniform_estimator": estimate.saving(cfg, context, dtype) if estimate else None,
        "published": estimate.published if estimate else None, "source": estimate.source if estimate else None,
    }


def sharing_table(rows: list[dict], context: int, dtype: str) -> Table:
    table = Table(
        title=f"KV saved by cross-layer sharing at {context:,} tokens ({dtype}, per sequence, decimal GB = 10^9 B)",
        caption="realized: this library's caches without vs with sharing (sliding layers hold their window); "
        "true geometry: every layer holds every token; uniform estimator: head_dim = emb_dim / n_heads for every "
        "layer, no window cap (the assumptions behind the published figure; see ctxlab.conventions)",
    )
    for header in ("Model", "Consumer layers", "Realized", "True geometry, no cap", "Uniform estimator", "Published"):
        table.add_column(header, justify="left" if header in ("Model", "Consumer layers") else "right")
    for r in rows:
        uniform = r["saving_uniform_estimator"]
        table.add_row(
            escape(r["model"]), f"{len(r['consumer_layers'])} ({r['consumer_layers'][0]}-{r['consumer_layers'][-1]})",
            f"{r['saving_realized'] / 1e9:.2f} GB", f"{r['saving_uncapped'] / 1e9:.2f} GB",
            "-" if uniform is None else f"{uniform / 1e9:.2f} GB", r["published"] or "-",
        )
    return table


def head_budget_row(name: str, context: int) -> dict | None:
    """Decode attention FLOPs of a per-layer head budget vs the same heads spread evenly (None: uniform)."""
    cfg = load_config(name)
    uniform = uniform_head_budget(cfg)
    if uniform is None:
        return None
    return {
        "model": name, "heads_per_layer": [s.num_heads for s in cfg.layers],
        "uniform_heads": uniform.layers[0].num_heads,
        "attention_flops": decode_flops_terms(cfg, context)["attention"],
        "attention_flops_uniform": decode_flops_terms(uniform, context)["attention"],
    }


def head_budget_table(rows: list[dict], context: int) -> Table:
    table = Table(title=f"Per-layer query-head budgets: decode attention GFLOPs at position {context:,}",
                  caption="q·kᵀ and p·v of one decoded token; 'uniform' spreads the same total of query heads "
                  "evenly over the layers (ctxlab.conventions.uniform_head_budget)")
    for header in ("Model", "Heads per layer", "Budgeted", "Uniform", "Saving"):
        table.add_column(header, justify="left" if header in ("Model", "Heads per layer") else "right")
    for r in rows:
        counts = sorted(set(r["heads_per_layer"]))
        mix = ", ".join(f"{r['heads_per_layer'].count(h)}x{h}" for h in counts)
        table.add_row(
            escape(r["model"]), f"{mix} (uniform {r['uniform_heads']})", f"{r['attention_flops'] / 1e9:,.2f}",
            f"{r['attention_flops_uniform'] / 1e9:,.2f}", f"{1 - r['attention_flops'] / r['attention_flops_uniform']:.1%}",
        )
    return table


def cmd_report(args, console: Console) -> int:
    names = args.models or preset_names(include_tiny=args.all)
    rows = [report_row(name, args.context, args.dtype, args.batch_size) for name in names]
    sharing = [r for r in (sharing_row(name, args.context, args.dtype) for name in names) if r]
    budgets = [r for r in (head_budget_row(name, args.context) for name in names) if r]
    if args.json:
        print(json.dumps({"models": rows, "kv_sharing": sharing, "head_budgets": budgets}, indent=2))
        return 0
    console.print(report_table(rows, args.context, args.dtype, args.batch_size))
    if sharing:
        console.print(sharing_table(sharing, args.context, args.dtype))
    if budgets:
        console.print(head_budget_table(budgets, args.context))
    return 0


# --------------------------------------------------------------------------------------- inspect


def layer_rows(cfg, context: int, dtype: str) -> list[dict]:
    per_layer = kv_cache_bytes_per_layer(cfg, context, dtype)
    return [
        {
            "layer": i, "attention": s.attention, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim, "window": s.window, "rope_type": s.rope.type, "rope_theta": s.rope.theta,
            "kv_source": s.kv_source, "cache_kind": layer_cache_spec(s).kind, "cache_bytes": nbytes,
        }
        for i, (s, nbytes) in enumerate(zip(cfg.layers, per_layer))
    ]


def layer_table(rows: list[dict], context: int, dtype: str) -> Table:
    table = Table(title=f"Layers (cache bytes at {context:,} tokens, {dtype}, batch 1, binary units)")
    for header in ("Layer", "Attention", "Q heads", "KV heads", "Head dim", "Window", "RoPE",
                   "KV source", "Cache", "Cache bytes"):
        table.add_column(header, justify="right" if header in ("Layer", "Q heads", "KV heads", "Head dim",
                                                               "Window", "Cache bytes") else "left")
    for r in rows:
        rope = "none" if r["rope_type"] == "none" else f"{r['rope_type']} θ={r['rope_theta']:g}"
        table.add_row(
            str(r["layer"]), r["attention"], str(r["num_heads"]), str(r["num_kv_heads"]), str(r["head_dim"]),
            "global" if r["window"] is None else str(r["window"]), rope,
            "own" if r["kv_source"] is None else f"layer {r['kv_source']}", r["cache_kind"],
            fmt_bytes(r["cache_bytes"]),
        )
    return table


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
    return f"KV producers: layers {producers[0]}-{producers[-1]}; consumers (no K/V weights, no cache): {reads}\n"


def head_budget_line(cfg, context: int) -> str:
    uniform = uniform_head_budget(cfg)
    if uniform is None:
        return ""
    ours, even = (decode_flops_terms(c, context)["attention"] / 1e9 for c in (cfg, uniform))
    return (f"query heads per layer vary ({min(s.num_heads for s in cfg.layers)}-{max(s.num_heads for s in cfg.layers)}):"
            f" decode attention {ours:,.2f} GFLOP at position {context:,} vs {even:,.2f} with "
            f"{uniform.layers[0].num_heads} heads on every layer\n")


def cmd_inspect(args, console: Console) -> int:
    cfg = load_config(args.model)
    params = count_params(cfg)
    info = {
        "model": args.model, "family": cfg.family, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size, "params": params, "context": args.context, "dtype": args.dtype,
        "kv_bytes_realized": kv_cache_bytes(cfg, args.context, args.dtype),
        "kv_bytes_naive": kv_cache_bytes(cfg, args.context, args.dtype, convention="naive"),
        "layers": layer_rows(cfg, args.context, args.dtype),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console.print(
        f"[bold]{escape(args.model)}[/]: family {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}\nparams: total {fmt_count(params['total'])}, effective {fmt_count(params['effective'])}"
        f" (+ non-text towers {fmt_count(params['non_text'])} - embedding tables), active {fmt_count(params['active'])}\n"
        f"{kv_roles(cfg)}{head_budget_line(cfg, args.context)}"
        f"KV cache at {args.context:,} tokens ({args.dtype}, batch 1): "
        f"realized {fmt_bytes(info['kv_bytes_realized'])}, naive {fmt_bytes(info['kv_bytes_naive'])}\n({UNITS_NOTE})"
    )
    console.print(layer_table(info["layers"], args.context, args.dtype))
    return 0


# -------------------------------------------------------------------------------------- generate


def load_for_generation(source: str, dtype: torch.dtype, max_memory_gb: float):
    """(model, tokenizer or None): a checkpoint directory, or random weights for a preset / config.json."""
    cfg = load_config(source)
    need = count_params(cfg)["total"] * torch.empty((), dtype=dtype).element_size()
    if need > max_memory_gb * (1 << 30):
        raise ValueError(
            f"{source}: its weights need about {fmt_bytes(need)} in {str(dtype).removeprefix('torch.')}, more than "
            f"--max-memory-gb {max_memory_gb:g} GiB; raise --max-memory-gb if this machine has the memory, or use "
            f"a small model (tiny presets: {', '.join(n for n in preset_names() if n.startswith('tiny-'))})"
        )
    if preset_path(source) is None and Path(source).is_dir():
        return from_pretrained(source, dtype=dtype), load_tokenizer(source)
    print(f"ctxlab generate: warning: {source} is not a checkpoint directory; using RANDOM weights "
          "(build_model seed 0), so the output is meaningless", file=sys.stderr)
    return build_model(cfg, dtype=dtype, seed=0), None


def cmd_generate(args, console: Console) -> int:
    model, tok = load_for_generation(args.model, as_dtype(args.dtype), args.max_memory_gb)
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"--prompt needs a tokenizer.json in the checkpoint directory and {args.model} has none; "
                             "pass token ids instead, e.g. --prompt-ids 1,2,3")
        prompt = encode(tok, args.prompt)
    else:
        prompt = args.prompt_ids
    steps = stream(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, prefill_chunk=args.prefill_chunk)
    show = (lambda ids: decode(tok, ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
    new: list[int] = []
    printed = ""
    for step, _finished in steps:
        new.append(int(step[0]))
        if args.stream and not args.json:
            text = show(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
    if args.json:
        out = {"model": args.model, "prompt_ids": prompt, "generated_ids": new,
               "text": decode(tok, new) if tok is not None else None}
        print(json.dumps(out))
    elif args.stream:
        print(show(new)[len(printed) :])
    else:
        print(show(new))
    return 0


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="ctxlab", formatter_class=fmt, description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ctxlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cost_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--context", type=tokens, default=131072,
                       help="context length in tokens the cache holds (128k = 131072; k = 1024, m = 1048576)")
        q.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                       help="element type of the cached K/V tensors")
        q.add_argument("--json", action="store_true", help="print JSON with exact integers instead of a table")

    r = sub.add_parser("report", formatter_class=fmt, help="KV cache, params and decode FLOPs of many models",
                       description="One row per model: parameters, KV-cache bytes (per token and at --context) and "
                       f"FLOPs to decode one token at position --context. {UNITS_NOTE}. {CONVENTIONS_NOTE}.")
    cost_options(r)
    r.add_argument("--batch-size", type=positive, default=1,
                   help="sequences held in the cache (multiplies the 'KV @ context' columns)")
    r.add_argument("--models", nargs="+", metavar="MODEL", help="preset names or config.json / checkpoint paths "
                   f"(None = every preset except tiny-*; presets: {', '.join(preset_names())})")
    r.add_argument("--all", action="store_true", help="also list the tiny-* test presets (ignored with --models)")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", formatter_class=fmt, help="one model's summary and per-layer table",
                       description="Resolved config of MODEL: sizes, parameter counts, KV-cache bytes and one row "
                       f"per layer (heads, head dim, window, RoPE, KV source, cache kind and bytes). {UNITS_NOTE}.")
    i.add_argument("model", metavar="MODEL", help="preset name, config.json path or checkpoint directory")
    cost_options(i)
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", formatter_class=fmt, help="generate tokens from a checkpoint or preset",
                       description="Continue a prompt and print only the generated part: text when the checkpoint "
                       "has a tokenizer.json, else token ids separated by spaces. A preset or config.json gets "
                       "random weights (a warning on stderr says so).")
    g.add_argument("model", metavar="MODEL", help="checkpoint directory (config.json + *.safetensors "
                   "[+ tokenizer.json]), or a preset name / config.json path for random weights")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer.json in the checkpoint directory)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=nonnegative, default=32, help="tokens to generate (fewer if EOS comes)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (argmax)")
    g.add_argument("--top-k", type=positive, help="sample among the k most likely tokens only (None = all)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this "
                   "probability mass, in (0, 1] (None = off)")
    g.add_argument("--seed", type=int, help="seed of the sampling generator (None = not reproducible when "
                   "--temperature > 0); the random weights of a preset always use seed 0")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight and cache element type")
    g.add_argument("--prefill-chunk", type=tokens, help="feed the prompt in chunks of this many tokens (None = all)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are generated")
    g.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, generated_ids, text)")
    g.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="refuse a model whose weights (total params x element size) exceed this many GiB")
    g.set_defaults(func=cmd_generate)
    return p


def error_message(e: BaseException) -> str:
    if isinstance(e, ConfigError) and len(e.problems) == 1:
        return e.problems[0]
    return str(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (code 2)
        return e.code if isinstance(e.code, int) else 0
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        return args.func(args, console)
    except (CtxlabError, ValueError, FileNotFoundError) as e:
        print(f"ctxlab {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctxlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
