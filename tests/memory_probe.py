"""Run as a script by test_memory.py: build or load a model and report the process's memory (JSON).

Peak resident memory (VmHWM, reset after the imports) minus the resident memory after imports is what the model cost;
the weights and cache are counted from their tensors; the estimate is the CLI's pre-flight figure.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

import ctxlab
from ctxlab.memory import generation_bytes


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_resident() -> int:
    """VmHWM: the peak resident memory since the last reset (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Restart the peak from the current resident memory (Linux: /proc/self/clear_refs, "5")."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_up(mode: str, dtype: str) -> None:
    """Run the same code on a tiny model first, so the code pages torch faults in on first use (tens of
    MB of libtorch) are resident before the measurement starts."""
    import tempfile

    tiny = ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype=dtype)
    tiny.new_cache(1, 16)
    if mode == "load":
        with tempfile.TemporaryDirectory() as d:
            tiny.save_pretrained(d)
            ctxlab.from_pretrained(d, dtype=dtype)


def main(mode: str, source: str, dtype: str, tokens: int) -> None:
    torch.set_num_threads(1)
    cfg = ctxlab.load_config(source)
    warm_up(mode, dtype)
    reset_peak()  # imports and config parsing may have peaked higher; only the model counts
    before = resident()
    model = ctxlab.build_model(cfg, dtype=dtype) if mode == "build" else ctxlab.from_pretrained(source, dtype=dtype)
    cache = model.new_cache(1, tokens)
    for t in model.state_dict().values():  # read every weight: tensors mapped from the file count once read
        t.sum()
    peak = peak_resident()
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    estimate = generation_bytes(cfg, model.dtype, tokens)["total"]
    print(json.dumps({"peak": peak - before, "weights": weights, "cache": cache.nbytes(), "estimate": estimate}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
