"""Decode ms/token against context length (1K..64K) for a full-attention, a sliding-window, a
KV-sharing, an MLA and a DeepSeek V4 model of similar size (docs/benchmarks.md).

    PYTHONPATH=src python benchmarks/decode_vs_context.py --markdown --json docs/benchmark-data/decode-vs-context.json \
        --plot docs/decode_vs_context.png

The models are the ~150M-parameter "tiny but wide" ones of benchmarks/families.py (hidden 1024, 8
layers, bf16, random weights); "MLA" is the DeepSeek V3.2 one without its indexer (every layer
attends to every cached latent, on the absorbed decode path). One cache per model grows from the
smallest context to the largest by chunked prefill (chunks of ``--chunk`` random tokens); at each
context ``--steps`` decode steps are timed and their median reported, so one 64K prefill serves every
context. Linear weights are packed as ``ctxlab bench`` packs them (bf16: the native matvec; ``--no-pack`` keeps
``F.linear``); a row's cache bytes are what a cache of exactly that context holds
(``ctxlab.kv_cache_bytes``), not the one 64K cache the curve grows in. The last column divides each
model's cost at the largest context by its cost at 2K: the issue's target for the sliding and
compressed families is <= 1.2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from families import family_config
from table_output import print_table

import ctxlab
from ctxlab.bench import copy_bandwidth, decode_read_bytes
from ctxlab.bench_engines import timed_steps


def mla_config() -> ctxlab.ModelConfig:
    cfg = family_config("deepseek_v32")
    return cfg.replace(name="wide-mla", layers=tuple(dataclasses.replace(s, indexer=None) for s in cfg.layers))


MODELS = {
    "full attention (llama)": lambda: family_config("llama"),
    "sliding 3:1 (qwen3 window 1024)": lambda: family_config("qwen3-sliding"),
    "KV sharing + sliding (gemma4)": lambda: family_config("gemma4"),
    "MLA (deepseek_v32 without indexer)": mla_config,
    "CSA / HCA (deepseek_v4)": lambda: family_config("deepseek_v4"),
}


@torch.no_grad()
def decode_curve(
    cfg, contexts: list[int], steps: int, chunk: int, fuse: bool = True, pack: bool = True, seed: int = 0
) -> list[dict]:
    """ms/token (median of ``steps``) at each context, one cache grown from the first to the last."""
    model = ctxlab.build_model(cfg, dtype=torch.bfloat16, seed=seed)
    if fuse:
        ctxlab.fuse_projections(model)
    if pack:
        ctxlab.pack_linears(model)
    total = max(contexts) + steps * len(contexts)
    cache = model.new_cache(1, total)
    ids = torch.randint(0, cfg.vocab_size, (1, total), generator=torch.Generator().manual_seed(seed))
    rows, filled = [], 0
    for c in sorted(contexts):
        while cache.length < c:
            n = min(chunk, c - cache.length)
            logits = model(ids[:, filled : filled + n], cache=cache, last_only=True)[:, -1]
            filled += n
        ms, logits = timed_steps(model, cache, logits, steps)
        cache_bytes = ctxlab.kv_cache_bytes(cfg, c, torch.bfloat16)
        read = decode_read_bytes(model, cache_bytes)
        rows.append({"context": c, "ms_per_token": ms, "cache_bytes": cache_bytes, "bytes_read_per_token": read})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in results["models"].items():
        ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token (bf16)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Decode cost vs context, ~150M-parameter models, {results['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024 << i for i in range(7)])
    p.add_argument("--steps", type=int, default=9, help="timed decode steps per context (median)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up matmuls (default: fused)")
    p.add_argument("--no-pack", action="store_true", help="keep linears on F.linear (default: packed, as ctxlab bench)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the model labels")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other models of the --json file (re-measure only --models; table and plot show all)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = {"packed": not args.no_pack, "models": {}}
    if args.update and args.json and args.json.exists():
        kept = json.loads(args.json.read_text())
        if kept.get("packed") != (not args.no_pack):  # one flag describes every row of the file
            p.error(
                f"--update: {args.json} was measured with packed = {kept.get('packed')}, this run with "
                f"packed = {not args.no_pack}; re-measure every model, or match --no-pack"
            )
    results = {"threads": args.threads, "torch": torch.__version__, "bandwidth_gb_s": copy_bandwidth() / 1e9}
    results["packed"] = not args.no_pack
    results["models"] = kept["models"]
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; allowed: {list(MODELS)}")
    for label in args.models.split(","):
        results["models"][label] = decode_curve(
            MODELS[label](), args.contexts, args.steps, args.chunk, not args.no_fuse, not args.no_pack
        )
        print(label, [round(r["ms_per_token"], 1) for r in results["models"][label]], flush=True)
    contexts = sorted(args.contexts)
    base = 2048 if 2048 in contexts else contexts[0]
    cols = ["model"] + [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts]
    cols.append(f"{contexts[-1] // 1024}K ÷ {base // 1024}K")
    rows = []
    for label, curve in results["models"].items():
        ms = {r["context"]: r["ms_per_token"] for r in curve}
        rows.append([label] + [f"{ms[c]:.1f}" for c in contexts] + [f"{ms[contexts[-1]] / ms[base]:.2f}"])
    title = (
        f"Decode ms/token vs context, bf16, {args.threads} threads, torch {torch.__version__}, "
        f"copy bandwidth {results['bandwidth_gb_s']:.1f} GB/s"
    )
    print_table(title, cols, rows, args.markdown, left=("model",))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
