"""What every training task provides: seeded examples by index, a batch builder and a held-out evaluation.

An example is fully determined by ``(seed, split, index)``: its generator is seeded from a hash of the
three, so the data order is fixed by the seed, any process can build any example (ranks of a
distributed run take disjoint slices of the same global batch), and resuming needs nothing but the
number of examples already consumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ...errors import InputError
from ...validation import positive_int

IGNORE = -100  # target id that contributes no loss (torch.nn.functional.cross_entropy's ignore_index)


def example_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, split, index) through SHA-256 (no correlation between neighbours)."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def require_positive_ints(task: str, **values) -> None:
    """Refuses, in one error naming each, every value that is not a positive integer (a task's sizes: a
    fractional or zero one would fail only after training, in the evaluation)."""
    bad = [f"{name} = {value!r}" for name, value in values.items() if not positive_int(value)]
    if bad:
        raise InputError(f"{task}: {', '.join(bad)}: must be positive integers")


@dataclass
class Batch:
    """``inputs`` [B, T] token ids; ``targets`` [B, T] next-token ids or ``IGNORE`` where no loss is taken."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def supervised(self) -> int:
        """Target positions that carry loss (the denominator of the mean loss)."""
        return int((self.targets != IGNORE).sum())

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.inputs[start:stop], self.targets[start:stop])


class Task:
    """Base class: subclasses set ``name`` and ``seq_len`` and implement :meth:`example` and :meth:`evaluate`."""

    name = "task"
    seq_len = 0

    def example(self, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training example ``index`` of ``seed``: (inputs [T], targets [T])."""
        raise NotImplementedError

    def batch(self, seed: int, start: int, size: int) -> Batch:
        """Examples ``start .. start + size - 1`` stacked: [size, T]."""
        pairs = [self.example(seed, start + i) for i in range(size)]
        return Batch(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict:
        """Held-out metrics (examples drawn from the ``eval`` split, never seen in training)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The task's parameters, recorded with every result."""
        return {"name": self.name, "seq_len": self.seq_len}
