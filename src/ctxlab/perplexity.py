"""Token-level perplexity of a text with a sliding window (HF's strided perplexity).

The method of the transformers guide "Perplexity of fixed-length models": windows of ``context``
tokens start every ``stride`` tokens; each window scores only the tokens the previous window did not
(its last ``end - previous_end`` tokens), each predicted from everything before it inside the window.
A window's first token has nothing before it inside the window and is not scored: with
``stride < context`` that is only token 0 (``tokens = len(ids) - 1``); ``stride = context`` gives
disjoint windows (fast, pessimistic) and skips the first token of each. A smaller stride gives every
scored token at least ``context - stride`` tokens of context (closer to the model's real perplexity,
more forwards).

    perplexity = exp(mean over scored tokens of -log p(token | window before it))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import InputError
from .model import CausalLM


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of every window over ``n_tokens`` tokens."""
    if context < 2:
        raise InputError(f"context = {context}: a window needs at least 2 tokens")
    if not 1 <= stride <= context:
        raise InputError(f"stride = {stride}: must be in [1, context = {context}] so that no token is skipped")
    out, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(previous_end, begin + 1)))  # a window's first token has no context
        previous_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    model: CausalLM,
    ids: Sequence[int] | torch.Tensor,
    context: int = 512,
    stride: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> dict:
    """Perplexity of the token ids ``ids`` under ``model``, ``context``-token windows every ``stride`` tokens
    (default ``context // 2``).

    Returns ``{"ppl", "nll" (mean, nats per token), "tokens" (scored), "windows", "context", "stride",
    "text_tokens"}``. ``on_window(done, total)`` is called after each window (progress bars).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise InputError(f"perplexity needs at least 2 tokens; the text has {ids.numel()}")
    stride = max(1, context // 2) if stride is None else stride
    plan = windows(ids.numel(), context, stride)
    total_nll, scored = 0.0, 0
    for k, (begin, end, first) in enumerate(plan):
        window = ids[begin:end].to(model.device)[None]  # [1, T]
        logits = model(window)[0, first - 1 - begin : end - 1 - begin].float()  # [n, V]: predict first..end-1
        logprobs = logits.log_softmax(dim=-1)
        targets = window[0, first - begin : end - begin]  # [n]
        total_nll -= logprobs.gather(-1, targets[:, None]).sum().item()
        scored += end - first
        if on_window is not None:
            on_window(k + 1, len(plan))
    nll = total_nll / scored
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": scored,
        "windows": len(plan),
        "context": context,
        "stride": stride,
        "text_tokens": int(ids.numel()),
    }
