"""``ctxlab lab report``: the study's table, significance marks, plots and the mHC diagnostics.

Reads every ``<runs>/<recipe>/<task>/seed<k>/result.json``; per recipe and metric, the mean ± sample
standard deviation over seeds, and a mark where Welch's t-test against the baseline recipe gives
p < 0.05. Costs (parameters, KV bytes per token, decode FLOPs) come from the accounting, of the model
config each result records (computed again, so an accounting fix reaches finished runs). The markdown goes between ``<!-- lab-report:begin -->`` and ``<!-- lab-report:end -->`` of
the target file (the hand-written discussion around it is kept), or makes a new file.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from ..config import ModelConfig
from ..errors import InputError
from .recipes import COST_CONTEXT, costs
from .stats import mean_std, welch_p

BEGIN, END = "<!-- lab-report:begin -->", "<!-- lab-report:end -->"
ALPHA = 0.05
# (column, task, key in result["eval"] or a callable, higher is better)
METRICS = [
    ("MQAR acc", "mqar", "mqar_accuracy", True),
    ("passkey acc @T", "passkey", "passkey_accuracy", True),
    ("passkey acc @2T", "passkey", "passkey_accuracy_2x", True),
    ("passkey digit acc @T", "passkey", "passkey_digit_accuracy", True),
    ("passkey digit acc @2T", "passkey", "passkey_digit_accuracy_2x", True),
    ("held-out bits/byte", "code", "bits_per_byte", False),
    ("train tok/s", "code", "tokens_per_s", True),
]


def collect(runs: str | Path) -> dict:
    """{recipe: {task: [result, ...] sorted by seed}}"""
    out: dict = {}
    for path in sorted(Path(runs).glob("*/*/seed*/result.json")):
        result = json.loads(path.read_text())
        recipe, task = path.parts[-4], path.parts[-3]
        out.setdefault(recipe, {}).setdefault(task, []).append(result)
    if not out:
        raise InputError(f"runs directory {str(runs)!r} holds no */*/seed*/result.json; run `ctxlab lab run` first")
    for tasks in out.values():
        for results in tasks.values():
            results.sort(key=lambda r: r["train"]["seed"])
    return out


def _values(results: list[dict], key: str) -> list[float]:
    vals = [r[key] if key in ("tokens_per_s",) else r["eval"].get(key) for r in results]
    return [float(v) for v in vals if v is not None]


def summarize(runs: str | Path, baseline: str = "gqa") -> dict:
    data = collect(runs)
    if baseline not in data:
        raise InputError(f"baseline = {baseline!r}: {str(runs)!r} holds no runs of it; recipes there: {sorted(data)}")
    rows = []
    for recipe, tasks in sorted(data.items(), key=lambda kv: (kv[0] != baseline, kv[0])):
        any_result = next(iter(tasks.values()))[0]
        info = any_result["recipe"]
        row = {
            "recipe": recipe,
            "mechanism": info["mechanism"],
            **costs(ModelConfig.from_dict(info["config"])),  # by today's accounting, not the one the run recorded
            "matched": info["matched"],
            "metrics": {},
        }
        for column, task, key, higher in METRICS:
            vals = _values(tasks.get(task, []), key)
            if not vals:
                continue
            mean, std = mean_std(vals)
            p = None
            if recipe != baseline and task in data.get(baseline, {}):
                p = welch_p(vals, _values(data[baseline][task], key))
            row["metrics"][column] = {
                "mean": mean,
                "std": std,
                "n": len(vals),
                "values": vals,
                "p": p,
                "significant": p is not None and p < ALPHA,
            }
        row["diagnostics"] = _diagnostics(runs, recipe, tasks)
        rows.append(row)
    meta = _meta(runs, data)
    return {"baseline": baseline, "alpha": ALPHA, "cost_context": COST_CONTEXT, "rows": rows, "meta": meta}


def _metric_lines(runs: str | Path, recipe: str, task: str, seed: int) -> list[dict]:
    path = Path(runs) / recipe / task / f"seed{seed}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _diagnostics(runs, recipe: str, tasks: dict) -> dict:
    """Per recipe, over its code-task runs: the largest grad norm and hyper-connection gains logged."""
    out = {}
    for result in tasks.get("code", []):
        for rec in _metric_lines(runs, recipe, "code", result["train"]["seed"]):
            for key in ("grad_norm", "hc_composite_gain_fwd", "hc_composite_gain_bwd", "hc_max_layer_gain"):
                if key in rec:
                    out[f"max_{key}"] = _largest(out.get(f"max_{key}", 0.0), rec[key])
    return out


def _largest(a: float, b: float) -> float:
    """max(a, b), NaN if either is: a diverged run shows as NaN (``max`` would keep whichever came first)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _meta(runs, data: dict) -> dict:
    corpus = Path(runs) / "corpus.json"
    manifest = json.loads(corpus.read_text()) if corpus.exists() else {}
    first = next(r for tasks in data.values() for rs in tasks.values() for r in rs)
    budgets = sorted({r.get("budget") for tasks in data.values() for rs in tasks.values() for r in rs} - {None})
    plans = {}
    for tasks in data.values():
        for task, rs in tasks.items():
            r = rs[0]
            plans[task] = {
                "steps": r["train"]["steps"],
                "global_batch": r["global_batch"],
                "seq_len": r["task"]["seq_len"],
                "tokens": r["tokens"],
                "task": r["task"],
            }
    for plan in plans.values():  # the code task's description carries the corpus summary; keep it once
        plan["task"] = {k: v for k, v in plan["task"].items() if k != "corpus"}
    return {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "torch": first.get("torch"),
        "python": first.get("python"),
        "threads": first.get("threads"),
        "budgets": budgets,
        "plans": plans,
        "corpus": {
            k: manifest.get(k)
            for k in ("sha256", "files", "heldout_files", "train_bytes", "heldout_bytes", "python", "heldout_every")
        },
        "runs": sum(len(rs) for tasks in data.values() for rs in tasks.values()),
        "train_seconds": sum(r["train_seconds"] for tasks in data.values() for rs in tasks.values() for r in rs),
    }


