"""ctxlab: KV cache, parameters and decode FLOPs of long-context LLMs; layer-by-layer inspection; generation.

Commands:

* ``ctxlab report``: the cost of many models (params, KV cache per token and at a context, decode FLOPs)
* ``ctxlab inspect MODEL``: one model's summary and per-layer table
* ``ctxlab claims``: published efficiency claims checked against the configs
* ``ctxlab generate MODEL``: generate tokens from a checkpoint (or a preset with random weights)
* ``ctxlab list`` (alias ``presets``): every preset with family, params, layers, trained context
* ``ctxlab chat MODEL``: multi-turn chat with a real checkpoint or .gguf file (its chat template)
* ``ctxlab perplexity MODEL FILE``: strided perplexity of a text file
* ``ctxlab train`` and ``ctxlab lab run`` / ``lab report``: the mechanism lab (``ctxlab.lab.cli``)

Human tables go to stdout (rich), ``--json`` prints exact integers for machines, warnings and
progress go to stderr. Errors a user can fix (bad name, bad value, missing file: ctxlab's own
error types and argument errors) exit with code 2 and a one-line message; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from . import __version__, progress
from .accounting import count_params, decode_flops_terms, kv_cache_bytes
from .argtypes import count, gibibytes, nonnegative, positive, probability, seed, temperature, tokens
from .dtypes import DTYPES, dtype_name
from .errors import ConfigError, CtxlabError, InputError
from .generate import past_trained_context, stream
from .io.checkpoint import from_pretrained
from .io.config_file import load_config
from .io.gguf import is_gguf
from .io.text_tokenizer import TextTokenizer
from .io.text_tokenizer import load_tokenizer as load_text_tokenizer
from .io.tokenizer import TOKENIZER_FILE
from .memory import generation_bytes
from .model import build_model
from .presets import preset_names, preset_path
from .reporting import rows, tables
from .reporting.table_fit import fit
from .reporting.tables import CONVENTIONS_NOTE, UNITS_NOTE, fmt_bytes, fmt_count

PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar for models at least this large


def token_ids(text: str) -> list[int]:
    """'1,2,3' (or '1 2 3') -> [1, 2, 3]; an empty entry ('1,,2') or a non-integer is refused."""
    parts = [t.strip() for t in text.split(",")]
    entries = [w for part in parts for w in (part.split() or [""])]
    if not all(e.lstrip("-").isdigit() for e in entries):
        bad = next((repr(e) for e in entries if not e.lstrip("-").isdigit()), "")
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected token ids separated by commas, e.g. 1,2,3 (entry {bad or repr('')} is not an integer)"
        )
    return [int(e) for e in entries]


# ---------------------------------------------------------------------------------------- report


def cmd_report(args, console: Console) -> int:
    names = args.models or preset_names(include_tiny=args.all)
    out = {
        "models": [rows.report_row(n, args.context, args.dtype, args.batch_size) for n in names],
        "kv_sharing": [r for n in names if (r := rows.sharing_row(n, args.context, args.dtype))],
        "head_budgets": [r for n in names if (r := rows.head_budget_row(n, args.context))],
        "deployed_formats": [r for n in names if (r := rows.deployed_row(n, args.context))],
        "same_width_baselines": [
            r for n in names for r in rows.baseline_rows(n, args.context, args.dtype, args.batch_size)
        ],
        "published_ratios": [r for n in names if (r := rows.published_ratio_row(n, args.context))],
    }
    if args.plot:
        from .reporting.plots import kv_vs_context, output_path

        kv_vs_context(names, args.plot, dtype=args.dtype)
        print(f"wrote {output_path(args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console.print(
        fit(
            tables.report_table(out["models"], args.context, args.dtype, args.batch_size),
            console,
            tables.REPORT_DROP_ORDER,
        )
    )
    extra = (
        ("kv_sharing", lambda rows: tables.sharing_table(rows, args.context, args.dtype)),
        ("head_budgets", lambda rows: tables.head_budget_table(rows, args.context)),
        ("deployed_formats", lambda rows: tables.deployed_table(rows, args.context)),
        ("same_width_baselines", lambda rows: tables.baseline_table(rows, args.context, args.dtype, args.batch_size)),
        ("published_ratios", lambda rows: tables.published_ratio_table(rows, args.context)),
    )
    for key, render in extra:
        if out[key]:
            console.print(fit(render(out[key]), console))
    return 0


# --------------------------------------------------------------------------------------- inspect


def cmd_inspect(args, console: Console) -> int:
    cfg = load_config(args.model)
    params = count_params(cfg)
    info = {
        "model": args.model,
        "family": cfg.family,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "params": params,
        "context": args.context,
        "dtype": args.dtype,
        "kv_bytes_realized": kv_cache_bytes(cfg, args.context, args.dtype),
        "kv_bytes_naive": kv_cache_bytes(cfg, args.context, args.dtype, convention="naive"),
        "decode_flops_terms": decode_flops_terms(cfg, args.context),
        "layers": rows.layer_rows(cfg, args.context, args.dtype),
    }
    if args.plot:
        from .reporting.plots import output_path, per_layer_cache

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
        f"{rows.kv_roles(cfg)}{escape(rows.compression_line(cfg))}{rows.head_budget_line(cfg, args.context)}"
        f"KV cache at {args.context:,} tokens ({args.dtype}, batch 1): "
        f"realized {fmt_bytes(info['kv_bytes_realized'])}, naive {fmt_bytes(info['kv_bytes_naive'])}\n"
        f"decode GFLOPs at position {args.context:,}: {flops}\n({UNITS_NOTE})"
    )
    console.print(fit(tables.layer_table(info["layers"], args.context, args.dtype), console, ["KV source", "RoPE"]))
    return 0


# ---------------------------------------------------------------------------------------- claims


def cmd_claims(args, console: Console) -> int:
    from .reporting.claims import evaluate_all
    from .reporting.measure import FAMILY_PRESETS, measured_cache

    out = {"claims": evaluate_all()}
    if args.measure:
        out["measured_caches"] = []
        with progress.bar("measuring caches", total=len(FAMILY_PRESETS), show=not args.json):
            for name in FAMILY_PRESETS:
                out["measured_caches"].append(measured_cache(name, args.tokens))
                progress.advance(1)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console.print(fit(tables.claims_table(out["claims"]), console, ["Source"]))
    if args.measure:
        console.print(fit(tables.measured_table(out["measured_caches"]), console))
    return 0


# -------------------------------------------------------------------------------------- generate


def check_memory(source: str, cfg, dtype: torch.dtype, max_memory_gb: float, tokens: int) -> dict[str, int]:
    """The bytes of the weights and of a ``tokens``-position cache; refused above ``max_memory_gb``."""
    need = generation_bytes(cfg, dtype, tokens)
    if need["total"] > max_memory_gb * (1 << 30):
        raise InputError(
            f"{source}: its weights ({fmt_bytes(need['weights'])} in {dtype_name(dtype)}) and KV cache of "
            f"{tokens:,} tokens ({fmt_bytes(need['cache'])}) need about {fmt_bytes(need['total'])}, more than "
            f"--max-memory-gb {max_memory_gb:g} GiB; raise --max-memory-gb if this machine has the memory, or use "
            f"a shorter context or a small model (tiny presets: "
            f"{', '.join(n for n in preset_names() if n.startswith('tiny-'))})"
        )
    return need


def check_trained_context(cfg, positions: int, what: str, allow: bool, command: str) -> None:
    """Refuse (or with ``allow``, only warn about) more positions than ``max_position_embeddings``."""
    past = past_trained_context(cfg, positions, what)
    if past and not allow:
        raise InputError(f"{past}; use at most {cfg.max_position_embeddings}, or pass --allow-past-max-positions")
    if past:
        print(f"ctxlab {command}: warning: {past}", file=sys.stderr)


def load_for_generation(
    source: str, dtype: torch.dtype, max_memory_gb: float, tokens: int, quiet: bool, command: str = "generate"
):
    """A checkpoint directory, or random weights for a preset / config.json; refused when the weights
    plus the cache of ``tokens`` positions would exceed ``max_memory_gb``. Messages name ``command``."""
    cfg = load_config(source)
    need = check_memory(source, cfg, dtype, max_memory_gb, tokens)
    checkpoint = preset_path(source) is None and (Path(source).is_dir() or is_gguf(source))
    if not checkpoint:
        print(
            f"ctxlab {command}: warning: {source} is not a checkpoint directory; using RANDOM weights "
            "(build_model seed 0), so the output is meaningless",
            file=sys.stderr,
        )
    if not quiet:
        print(
            f"ctxlab {command}: memory estimate {fmt_bytes(need['total'])} (weights {fmt_bytes(need['weights'])}"
            f" + KV cache {fmt_bytes(need['cache'])})",
            file=sys.stderr,
        )
    verb = "loading" if checkpoint else "building"
    with progress.bar(
        f"{verb} {source}",
        total=need["weights"],
        show=not quiet and need["weights"] >= PROGRESS_MIN_BYTES,
        unit_bytes=True,
    ):
        model = from_pretrained(source, dtype=dtype) if checkpoint else build_model(cfg, dtype=dtype, seed=0)
    return model, need


def prompt_tokenizer(source: str) -> TextTokenizer | None:
    """The tokenizer of a real checkpoint (a .gguf file, or a directory with tokenizer.json), else None."""
    if preset_path(source) is None and (is_gguf(source) or (Path(source) / TOKENIZER_FILE).is_file()):
        return load_text_tokenizer(source)
    return None


def cmd_generate(args, console: Console) -> int:
    dtype = DTYPES[args.dtype]
    model_tokens = args.max_new_tokens + (len(args.prompt_ids) if args.prompt_ids else 0)
    tok = None
    if args.prompt is not None:  # the tokenizer is read only when text has to be encoded
        tok = prompt_tokenizer(args.model)
        if tok is None:
            raise InputError(
                f"--prompt needs a tokenizer.json in the checkpoint directory and {args.model} has none; "
                "pass token ids instead, e.g. --prompt-ids 1,2,3"
            )
        prompt = tok.encode(args.prompt)
        model_tokens += len(prompt)
    else:
        prompt = args.prompt_ids
    warn_unused_sampling(args, "generate")
    model, need = load_for_generation(args.model, dtype, args.max_memory_gb, model_tokens, quiet=args.json)
    _prepare_weights(model, args)
    report_quantized(model, args, "generate")
    steps = stream(
        model,
        [prompt],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        prefill_chunk=args.prefill_chunk,
        compile=args.compile,
        allow_past_max_positions=args.allow_past_max_positions,
    )
    show = tok.decode if tok is not None else (lambda ids: " ".join(map(str, ids)))
    new: list[int] = []
    printed = ""
    start = time.perf_counter()
    first = None  # when the first token came out: the end of the prefill
    for step, _finished in steps:
        first = time.perf_counter() if first is None else first
        new.append(int(step[0]))
        if args.stream and not args.json:
            text = show(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
    summary = generation_summary(len(prompt), new, start, first, time.perf_counter())
    if args.json:
        out = {
            "model": args.model,
            "prompt_ids": prompt,
            "generated_ids": new,
            "text": tok.decode(new) if tok is not None else None,
            "summary": summary,
            "memory_estimate_bytes": need,
        }
        print(json.dumps(out))
        return 0
    if args.stream:
        print(show(new)[len(printed) :])
    else:
        print(show(new))
    print(
        f"ctxlab generate: {summary['prompt_tokens']} prompt tokens, {summary['new_tokens']} new tokens; "
        f"prefill {summary['prefill_tokens_per_s']:,.1f} tok/s, decode {summary['decode_tokens_per_s']:,.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def generation_summary(prompt_tokens: int, new: list[int], start: float, first: float | None, end: float) -> dict:
    """Token counts and speeds: prefill = prompt tokens / time to the first new token; decode = the
    other new tokens / the time after it (0 when there were none)."""
    first = end if first is None else first
    prefill_s, decode_s = max(first - start, 1e-9), max(end - first, 1e-9)
    decoded = max(len(new) - 1, 0)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(new),
        "prefill_seconds": first - start,
        "decode_seconds": end - first,
        "prefill_tokens_per_s": prompt_tokens / prefill_s if new else 0.0,
        "decode_tokens_per_s": decoded / decode_s if decoded else 0.0,
    }


# ------------------------------------------------------------------------------------------ list


def cmd_list(args, console: Console) -> int:
    from .reporting.catalog import list_presets

    rows = list_presets(include_tiny=True)
    if args.json:
        print(json.dumps({"presets": rows}, indent=2))
        return 0
    console.print(fit(tables.presets_table(rows), console, tables.PRESETS_DROP_ORDER))
    return 0


# ----------------------------------------------------------------------------- chat, perplexity


def load_checkpoint(source: str, dtype: torch.dtype, chat: bool = False, before_weights=None):
    """(model, TextTokenizer) of a real checkpoint: a directory with tokenizer.json, or a .gguf file.
    With ``chat``, a tokenizer without chat template is refused before the weights are read;
    ``before_weights(cfg)`` may refuse the config (its context, its memory) before they are read too."""
    if preset_path(source) is not None or not Path(source).exists():
        raise InputError(
            f"{source}: not a checkpoint directory or .gguf file (random-weight presets are "
            "meaningless here; `ctxlab generate` runs them)"
        )
    if before_weights is not None:
        before_weights(load_config(source))
    tokenizer = load_text_tokenizer(source)
    if chat:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # the "no chat template" error
    return from_pretrained(source, dtype=dtype), tokenizer


CHAT_CONTEXT = 4096  # chat's default cache, in tokens


def cmd_chat(args, console: Console) -> int:
    from .chat import ChatSession, run_chat, user_messages

    warn_unused_sampling(args, "chat")

    def fits(cfg) -> None:
        if args.context is None:  # the default: as much as the model was trained for, up to 4096
            args.context = min(CHAT_CONTEXT, cfg.max_position_embeddings)
        check_trained_context(cfg, args.context, "--context", args.allow_past_max_positions, "chat")
        check_memory(args.model, cfg, DTYPES[args.dtype], args.max_memory_gb, args.context)

    model, tokenizer = load_checkpoint(args.model, DTYPES[args.dtype], chat=True, before_weights=fits)
    _prepare_weights(model, args)
    report_quantized(model, args, "chat")
    session = ChatSession(
        model,
        tokenizer,
        context=args.context,
        system=args.system,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        prefill_chunk=args.prefill_chunk,
    )
    messages = args.message if args.message else user_messages(sys.stdin, sys.stderr)
    return run_chat(session, messages, args.max_new_tokens, args.json, sys.stdout, sys.stderr)


def check_weight_options(args) -> None:
    """Refuse combinations of :func:`add_weight_options` flags that cannot work, before a model is loaded."""
    if args.quantize_embedding and not args.quantize:
        raise InputError("--quantize-embedding needs --quantize (the mode of every other linear layer)")
    compiled = getattr(args, "compile", False)
    if args.pack_tied_head and (args.no_pack or compiled or args.quantize):
        clash = "--no-pack" if args.no_pack else "--compile" if compiled else f"--quantize {args.quantize}"
        raise InputError(
            f"--pack-tied-head with {clash}: the tied head is packed only when the weights are "
            "(not with --no-pack or --compile) and stay bf16 / fp32 (--quantize quantizes the head)"
        )


def _prepare_weights(model, args) -> None:
    """Projections of one input fused into one matmul (unless ``--no-fuse``), then ``--quantize int8|int4
    [--quantize-embedding int8|int4]``: weight-only quantization, then the remaining linear weights packed
    (unless ``--no-pack``): bf16 ones onto the native matvec, the rest reordered for oneDNN (not with
    ``--compile``, which keeps only the native ones; a tied LM head in oneDNN's layout with
    ``--pack-tied-head``); all in place. :func:`check_weight_options` has vetted the flags."""
    compiled = getattr(args, "compile", False)
    if not args.no_fuse:
        from .nn.fusion import fuse_projections_

        fuse_projections_(model)
    if args.quantize:
        from .quant import quantize_

        quantize_(model, args.quantize, embedding=args.quantize_embedding)
    if not args.no_pack:  # under --compile only the bf16 linears on the native kernel (inductor traces them)
        from .nn.packing import pack_linears_

        pack_linears_(model, shared=args.pack_tied_head, for_compile=compiled)


def report_quantized(model, args, command: str) -> None:
    """A warning on stderr naming the linear weights ``--quantize`` left as they were, if any."""
    skipped = getattr(model, "quantize_skipped", None) if args.quantize else None
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        print(
            f"ctxlab {command}: warning: --quantize {args.quantize} left {len(skipped)} linear weight(s) in "
            f"{args.dtype}: {shown}",
            file=sys.stderr,
        )


def warn_unused_sampling(args, command: str) -> None:
    """--top-k / --top-p / --seed do nothing at --temperature 0 (greedy): say so instead of ignoring them."""
    unused = [f"--{n.replace('_', '-')}" for n in ("top_k", "top_p", "seed") if getattr(args, n) is not None]
    if unused and args.temperature == 0:
        print(
            f"ctxlab {command}: warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at "
            "--temperature 0 (greedy decoding); give a temperature > 0 to sample",
            file=sys.stderr,
        )


def cmd_perplexity(args, console: Console) -> int:
    from rich.progress import Progress

    from .perplexity import perplexity

    path = Path(args.file)
    try:  # read first: a bad path should not wait for the model to load
        text = path.read_bytes().decode("utf-8")  # as it is: read_text would turn CRLF into LF
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise InputError(f"{path}: cannot read the text file: {reason}") from None

    def fits(cfg) -> None:
        check_trained_context(cfg, args.context, "--context", args.allow_past_max_positions, "perplexity")

    model, tokenizer = load_checkpoint(args.model, DTYPES[args.dtype], before_weights=fits)
    _prepare_weights(model, args)
    report_quantized(model, args, "perplexity")
    ids = tokenizer.encode(text)
    stride = args.stride if args.stride is not None else max(1, args.context // 2)
    bar = Console(file=sys.stderr)
    with Progress(console=bar, disable=args.json or not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task(f"perplexity of {len(ids):,} tokens", total=None)
        result = perplexity(
            model,
            ids,
            args.context,
            stride,
            on_window=lambda done, total: progress.update(task, completed=done, total=total),
        )
    result = {
        "model": args.model,
        "file": args.file,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "quantize_embedding": args.quantize_embedding,
        **result,
    }
    if args.json:
        print(json.dumps(result))
    else:
        console.print(
            f"perplexity {result['ppl']:.4f} (mean NLL {result['nll']:.5f} nats over {result['tokens']:,} "
            f"tokens; {result['windows']} windows of {args.context} tokens, stride {stride})"
        )
    return 0


# ----------------------------------------------------------------------------------------- bench


def cmd_bench(args, console: Console) -> int:
    from rich.progress import Progress

    from .bench import bench, check_against
    from .bench import tables as bench_tables

    check_against(args.against, args.quantize, args.model)  # before loading: a refusal should not cost a model load
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = max(args.context + args.prompt) + args.steps
    model, _ = load_for_generation(
        args.model, DTYPES[args.dtype], args.max_memory_gb, tokens, quiet=args.json, command="bench"
    )
    check_trained_context(model.config, tokens, "the longest --context / --prompt + --steps", True, "bench")
    _prepare_weights(model, args)
    report_quantized(model, args, "bench")
    with Progress(console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = bench(
            model,
            contexts=args.context,
            prompts=args.prompt,
            steps=args.steps,
            repeats=args.repeats,
            against=args.against,
            compile=args.compile,
            source=args.model,
            progress=lambda message: progress.update(task, description=message),
        )
    if args.json:
        print(json.dumps(result))
        return 0
    if result["against_skipped"]:
        print(f"ctxlab bench: --against {args.against} skipped: {result['against_skipped']}", file=sys.stderr)
    for table in bench_tables(result):
        console.print(table)
    if "greedy_agreement" in result:
        a = result["greedy_agreement"]
        console.print(
            f"greedy tokens: {args.against} picks ctxlab's token at {a['agree']} of {a['new_tokens']} positions "
            f"after a {a['prompt_tokens']}-token prompt; the first {a['leading']} agree in a row"
        )
    console.print(f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (whole process); torch {result['torch']}")
    return 0


def token_list(text: str) -> list[int]:
    """``512,4k,16k`` -> [512, 4096, 16384]; at least one length."""
    lengths = [tokens(part) for part in text.split(",") if part.strip()]
    if not lengths:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one length, e.g. 512,4k,16k")
    return lengths


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="ctxlab", formatter_class=fmt, description=__doc__.splitlines()[0].removeprefix("ctxlab: ")
    )
    p.add_argument("--version", action="version", version=f"ctxlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cost_options(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--context",
            type=tokens,
            default=131072,
            help="context length in tokens the cache holds (128k = 131072; k = 1024, m = 1048576)",
        )
        q.add_argument(
            "--dtype",
            choices=("bfloat16", "float32", "float16"),
            default="bfloat16",
            help="element type of the cached K/V tensors",
        )
        q.add_argument("--json", action="store_true", help="print JSON with exact integers instead of a table")

    r = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="KV cache, params and decode FLOPs of many models",
        description="One row per model: parameters, KV-cache bytes (per token and at --context) and "
        f"FLOPs to decode one token at position --context. {UNITS_NOTE}. {CONVENTIONS_NOTE}.",
    )
    cost_options(r)
    r.add_argument(
        "--batch-size",
        type=positive,
        default=1,
        help="sequences held in the cache (multiplies the 'KV @ context' columns)",
    )
    r.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="preset names or config.json / checkpoint paths "
        f"(None = every preset except the tiny-* and *-tiny test presets; presets: {', '.join(preset_names())})",
    )
    r.add_argument(
        "--all", action="store_true", help="also list the tiny-* and *-tiny test presets (ignored with --models)"
    )
    r.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write KV-cache bytes vs context length (1K to 1M tokens, "
        "log axes; realized solid, naive dashed where it differs) for these models (needs matplotlib)",
    )
    r.set_defaults(func=cmd_report)

    i = sub.add_parser(
        "inspect",
        formatter_class=fmt,
        help="one model's summary and per-layer table",
        description="Resolved config of MODEL: sizes, parameter counts, KV-cache bytes and one row "
        f"per layer (heads, head dim, window, RoPE, KV source, cache kind and bytes). {UNITS_NOTE}.",
    )
    i.add_argument("model", metavar="MODEL", help="preset name, config.json path or checkpoint directory")
    cost_options(i)
    i.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write per-layer cache bytes at --context as bars coloured by attention kind (needs matplotlib)",
    )
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser(
        "claims",
        formatter_class=fmt,
        help="published efficiency claims, checked against the configs",
        description="One row per published quantitative claim about these architectures: the claim "
        "and its source, the convention it needs, ctxlab's figure under that convention, the figure "
        "the real config / a real cache gives, and a verdict (reproduced / holds only under a "
        "convention / not reproduced). Every ctxlab figure is computed from the presets.",
    )
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument(
        "--measure",
        action="store_true",
        help="also build a tiny model with each family's layer "
        "pattern, prefill --tokens tokens and compare cache.nbytes() with the analytic bytes (slower)",
    )
    c.add_argument("--tokens", type=tokens, default=2048, help="tokens to prefill with --measure")
    c.set_defaults(func=cmd_claims)

    g = sub.add_parser(
        "generate",
        formatter_class=fmt,
        help="generate tokens from a checkpoint or preset",
        description="Continue a prompt and print only the generated part: text for a --prompt (which needs the "
        "checkpoint's tokenizer), token ids separated by spaces for --prompt-ids. A preset or config.json gets "
        "random weights (a warning on stderr says so).",
    )
    g.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory (config.json + *.safetensors "
        "[+ tokenizer.json]), or a preset name / config.json path for random weights",
    )
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer.json in the checkpoint directory)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=nonnegative, default=32, help="tokens to generate (fewer if EOS comes)")
    g.add_argument("--temperature", type=temperature, default=0.0, help="sampling temperature; 0 = greedy (argmax)")
    g.add_argument("--top-k", type=positive, help="sample among the k most likely tokens only (None = all)")
    g.add_argument(
        "--top-p",
        type=probability,
        help="nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1] (None = off)",
    )
    g.add_argument(
        "--seed",
        type=seed,
        help="seed of the sampling generator (None = not reproducible when "
        "--temperature > 0); the random weights of a preset always use seed 0",
    )
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight and cache element type")
    g.add_argument("--prefill-chunk", type=tokens, help="feed the prompt in chunks of this many tokens (None = all)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile (needs a C++ "
        "compiler; tens of seconds of warm-up on a small CPU, worth it only for long generations)",
    )
    g.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="print tokens as they are generated"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, generated_ids, text)")
    g.add_argument(
        "--max-memory-gb",
        type=gibibytes,
        default=8.0,
        help="refuse a model whose weights (total params x element size) plus KV cache exceed this many GiB",
    )
    g.add_argument(
        "--allow-past-max-positions",
        action="store_true",
        help="generate past the model's max_position_embeddings (the context it was trained for); refused otherwise",
    )
    add_weight_options(g, "weight-only quantization")
    g.set_defaults(func=cmd_generate)

    for name, aliases in (("list", ["presets"]),):
        q = sub.add_parser(
            name,
            aliases=aliases,
            formatter_class=fmt,
            help="every preset: family, params, layers, trained context, description",
            description="Every built-in preset: family, parameters "
            "(total and active per token), layers, trained context (max_position_embeddings) and "
            "what it is. Use a name with report, inspect or generate.",
        )
        q.add_argument("--json", action="store_true", help="print JSON with exact integers instead of a table")
        q.set_defaults(func=cmd_list)
    sampling = argparse.ArgumentParser(add_help=False)  # shared by chat
    sampling.add_argument(
        "--temperature", type=temperature, default=0.0, help="sampling temperature; 0 = greedy (argmax)"
    )
    sampling.add_argument("--top-k", type=positive, help="sample among the k most likely tokens only (None = all)")
    sampling.add_argument("--top-p", type=probability, help="nucleus sampling mass in (0, 1] (None = off)")
    sampling.add_argument("--seed", type=seed, help="seed of the sampling generator")

    ch = sub.add_parser(
        "chat",
        formatter_class=fmt,
        parents=[sampling],
        help="chat with a real model",
        description="Multi-turn chat with a checkpoint directory or .gguf file, formatted by its "
        "chat template. Reads one message per line from stdin (typed or piped) unless --message "
        "is given; streams each answer to stdout and a tokens/s line to stderr. The conversation "
        "stays in one cache: each turn prefills only its new tokens. Ctrl-C stops the current "
        "answer (it stays in the conversation); /reset starts over, /exit ends.",
    )
    ch.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory (with tokenizer.json and a chat template in tokenizer_config.json) or .gguf file",
    )
    ch.add_argument(
        "--message",
        action="append",
        metavar="TEXT",
        help="answer this message and exit (repeat for several turns) instead of reading stdin",
    )
    ch.add_argument(
        "--system", help='system message at the start of the conversation ("" = an empty one; none = the template\'s)'
    )
    ch.add_argument("--max-new-tokens", type=positive, default=256, help="longest answer in tokens")
    ch.add_argument(
        "--context",
        type=tokens,
        help=f"tokens the conversation may hold, the cache size (None = {CHAT_CONTEXT} or the model's "
        "max_position_embeddings if smaller)",
    )
    ch.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight and cache element type")
    ch.add_argument("--prefill-chunk", type=tokens, help="feed prompts in chunks of this many tokens (None = all)")
    ch.add_argument(
        "--max-memory-gb",
        type=gibibytes,
        default=8.0,
        help="refuse a model whose weights plus a KV cache of --context tokens exceed this many GiB",
    )
    ch.add_argument(
        "--allow-past-max-positions",
        action="store_true",
        help="a --context past the model's max_position_embeddings (the context it was trained for); refused otherwise",
    )
    add_weight_options(ch, "weight-only quantization")
    ch.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per turn (answer, prefill_tokens, "
        "cached_tokens, generated_tokens, stop, timings) instead of streamed text",
    )
    ch.set_defaults(func=cmd_chat)

    pp = sub.add_parser(
        "perplexity",
        formatter_class=fmt,
        help="perplexity of a text file",
        description="Token-level perplexity of FILE under MODEL with a sliding window: windows of "
        "--context tokens every --stride tokens, each scoring only the tokens the previous window "
        "did not (HF's strided perplexity). A progress bar goes to stderr when it is a terminal.",
    )
    pp.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json) or .gguf file")
    pp.add_argument("file", metavar="FILE", help="UTF-8 text file")
    pp.add_argument(
        "--context", type=partial(count, minimum=2, suffixes=True), default=512, help="window length in tokens"
    )
    pp.add_argument("--stride", type=positive, help="tokens between window starts, <= --context (None = context / 2)")
    pp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight element type")
    pp.add_argument(
        "--allow-past-max-positions",
        action="store_true",
        help="windows longer than the model's max_position_embeddings (the context it was trained for); "
        "refused otherwise",
    )
    add_weight_options(pp, "weight-only quantization, to measure what it costs in perplexity")
    pp.add_argument("--json", action="store_true", help="print JSON (ppl, nll, tokens, windows, ...)")
    pp.set_defaults(func=cmd_perplexity)

    from .lab.cli import add_commands  # ctxlab train, ctxlab lab run / report

    add_commands(sub, fmt)

    b = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="measure prefill and decode speed on this machine",
        description="Prefill tokens/s at each --prompt length and decode ms/token at each --context "
        "length (cache filled by a chunked prefill of random tokens, then timed decode steps), cache "
        "bytes, peak RSS, and the decode roofline ratio (measured ms/token / (bytes read per token / "
        "copy bandwidth measured at the start)). --against runs the same weights in another engine "
        "in the same run, alternating with ctxlab; medians of --repeats.",
    )
    b.add_argument(
        "model", metavar="MODEL", help="checkpoint directory, or a preset name / config.json path (random weights)"
    )
    b.add_argument(
        "--context",
        type=token_list,
        default=[512, 4096, 16384],
        help="decode context lengths, comma-separated (k = 1024)",
    )
    b.add_argument("--prompt", type=token_list, default=[512, 2048], help="prefill prompt lengths, comma-separated")
    b.add_argument("--steps", type=positive, default=16, help="timed decode steps per context")
    b.add_argument("--repeats", type=positive, default=3, help="repeats (medians are reported)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="weight and cache type")
    add_weight_options(b, "weight-only quantization")
    b.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (warm-up: an untimed decode at the shortest --context, reported separately)",
    )
    b.add_argument(
        "--against",
        choices=("transformers", "llama.cpp"),
        help="also run the same weights in "
        "transformers (saved and reloaded), or llama-cpp-python on MODEL as a GGUF file (in a process of "
        "its own, same threads); also reports how often the other engine picks ctxlab's greedy token",
    )
    b.add_argument(
        "--threads",
        type=positive,
        help="torch threads (None = torch's default); on a shared, "
        "oversubscribed machine 1 thread gives far steadier numbers",
    )
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.add_argument(
        "--max-memory-gb",
        type=gibibytes,
        default=8.0,
        help="refuse a model whose weights plus KV cache exceed this many GiB",
    )
    b.set_defaults(func=cmd_bench)
    return p


def add_weight_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--quantize``, ``--quantize-embedding`` (``ctxlab.quant.quantize_``), ``--no-fuse``
    (``ctxlab.nn.fusion.fuse_projections_``), ``--no-pack`` and ``--pack-tied-head``
    (``ctxlab.nn.packing.pack_linears_``)."""
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help=f"{what}: every linear layer, the embedding and the LM head (MoE expert banks stay in --dtype; int4 "
        "needs --dtype bfloat16 and leaves layers whose input width is not a multiple of 32, or whose output width "
        "is not a multiple of 16, as they are, with a warning)",
    )
    parser.add_argument(
        "--quantize-embedding",
        choices=("int8", "int4"),
        help="a different mode for the token embedding and LM head, e.g. --quantize int4 --quantize-embedding int8 "
        "(llama.cpp's Q4_K_M keeps them at 6-8 bits)",
    )
    parser.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep q/k/v and gate/up as separate matmuls (by default the projections of one input run as one: "
        "fewer kernel calls per decode step, same results up to summation order)",
    )
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="run bf16/fp32 linear weights through F.linear (by default bf16 ones go to ctxlab's native "
        "matrix-vector kernel where the CPU has AVX512-BF16, also with --compile, and the rest are reordered "
        "for oneDNN's, not with --compile; either reads weights 1.4-2.3x faster than F.linear in a decode step)",
    )
    parser.add_argument(
        "--pack-tied-head",
        action="store_true",
        help="also pack an LM head tied to the embedding for oneDNN, as a second copy of the table (vocab x "
        "hidden more bytes: +336 MB on Gemma 3 270M in bf16); a bf16 head on the native kernel needs no copy "
        "and is packed without this flag",
    )


def error_message(e: BaseException) -> str:
    if isinstance(e, ConfigError) and len(e.problems) == 1:
        return e.problems[0]
    return str(e)


class PipeConsole(Console):
    """A rich console that hands a closed pipe to ``main`` (rich alone exits with code 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (code 2)
        return e.code if isinstance(e.code, int) else 0
    console = PipeConsole(file=sys.stdout, highlight=False, width=tables.console_width())
    try:
        if hasattr(args, "pack_tied_head"):  # a command that loads a model and prepares its weights
            check_weight_options(args)
        return args.func(args, console)
    except CtxlabError as e:  # bad input: names, values, files (anything else is a bug: its traceback stays)
        print(f"ctxlab {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (ctxlab report | head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except KeyboardInterrupt:
        print(f"ctxlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a path given on the command line that cannot be written where it says (a file where a directory goes, ...)
        print(f"ctxlab {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
