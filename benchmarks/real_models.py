"""The real GGUF models against llama.cpp on the same file: ctxlab's decode in every weight mode
(bfloat16, int8, int4, int4 with an int8 embedding / LM head), eager and compiled, each mode in a run
of ``ctxlab.bench`` with llama.cpp alternating beside it (docs/benchmarks.md).

    PYTHONPATH=src python benchmarks/real_models.py --markdown --json docs/benchmark-data/real-models.json

Each row is what ``ctxlab bench FILE --against llama.cpp --threads T [--quantize ...] [--compile]``
measures with its defaults (fused projections, packed linears): prefill tokens/s,
decode ms/token at each context (median of ``--steps`` steps, median of ``--repeats``), and the
greedy-token agreement (llama.cpp fed ctxlab's greedy continuation of a fixed text: at how many of
64 positions it picks the same token). llama.cpp runs in its own process
(``ctxlab/llama_cpp_worker.py``); needs ``pip install llama-cpp-python`` (built from source).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gguf_load import default_files
from table_output import print_table

import ctxlab

# (label, --quantize, --quantize-embedding)
MODES = [
    ("bfloat16", None, None),
    ("int8", "int8", None),
    ("int4", "int4", None),
    ("int4 + int8 embedding", "int4", "int8"),
]


def run(path: Path, quantize, embedding, compile: bool, fuse: bool, pack: bool, args) -> dict:
    model = ctxlab.from_pretrained(path, dtype=torch.bfloat16)
    if fuse:
        ctxlab.fuse_projections(model)
    if quantize:
        ctxlab.quantize(model, quantize, embedding=embedding)
    if pack:  # the remaining bf16 linears on the native matvec or oneDNN (compiled: the native ones only), as the CLI
        ctxlab.pack_linears(model, for_compile=compile)
    return ctxlab.bench(
        model,
        contexts=args.contexts,
        prompts=args.prompts,
        steps=args.steps,
        repeats=args.repeats,
        against="llama.cpp",
        compile=compile,
        source=str(path),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files (default: the two PyPI models, if installed)")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    p.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads of both engines")
    p.add_argument("--modes", default=",".join(m[0] for m in MODES), help="comma-separated subset of the modes")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument(
        "--fuse",
        choices=("yes", "no", "both"),
        default="yes",
        help="fused q/k/v and gate/up projections (ctxlab's default), separate ones, or a row of each",
    )
    p.add_argument(
        "--pack",
        choices=("yes", "no", "both"),
        default="yes",
        help="linear weights packed (ctxlab's default: bf16 on the native matvec, also compiled; the rest for "
        "oneDNN, eager only), not packed, or a row of each",
    )
    p.add_argument("--markdown", action="store_true", help="print a markdown table (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="also write every bench result to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = args.files or default_files()
    wanted = args.modes.split(",")
    unknown = [m for m in wanted if m not in [label for label, _, _ in MODES]]
    if unknown:
        p.error(f"--modes: unknown {unknown}; allowed: {[label for label, _, _ in MODES]}")
    choices = {"yes": (True,), "no": (False,), "both": (False, True)}
    variants = [
        (compile, fuse, pack)
        for compile in ((False,) if args.no_compile else (False, True))
        for fuse in choices[args.fuse]
        for pack in choices[args.pack]
    ]
    results, rows = [], []
    for path in files:
        for label, quantize, embedding in (m for m in MODES if m[0] in wanted):
            for compile, fuse, pack in variants:
                r = run(path, quantize, embedding, compile, fuse, pack, args)
                if r["against_skipped"]:
                    raise SystemExit(f"llama.cpp skipped: {r['against_skipped']}")
                results.append({"file": path.name, "mode": label, **r})
                row = [path.name, label] + ["yes" if flag else "no" for flag in (compile, fuse, pack)]
                pre = r["prefill"][0]
                row.append(f"{pre['ctxlab_tokens_per_s']:.0f} / {pre['llama.cpp_tokens_per_s']:.0f}")
                for d in r["decode"]:
                    row.append(
                        f"{d['ctxlab_ms_per_token']:.1f} / {d['llama.cpp_ms_per_token']:.1f} ({d['speedup']:.2f}×)"
                    )
                a = r["greedy_agreement"]
                row.append(f"{a['agree']}/{a['new_tokens']} ({a['leading']})")
                rows.append(row)
                print(" | ".join(row), flush=True)
    cols = [
        "file",
        "ctxlab weights",
        "compiled",
        "fused",
        "packed",
        f"prefill {args.prompts[0]} tok/s: ctxlab / llama.cpp",
    ]
    cols += [f"decode @{c}: ctxlab / llama.cpp ms (speed ratio)" for c in args.contexts]
    cols += ["greedy agreement (leading run)"]
    title = f"ctxlab vs llama.cpp on the same GGUF file, {args.threads} threads, torch {torch.__version__}"
    print_table(title, cols, rows, args.markdown, left=("file", "ctxlab weights"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
