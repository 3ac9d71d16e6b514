"""The training loop: ``train(model_config, task, train_config, out_dir)``.

One process on CPU, or many under ``torchrun`` (DDP or FSDP2, see ``distributed``). Each optimizer step
takes the next global batch of the task's seeded example stream; each process takes its own slice of
each micro-batch; the loss is the sum of token losses over the global batch divided by its number of
supervised tokens, so any split over processes and micro-batches gives the same gradient up to
summation order. Writes ``metrics.jsonl`` (one line per step; evaluations and diagnostics when due),
``checkpoint.pt`` (atomic) and ``result.json`` into ``out_dir``; rerunning with ``resume=True``
continues from the checkpoint and reproduces the uninterrupted losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..accounting import count_params
from ..allocator import retain_freed_memory
from ..config import ModelConfig
from ..errors import InputError
from ..model import build_model
from . import checkpoint, distributed
from .config import TrainConfig
from .diagnostics import hyper_connections, residual_gains
from .progress import TrainProgress
from .schedule import make_scheduler
from .tasks import IGNORE, Task

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections), none on vectors (norms, biases, gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> summed cross-entropy over supervised positions (float32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def _state(model, optimizer, world: distributed.World, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def _load_state(model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def _truncate_metrics(path: Path, completed: int) -> None:
    """Drop lines of steps after the checkpoint (a killed run may have logged steps it did not save)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= completed]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _check_same_run(path: Path, state: dict, run: dict) -> None:
    """Refuses to resume from a checkpoint of another run: another training config, model, task or global batch
    (whose data positions and token counts would not continue this run's). Checkpoints written before the model,
    task and batch were recorded are checked on the training config alone."""
    differs = []
    fields = sorted(k for k, v in run["train_config"].items() if state["train_config"].get(k) != v)
    if fields:
        differs.append(f"training config (differs in {fields})")
    for key, what in (("model_config", "model config"), ("task", "task")):
        if key in state and state[key] != run[key]:
            differs.append(what)
    if "global_batch" in state and state["global_batch"] != run["global_batch"]:
        differs.append(
            f"global batch ({state['global_batch']} examples a step, here {run['global_batch']}: micro batch x "
            "accumulation x processes)"
        )
    if differs:
        raise InputError(
            f"{path}: written by a run with a different {'; '.join(differs)}; use another output directory, or "
            "resume=False (--no-resume) to start over"
        )


def train(
    model_config: ModelConfig,
    task: Task,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool | None = None,
    model_transform: Callable[[nn.Module], object] | None = None,
    extra_result: dict | None = None,
) -> dict:
    """Train a fresh model of ``model_config`` (seeded by ``cfg.seed``) on ``task``; returns the result dict
    (also written to ``out_dir/result.json`` by rank 0). ``model_transform`` edits the built model in
    place before training (e.g. the lab's unconstrained hyper-connections).

    The process keeps freed host memory for reuse from then on (:func:`ctxlab.allocator.retain_freed_memory`):
    every step frees and reallocates the same activations, which glibc would otherwise hand back to the
    OS and fault in again, page by page, at the next step."""
    retain_freed_memory()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out = {str(out)!r} is a file; the run writes a directory (result.json, metrics, checkpoint)")
    world = distributed.setup()
    fsdp = world.distributed and cfg.strategy == "fsdp"
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config, dtype=torch.float32, seed=cfg.seed, device=world.device)
    if model_transform is not None:
        model_transform(model)
    model.train()
    wrapped = distributed.wrap(model, world, cfg.strategy)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    start, train_seconds, trained_steps = 0, 0.0, 0  # steps and seconds trained, the resumed run's included
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    global_batch = cfg.micro_batch * cfg.grad_accum * world.size
    run = {  # what a checkpoint must have been written by to be resumed here
        "train_config": cfg.to_dict(),
        "model_config": model_config.to_dict(),
        "task": task.describe(),
        "global_batch": global_batch,
    }
    if resume and ckpt_path.exists():
        state = checkpoint.load(ckpt_path)
        _check_same_run(ckpt_path, state, run)
        _load_state(model, optimizer, state["model"], state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng_states(state["rng"])
        start = state["step"]
        if "train_seconds" in state:  # (checkpoints written before it was recorded: this process's time only)
            train_seconds, trained_steps = state["train_seconds"], start
        if world.main:
            _truncate_metrics(metrics_path, start)
    elif world.main and metrics_path.exists():
        metrics_path.unlink()
    distributed.barrier(world)

    tokens_per_step = global_batch * task.seq_len
    has_hc = bool(hyper_connections(model))
    autocast = (
        torch.autocast(device_type=world.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    )
    bar = TrainProgress(cfg.steps, start, f"{task.name} seed {cfg.seed}", enabled=progress if world.main else False)
    metrics = open(metrics_path, "a") if world.main else None  # noqa: SIM115 (closed in finally)
    last_eval = None
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = task.batch(cfg.seed, step * global_batch, global_batch)  # the same on every rank
            supervised = batch.supervised
            loss_sum = torch.zeros((), device=world.device)
            for m in range(cfg.grad_accum):
                offset = (m * world.size + world.rank) * cfg.micro_batch
                mb = batch.slice(offset, offset + cfg.micro_batch)
                with distributed.no_sync(wrapped, m == cfg.grad_accum - 1), autocast:
                    loss = token_loss_sum(wrapped(mb.inputs.to(world.device)), mb.targets.to(world.device))
                    # DDP / FSDP average gradients over ranks: scale so the average is sum / supervised
                    (loss * (world.size / supervised)).backward()
                loss_sum += loss.detach()
            loss_value = float(distributed.all_reduce_sum(loss_sum, world)) / supervised
            clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            trained_steps += 1
            done = step + 1
            record = {
                "step": done,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": done * tokens_per_step,
                "tokens_per_s": tokens_per_step / seconds,
            }
            if has_hc and cfg.diagnostics_every and (done % cfg.diagnostics_every == 0 or done == 1):
                record.update(residual_gains(model, mb.inputs[:2].to(world.device)))
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                model.eval()
                with autocast:
                    last_eval = task.evaluate(model)
                model.train()
                record["eval"] = last_eval
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                model_state, optim_state = _state(model, optimizer, world, fsdp)
                if world.main:
                    checkpoint.save_atomic(
                        {
                            "model": model_state,
                            "optimizer": optim_state,
                            "scheduler": scheduler.state_dict(),
                            "step": done,
                            "examples": done * global_batch,
                            "rng": checkpoint.rng_states(),
                            "train_seconds": train_seconds,
                            **run,
                        },
                        ckpt_path,
                    )
                distributed.barrier(world)
            bar.update(done, loss_value, tokens_per_step / seconds)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    if last_eval is None:  # resumed after the last step: evaluate the restored model
        model.eval()
        with autocast:
            last_eval = task.evaluate(model)
    result = {
        "task": task.describe(),
        "train": cfg.to_dict(),
        "eval": last_eval,
        "params": count_params(model_config)["total"],
        "world_size": world.size,
        "global_batch": global_batch,
        "tokens": cfg.steps * tokens_per_step,
        "tokens_per_s": trained_steps * tokens_per_step / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        **(extra_result or {}),
    }
    if world.main:
        tmp = out / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / RESULT)
    distributed.teardown(world)
    return result
