"""llama.cpp's side of ``ctxlab bench --against llama.cpp``, run as its own process by
:class:`ctxlab.bench_engines.LlamaCppEngine` (``python llama_cpp_worker.py MODEL N_CTX THREADS``).

It imports neither torch nor ctxlab, so llama.cpp's OpenMP threads never share a process with
torch's. One JSON request per line on stdin -> one JSON reply per line on stdout:
``["prefill", tokens]`` -> seconds; ``["decode", tokens, steps]`` -> median ms per decoded token;
``["next_tokens", tokens]`` -> the greedy next token after every position. A reply is
``["ok", value]`` or ``["error", message]``; end of input stops the worker.
"""

import json
import os
import statistics
import sys
import time


def main(path: str, n_ctx: int, threads: int) -> None:
    replies = os.fdopen(os.dup(1), "w")  # the parent reads only these lines:
    os.dup2(2, 1)  # whatever llama.cpp or ggml print goes to stderr
    from llama_cpp import Llama

    def load(n: int, logits_all: bool = False) -> Llama:
        return Llama(
            model_path=path, n_ctx=n, n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False
        )

    def prefill(tokens: list) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - start

    def decode(tokens: list, steps: int) -> float:
        llm.reset()
        llm.eval(tokens)
        times, token = [], tokens[-1]
        for _ in range(steps):
            start = time.perf_counter()
            llm.eval([token])
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def next_tokens(tokens: list) -> list:
        scorer = load(len(tokens), logits_all=True)
        scorer.eval(tokens)
        return scorer.scores[: len(tokens)].argmax(-1).tolist()

    def reply(status: str, value) -> None:
        replies.write(json.dumps([status, value]) + "\n")
        replies.flush()

    try:
        llm = load(n_ctx)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which raises it)
        reply("error", f"{type(e).__name__}: {e}")
        return
    reply("ok", None)
    commands = {"prefill": prefill, "decode": decode, "next_tokens": next_tokens}
    for line in sys.stdin:
        name, *args = json.loads(line)
        try:
            reply("ok", commands[name](*args))
        except Exception as e:  # noqa: BLE001
            reply("error", f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.path.pop(0)  # this file's directory (src/ctxlab), whose modules would shadow top-level ones
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
