"""mHC's native kernels against the same steps on PyTorch's ops, one connection at a time: Sinkhorn
(forward, backward), a connection's split and merge at inference, and in training (forward +
backward through the autograd functions the fast path uses).

    python benchmarks/mhc_kernels.py                     # N = 1 and 1024 tokens, n = 4, width 512
    python benchmarks/mhc_kernels.py --tokens 4096 --width 1024 --markdown

Each row times one step both ways, alternating call by call (medians of ``--repeats``): ctxlab's
kernels (``ctxlab/csrc/sinkhorn.cpp``, ``hyper_connection.cpp``, ``hyper_connection_backward.cpp``) and
the fast path with them turned off (``mhc_fused.pytorch_ops()``: Sinkhorn as ~40 small ops, the split
as the RMS / skinny projection / collapse products, the merge as batched matmuls). The inputs are
warm in cache, so the training rows show the kernels' own speed; inside a training step the stream
comes from memory (``benchmarks/mhc_overhead.py`` measures that whole).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch
from alternating import alternate, timed
from table_output import print_table

from ctxlab import native
from ctxlab.allocator import retain_freed_memory
from ctxlab.nn import mhc_fused
from ctxlab.nn.residual import HyperConnection


def connection(width: int, streams: int) -> HyperConnection:
    """One connection, its parameters random at init scale (gains included)."""
    hc = HyperConnection(width, streams, iters=20, eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(0.05 * torch.randn(p.shape))
    return hc


def steps(tokens: int, width: int, streams: int) -> dict[str, Callable[[], object]]:
    """One callable per row: the step on random inputs of N = ``tokens`` (one sequence)."""
    hc = connection(width, streams)
    x, y = torch.randn(1, tokens, streams, width), torch.randn(1, tokens, width)
    logits, grad = torch.randn(streams, streams, tokens), torch.randn(streams, streams, tokens)
    with torch.no_grad():
        _, (post, comb) = hc.split(x)
    x_leaf, y_leaf = x.clone().requires_grad_(), y.clone().requires_grad_()
    mixing_leaves = (post.clone().requires_grad_(), comb.clone().requires_grad_())
    g_u, g_post, g_comb, g_x = torch.randn_like(y), torch.randn_like(post), torch.randn_like(comb), torch.randn_like(x)

    def train_split():
        u, (p, c, *_) = hc.split(x_leaf)  # (the stream handed back for the merge: not used here)
        torch.autograd.backward([u, p, c], [g_u, g_post, g_comb])

    def infer_split():
        with torch.no_grad():
            hc.split(x)

    def infer_merge():
        with torch.no_grad():
            hc.merge(x, y, (post, comb))

    return {
        "Sinkhorn forward": lambda: mhc_fused.sinkhorn_forward(logits, 20, 1e-6),
        "Sinkhorn backward": lambda: mhc_fused.sinkhorn_backward(grad, logits, 20, 1e-6),
        "split, inference": infer_split,
        "merge, inference": infer_merge,
        "split, training (fwd + bwd)": train_split,
        "merge, training (fwd + bwd)": lambda: hc.merge(x_leaf, y_leaf, mixing_leaves).backward(g_x),
    }


def measure(tokens: int, width: int, streams: int, repeats: int) -> list[list[str]]:
    rows = []
    for what, step in steps(tokens, width, streams).items():

        def run(variant: str, step=step) -> float:
            if variant == "native":
                return timed(step)
            with mhc_fused.pytorch_ops():
                return timed(step)

        t = alternate(run, ["native", "pytorch"], repeats, warmup=3)
        rows.append(
            [
                what,
                str(tokens),
                f"{t['native'] * 1e3:.3f}",
                f"{t['pytorch'] * 1e3:.3f}",
                f"{t['pytorch'] / t['native']:.2f}x",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 1024], help="tokens per call (N)")
    p.add_argument("--width", type=int, default=512, help="hidden size H of each stream")
    p.add_argument(
        "--streams",
        type=int,
        default=4,
        help=f"residual streams n (the kernels take up to {native.SINKHORN_MAX_STREAMS})",
    )
    p.add_argument("--repeats", type=int, default=50, help="timed calls per variant")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of a rich one")
    args = p.parse_args()
    if not native.available():
        sys.exit(
            "ctxlab's native kernels do not run here (no AVX512-BF16 CPU, no compiler, or CTXLAB_NATIVE_KERNELS=0)"
        )
    if not 1 <= args.streams <= native.SINKHORN_MAX_STREAMS:
        p.error(f"--streams {args.streams}: the kernels take 1 to {native.SINKHORN_MAX_STREAMS}")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as in training: no page faults on the outputs' memory
    torch.manual_seed(0)
    rows = [row for tokens in args.tokens for row in measure(tokens, args.width, args.streams, args.repeats)]
    title = (
        f"mHC kernels vs PyTorch's ops: n = {args.streams}, width {args.width}, median of {args.repeats} "
        f"(alternating); torch {torch.__version__}, {args.threads} threads, {platform.machine()}"
    )
    print_table(
        title, ["step", "N", "native (ms)", "PyTorch ops (ms)", "speed-up"], rows, args.markdown, left=("step",)
    )


if __name__ == "__main__":
    main()
