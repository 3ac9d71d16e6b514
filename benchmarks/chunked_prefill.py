"""One layer's prefill attention where SDPA's defaults waste work: a chunk after earlier ones, and MLA's
narrower values (docs/benchmarks.md).

    PYTHONPATH=src python benchmarks/chunked_prefill.py --markdown

bf16, the variants alternating within every repeat, medians of --repeats (after one warm-up round):

* **a chunk after a cached history** (a cache filled in chunks, a chat's next turn), GQA 16 / 4 heads
  of 64: SDPA over the [T, S] position mask (ctxlab before, transformers) against
  ``prefix_causal_attention`` (two unmasked flash calls merged by log-sum-exp, now);
* **MLA** (16 heads, keys 192, values 128), a fresh causal prefill and a chunk after history: SDPA with
  the narrower values (its math kernel) against values zero-padded to 192 (the flash kernel, now).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from table_output import print_table

from ctxlab.attention.context import attention_mask
from ctxlab.attention.kernels import grouped_attention, prefix_causal_attention

CHUNKS = ((512, 1024), (4096, 4096), (4096, 12288))  # (chunk tokens, history tokens)
MLA = ((2048, 0), (1024, 2048))


def timed(variants: dict, repeats: int) -> dict[str, float]:
    """Median ms of each variant; the variants alternate within every round, the first round warms up."""
    times = {name: [] for name in variants}
    for _ in range(repeats + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts[1:]) for name, ts in times.items()}


def tensors(gen, heads: int, kv_heads: int, tokens: int, history: int, d: int, dv: int):
    q = torch.randn(1, heads, tokens, d, generator=gen).bfloat16()
    k = torch.randn(1, kv_heads, history + tokens, d, generator=gen).bfloat16()
    v = torch.randn(1, kv_heads, history + tokens, dv, generator=gen).bfloat16()
    pos = torch.arange(history + tokens)[None]
    return q, k, v, attention_mask(pos[:, history:], pos, None)  # [1, 1, T, S]


def before_and_after(shape: tuple[int, int], before, after, repeats: int) -> list[str]:
    """A table row: tokens, history, the two variants' median ms and the speed-up."""
    ms = timed({"before": before, "after": after}, repeats)
    return [f"{n:,}" for n in shape] + [
        f"{ms['before']:.1f}",
        f"{ms['after']:.1f}",
        f"{ms['before'] / ms['after']:.2f}×",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="print markdown tables (docs/benchmarks.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    rows = []
    for tokens, history in CHUNKS:
        q, k, v, mask = tensors(gen, 16, 4, tokens, history, 64, 64)
        masked = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
        rows.append(
            before_and_after((tokens, history), masked, lambda: prefix_causal_attention(q, k, v, 0.125), args.repeats)
        )
    cols = ["chunk tokens", "history tokens", "[T, S] mask (ms)", "prefix_causal_attention (ms)", "speed-up"]
    title = f"A chunk after history, GQA 16 / 4 × 64, bf16, {args.threads} threads, torch {torch.__version__}"
    print_table(title, cols, rows, args.markdown)

    rows = []
    for tokens, history in MLA:
        q, k, v, mask = tensors(gen, 16, 16, tokens, history, 192, 128)
        causal = history == 0
        mask = None if causal else mask
        math = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # noqa: E731
        padded = lambda: grouped_attention(q, k, v, mask, 192**-0.5, causal)  # noqa: E731
        rows.append(before_and_after((tokens, history), math, padded, args.repeats))
    cols = ["tokens", "history tokens", "values of 128: math kernel (ms)", "padded to 192: flash (ms)", "speed-up"]
    title = f"MLA prefill attention, 16 heads, bf16, {args.threads} threads"
    print_table(title, cols, rows, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
