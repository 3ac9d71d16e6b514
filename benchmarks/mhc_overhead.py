"""What mHC costs: a training step (forward + backward + AdamW) and a decoded token of a model with
4 mHC residual streams against the same model with one plain residual stream, eager and under
``torch.compile``, beside DeepSeek's reported +6.7% (n = 4, fused kernels; arXiv 2512.24880).

    python benchmarks/mhc_overhead.py                      # widths 256 and 512, eager and compiled
    python benchmarks/mhc_overhead.py --widths 512 --modes eager --reference --markdown

Both models come from one config (6 ``hyper`` layers, GQA, gated MLP); only ``residual`` /
``hc_mult`` differ. Within each (width, mode) the models alternate step by step, so drift on a
shared machine hits them alike, and medians of ``--repeats`` are reported. ``--reference`` adds
mHC on its reference path (``set_hc_impl(model, "reference")``, the code before the fast path)
to the eager rows; ``--pytorch-ops`` adds the fast path with PyTorch's ops where ctxlab's native kernels
would run (``mhc_fused.pytorch_ops()``: Sinkhorn as ~40 small ops, the inference split and merge as
~30), eager and compiled, to show what the kernels change. ``--allocator retain`` (default) keeps freed host memory for reuse, as ``ctxlab
train`` does (``ctxlab.allocator``); ``--allocator glibc`` leaves the C library's defaults, under which
the mHC model re-faults ~90 MiB of freed activations every step.
"Extra FLOPs" is the floor: the matmul FLOPs of mHC's terms (ctxlab's accounting,
``decode_flops_terms(...)["hyper_connections"]``; training counts them 3x, forward + backward)
over the plain model's FLOPs; anything above it is implementation overhead (memory traffic of
the n-times wider stream, small ops).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import torch
from alternating import alternate
from table_output import print_table

import ctxlab
from ctxlab import LayerSpec, ModelConfig
from ctxlab.allocator import retain_freed_memory
from ctxlab.generate import compiled_decode_step, decode_step, prefill
from ctxlab.nn import mhc_fused
from ctxlab.nn.residual import set_hc_impl

DEEPSEEK_OVERHEAD = 0.067  # training time, n = 4 (mHC paper)
VOCAB = 4096


def config(hidden: int, layers: int, residual: str, streams: int) -> ModelConfig:
    heads = hidden // 64
    layer = LayerSpec(
        num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=64, intermediate_size=4 * hidden, block="hyper"
    )
    return ModelConfig(
        family="benchmark",
        vocab_size=VOCAB,
        hidden_size=hidden,
        layers=(layer,) * layers,
        residual=residual,
        hc_mult=streams,
        name=f"{residual} x{streams}",
    )


def build(hidden: int, layers: int) -> dict[str, torch.nn.Module]:
    return {
        "plain": ctxlab.build_model(config(hidden, layers, "plain", 1), seed=0),
        "mhc": ctxlab.build_model(config(hidden, layers, "mhc", 4), seed=0),
        "mhc_ref": set_hc_impl(ctxlab.build_model(config(hidden, layers, "mhc", 4), seed=0), "reference"),
        "mhc_pt": ctxlab.build_model(config(hidden, layers, "mhc", 4), seed=0),  # run inside pytorch_ops()
    }


def ops_of(name: str):
    """The context each model runs in: ``mhc_pt`` is the fast path on PyTorch's ops."""
    return mhc_fused.pytorch_ops() if name == "mhc_pt" else contextlib.nullcontext()


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (one thread; time spent preempted is not counted)


def train_step(fn, optimizer, ids) -> float:
    """One AdamW step on next-token loss. The ids are drawn in range, so the model's per-call range
    check (a read back to the host, and a graph break under ``torch.compile``) is skipped."""
    start = CLOCK()
    logits = fn(ids[:, :-1], check_ids=False)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return CLOCK() - start


@torch.no_grad()
def decode_ms(step, model, prompt, tokens: int) -> float:
    """Prefill ``prompt`` (untimed), then greedy-decode ``tokens`` one at a time with ``step``
    (the engine's eager or compiled decode step, as ``ctxlab generate [--compile]`` runs): ms per token."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + tokens + 1)
    token = prefill(model, prompt, cache).argmax(-1)  # [B]
    start = CLOCK()
    for _ in range(tokens):
        token = step(model, token, cache).argmax(-1)
    return (CLOCK() - start) / tokens * 1e3


def in_ops_of(run):
    """``run(name)`` inside that model's ``ops_of(name)``."""

    def wrapped(name: str) -> float:
        with ops_of(name):
            return run(name)

    return wrapped


def extra_flops(hidden: int, layers: int, seq: int) -> tuple[float, float]:
    """mHC's matmul FLOPs over the plain model's: (training step, decoded token at position ``seq``)."""
    plain, mhc = config(hidden, layers, "plain", 1), config(hidden, layers, "mhc", 4)
    per_token = ctxlab.decode_flops_terms(mhc, 0)["hyper_connections"]
    train_plain = sum(ctxlab.decode_flops(plain, t) for t in range(seq))  # forward, every position
    return per_token * seq / train_plain, per_token / ctxlab.decode_flops(plain, seq)


