"""Measured speed of one model on this machine: prefill tokens/s, decode ms/token at given context
lengths, peak RSS, cache bytes and the decode roofline ratio; optionally the same measurements of
the same weights in transformers (or llama.cpp on a GGUF file) in the same run.

* Bandwidth: a copy benchmark (``dst.copy_(src)`` of 256 MiB, median of 5) at the start; bytes
  moved (read + write) per second.
* Prefill of ``P`` tokens: one untimed prefill per engine first (oneDNN creates and JIT-compiles its
  kernels for each new product shape at first use; an MoE layer's expert batches bring new shapes), then
  ``repeats`` timed ones, the engines alternating; tokens/s from the median.
* Decode at context ``C``: a cache of ``C + steps`` tokens is filled with ``C`` random tokens by a
  prefill (not timed; chunks of 16,384 tokens in ctxlab, 2,048 in transformers, whose masked
  attention would otherwise materialize C × C), then ``steps`` one-token decode steps are timed; ms/token is their
  median, repeated ``repeats`` times (the median of the repeats is reported). Against transformers,
  the two engines alternate within every repeat, so both see the same machine load.
* Roofline: bytes one decode step must read (the weights a token uses: every parameter and buffer
  except the untied input embedding and unchosen experts, plus the cache's bytes at that context)
  divided by the measured bandwidth; ratio = measured ms ÷ that time (1.0 = at the memory bound).
* Greedy-token agreement (against another engine): ctxlab greedily continues a fixed English text
  (tokenized by the model's own tokenizer when MODEL has one, else seeded random ids) by
  ``agreement_tokens``; the other engine is fed that same sequence and its greedy choice at every
  generated position is compared with ctxlab's (``agree`` of ``new_tokens``; ``leading``: how
  many of them match before the first difference, i.e. what both would generate identically).
"""

from __future__ import annotations

import importlib.util
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .accounting import count_params
from .bench_engines import CtxlabEngine, LlamaCppEngine, TransformersEngine
from .errors import CtxlabError, InputError
from .generate import generate
from .io.gguf import is_gguf
from .quant import lookup_only_bytes, weight_bytes

AGAINST = ("transformers", "llama.cpp")


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (read + write), median of ``repeats``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def decode_read_bytes(model, cache_bytes: int) -> int:
    """Bytes one decode step reads at least: the weights a token uses, plus the cache. The embedding
    lookups' own bytes (an untied table, an int4 tied table's row codes, Gemma 4's per-layer embedding table)
    are left out: a token reads one row."""
    counts = count_params(model.config)
    looked_up = (0 if model.config.tie_word_embeddings else counts["embedding"]) + counts["per_layer_embedding"]
    per_param = (weight_bytes(model) - lookup_only_bytes(model)) / (counts["total"] - looked_up)  # quantized too
    return int((counts["active"] - looked_up) * per_param) + cache_bytes


def check_against(against: str | None, quantization: str | None, source: str | None = None) -> None:
    """Refuse a comparison :func:`bench` cannot make (the CLI asks before it loads the model ``source``)."""
    if against is not None and against not in AGAINST:
        raise InputError(f"against = {against!r}: allowed: {list(AGAINST)} or None")
    if against == "llama.cpp" and source is not None and not is_gguf(source):
        raise InputError(f"against = 'llama.cpp' runs MODEL as a GGUF file, and {source!r} is not one")
    if against == "transformers" and quantization:
        raise InputError(
            f"against = 'transformers' with a model quantized {quantization}: transformers cannot load "
            "ctxlab's quantized weights; compare in bf16 (no --quantize), or a GGUF file against llama.cpp"
        )


def _random_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def against_unavailable(against: str, source: str | None) -> str | None:
    """Why the comparison ``against`` cannot run here (None: it can)."""
    if against == "transformers":
        return None if importlib.util.find_spec("transformers") else "transformers is not installed"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python); the llama.cpp column is skipped"
    if source is None or not is_gguf(source):
        return f"--against llama.cpp needs MODEL to be a GGUF file; got {source!r}"
    return None


AGREEMENT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years"
)


