"""``ctxlab`` command line: ``report`` (cost of presets), ``inspect`` (one model, layer by layer), ``generate``, ``bench``.

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

from . import __version__, reporting, tables
from .accounting import as_dtype, count_params, decode_flops_terms, kv_cache_bytes
from .errors import ConfigError, CtxlabError
from .generate import stream
from .io.checkpoint import from_pretrained
from .io.config_file import load_config
from .io.tokenizer import decode, encode, load_tokenizer
from .model import build_model
from .presets import preset_names, preset_path
from .tables import CONVENTIONS_NOTE, UNITS_NOTE, fmt_bytes, fmt_count


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


def cmd_report(args, console: Console) -> int:
    names = args.models or preset_names(include_tiny=args.all)
    out = {
        "models": [reporting.report_row(n, args.context, args.dtype, args.batch_size) for n in names],
        "kv_sharing": [r for n in names if (r := reporting.sharing_row(n, args.context, args.dtype))],
        "head_budgets": [r for n in names if (r := reporting.head_budget_row(n, args.context))],
        "deployed_formats": [r for n in names if (r := reporting.deployed_row(n, args.context))],
        "same_width_baselines": [r for n in names for r in reporting.baseline_rows(n, args.context, args.dtype)],
        "published_ratios": [r for n in names if (r := reporting.published_ratio_row(n, args.context))],
    }
    if args.plot:
        from .plots import kv_vs_context, output_path

        kv_vs_context(names, args.plot, dtype=args.dtype)
        print(f"wrote {output_path(args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console.print(tables.report_table(out["models"], args.context, args.dtype, args.batch_size))
    extra = (
        ("kv_sharing", lambda rows: tables.sharing_table(rows, args.context, args.dtype)),
        ("head_budgets", lambda rows: tables.head_budget_table(rows, args.context)),
        ("deployed_formats", lambda rows: tables.deployed_table(rows, args.context)),
        ("same_width_baselines", lambda rows: tables.baseline_table(rows, args.context, args.dtype)),
        ("published_ratios", lambda rows: tables.published_ratio_table(rows, args.context)),
    )
    for key, render in extra:
        if out[key]:
            console.print(render(out[key]))
    return 0


# --------------------------------------------------------------------------------------- inspect


def cmd_inspect(args, console: Console) -> int:
    cfg = load_config(args.model)
    params = count_params(cfg)
    info = {
        "model": args.model, "family": cfg.family, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size, "params": params, "context": args.context, "dtype": args.dtype,
        "kv_bytes_realized": kv_cache_bytes(cfg, args.context, args.dtype),
        "kv_bytes_naive": kv_cache_bytes(cfg, args.context, args.dtype, convention="naive"),
        "decode_flops_terms": decode_flops_terms(cfg, args.context),
        "layers": reporting.layer_rows(cfg, args.context, args.dtype),
    }  # fmt: skip
    if args.plot:
        from .plots import output_path, per_layer_cache

        per_layer_cache(args.model, args.plot, context=args.context, dtype=args.dtype)
        print(f"wrote {output_path(args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    towers = f" (text decoder + {fmt_count(params['non_text'])} of vision/audio towers - embedding tables)"
    flops = ", ".join(f"{k} {v / 1e9:,.2f}" for k, v in info["decode_flops_terms"].items())
    console.print(
        f"[bold]{escape(args.model)}[/]: family {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}\nparams: total {fmt_count(params['total'])}, effective {fmt_count(params['effective'])}"
        f"{towers if params['non_text'] else ''}, active {fmt_count(params['active'])}\n"
        f"{reporting.kv_roles(cfg)}{reporting.head_budget_line(cfg, args.context)}"
        f"KV cache at {args.context:,} tokens ({args.dtype}, batch 1): "
        f"realized {fmt_bytes(info['kv_bytes_realized'])}, naive {fmt_bytes(info['kv_bytes_naive'])}\n"
        f"decode GFLOPs at position {args.context:,}: {flops}\n({UNITS_NOTE})"
    )
    console.print(tables.layer_table(info["layers"], args.context, args.dtype))
    return 0


# ---------------------------------------------------------------------------------------- claims


def cmd_claims(args, console: Console) -> int:
    from .claims import evaluate_all
    from .measure import FAMILY_PRESETS, measured_cache

    out = {"claims": evaluate_all()}
    if args.measure:
        out["measured_caches"] = [measured_cache(n, args.tokens) for n in FAMILY_PRESETS]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console.print(tables.claims_table(out["claims"]))
    if args.measure:
        console.print(tables.measured_table(out["measured_caches"]))
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
    if args.quantize:
        from .quant import quantize_

        quantize_(model, args.quantize)
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"--prompt needs a tokenizer.json in the checkpoint directory and {args.model} has none; "
                             "pass token ids instead, e.g. --prompt-ids 1,2,3")
        prompt = encode(tok, args.prompt)
    else:
        prompt = args.prompt_ids
    steps = stream(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, prefill_chunk=args.prefill_chunk, compile=args.compile)
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


# ----------------------------------------------------------------------------------------- bench


def cmd_bench(args, console: Console) -> int:
    from rich.progress import Progress

    from .bench import bench
    from .bench import tables as bench_tables

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_for_generation(args.model, as_dtype(args.dtype), args.max_memory_gb)
    if args.quantize:
        from .quant import quantize_

        quantize_(model, args.quantize)
    with Progress(console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = bench(model, contexts=args.context, prompts=args.prompt, steps=args.steps, repeats=args.repeats,
                       against=args.against, compile=args.compile, source=args.model,
                       progress=lambda message: progress.update(task, description=message))  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    if result["against_skipped"]:
        print(f"ctxlab bench: --against {args.against} skipped: {result['against_skipped']}", file=sys.stderr)
    for table in bench_tables(result):
        console.print(table)
    console.print(f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (whole process); torch {result['torch']}")
    return 0


def token_list(text: str) -> list[int]:
    """``512,4k,16k`` -> [512, 4096, 16384]."""
    return [tokens(part) for part in text.split(",") if part.strip()]


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
    r.add_argument("--plot", metavar="FILE.png", help="also write KV-cache bytes vs context length (1K to 1M tokens, "
                   "log axes; realized solid, naive dashed where it differs) for these models (needs matplotlib)")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", formatter_class=fmt, help="one model's summary and per-layer table",
                       description="Resolved config of MODEL: sizes, parameter counts, KV-cache bytes and one row "
                       f"per layer (heads, head dim, window, RoPE, KV source, cache kind and bytes). {UNITS_NOTE}.")
    i.add_argument("model", metavar="MODEL", help="preset name, config.json path or checkpoint directory")
    cost_options(i)
    i.add_argument("--plot", metavar="FILE.png", help="also write per-layer cache bytes at --context as bars "
                   "coloured by attention kind (needs matplotlib)")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("claims", formatter_class=fmt, help="published efficiency claims, checked against the configs",
                       description="One row per published quantitative claim about these architectures: the claim "
                       "and its source, the convention it needs, ctxlab's figure under that convention, the figure "
                       "the real config / a real cache gives, and a verdict (reproduced / holds only under a "
                       "convention / not reproduced). Every ctxlab figure is computed from the presets.")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--measure", action="store_true", help="also build a tiny model with each family's layer "
                   "pattern, prefill --tokens tokens and compare cache.nbytes() with the analytic bytes (slower)")
    c.add_argument("--tokens", type=tokens, default=2048, help="tokens to prefill with --measure")
    c.set_defaults(func=cmd_claims)

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
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile (needs a C++ "
                   "compiler; tens of seconds of warm-up on a small CPU, worth it only for long generations)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are generated")
    g.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, generated_ids, text)")
    g.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="refuse a model whose weights (total params x element size) exceed this many GiB")
    g.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization (int4 needs "
                   "--dtype bfloat16)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", formatter_class=fmt, help="measure prefill and decode speed on this machine",
                       description="Prefill tokens/s at each --prompt length and decode ms/token at each --context "
                       "length (cache filled by a chunked prefill of random tokens, then timed decode steps), cache "
                       "bytes, peak RSS, and the decode roofline ratio (measured ms/token / (bytes read per token / "
                       "copy bandwidth measured at the start)). --against runs the same weights in another engine "
                       "in the same run, alternating with ctxlab; medians of --repeats.")
    b.add_argument("model", metavar="MODEL", help="checkpoint directory, or a preset name / config.json path "
                   "(random weights)")
    b.add_argument("--context", type=token_list, default=[512, 4096, 16384], help="decode context lengths, "
                   "comma-separated (k = 1024)")
    b.add_argument("--prompt", type=token_list, default=[512, 2048], help="prefill prompt lengths, comma-separated")
    b.add_argument("--steps", type=positive, default=16, help="timed decode steps per context")
    b.add_argument("--repeats", type=positive, default=3, help="repeats (medians are reported)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="weight and cache type")
    b.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization (int4 needs bfloat16)")
    b.add_argument("--compile", action="store_true", help="compile the decode step (warm-up reported separately)")
    b.add_argument("--against", choices=("transformers", "llama.cpp"), help="also run the same weights in "
                   "transformers (saved and reloaded), or llama-cpp-python on MODEL as a GGUF file")
    b.add_argument("--threads", type=positive, help="torch threads (None = torch's default); on a shared, "
                   "oversubscribed machine 1 thread gives far steadier numbers")
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="refuse a model whose weights (total params x element size) exceed this many GiB")
    b.set_defaults(func=cmd_bench)
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
    except (CtxlabError, ValueError, OSError) as e:  # bad input, unreadable / unwritable files
        print(f"ctxlab {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctxlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
