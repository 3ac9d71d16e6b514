"""Subcommands ``ctxlab train``, ``ctxlab lab run`` and ``ctxlab lab report`` (registered by ``ctxlab.cli``)."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..argtypes import nonnegative, positive, real, seed


def _key_value(text: str) -> tuple[str, object]:
    """'pairs=8' -> ('pairs', 8); values parsed as JSON when they can be (numbers, lists, true/false)."""
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. pairs=8")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def cmd_train(args, console) -> int:
    from ..io.config_file import load_config
    from ..train import TrainConfig, make_task, train
    from .recipes import load_recipe

    transform = None
    if args.recipe:
        recipe = load_recipe(args.recipe)
        model_config, transform = recipe.config, recipe.model_transform()
    else:
        model_config = load_config(args.config)
    task = make_task(args.task, **dict(args.task_param or []))
    cfg = TrainConfig(
        steps=args.steps,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        bf16=args.bf16,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        diagnostics_every=args.diagnostics_every,
        strategy=args.strategy,
    )
    result = train(model_config, task, cfg, args.out, resume=args.resume, model_transform=transform)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        speed = f"{result['tokens_per_s']:.0f} tokens/s; " if result["tokens_per_s"] else ""
        console.print(f"{args.task}: {result['eval']}  ({speed}results in {args.out})")
    return 0


def cmd_lab_run(args, console) -> int:
    from .recipes import recipe_names
    from .runner import run_study

    names = recipe_names() if args.recipes == ["all"] else args.recipes
    run_study(
        names,
        args.runs,
        budget=args.budget,
        tasks=args.tasks,
        seeds=args.seeds,
        threads=args.threads,
        jobs=args.jobs,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    return 0


def cmd_lab_report(args, console) -> int:
    import json

    from .report import write_report

    summary = write_report(args.runs, args.out, args.plots, baseline=args.baseline)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"wrote {args.out}" + (f" and plots in {args.plots}" if args.plots else ""), file=sys.stderr)
    return 0


def add_commands(sub, fmt) -> None:
    t = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train a model on a lab task (one process or torchrun)",
        description="Train a fresh model (a lab recipe or a config) on a task; writes metrics.jsonl, "
        "an atomic checkpoint.pt and result.json into --out, and resumes from the checkpoint when "
        "rerun. Under `torchrun --nproc-per-node N -m ctxlab.cli train ...` each process takes its "
        "slice of the global batch (DDP, gloo on CPU, or --strategy fsdp).",
    )
    model = t.add_mutually_exclusive_group(required=True)
    model.add_argument("--recipe", help="lab recipe name (see `ctxlab lab run --help`) or recipe .json file")
    model.add_argument("--config", help="preset name, config.json path or checkpoint directory")
    t.add_argument("--task", choices=("mqar", "passkey", "code"), required=True, help="training task")
    t.add_argument(
        "--task-param",
        type=_key_value,
        action="append",
        metavar="NAME=VALUE",
        help="task parameter, repeatable (e.g. seq_len=128, pairs=8)",
    )
    t.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoint.pt, result.json)")
    t.add_argument("--steps", type=positive, default=200, help="optimizer steps")
    t.add_argument("--micro-batch", type=positive, default=16, help="sequences per process per forward")
    t.add_argument("--grad-accum", type=positive, default=1, help="forwards per optimizer step")
    t.add_argument("--lr", type=partial(real, low_open=True), default=3e-3, help="peak learning rate (AdamW)")
    t.add_argument(
        "--min-lr-ratio", type=partial(real, high=1.0), default=0.1, help="final LR as a fraction of the peak (cosine)"
    )
    t.add_argument("--warmup-steps", type=nonnegative, default=20, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=real, default=0.1, help="AdamW decoupled weight decay (matrices only)")
    t.add_argument("--grad-clip", type=real, default=1.0, help="global gradient-norm cap (0 = off)")
    t.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16")
    t.add_argument("--seed", type=seed, default=0, help="seed of the weights and of the data order")
    t.add_argument("--checkpoint-every", type=nonnegative, default=0, help="steps between checkpoints (0 = at the end)")
    t.add_argument(
        "--eval-every", type=nonnegative, default=0, help="steps between held-out evaluations (0 = at the end)"
    )
    t.add_argument("--diagnostics-every", type=nonnegative, default=10, help="steps between hyper-connection gain logs")
    t.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="multi-process wrapping under torchrun")
    t.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from --out/checkpoint.pt when it exists",
    )
    t.set_defaults(func=cmd_train)

    lab = sub.add_parser("lab", formatter_class=fmt, help="the mechanism study: run recipes, report the comparison")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    r = lab_sub.add_parser(
        "run",
        formatter_class=fmt,
        help="train recipes on the study's tasks and seeds",
        description="Train each RECIPE on every task of the study (src/ctxlab/lab/study.json) "
        "for every seed; finished runs are skipped and interrupted ones resume.",
    )
    from .recipes import recipe_names

    r.add_argument(
        "recipes",
        nargs="+",
        metavar="RECIPE",
        help=f"shipped recipe names ({', '.join(recipe_names())}), recipe .json files, or 'all'",
    )
    r.add_argument("--runs", default="runs/lab", help="directory of the study's runs")
    r.add_argument("--budget", choices=("full", "reduced", "ci"), default="full", help="steps per run (study.json)")
    r.add_argument("--tasks", nargs="+", choices=("mqar", "passkey", "code"), help="only these tasks (None = all)")
    r.add_argument("--seeds", nargs="+", type=seed, help="seeds (None = the study's: 0 1 2)")
    r.add_argument(
        "--threads",
        type=positive,
        help="torch threads per process (None = torch's default; 1 is faster on a busy machine)",
    )
    r.add_argument(
        "--jobs",
        type=positive,
        default=1,
        help="runs trained at once, each in its own process (e.g. --jobs 2 --threads 1 on a 2-core machine)",
    )
    r.set_defaults(func=cmd_lab_run)
    p = lab_sub.add_parser(
        "report",
        formatter_class=fmt,
        help="table, significance and plots of a study",
        description="Mean ± std over seeds per recipe and metric, Welch's t-test marks against "
        "the baseline, plots; written into --out between the lab-report markers.",
    )
    p.add_argument("--runs", default="runs/lab", help="directory of the study's runs")
    p.add_argument("--out", default="docs/lab.md", help="markdown file to write (the marked block is replaced)")
    p.add_argument("--plots", default="docs/lab", help="directory for the PNG plots")
    p.add_argument("--baseline", default="gqa", help="recipe the t-tests compare against")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(func=cmd_lab_report)
