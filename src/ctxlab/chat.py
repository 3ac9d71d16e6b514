"""A multi-turn chat with one model that keeps the whole conversation in ONE cache.

Each turn renders the full conversation with the model's chat template and reuses the cache when it
holds a prefix of that rendering, so only the suffix -- the end of the previous answer, the new user
message and the generation prompt -- is prefilled. Two checks, in order:

1. the tokens of the whole rendering start with the token ids in the cache (the usual case: the
   template only appends, and the answer's text re-tokenizes to the tokens the model produced);
2. the rendering starts with the *text* the cache holds (the previous prompt text plus the answer's
   tokens decoded as the answer is shown): then only the text after it is tokenized and appended to
   the cached ids. This is llama.cpp's ``common_chat_format_single`` (which diffs the text), and it
   covers answers whose text does not re-tokenize to the model's own tokens: a special token the model
   emitted that is not an end of turn (dropped from the shown text), a non-canonical split of a word,
   an answer interrupted between two tokens. The model keeps seeing exactly the tokens it produced.

When neither holds (the template rewrote earlier text, e.g. trimmed the answer), the cache is dropped
and the whole conversation is prefilled again; the turn's stats say so (``reprefilled``).

An answer ends at one of the tokenizer's end-of-turn ids (EOS and the token the template writes
after an assistant message, e.g. ``<|im_end|>``), at ``max_new_tokens``, when the context is full,
or when :attr:`ChatSession.interrupted` is set (the CLI sets it on Ctrl-C, between two tokens, so
the cache never holds half a step); the answer so far stays in the conversation.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TextIO

import torch

from .errors import CtxlabError, InputError
from .generate import decode_step, prefill, sample, sampling_generator
from .io.text_tokenizer import TextTokenizer
from .model import CausalLM


class ContextFullError(CtxlabError, ValueError):
    """The conversation no longer fits in the context the chat was started with."""


@dataclass
class TurnStats:
    """What one turn cost. ``prefill_tokens`` counts only the tokens fed this turn."""

    turn: int
    prompt_tokens: int  # the whole rendered conversation up to the generation prompt
    cached_tokens: int  # tokens already in the cache and reused
    prefill_tokens: int
    reprefilled: bool  # the cache did not hold a prefix of the new rendering: everything was prefilled
    generated_tokens: int
    stop: str  # end_of_turn | max_new_tokens | context_full | interrupted
    prefill_seconds: float
    decode_seconds: float
    context_used: int
    context: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"decode_tokens_per_s": self.decode_tokens_per_s}

    def line(self) -> str:
        """The human stats line printed after each answer."""
        prefill_rate = self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")
        again = ", the whole conversation re-prefilled (cache was not a prefix)" if self.reprefilled else ""
        stopped = "" if self.stop == "end_of_turn" else f"; stopped: {self.stop.replace('_', ' ')}"
        return (
            f"[{self.generated_tokens} tokens, {self.decode_tokens_per_s:.1f} tok/s | prefill {self.prefill_tokens} "
            f"tokens, {prefill_rate:.0f} tok/s{again} | context {self.context_used}/{self.context}{stopped}]"
        )


class ChatSession:
    """A conversation with ``model``: ``turn(text)`` streams the answer and returns its stats."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: TextTokenizer,
        context: int = 4096,
        system: str | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        prefill_chunk: int | None = None,
    ):
        if context < 1:
            raise InputError(f"context = {context}: must be a positive number of tokens")
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.generator = sampling_generator(seed, model.device)
        self.prefill_chunk = prefill_chunk
        self.stop_ids = set(tokenizer.end_of_turn_ids())
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # no template: the error, up front
        self.system = system
        self.interrupted = False
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        # "" is an empty system message (no template default); None leaves the template's own
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.turns = 0
        self.last_generated: list[int] = []  # the last answer's token ids (with its end-of-turn token)
        self._drop_cache()

    def _drop_cache(self) -> None:
        self.cache = self.model.new_cache(1, self.context)
        self.cached_ids: list[int] = []  # exactly the tokens written to self.cache, in order
        self.cached_text = ""  # the conversation text those tokens stand for (special answer tokens dropped)

    def _prompt_ids(self, text: str) -> tuple[list[int], int]:
        """(token ids of the rendered conversation ``text``, how many of them the cache already holds)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        reused = len(self.cached_ids)
        if ids[:reused] == self.cached_ids:
            return ids, reused
        if reused and text.startswith(self.cached_text):
            rest = self.tokenizer.encode(text[len(self.cached_text) :], add_special_tokens=False)
            return [*self.cached_ids, *rest], reused
        return ids, 0

    def turn(self, text: str, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None) -> TurnStats:
        """Answer the user message ``text``; ``on_text`` receives the answer's text as it grows."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt_text = self.tokenizer.apply_chat_template(messages)
        prompt, reused = self._prompt_ids(prompt_text)
        if len(prompt) >= self.context:
            raise ContextFullError(
                f"the conversation needs {len(prompt)} tokens before the answer and the context holds "
                f"{self.context} (--context): start a new conversation (/reset) or raise --context"
            )
        reprefilled = reused == 0 and bool(self.cached_ids)
        if reused == 0:
            self._drop_cache()
        self.interrupted = False
        start = time.perf_counter()
        new = torch.tensor([prompt[reused:]], dtype=torch.long, device=self.model.device)
        logits = prefill(self.model, new, self.cache, self.prefill_chunk)
        self.cached_ids = list(prompt)
        prefill_seconds = time.perf_counter() - start

        start, generated, stop = time.perf_counter(), [], "max_new_tokens"
        shown = ""
        for step in range(max_new_tokens):
            if self.interrupted:
                stop = "interrupted"
                break
            token = int(sample(logits, generator=self.generator, **self.sampling)[0])
            generated.append(token)
            if token in self.stop_ids:
                stop = "end_of_turn"
                break
            answer = self.tokenizer.decode(generated)
            if on_text is not None and not answer.endswith("\ufffd"):  # wait for the rest of a multi-byte char
                on_text(answer[len(shown) :])
                shown = answer
            if step == max_new_tokens - 1:
                break
            if len(self.cached_ids) >= self.context:
                stop = "context_full"
                break
            logits = decode_step(self.model, torch.tensor([token], device=self.model.device), self.cache)
            self.cached_ids.append(token)
        decode_seconds = time.perf_counter() - start
        self.cached_text = prompt_text + self.tokenizer.decode(self.cached_ids[len(prompt) :])
        answer = self.tokenizer.decode([t for t in generated if t not in self.stop_ids])
        if on_text is not None and len(answer) > len(shown):
            on_text(answer[len(shown) :])
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.last_generated = generated
        self.turns += 1
        return TurnStats(
            turn=self.turns,
            prompt_tokens=len(prompt),
            cached_tokens=reused,
            prefill_tokens=len(prompt) - reused,
            reprefilled=reprefilled,
            generated_tokens=len(generated),
            stop=stop,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            context_used=len(self.cached_ids),
            context=self.context,
        )


