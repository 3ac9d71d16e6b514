"""The linear maps of one decode step, timed through each kernel ctxlab has for them (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/linears.py --family llama --rows 1
    PYTHONPATH=src nice -n 5 python benchmarks/linears.py --family llama --rows 2048   # a prefill's products

Takes every linear weight of a tiny-but-wide model of ``benchmarks/families.py`` (bf16, projections
fused as ``ctxlab bench`` runs them, the LM head included) and multiplies ``--rows`` rows of activations
by all of them in turn, alternating the kernels within every repeat: ``F.linear`` on PyTorch's layout,
oneDNN's kernel on its blocked layout (``torch.ops.mkldnn._linear_pointwise``, ctxlab's packing for
float32), and ctxlab's native matvec on PyTorch's layout (``ctxlab::matvec``, its packing for bf16 where
the CPU has AVX512-BF16) up to 8 rows, and above that (a prefill) ``F.linear`` in blocks of at most
``GEMM_COLUMNS`` output columns (``packing.column_blocked_linear``, what ctxlab runs there). Prints the median
time per pass, the weight bytes read per second beside the copy bandwidth measured at the start
(``ctxlab.bench``'s roofline uses that bandwidth) and the arithmetic rate.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from alternating import alternate, timed
from families import FAMILIES, build  # benchmarks/families.py: the same models

import ctxlab
from ctxlab import native
from ctxlab.bench import copy_bandwidth
from ctxlab.nn.packing import GEMM_COLUMNS, MATVEC_ROWS, column_blocked_linear


def decode_weights(family: str) -> list[torch.Tensor]:
    """Every nn.Linear weight of the family's wide model in bf16, after fusing (one decode step's matmuls)."""
    model = build(family, torch.bfloat16)
    ctxlab.fuse_projections(model)
    return [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llama", choices=tuple(FAMILIES))
    p.add_argument("--rows", type=int, default=1, help="activation rows per product (1 = one decoded token)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = decode_weights(args.family)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1) for w in weights]
    gen = torch.Generator().manual_seed(0)
    inputs = {w.shape[1]: torch.randn(args.rows, w.shape[1], generator=gen).bfloat16() for w in weights}
    variants = {
        "F.linear (PyTorch's layout)": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
        "oneDNN (its blocked layout)": lambda: [
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], o, None, "none", [], "")
            for w, o in zip(weights, onednn, strict=True)
        ],
    }
    if args.rows > MATVEC_ROWS:
        variants[f"F.linear in blocks of {GEMM_COLUMNS} columns"] = lambda: [
            column_blocked_linear(inputs[w.shape[1]], w, None) for w in weights
        ]
    elif native.available():
        variants["ctxlab::matvec (PyTorch's layout)"] = lambda: [
            torch.ops.ctxlab.matvec(inputs[w.shape[1]], w, None, 1) for w in weights
        ]
    else:
        print("ctxlab's native kernels: off (no AVX512-BF16 CPU, no compiler, or CTXLAB_NATIVE_KERNELS=0)")
    bandwidth = copy_bandwidth()
    medians = alternate(lambda name: timed(variants[name]), variants, args.repeats)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flops = 2 * args.rows * sum(w.numel() for w in weights)
    print(
        f"wide-{args.family}: {len(weights)} weights, {nbytes / 1e6:.0f} MB bf16, {args.rows} row(s); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    base = medians["oneDNN (its blocked layout)"]
    for name, median in medians.items():
        rates = f"{nbytes / median / 1e9:6.1f} GB/s  {flops / median / 1e12:5.2f} TFLOP/s"
        print(f"  {name:36s} {1e3 * median:8.2f} ms  {rates}  {base / median:5.2f}× oneDNN")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