def agreement_prompt(model, source: str | None, seed: int) -> torch.Tensor:
    """[1, T] ids of :data:`AGREEMENT_TEXT` by MODEL's tokenizer, or 32 seeded random ids without one."""
    readable = source is not None and (
        is_gguf(source) or (Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file())
    )
    if readable:
        from .io.text_tokenizer import load_tokenizer

        try:
            return torch.tensor([load_tokenizer(source).encode(AGREEMENT_TEXT)])
        except CtxlabError:
            pass  # a tokenizer ctxlab does not read: random ids
    return _random_ids(model.config.vocab_size, 32, seed)


def greedy_agreement(model, other, prompt: torch.Tensor, new_tokens: int) -> dict:
    """ctxlab's greedy continuation of ``prompt`` against ``other``'s greedy choice at each of its positions."""
    sequence = generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=[])  # [1, P + N]
    P = prompt.shape[1]
    ours = sequence[0, P:].tolist()
    theirs = other.next_tokens(sequence[:, :-1])[P - 1 :]  # the choice after each of positions P-1 ..
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    leading = same.index(False) if False in same else len(same)
    return {"prompt_tokens": P, "new_tokens": len(ours), "agree": sum(same), "leading": leading}


def bench(
    model,
    contexts: Sequence[int] = (512, 4096, 16384),
    prompts: Sequence[int] = (512, 2048),
    steps: int = 16,
    repeats: int = 3,
    against: str | None = None,
    compile: bool = False,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    agreement_tokens: int = 64,
) -> dict:
    """Measure ``model`` (a ctxlab ``CausalLM``); returns a dict of plain numbers (see the module doc).

    ``against``: ``"transformers"`` or ``"llama.cpp"`` (then ``source`` is the GGUF path) runs the same
    measurements on the other engine, alternating with ctxlab in every repeat; the result says why
    when the comparison cannot run, and how often the two pick the same greedy token
    (``agreement_tokens`` positions, 0 = skip). ``progress(message)`` is called before each measurement."""
    for name, values in (("contexts", contexts), ("prompts", prompts)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise InputError(f"{name} = {list(values)}: give at least one length, each a positive integer")
    if steps < 1 or repeats < 1 or agreement_tokens < 0:
        raise InputError(
            f"steps = {steps}, repeats = {repeats}, agreement_tokens = {agreement_tokens}: "
            "steps and repeats must be >= 1, agreement_tokens >= 0"
        )
    check_against(against, getattr(model, "quantization", None))
    say = progress or (lambda message: None)
    say("copy bandwidth")
    bandwidth = copy_bandwidth()
    engines = [CtxlabEngine(model, compile=compile)]
    skipped = against_unavailable(against, source) if against else None
    try:
        if against and not skipped:
            say(f"loading {against}")
            n_ctx = max(*contexts, *prompts) + steps
            engines.append(TransformersEngine(model) if against == "transformers" else LlamaCppEngine(source, n_ctx))
        prompt = agreement_prompt(model, source, seed) if len(engines) > 1 and agreement_tokens else None
        result = _measure(model, engines, contexts, prompts, steps, repeats, compile, say, seed)
        if prompt is not None:
            say(f"greedy agreement with {engines[1].name}")
            result["greedy_agreement"] = greedy_agreement(model, engines[1], prompt, agreement_tokens)
    finally:
        for engine in engines:
            engine.close()
    result.update(bandwidth_gb_s=bandwidth / 1e9, against=against, against_skipped=skipped)
    for row in result["decode"]:
        read = decode_read_bytes(model, row["cache_bytes"])
        row["bytes_read_per_token"] = read
        row["roofline_ms"] = 1e3 * read / bandwidth
        row["roofline_ratio"] = row["ctxlab_ms_per_token"] / row["roofline_ms"]
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _measure(model, engines, contexts, prompts, steps, repeats, compile, say, seed) -> dict:
    """Prefill and decode timings of every engine, alternating within each repeat."""
    vocab = model.config.vocab_size
    result = {
        "model": model.config.name or model.config.family,
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": getattr(model, "quantization", None),
        "fused_projections": getattr(model, "fused_projections", 0),  # groups run as one matmul (nn.fusion)
        "packed_linears": getattr(model, "packed_linears", 0),  # on the native matvec or oneDNN (nn.packing)
        "compile": compile,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "weight_bytes": weight_bytes(model),
        "prefill": [],
        "decode": [],
    }
    if compile:  # warm-up (compilation) measured on its own: an untimed decode at the shortest context,
        # so the graphs the timed steps need (sizes there, a compression block completing) exist
        say("compiling the decode step")
        start = time.perf_counter()
        engines[0].decode_ms(_random_ids(vocab, min(contexts, default=8), seed), steps)
        result["compile_seconds"] = time.perf_counter() - start
    for n in prompts:
        ids = _random_ids(vocab, n, seed)
        seconds = {e.name: [] for e in engines}
        for e in engines:
            say(f"prefill {n} tokens: {e.name} (warm-up)")
            e.prefill_seconds(ids)
        for r in range(repeats):
            for e in engines:
                say(f"prefill {n} tokens: {e.name} ({r + 1}/{repeats})")
                seconds[e.name].append(e.prefill_seconds(ids))
        row = {"prompt_tokens": n}
        for e in engines:
            row[f"{e.name}_tokens_per_s"] = n / statistics.median(seconds[e.name])
        result["prefill"].append(row)
    for c in contexts:
        ids = _random_ids(vocab, c, seed)
        ms = {e.name: [] for e in engines}
        cache_bytes = 0
        for r in range(repeats):
            for e in engines:
                say(f"decode at {c} tokens: {e.name} ({r + 1}/{repeats})")
                value, nbytes = e.decode_ms(ids, steps)
                ms[e.name].append(value)
                cache_bytes = nbytes or cache_bytes
        row = {"context": c, "cache_bytes": cache_bytes}
        for e in engines:
            row[f"{e.name}_ms_per_token"] = statistics.median(ms[e.name])
        result["decode"].append(row)
    if len(engines) > 1:  # ctxlab's speed-up over the other engine
        other = engines[1].name
        for row in result["prefill"]:
            row["speedup"] = row["ctxlab_tokens_per_s"] / row[f"{other}_tokens_per_s"]
        for row in result["decode"]:
            row["speedup"] = row[f"{other}_ms_per_token"] / row["ctxlab_ms_per_token"]
    return result


def tables(result: dict) -> list:
    """Rich tables of a :func:`bench` result: prefill, then decode."""
    from rich.table import Table

    other = result["against"] if result["against"] and not result["against_skipped"] else None
    pre = Table(
        title=f"prefill — {result['model']} ({result['dtype']}"
        f"{', ' + result['quantization'] if result['quantization'] else ''}), {result['threads']} threads"
    )
    pre.add_column("prompt tokens", justify="right")
    pre.add_column("ctxlab tok/s", justify="right")
    if other:
        pre.add_column(f"{other} tok/s", justify="right")
        pre.add_column("ctxlab ÷ " + other, justify="right")
    for row in result["prefill"]:
        cells = [str(row["prompt_tokens"]), f"{row['ctxlab_tokens_per_s']:.0f}"]
        if other:
            cells += [f"{row[f'{other}_tokens_per_s']:.0f}", f"{row['speedup']:.2f}×"]
        pre.add_row(*cells)
    dec = Table(
        title=f"decode — copy bandwidth {result['bandwidth_gb_s']:.1f} GB/s, weights "
        f"{result['weight_bytes'] / 2**20:.1f} MiB"
    )
    for name in ("context", "cache MiB", "ctxlab ms/token", "roofline ms", "÷ roofline"):
        dec.add_column(name, justify="right")
    if other:
        dec.add_column(f"{other} ms/token", justify="right")
        dec.add_column(f"speed-up vs {other}", justify="right")
    for row in result["decode"]:
        cells = [
            str(row["context"]),
            f"{row['cache_bytes'] / 2**20:.1f}",
            f"{row['ctxlab_ms_per_token']:.2f}",
            f"{row['roofline_ms']:.2f}",
            f"{row['roofline_ratio']:.2f}",
        ]
        if other:
            cells += [f"{row[f'{other}_ms_per_token']:.2f}", f"{row['speedup']:.2f}×"]
        dec.add_row(*cells)
    return [pre, dec]