# ------------------------------------------------------------------------------------ the CLI loop


@contextmanager
def ctrl_c_stops(session: ChatSession):
    """While the block runs, Ctrl-C sets ``session.interrupted`` (the answer stops after the current
    token) instead of raising in the middle of a forward; a second Ctrl-C raises as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if session.interrupted:
            raise KeyboardInterrupt
        session.interrupted = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def user_messages(stdin: TextIO, err: TextIO) -> Iterator[str]:
    """Lines typed (a '> ' prompt on stderr when stdin is a terminal) or piped, empty lines skipped."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n").removesuffix("\r")  # a CRLF file piped in (stdin does not translate it)


def run_chat(
    session: ChatSession,
    messages: Iterable[str],
    max_new_tokens: int,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Answer each message (``/reset`` forgets the conversation, ``/exit`` ends); stream answers to ``out``
    (or one JSON object per turn with ``as_json``), a stats line per answer to ``err``."""
    code = 0
    for text in messages:
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            err.write("[conversation reset]\n")
            continue

        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            with ctrl_c_stops(session):
                stats = session.turn(text, max_new_tokens, on_text=None if as_json else show)
        except ContextFullError as e:  # this message is dropped; /reset can still start over
            err.write(f"ctxlab chat: error: {e}\n")
            code = 2
            continue
        if as_json:
            out.write(
                json.dumps(
                    {
                        "user": text,
                        "answer": session.messages[-1]["content"],
                        "generated_ids": session.last_generated,
                        **stats.as_dict(),
                    }
                )
                + "\n"
            )
        else:
            out.write("\n")
        out.flush()
        if stats.stop == "context_full":
            err.write(
                f"ctxlab chat: the context is full ({session.context} tokens, --context): the answer was cut; "
                "/reset starts a new conversation, or restart with a larger --context\n"
            )
        err.write(stats.line() + "\n")
        err.flush()
    return code
