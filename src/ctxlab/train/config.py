"""Training hyper-parameters as one frozen dataclass (JSON-able; recorded with every result)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``micro_batch`` sequences per process per forward; ``grad_accum`` forwards per optimizer step;
    the global batch is ``micro_batch * grad_accum * world_size`` sequences, taken in order from the
    task's seeded example stream (so a 2-process run with ``micro_batch = 4`` sees the same examples
    per step as one process with ``micro_batch = 8``). Learning rate: linear warm-up over
    ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``. AdamW with decoupled
    ``weight_decay`` on matrices only (not on norms, biases, scalars). ``grad_clip`` caps the global
    gradient norm (0 = off). ``bf16``: autocast the forward to bfloat16 (weights and optimizer stay
    float32). ``checkpoint_every`` steps (0 = only at the end) a checkpoint is written atomically;
    ``eval_every`` steps (0 = only at the end) the task's held-out evaluation runs.
    ``diagnostics_every`` steps, models with hyper-connections log their residual-mapping gains.
    ``strategy``: ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``) when launched by ``torchrun``.
    """

    steps: int = 200
    micro_batch: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    diagnostics_every: int = 10
    strategy: str = "ddp"

    def __post_init__(self):
        problems = []
        for name in ("steps", "micro_batch", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name} = {v!r}: must be a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "diagnostics_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name} = {v!r}: must be an integer >= 0")
        if not self.lr > 0:
            problems.append(f"lr = {self.lr!r}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio = {self.min_lr_ratio!r}: must be in [0, 1]")
        for name in ("grad_clip", "weight_decay"):  # written so that NaN fails too
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                problems.append(f"{name} = {v!r}: must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                problems.append(f"{name} = {v!r}: must be in [0, 1)")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append(f"strategy = {self.strategy!r}: allowed: 'ddp', 'fsdp'")
        if problems:
            raise InputError("TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"train config: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return TrainConfig(**d)
