"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv 2305.16300, §4.2), in bytes.

A 5-digit number is hidden at a random depth of repetitive filler text, and the sequence ends with the
question; the model must emit the number. Training examples have ``seq_len`` tokens and a uniform random
depth; loss is on the answer digits only. Evaluation: accuracy (all five digits right, teacher-forced)
and per-digit accuracy at each depth in ``eval_depths`` and each length in ``eval_lengths`` (lengths
beyond the trained one measure extrapolation).
"""

from __future__ import annotations

import torch

from ...errors import InputError
from ...validation import positive_int
from .base import IGNORE, Task, example_generator, require_positive_ints

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = b" What is the pass key? The pass key is "
DIGITS = 5


def _key_sentence(number: bytes) -> bytes:
    return b" The pass key is " + number + b". Remember it. " + number + b" is the pass key. "


class Passkey(Task):
    name = "passkey"

    def __init__(
        self,
        seq_len: int = 256,
        eval_lengths: tuple[int, ...] | None = None,
        eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
        eval_per_cell: int = 20,
    ):
        require_positive_ints("passkey", seq_len=seq_len, eval_per_cell=eval_per_cell)
        shortest = len(_key_sentence(b"0" * DIGITS)) + len(QUESTION) + DIGITS + 8
        eval_lengths = tuple(eval_lengths or (seq_len, 2 * seq_len))
        problems = [
            f"{name} = {length!r} is too short; need at least {shortest} bytes"
            for name, length in [("seq_len", seq_len), *(("eval_lengths entry", n) for n in eval_lengths)]
            if not positive_int(length) or length < shortest
        ]
        if not eval_lengths or not eval_depths:
            problems.append(
                f"eval_lengths = {list(eval_lengths)}, eval_depths = {list(eval_depths)}: need one or more each"
            )
        problems += [
            f"eval_depths entry {d!r}: must be a number in [0, 1]"
            for d in eval_depths
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
        ]
        if problems:
            raise InputError("passkey: " + "; ".join(problems))
        self.seq_len, self.eval_depths, self.eval_per_cell = seq_len, tuple(eval_depths), eval_per_cell
        self.eval_lengths = eval_lengths

    def _sequence(self, g: torch.Generator, length: int, depth: float | None = None):
        number = str(int(torch.randint(10 ** (DIGITS - 1), 10**DIGITS, (1,), generator=g))).encode()
        if depth is None:
            depth = float(torch.rand((), generator=g))
        key = _key_sentence(number)
        filler_len = length + 1 - len(key) - len(QUESTION) - DIGITS
        filler = (FILLER * (filler_len // len(FILLER) + 1))[:filler_len]
        cut = round(depth * filler_len)
        text = filler[:cut] + key + filler[cut:] + QUESTION + number  # length + 1 bytes
        seq = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[-DIGITS:] = seq[-DIGITS:]  # the positions that predict the answer digits
        return seq[:-1], targets

    def example(self, seed: int, index: int):
        return self._sequence(example_generator(seed, "train", index), self.seq_len)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict:
        out: dict = {"passkey_by_length": {}, "passkey_digits_by_length": {}, "passkey_by_depth": {}}
        for length in self.eval_lengths:
            by_depth = {}
            for d_i, depth in enumerate(self.eval_depths):
                pairs = [
                    self._sequence(example_generator(0, f"eval/{length}/{d_i}", i), length, depth)
                    for i in range(self.eval_per_cell)
                ]
                inputs, targets = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                pred = model(inputs)[:, -DIGITS:].argmax(-1)  # [B, 5]
                right = pred == targets[:, -DIGITS:]
                by_depth[f"{depth:g}"] = {
                    "accuracy": float(right.all(-1).float().mean()),
                    "digit_accuracy": float(right.float().mean()),
                }
            out["passkey_by_depth"][str(length)] = by_depth
            for key, name in (("passkey_by_length", "accuracy"), ("passkey_digits_by_length", "digit_accuracy")):
                out[key][str(length)] = sum(v[name] for v in by_depth.values()) / len(by_depth)
        for key, name in (
            ("passkey_by_length", "passkey_accuracy"),
            ("passkey_digits_by_length", "passkey_digit_accuracy"),
        ):
            out[name] = out[key].get(str(self.seq_len))  # eval_lengths may leave out the trained length
            out[f"{name}_2x"] = out[key].get(str(2 * self.seq_len))
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "seq_len": self.seq_len,
            "eval_lengths": list(self.eval_lengths),
            "eval_depths": list(self.eval_depths),
            "eval_per_cell": self.eval_per_cell,
        }
