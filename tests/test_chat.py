"""``ctxlab chat`` on a tiny random checkpoint: one cache across turns (only the new tokens are prefilled),
answers equal to transformers' greedy continuation of the whole conversation, stops, Ctrl-C, context limit."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctxlab
from ctxlab.chat import ChatSession
from ctxlab.chat_template import ChatTemplateError

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
from tiny_chat_checkpoint import CHATML, write_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(checkpoint)


def console(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The installed ``ctxlab`` console script, with this worktree's sources."""
    exe = Path(sys.executable).with_name("ctxlab")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [str(exe), *argv], check=False, input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def hf_greedy(reference, messages: list[dict], n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer ids up to and including <|im_end|>) from transformers alone."""
    _, tok = reference
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    return prompt, hf_continue(reference, prompt, n)


def hf_continue(reference, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of the token ids ``prompt``, up to and including <|im_end|>."""
    model, tok = reference
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


# "tell me about cats": an answer of plain words, whose text re-tokenizes to the same ids, so the tokens of the next
# rendering start with the cache. "hello what is the sky": the answer holds <|endoftext|>, which its shown text (special
# tokens skipped) loses, so the next rendering's tokens differ from the cache; its text still extends the text the cache
# stands for, so only that extension is tokenized and prefilled after the model's own tokens.
@pytest.mark.parametrize(("question", "same_tokens"), [("tell me about cats", True), ("hello what is the sky", False)])
def test_two_piped_turns(checkpoint, reference, question, same_tokens):
    _, hf_tok = reference
    run = console(
        "chat", str(checkpoint), "--json", "--max-new-tokens", "6", stdin=f"{question}\n\ntell me about the sea\n"
    )
    assert run.returncode == 0, run.stderr
    first, second = (json.loads(line) for line in run.stdout.splitlines())

    # turn 1 is transformers' greedy answer to the rendered question
    user1 = {"role": "user", "content": question}
    prompt1, answer1 = hf_greedy(reference, [user1], 6)
    assert first["prompt_tokens"] == first["prefill_tokens"] == len(prompt1)
    assert first["generated_ids"] == answer1
    assert first["answer"] == hf_tok.decode(answer1, skip_special_tokens=True)

    # turn 2: the cache held the first prompt and every answer token fed back (all but the last one sampled)
    conversation = [
        user1,
        {"role": "assistant", "content": first["answer"]},
        {"role": "user", "content": "tell me about the sea"},
    ]
    prompt2, answer2 = hf_greedy(reference, conversation, 6)
    cached = prompt1 + answer1[:-1]
    assert (prompt2[: len(cached)] == cached) is same_tokens
    if not same_tokens:  # the cached ids, then the tokens of the text after the cached text
        text = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        cached_text = hf_tok.apply_chat_template([user1], add_generation_prompt=True, tokenize=False)
        cached_text += hf_tok.decode(answer1[:-1], skip_special_tokens=True)
        assert text.startswith(cached_text)
        prompt2 = cached + hf_tok.encode(text[len(cached_text) :], add_special_tokens=False)
        answer2 = hf_continue(reference, prompt2, 6)
    assert (second["reprefilled"], second["cached_tokens"]) == (False, len(cached))
    assert (second["prompt_tokens"], second["prefill_tokens"]) == (len(prompt2), len(prompt2) - len(cached))
    assert "re-prefilled" not in run.stderr
    assert second["generated_ids"] == answer2  # the answer transformers gives to the same ids
    assert run.stderr.count("tok/s") == 4  # prefill and decode rates after each answer


def test_a_template_that_rewrites_history_prefills_everything_again(tmp_path):
    """When the new rendering changes text the cache already holds (here: a message count at the top), neither the
    tokens nor the text extend the cache: it is dropped and the whole conversation prefilled, and the answer is
    still transformers' greedy answer to the whole rendering."""
    counted = "{{ messages | length }} messages\n" + CHATML
    path = write_checkpoint(tmp_path / "counted", chat_template=counted)
    reference = (
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
        transformers.AutoTokenizer.from_pretrained(path),
    )
    session = ChatSession(ctxlab.from_pretrained(path), ctxlab.load_tokenizer(path), context=256)
    session.turn("tell me about cats", max_new_tokens=4)
    stats = session.turn("tell me about the sea", max_new_tokens=4)
    prompt, answer = hf_greedy(reference, session.messages[:-1], 4)
    assert (stats.reprefilled, stats.cached_tokens, stats.prefill_tokens) == (True, 0, len(prompt))
    assert session.last_generated == answer
    assert "re-prefilled" in stats.line()


def test_message_option_streams_text(checkpoint, reference):
    _, hf_tok = reference
    run = console("chat", str(checkpoint), "--message", "hi", "--max-new-tokens", "5", "--system", "you are a sky")
    assert run.returncode == 0, run.stderr
    messages = [{"role": "system", "content": "you are a sky"}, {"role": "user", "content": "hi"}]
    _, answer = hf_greedy(reference, messages, 5)
    assert run.stdout.strip() == hf_tok.decode(answer, skip_special_tokens=True).strip()
    assert "tok/s" in run.stderr


def test_an_empty_system_message_replaces_the_templates_default(checkpoint, reference):
    """``--system ""`` renders an empty system message; only no ``--system`` leaves the template's own."""
    _, hf_tok = reference
    run = console("chat", str(checkpoint), "--json", "--message", "hi", "--max-new-tokens", "1", "--system", "")
    assert run.returncode == 0, run.stderr
    empty = hf_tok.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    default = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    assert json.loads(run.stdout)["prompt_tokens"] == len(empty) != len(default)


