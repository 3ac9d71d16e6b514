"""One decode step of attention over S cached tokens, the ways ctxlab did and does it (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/decode_attention.py --keys 16384

16 query heads, 4 KV heads, head dim 64, bf16, one query token; medians of --repeats, the variants
alternating within every repeat. ``grouped_attention`` is ctxlab's decode path: its native kernel where
the CPU has AVX512-BF16 (``ctxlab.attention.decode_kernel``), the grouped SDPA call otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ctxlab import native
from ctxlab.attention.kernels import grouped_attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, Hq, Hkv, D, S = 1, 16, 4, 64, args.keys
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=gen).bfloat16()
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    variants = {
        "SDPA enable_gqa + boolean mask (before)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        ),
        "SDPA enable_gqa, no mask": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "grouped SDPA: heads folded into the query axis": lambda: F.scaled_dot_product_attention(
            q.view(B, Hkv, Hq // Hkv, D), k, v, scale=D**-0.5
        ),
        "grouped_attention (now)": lambda: grouped_attention(q, k, v, None, D**-0.5),
    }
    print(f"ctxlab's decode kernel: {'on' if native.available() else 'off (SDPA)'}")
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    kv_bytes = 2 * k.numel() * k.element_size()
    print(f"keys {S}, K+V {kv_bytes / 2**20:.1f} MiB, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"  {name:50s} {1e3 * statistics.median(ts):8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
