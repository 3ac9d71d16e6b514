"""argparse types shared by ctxlab's commands (``ctxlab.cli``, ``ctxlab.lab.cli``): each turns a bad value into
a one-line usage error naming the value and what is allowed, instead of a traceback later."""

from __future__ import annotations

import argparse
import math
from functools import partial

from .errors import InputError
from .generate import sampling_generator

MAX_TOKENS = 1 << 40  # no cache or context anywhere near it; larger numbers are typos


def count(text: str, minimum: int = 1, suffixes: bool = False, maximum: int = MAX_TOKENS) -> int:
    """An integer in [minimum, maximum]; with ``suffixes``, '128k' = 128 * 1024 and '1m' = 1024 * 1024."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1) if suffixes else 1
    try:
        n = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        n = minimum - 1
    if not minimum <= n <= maximum:
        example = ", e.g. 4096 or 128k" if suffixes else ""
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in [{minimum}, 2^40 = {maximum}]{example}")
    return n


tokens = partial(count, suffixes=True)  # argparse types
positive = partial(count, minimum=1)
nonnegative = partial(count, minimum=0)


def real(text: str, low: float = 0.0, high: float = math.inf, low_open: bool = False, what: str = "") -> float:
    """A finite number in [low, high] (or (low, high] with ``low_open``); nan and inf are refused."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and (x > low if low_open else x >= low) and x <= high):
        bound = (
            f"{'(' if low_open else '['}{low:g}, {high:g}]"
            if math.isfinite(high)
            else f"{'>' if low_open else '>='} {low:g}"
        )
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number {bound}{what}")
    return x


def seed(text: str) -> int:
    """A seed torch's generator takes (:func:`ctxlab.generate.sampling_generator`'s rule)."""
    try:
        n = int(text)
        sampling_generator(n, "cpu")
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in [-2^63, 2^64)") from None
    return n


temperature = partial(real, what=" (0 = greedy)")
probability = partial(real, high=1.0, low_open=True)
gibibytes = partial(real, low_open=True, what=" GiB")
