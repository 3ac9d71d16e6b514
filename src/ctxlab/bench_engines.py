"""The engines ``ctxlab.bench`` times: ctxlab itself, transformers on the same weights, llama.cpp on
the same GGUF file. Each one prefills a prompt (seconds), fills a cache and times decode steps
(median ms/token), and the other two give their greedy next token at every position of a sequence
(for the token agreement with ctxlab).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .accounting import kv_cache_bytes
from .errors import CheckpointError
from .generate import compiled_decode_step, decode_step


def timed_steps(model, cache, logits: torch.Tensor, steps: int, step=decode_step) -> tuple[float, torch.Tensor]:
    """Decode ``steps`` greedy tokens after ``logits`` [B, V] through ``cache``, each step timed alone:
    (median ms per step, the last logits)."""
    times = []
    for _ in range(steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits = step(model, token, cache)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), logits


class CtxlabEngine:
    """Prefill / fill / decode of a ctxlab model, timed."""

    name = "ctxlab"

    def __init__(self, model, compile: bool = False, chunk: int = 16384):
        self.model, self.chunk = model, chunk
        self.step = compiled_decode_step(model) if compile else decode_step

    @torch.no_grad()
    def prefill_seconds(self, ids: torch.Tensor) -> float:
        cache = self.model.new_cache(1, ids.shape[1])
        start = time.perf_counter()
        self.model(ids, cache=cache, last_only=True)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode_ms(self, ids: torch.Tensor, steps: int) -> tuple[float, int]:
        """Fill a cache with ``ids`` (chunked), then time ``steps`` decode steps: (median ms, the cache's bytes at the
        context, ``ids``' length: not the room allocated for the timed steps beyond it)."""
        cache = self.model.new_cache(1, ids.shape[1] + steps)
        for start in range(0, ids.shape[1], self.chunk):
            logits = self.model(ids[:, start : start + self.chunk], cache=cache, last_only=True)[:, -1]
        ms = timed_steps(self.model, cache, logits, steps, self.step)[0]
        return ms, kv_cache_bytes(self.model.config, ids.shape[1], self.model.dtype)

    def close(self) -> None:
        pass


class TransformersEngine:
    """The same weights in transformers (saved with ``save_pretrained``, loaded with ``AutoModelForCausalLM``)."""

    name = "transformers"

    def __init__(self, model, chunk: int = 2048):
        import transformers

        self.chunk = chunk
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval()

    @torch.no_grad()
    def prefill_seconds(self, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode_ms(self, ids: torch.Tensor, steps: int) -> tuple[float, int]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for start in range(0, ids.shape[1], self.chunk):
            out = self.model(
                input_ids=ids[:, start : start + self.chunk], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        logits, times = out.logits[:, -1], []
        for _ in range(steps):
            token = logits.argmax(-1)
            start = time.perf_counter()
            logits = self.model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times), 0

    @torch.no_grad()
    def next_tokens(self, ids: torch.Tensor) -> list[int]:
        """The greedy next token after every position of ``ids`` [1, T]."""
        return self.model(input_ids=ids).logits[0].argmax(-1).tolist()

    def close(self) -> None:
        pass


class LlamaCppEngine:
    """llama-cpp-python on the same GGUF file with torch's number of threads, in a process of its own
    (``llama_cpp_worker.py``, which imports neither torch nor ctxlab).

    Not in this process: two OpenMP thread pools in one process slow torch down for good once
    llama.cpp has run (measured: SmolLM2-135M int4 decode 12.7 -> 19.4 ms/token after one llama.cpp
    prefill, still 20.7 ms a second later). Timings are taken inside the worker."""

    name = "llama.cpp"

    def __init__(self, path: str, n_ctx: int):
        worker = Path(__file__).with_name("llama_cpp_worker.py")
        self._process = subprocess.Popen(
            [sys.executable, str(worker), str(path), str(n_ctx), str(torch.get_num_threads())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            self._reply()  # loaded
        except RuntimeError as e:
            self.close()
            raise CheckpointError(f"{path}: llama.cpp cannot load it ({e})") from None

    def _reply(self):
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (code {self._process.wait()}) without replying")
        try:
            status, value = json.loads(line)
        except ValueError:
            raise RuntimeError(f"the llama.cpp worker replied {line[:200]!r}, not a JSON reply") from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def _call(self, *request):
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except OSError:  # a broken pipe: the worker is gone
            raise RuntimeError(f"the llama.cpp worker exited (code {self._process.wait()})") from None
        return self._reply()

    def prefill_seconds(self, ids: torch.Tensor) -> float:
        return self._call("prefill", ids[0].tolist())

    def decode_ms(self, ids: torch.Tensor, steps: int) -> tuple[float, int]:
        return self._call("decode", ids[0].tolist(), steps), 0

    def next_tokens(self, ids: torch.Tensor) -> list[int]:
        return self._call("next_tokens", ids[0].tolist())

    def close(self) -> None:
        """End of input stops the worker; one that does not stop within a minute is killed."""
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
