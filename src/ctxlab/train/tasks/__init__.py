"""Training tasks with held-out evaluations: MQAR, passkey retrieval, byte-level LM on stdlib code."""

from ...errors import InputError
from .base import IGNORE, Batch, Task, example_generator
from .code_lm import CodeLM, gather
from .mqar import MQAR
from .passkey import Passkey

TASKS = {"mqar": MQAR, "passkey": Passkey, "code": CodeLM}


def make_task(name: str, **params) -> Task:
    """A task by name with its parameters (e.g. ``make_task("mqar", seq_len=128, pairs=8)``)."""
    if name not in TASKS:
        raise InputError(f"task = {name!r}: unknown task; allowed: {sorted(TASKS)}")
    try:
        return TASKS[name](**params)
    except TypeError as e:
        raise InputError(f"task {name!r}: bad parameters {sorted(params)}: {e}") from None


__all__ = ["IGNORE", "MQAR", "TASKS", "Batch", "CodeLM", "Passkey", "Task", "example_generator", "gather", "make_task"]
