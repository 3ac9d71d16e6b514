"""``ctxlab lab run``: train recipes on the study's tasks and seeds, one result directory per run.

Layout: ``<runs>/<recipe>/<task>/seed<k>/{result.json, metrics.jsonl, checkpoint.pt}`` and
``<runs>/corpus.json`` (the code corpus manifest: every file's path, split and SHA-256). A run whose
``result.json`` exists with the same model, task and training config is skipped (one of another model is
trained again), and an interrupted run resumes from its
checkpoint (deleted once the run has finished), so rerunning the documented command completes a study instead of repeating it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..train import TrainConfig, make_task, train
from ..train.loop import CHECKPOINT, RESULT
from ..validation import positive_int
from .recipes import load_recipe

BUDGETS = ("full", "reduced", "ci")


def study() -> dict:
    return json.loads((resources.files("ctxlab.lab") / "study.json").read_text())


def run_plan(budget: str, tasks: list[str] | None = None) -> list[tuple[str, dict, TrainConfig]]:
    """[(task name, task params, TrainConfig without the seed)] for ``budget``."""
    s = study()
    if budget not in s["budgets"]:
        raise InputError(f"budget = {budget!r}: allowed: {sorted(s['budgets'])}")
    b = s["budgets"][budget]
    unknown = sorted(set(tasks or ()) - set(s["tasks"]))
    if unknown:
        raise InputError(f"tasks {unknown}: unknown; allowed: {sorted(s['tasks'])}")
    plan = []
    for name, spec in s["tasks"].items():
        if tasks and name not in tasks:
            continue
        train_kw = {**spec["train"], **b.get("train", {}), "steps": b["steps"][name]}
        plan.append((name, {**spec["params"], **b.get("eval", {}).get(name, {})}, TrainConfig(**train_kw)))
    return plan


def run_recipe(
    name: str,
    runs: str | Path,
    budget: str = "full",
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool | None = None,
    log=print,
) -> list[dict]:
    """Train recipe ``name`` on every planned task x seed; returns the results (skipped runs included)."""
    recipe = load_recipe(name)
    runs = Path(runs)
    seeds = list(seeds if seeds is not None else study()["seeds"])
    results = []
    for task_name, params, base_cfg in run_plan(budget, tasks):
        task = make_task(task_name, **params)
        if task_name == "code":
            _write_corpus(runs, task.manifest)
        for seed in seeds:
            cfg = TrainConfig.from_dict({**base_cfg.to_dict(), "seed": seed})
            out = runs / recipe.name / task_name / f"seed{seed}"
            done = out / RESULT
            if done.exists():
                old = json.loads(done.read_text())
                if _same_run(old, recipe, cfg, task):
                    log(f"{recipe.name} {task_name} seed {seed}: done already ({done})")
                    results.append(old)
                    continue
                log(f"{recipe.name} {task_name} seed {seed}: {done} is of another model, task or training; retraining")
            start = time.perf_counter()
            extra = {"recipe": recipe.to_dict(), "budget": budget}
            result = train(
                recipe.config,
                task,
                cfg,
                out,
                resume=True,
                progress=progress,
                model_transform=recipe.model_transform(),
                extra_result=extra,
            )
            speed = f", {result['tokens_per_s']:.0f} tok/s" if result["tokens_per_s"] else ""
            log(
                f"{recipe.name} {task_name} seed {seed}: {_headline(result)} ({time.perf_counter() - start:.0f} s{speed})"
            )
            (out / CHECKPOINT).unlink(missing_ok=True)  # finished: result.json marks it done; save the disk
            results.append(result)
    return results


def _same_run(old: dict, recipe, cfg: TrainConfig, task) -> bool:
    """Whether a finished run's result is of this run: the same model (config and transform), task and training
    config. (Its recorded costs may be older than the accounting: ``lab report`` recomputes them.)"""
    trained = old.get("recipe", {})
    return (
        old.get("train") == cfg.to_dict()
        and old.get("task") == task.describe()
        and trained.get("config") == json.loads(json.dumps(recipe.config.to_dict()))  # as result.json holds it
        and trained.get("transform") == recipe.transform
    )


def run_study(
    names: list[str],
    runs: str | Path,
    budget: str = "full",
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
    jobs: int = 1,
    log=print,
) -> None:
    """:func:`run_recipe` for every recipe; with ``jobs > 1`` the (recipe, task, seed) runs are shared
    out to ``jobs`` worker processes (spawned, ``threads`` torch threads each). Every run writes only
    its own directory, so runs in parallel cannot disturb each other's results."""
    if not positive_int(jobs):
        raise InputError(f"jobs = {jobs!r}: must be a positive integer")
    if threads is not None and not positive_int(threads):
        raise InputError(f"threads = {threads!r}: must be a positive integer (None = torch's default)")
    for name in names:
        load_recipe(name)  # every bad name is reported before anything trains
    run_plan(budget, tasks)
    seeds = list(seeds if seeds is not None else study()["seeds"])
    units = [(n, [t], [s]) for n in names for t, _, _ in run_plan(budget, tasks) for s in seeds]
    if jobs == 1:
        _set_threads(threads)
        for name, unit_tasks, unit_seeds in units:
            run_recipe(name, runs, budget, unit_tasks, unit_seeds, log=log)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_unit, name, str(runs), budget, t, s) for name, t, s in units]
        for future in as_completed(futures):
            for line in future.result():
                log(line)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_unit(name: str, runs: str, budget: str, tasks: list[str], seeds: list[int]) -> list[str]:
    """One worker's run; its log lines are returned to the parent, which prints them in one place."""
    lines: list[str] = []
    run_recipe(name, runs, budget, tasks, seeds, progress=False, log=lines.append)
    return lines


def _headline(result: dict) -> str:
    e = result["eval"]
    for key in ("mqar_accuracy", "passkey_accuracy", "bits_per_byte"):
        if key in e:
            return f"{key} {e[key]:.4f}"
    return ""


def _write_corpus(runs: Path, manifest: dict) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "corpus.json"
    if path.exists() and json.loads(path.read_text()).get("sha256") == manifest["sha256"]:
        return
    tmp = path.with_name(f"corpus.json.{os.getpid()}.tmp")  # runs in parallel write the same manifest
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, path)
