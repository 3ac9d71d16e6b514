"""How the benchmark scripts time rival variants on a shared, noisy machine: every repeat runs each
variant once, in turn, so drift hits all of them alike, and the median of each is reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable


def alternate(run: Callable[[str], float], names: Iterable[str], repeats: int, warmup: int = 0) -> dict[str, float]:
    """The median of ``run(name)`` (a time the call measures itself) per name, the names alternating
    within every repeat, after ``warmup`` untimed rounds."""
    names = list(names)
    for _ in range(warmup):
        for name in names:
            run(name)
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            times[name].append(run(name))
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of ``fn`` takes on ``clock``."""
    start = clock()
    fn()
    return clock() - start
