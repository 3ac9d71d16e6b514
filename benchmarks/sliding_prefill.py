"""One sliding-window layer's prefill attention, the ways ctxlab did and does it (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/sliding_prefill.py --markdown

T prompt tokens attend causally within a window of W; bf16, head dim 64, 16 query / 4 KV heads (and
Gemma 4's 8 / 2 of 128). Variants, alternating within every repeat, medians of --repeats:
the [T, T] boolean mask handed to SDPA (ctxlab before, and transformers), plain causal SDPA (what a
global layer costs, for scale), and ``sliding_causal_attention`` in bands of 64-256 queries (now).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from table_output import print_table

from ctxlab.attention.context import attention_mask
from ctxlab.attention.kernels import BAND_QUERIES, sliding_causal_attention

SHAPES = ((2048, 512, 16, 4, 64), (2048, 1024, 16, 4, 64), (8192, 512, 16, 4, 64), (2048, 512, 8, 2, 128))
BANDS = (64, 128, 256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (docs/benchmarks.md)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cols = ["tokens", "window", "heads (q / kv × dim)", "[T, T] mask (ms)", "causal, no window (ms)"]
    cols += [f"bands of {b} (ms)" + (" default" if b == BAND_QUERIES else "") for b in BANDS] + ["speed-up"]
    rows = []
    for T, W, Hq, Hkv, D in SHAPES:
        q = torch.randn(1, Hq, T, D, generator=gen).bfloat16()
        k, v = (torch.randn(1, Hkv, T, D, generator=gen).bfloat16() for _ in range(2))
        pos = torch.arange(T)[None]
        mask = attention_mask(pos, pos, W)  # [1, 1, T, T]
        variants = {
            "mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        }
        for b in BANDS:
            variants[b] = lambda b=b: sliding_causal_attention(q, k, v, D**-0.5, W, b)
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(ts[1:]) for name, ts in times.items()}
        row = [f"{T:,}", f"{W:,}", f"{Hq} / {Hkv} × {D}", f"{ms['mask']:.1f}", f"{ms['causal']:.1f}"]
        row += [f"{ms[b]:.1f}" for b in BANDS] + [f"{ms['mask'] / ms[BAND_QUERIES]:.2f}×"]
        rows.append(row)
    title = f"Sliding-window prefill attention, bf16, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print_table(title, cols, rows, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
