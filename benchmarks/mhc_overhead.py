"""Training-step time of a small model with 4 mHC residual streams vs the same model with one plain
residual stream, measured side by side in one run (DeepSeek reports +6.7% at n = 4 with fused
kernels; mHC paper arXiv 2512.24880). Here mHC is plain PyTorch on the CPU: no fused Sinkhorn, no
fused stream mixing.

    python benchmarks/mhc_overhead.py [--hidden 256] [--layers 4] [--seq 256] [--batch 4] [--steps 10]

Both models are built from one config; only ``residual`` / ``hc_mult`` differ. Steps alternate
between the two models so drift on a shared machine hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import ctxlab
from ctxlab import LayerSpec, ModelConfig


def config(hidden: int, layers: int, residual: str, streams: int) -> ModelConfig:
    heads = hidden // 64
    layer = LayerSpec(num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=64, intermediate_size=4 * hidden, block="hyper")  # fmt: skip
    return ModelConfig(
        family="benchmark", vocab_size=4096, hidden_size=hidden, layers=(layer,) * layers,
        residual=residual, hc_mult=streams, name=f"{residual} x{streams}",
    )  # fmt: skip


def train_step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    args = p.parse_args()
    torch.manual_seed(0)
    models = {
        "plain residual (1 stream)": ctxlab.build_model(config(args.hidden, args.layers, "plain", 1), seed=0),
        "mHC (4 streams)": ctxlab.build_model(config(args.hidden, args.layers, "mhc", 4), seed=0),
    }
    for m in models.values():
        m.train()
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, 4096, (args.batch, args.seq + 1))
    times = {k: [] for k in models}
    for step in range(args.steps + 2):
        for k, m in models.items():  # alternate, so both see the same machine conditions
            t = train_step(m, optimizers[k], ids)
            if step >= 2:
                times[k].append(t)
    base = statistics.median(times["plain residual (1 stream)"])
    table = Table(title=f"Training step, {args.layers} layers x {args.hidden} wide, batch {args.batch} x {args.seq} "
                        f"tokens, {torch.get_num_threads()} threads")  # fmt: skip
    for col in ("Residual", "Params", "Median step (ms)", "Relative"):
        table.add_column(col, justify="left" if col == "Residual" else "right")
    for k, m in models.items():
        med = statistics.median(times[k])
        table.add_row(k, f"{sum(p.numel() for p in m.parameters()):,}", f"{med * 1e3:.1f}", f"{med / base:.3f}x")
    Console().print(table)
    overhead = statistics.median(times["mHC (4 streams)"]) / base - 1
    print(f"mHC overhead: {overhead:+.1%} (DeepSeek reports +6.7% at n = 4 with fused kernels)")


if __name__ == "__main__":
    main()
