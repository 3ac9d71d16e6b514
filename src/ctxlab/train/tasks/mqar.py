"""Multi-query associative recall, MQAR (Arora et al. 2023, "Zoology", arXiv 2312.04927;
HazyResearch/zoology ``multiquery_ar``).

A sequence opens with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; the rest of the sequence holds each
key once more, in random order at random even offsets, among filler tokens (0). After each queried key
the model must emit that key's value. Keys are drawn without replacement from ``[1, vocab / 2)``,
values from ``[vocab / 2, vocab)`` (Zoology's split of the vocabulary). Loss and accuracy are taken on
the queried values only.
"""

from __future__ import annotations

import torch

from ...errors import InputError
from .base import IGNORE, Task, example_generator, require_positive_ints


class MQAR(Task):
    name = "mqar"

    def __init__(self, seq_len: int = 128, pairs: int = 8, vocab_size: int = 256, eval_examples: int = 256):
        require_positive_ints("mqar", seq_len=seq_len, pairs=pairs, vocab_size=vocab_size, eval_examples=eval_examples)
        if pairs < 1 or 4 * pairs > seq_len:
            raise InputError(
                f"mqar: pairs = {pairs} with seq_len = {seq_len}: need 1 <= pairs and 4 * pairs <= seq_len"
            )
        if vocab_size // 2 - 1 < pairs:
            raise InputError(f"mqar: pairs = {pairs} needs more than {vocab_size // 2 - 1} distinct keys (vocab_size)")
        self.seq_len, self.pairs, self.vocab_size, self.eval_examples = seq_len, pairs, vocab_size, eval_examples

    def _sequence(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, half, T = self.pairs, self.vocab_size // 2, self.seq_len
        keys = torch.randperm(half - 1, generator=g)[:n] + 1  # [n] in [1, half)
        values = torch.randint(half, self.vocab_size, (n,), generator=g)  # [n]
        seq = torch.zeros(T + 1, dtype=torch.long)  # one extra token so inputs/targets are a shift
        seq[0 : 2 * n : 2], seq[1 : 2 * n : 2] = keys, values
        slots = (T + 1 - 2 * n) // 2  # query slots: (key, value) at even offsets after the context
        where = 2 * n + 2 * torch.randperm(slots, generator=g)[:n]  # [n] positions of the queried keys
        order = torch.randperm(n, generator=g)
        seq[where], seq[where + 1] = keys[order], values[order]
        targets = torch.full((T,), IGNORE, dtype=torch.long)
        targets[where] = values[order]  # predicting position where+1 from the key at `where`
        return seq[:T], targets

    def example(self, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sequence(example_generator(seed, "train", index))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 64) -> dict:
        correct = total = 0
        for start in range(0, self.eval_examples, batch_size):
            pairs = [
                self._sequence(example_generator(0, "eval", i))
                for i in range(start, min(start + batch_size, self.eval_examples))
            ]
            inputs, targets = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            pred = model(inputs).argmax(-1)  # [B, T]
            mask = targets != IGNORE
            correct += int((pred[mask] == targets[mask]).sum())
            total += int(mask.sum())
        return {"mqar_accuracy": correct / total}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "seq_len": self.seq_len,
            "pairs": self.pairs,
            "vocab_size": self.vocab_size,
            "eval_examples": self.eval_examples,
        }
