"""A prefill of the tiny-but-wide models with and without each of ctxlab's prefill-specific steps (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/prefill_steps.py --families llama,gemma4 --markdown

Each model of ``benchmarks/families.py`` (bf16, projections fused and weights packed, as ``ctxlab bench`` runs it)
prefills ``--tokens`` random tokens into a fresh cache (last position's logits only, as ``generate`` does) in four
variants that alternate within every repeat, so the machine's drift hits all alike:

* ``ctxlab``: as shipped;
* ``no gated kernel``: a gated MLP's ``act(gate) * up`` on PyTorch's two ops instead of ``ctxlab::gated_act``;
* ``no column blocks``: wide bf16 products of many rows as one ``F.linear`` instead of
  ``packing.column_blocked_linear``'s blocks;
* ``neither``: both, i.e. the code before 2026-12-05.

The variants are ablations: the script switches the two steps off by emptying ``mlp.NATIVE_ACTIVATIONS`` and
raising ``packing.GEMM_COLUMNS`` for the duration of a call. Prints the median milliseconds of each and the
speed-up of ``ctxlab`` over ``neither``.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
from alternating import alternate, timed
from families import FAMILIES, build  # benchmarks/families.py: the same models
from table_output import print_table

import ctxlab
from ctxlab.nn import mlp, packing

VARIANTS = {
    "ctxlab": (True, True),
    "no gated kernel": (False, True),
    "no column blocks": (True, False),
    "neither": (False, False),
}


@contextmanager
def steps(gated_kernel: bool, column_blocks: bool):
    """The two prefill steps on or off while the block runs."""
    activations, columns = dict(mlp.NATIVE_ACTIVATIONS), packing.GEMM_COLUMNS
    if not gated_kernel:
        mlp.NATIVE_ACTIVATIONS.clear()
    if not column_blocks:
        packing.GEMM_COLUMNS = 1 << 62
    try:
        yield
    finally:
        mlp.NATIVE_ACTIVATIONS.update(activations)
        packing.GEMM_COLUMNS = columns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="llama,qwen3-sliding,gemma4,laguna,zaya", help="of: " + ", ".join(FAMILIES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.families.split(","):
        model = build(name)
        ctxlab.fuse_projections(model)
        ctxlab.pack_linears(model)
        ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))

        @torch.no_grad()
        def prefill(variant: str, model=model, ids=ids) -> float:
            cache = model.new_cache(1, ids.shape[1])
            with steps(*VARIANTS[variant]):
                return timed(lambda: model(ids, cache=cache, last_only=True))

        medians = alternate(prefill, VARIANTS, args.repeats, warmup=1)
        cells = [f"{1e3 * medians[v]:.1f}" for v in VARIANTS]
        rows.append([name, *cells, f"{medians['neither'] / medians['ctxlab']:.2f}×"])
        del model
    cols = ["family", *(f"{v} (ms)" for v in VARIANTS), "speed-up"]
    title = f"{args.tokens}-token prefill, bf16, {torch.get_num_threads()} threads, medians of {args.repeats}"
    print_table(title, cols, rows, args.markdown, left=("family",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