def measure(args, hidden: int, mode: str) -> list[dict]:
    torch.manual_seed(0)
    models = build(hidden, args.layers)
    names = ["plain", "mhc"] + (["mhc_ref"] if args.reference and mode == "eager" else [])
    names += ["mhc_pt"] if args.pytorch_ops else []
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + 1))
    flops_train, flops_decode = extra_flops(hidden, args.layers, args.seq)
    rows = []
    if "train" in args.measures:
        fns = {k: torch.compile(models[k]) if mode == "compiled" else models[k] for k in names}
        for k in names:
            models[k].train()
        optimizers = {k: torch.optim.AdamW(models[k].parameters(), lr=1e-4) for k in names}
        train = alternate(in_ops_of(lambda k: train_step(fns[k], optimizers[k], ids) * 1e3), names, args.repeats, 2)
        rows.append({"width": hidden, "mode": mode, "what": "training step", "extra_flops": flops_train, **train})
    if "decode" in args.measures:
        for k in names:
            models[k].eval()
        steps = {k: compiled_decode_step(models[k]) if mode == "compiled" else decode_step for k in names}
        prompt = ids[:1, : args.prompt]
        decode = alternate(
            in_ops_of(lambda k: decode_ms(steps[k], models[k], prompt, args.decode_tokens)), names, args.repeats, 1
        )
        rows.append({"width": hidden, "mode": mode, "what": "decode token", "extra_flops": flops_decode, **decode})
    return rows


EXTRA_MODELS = {"mhc_ref": "mHC reference", "mhc_pt": "mHC on PyTorch ops"}  # optional columns


def render(rows: list[dict], extra: list[str], markdown: bool, title: str) -> None:
    """One line per (width, mode, measure); ``extra`` models (keys of EXTRA_MODELS) get two columns each,
    "-" where a row did not time them (the reference is eager only)."""
    cols = ["width", "mode", "measure", "plain (ms)", "mHC (ms)", "mHC overhead"]
    for key in extra:
        cols += [f"{EXTRA_MODELS[key]} (ms)", f"{EXTRA_MODELS[key].replace('mHC ', '')} overhead"]
    cols += ["extra FLOPs (floor)", "DeepSeek"]
    lines = []
    for r in rows:
        line = [str(r["width"]), r["mode"], r["what"], f"{r['plain']:.1f}"]
        for key in ["mhc", *extra]:
            line += [f"{r[key]:.1f}", f"{r[key] / r['plain'] - 1:+.1%}"] if key in r else ["-", "-"]
        line += [f"+{r['extra_flops']:.1%}", "+6.7%" if r["what"] == "training step" else "-"]
        lines.append(line)
    print_table(title, cols, lines, markdown, left=("mode", "measure"))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512], help="model widths")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--measures", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--layers", type=int, default=6, help="decoder layers")
    p.add_argument("--seq", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per training step")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    p.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model (after warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: CPU time of the calling thread (needs --threads 1; robust on a busy machine)",
    )
    p.add_argument("--reference", action="store_true", help="also time mHC on its reference path (eager)")
    p.add_argument(
        "--pytorch-ops",
        action="store_true",
        help="also time mHC's fast path on PyTorch's ops instead of ctxlab's native kernels",
    )
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of a rich one")
    p.add_argument(
        "--allocator",
        choices=["retain", "glibc"],
        default="retain",
        help="retain: keep freed memory for reuse, as `ctxlab train` does (ctxlab.allocator); "
        "glibc: the C library's defaults, which return freed activations to the OS and fault them in again",
    )
    args = p.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        p.error(f"--clock cpu measures one thread's CPU time; it needs --threads 1 (got --threads {args.threads})")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.allocator == "retain" and not retain_freed_memory():
        p.error("--allocator retain needs glibc's mallopt; use --allocator glibc on this platform")
    rows = []
    for mode in args.modes:  # eager first: its rows are printed (to stderr) before any compile starts
        for hidden in args.widths:
            new = measure(args, hidden, mode)
            rows += new
            print(f"measured {new}", file=sys.stderr, flush=True)
    title = (
        f"mHC (n = 4) vs plain residual: {args.layers} layers, training batch {args.batch} x {args.seq} tokens "
        f"(fwd + bwd + AdamW), decode after a {args.prompt}-token prompt; median of {args.repeats}; "
        f"{args.clock} clock; {args.allocator} allocator; torch {torch.__version__}, {args.threads} threads, {platform.machine()}"
    )
    extra = [key for key, on in (("mhc_ref", args.reference), ("mhc_pt", args.pytorch_ops)) if on]
    render(rows, extra, args.markdown, title)


if __name__ == "__main__":
    main()