def test_piped_crlf_lines_lose_their_carriage_returns():
    from ctxlab.chat import user_messages

    assert list(user_messages(io.StringIO("what is it?\r\n\r\nthanks\r\n"), io.StringIO())) == ["what is it?", "thanks"]


def test_model_without_chat_template(tmp_path):
    path = write_checkpoint(tmp_path / "base", chat_template=None)
    run = console("chat", str(path), "--message", "hi")
    assert run.returncode == 2
    assert "no chat template" in run.stderr and "ctxlab generate" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ctxlab.load_tokenizer(path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_context_past_the_trained_one_or_the_memory_limit_is_refused_before_loading(checkpoint):
    run = console("chat", str(checkpoint), "--context", "600", "--message", "hi")  # trained for 512
    assert run.returncode == 2 and "--context = 600 positions" in run.stderr and "Traceback" not in run.stderr
    argv = ["chat", str(checkpoint), "--context", "1m", "--allow-past-max-positions", "--message", "hi"]
    run = console(*argv, "--max-memory-gb", "0.01")
    assert run.returncode == 2 and "--max-memory-gb 0.01" in run.stderr and "Traceback" not in run.stderr
    run = console("chat", str(checkpoint), "--message", "hi", "--max-new-tokens", "2", "--top-k", "5")
    assert run.returncode == 0, run.stderr
    assert "/512;" in run.stderr  # the default context: the trained one, under 4096
    assert "--top-k has no effect at --temperature 0" in run.stderr


def test_context_full(checkpoint):
    run = console("chat", str(checkpoint), "--context", "30", "--message", "hi", "--max-new-tokens", "50")
    assert run.returncode == 0, run.stderr
    assert "the context is full (30 tokens, --context)" in run.stderr and "stopped: context full" in run.stderr
    long = " ".join(["tell me about cats and dogs"] * 10)
    run = console("chat", str(checkpoint), "--context", "30", "--message", long)
    assert run.returncode == 2
    assert "needs" in run.stderr and "30 (--context)" in run.stderr and "Traceback" not in run.stderr


def test_interrupt_keeps_the_conversation(checkpoint, reference):
    model = ctxlab.from_pretrained(checkpoint)
    session = ChatSession(model, ctxlab.load_tokenizer(checkpoint), context=256)
    pieces = []

    def stop_after_two(piece: str) -> None:  # what the Ctrl-C handler does, between two tokens
        pieces.append(piece)
        if len(pieces) == 2:
            session.interrupted = True

    stats = session.turn("tell me about cats", max_new_tokens=20, on_text=stop_after_two)
    assert stats.stop == "interrupted" and stats.generated_tokens == 2
    _, full = hf_greedy(reference, [{"role": "user", "content": "tell me about cats"}], 20)
    assert session.last_generated == full[:2]
    assert session.messages[-1] == {
        "role": "assistant",
        "content": reference[1].decode(full[:2], skip_special_tokens=True),
    }
    stats = session.turn("tell me about the sea", max_new_tokens=3)
    assert not stats.reprefilled and stats.cached_tokens > 0
    _, expected = hf_greedy(reference, session.messages[:-1], 3)
    assert session.last_generated == expected


@pytest.mark.parametrize("stop_after", range(1, 13))
def test_the_next_turn_reuses_the_cache_wherever_an_answer_is_interrupted(checkpoint, stop_after):
    """Interrupted after any number of tokens (this answer emits <|endoftext|>, which its shown text drops, at the
    7th), the next turn prefills only the new text, never the whole conversation."""
    session = ChatSession(ctxlab.from_pretrained(checkpoint), ctxlab.load_tokenizer(checkpoint), context=256)
    pieces: list[str] = []

    def interrupt(piece: str) -> None:  # what the Ctrl-C handler does, between two tokens
        pieces.append(piece)
        session.interrupted = len(pieces) >= stop_after

    first = session.turn("tell me about cats", max_new_tokens=50, on_text=interrupt)
    assert (first.stop, first.generated_tokens) == ("interrupted", stop_after)
    second = session.turn("hi", max_new_tokens=2)
    assert not second.reprefilled and second.cached_tokens == first.context_used


def test_end_of_turn_ids(checkpoint):
    tok = ctxlab.load_tokenizer(checkpoint)
    assert tok.end_of_turn_ids() == [tok.backend.token_to_id("<|im_end|>")]


def test_ctrl_c_stops_the_answer_not_the_chat(checkpoint):
    """A real SIGINT to the console script while it streams: the answer stops, the next message is answered
    from the same cache."""
    exe = Path(sys.executable).with_name("ctxlab")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [str(exe), "chat", str(checkpoint), "--max-new-tokens", "3000", "--context", "3000"]
    argv.append("--allow-past-max-positions")  # a long answer to interrupt, past the 512 trained positions
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=0
    )
    proc.stdin.write("tell me about cats\n")
    proc.stdin.flush()
    assert proc.stdout.read(3)  # the answer is streaming
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("hi\n")
    proc.stdin.close()
    proc.stdin = None
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    first, second = [line for line in err.splitlines() if "tok/s" in line]
    assert "stopped: interrupted" in first
    assert "re-prefilled" not in second and "interrupted" not in second