def _cell(m: dict | None, digits: int) -> str:
    if m is None:
        return "—"
    mark = " †" if m["significant"] else ""
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}{mark}"


def markdown(summary: dict, plot_paths: dict[str, str] | None = None) -> str:
    rows, meta = summary["rows"], summary["meta"]
    head = [
        "mechanism",
        "params",
        "KV bytes/token",
        f"decode MFLOPs/token @{summary['cost_context'] // 1024}K",
        *[c for c, *_ in METRICS],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    digits = {
        "MQAR acc": 3,
        "passkey acc @T": 3,
        "passkey acc @2T": 3,
        "passkey digit acc @T": 3,
        "passkey digit acc @2T": 3,
        "held-out bits/byte": 3,
        "train tok/s": 0,
    }
    for r in rows:
        cells = [
            f"{r['mechanism']} (`{r['recipe']}`)",
            f"{r['params']:,}",
            f"{r['kv_bytes_per_token']:,.1f}",
            f"{r['decode_flops_4k'] / 1e6:.2f}",
        ]
        cells += [_cell(r["metrics"].get(c), digits[c]) for c, *_ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    n = max((m["n"] for r in rows for m in r["metrics"].values()), default=0)
    ctx = summary["cost_context"]
    notes = (
        f"Mean ± sample standard deviation over {n} seeds. † = Welch's t-test against `{summary['baseline']}` "
        f"gives p < {summary['alpha']} (two-sided; scipy.stats.ttest_ind, equal_var=False). KV bytes/token: "
        f"bfloat16 cache bytes at a {ctx}-token context divided by the context (ring and compressed caches make "
        f"it context-dependent); decode FLOPs: matmul FLOPs of the token at position {ctx} "
        "(`ctxlab.decode_flops`). Train tok/s: the code task's training throughput on this (shared) machine."
    )
    matching = (
        "Parameter matching (FFN width on every layer, chosen by `ctxlab.lab.recipes` to bring the total "
        "closest to the baseline's):"
    )
    lines += ["", notes, "", matching, "", "| recipe | FFN width | params | vs baseline |", "|---|---|---|---|"]
    for r in rows:
        m = r["matched"]
        if m:
            change = 100 * (m["params"] / m["baseline_params"] - 1)
            lines.append(
                f"| `{r['recipe']}` | {m['baseline_value']} → {m['value']} | {m['params']:,} | {change:+.2f}% |"
            )
    diag = [r for r in rows if any(k.startswith("max_hc") for k in r["diagnostics"])]
    if diag:
        base = next((r for r in rows if r["recipe"] == summary["baseline"]), None)
        about = (
            "Hyper-connection diagnostics (code task, maxima over all logged steps and seeds; composite = product "
            "of every connection's residual mixing matrix, gain = largest absolute row (forward) / column "
            "(backward) sum):"
        )
        head = "| recipe | composite gain fwd | composite gain bwd | largest single-layer gain | max grad norm |"
        lines += ["", about, "", head, "|---|---|---|---|---|"]
        keys = ("max_hc_composite_gain_fwd", "max_hc_composite_gain_bwd", "max_hc_max_layer_gain", "max_grad_norm")
        listed = [r["recipe"] for r in diag]
        for r in ([base] if base and base["recipe"] not in listed else []) + diag:
            values = " | ".join(f"{r['diagnostics'].get(k, float('nan')):.3g}" for k in keys)
            lines.append(f"| `{r['recipe']}` | {values} |")
    plans = ", ".join(
        f"{t}: {p['steps']} steps × {p['global_batch']} sequences × {p['seq_len']} tokens = {p['tokens']:,} tokens"
        for t, p in sorted(meta["plans"].items())
    )
    runs_line = (
        f"Runs: {plans}; {meta['runs']} runs, {meta['train_seconds'] / 60:.1f} min of training in all. "
        f"Budget: {', '.join(meta['budgets'])}. Machine: {meta['machine']}, torch {meta['torch']}, "
        f"Python {meta['python']}, {meta['threads']} torch threads."
    )
    lines += ["", runs_line, ""]
    c = meta["corpus"]
    if c.get("sha256"):
        corpus = (
            f"Code corpus: Python {c['python']} standard library, {c['files']} `.py` files ({c['heldout_files']} "
            f"held out, {c['heldout_bytes']:,} bytes; {c['train_bytes']:,} training bytes), SHA-256 "
            f"`{c['sha256']}` (file list in the runs directory's `corpus.json`)."
        )
        lines += [corpus, ""]
    for title, path in (plot_paths or {}).items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def _color(plt, summary: dict, recipe: str, index: int):
    """Black for the baseline; otherwise 20 distinct colours (tab20), so 13 recipes never share one."""
    return "black" if recipe == summary["baseline"] else plt.get_cmap("tab20")(index % 20)


def plot_tradeoff(summary: dict, path: str | Path) -> None:
    """Held-out bits per byte against KV bytes per token (log x), one point per recipe with ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(summary["rows"]):
        m = r["metrics"].get("held-out bits/byte")
        if m is None:
            continue
        ax.errorbar(
            r["kv_bytes_per_token"],
            m["mean"],
            yerr=m["std"],
            fmt="o",
            capsize=3,
            color=_color(plt, summary, r["recipe"], i),
        )
        ax.annotate(
            r["recipe"], (r["kv_bytes_per_token"], m["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"KV-cache bytes per token (bfloat16, {summary['cost_context']}-token context)")
    ax.set_ylabel("held-out bits per byte (stdlib .py)")
    ax.set_title("Quality vs KV cache at equal parameters (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(runs: str | Path, summary: dict, path: str | Path) -> None:
    """Training loss against step for each task (one panel each), mean over seeds per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = collect(runs)
    tasks = sorted({t for r in data.values() for t in r})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, recipe in enumerate(r["recipe"] for r in summary["rows"]):
            curves = [
                [rec["loss"] for rec in _metric_lines(runs, recipe, task, res["train"]["seed"])]
                for res in data[recipe].get(task, [])
            ]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(map(len, curves))
            mean = [sum(c[j] for c in curves) / len(curves) for j in range(n)]
            ax.plot(
                range(1, n + 1),
                mean,
                label=recipe,
                lw=2.2 if recipe == summary["baseline"] else 1.0,
                color=_color(plt, summary, recipe, i),
                ls=("-", "--", ":")[i % 3],
            )
        ax.set_title(f"{task}: training loss (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / supervised token)")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: str | Path, out: str | Path, plots_dir: str | Path | None = None, baseline: str = "gqa") -> dict:
    """Summarize ``runs``, write plots into ``plots_dir`` (paths in the markdown relative to ``out``) and the
    table into ``out`` (between the report markers if the file has them). Returns the summary."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"out = {str(out)!r} is a directory; give the markdown file to write (e.g. docs/lab.md)")
    summary = summarize(runs, baseline)
    plot_paths = {}
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        (plots_dir / "summary.json").write_text(json.dumps(summary, indent=1))  # every number behind the table
        trade, losses = plots_dir / "bits_per_byte_vs_kv.png", plots_dir / "loss_curves.png"
        plot_tradeoff(summary, trade)
        plot_losses(runs, summary, losses)
        for title, p in (("bits per byte vs KV bytes per token", trade), ("training loss curves", losses)):
            try:
                plot_paths[title] = p.resolve().relative_to(out.resolve().parent).as_posix()
            except ValueError:
                plot_paths[title] = str(p)
    block = f"{BEGIN}\n{markdown(summary, plot_paths)}\n{END}"
    text = out.read_text() if out.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Mechanism lab results\n\n") + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return summary
