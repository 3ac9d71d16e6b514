"""Learning-rate schedule: linear warm-up then cosine decay (Loshchilov & Hutter 2017, SGDR, without restarts)."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): ``(step + 1) / warmup``
    during warm-up, then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2`` down to
    ``min_ratio`` at ``total`` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
