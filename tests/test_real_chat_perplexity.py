"""``ctxlab chat`` and ``ctxlab perplexity`` on the real SmolLM2-135M-Instruct GGUF file.

Skipped, with the install command, when the model package (or ``gguf``) is absent.
"""

from __future__ import annotations

import json

import pytest
import torch

import ctxlab
from ctxlab.cli import main

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    '"La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 World\'s Fair, '
    "and to crown the centennial anniversary of the French Revolution. Although initially criticised by some of "
    "France's leading artists and intellectuals for its design, it has since become a global cultural icon of "
    "France and one of the most recognisable structures in the world."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from gguf_files import smollm2_path

    path = smollm2_path()
    return path, ctxlab.from_pretrained(path, dtype=torch.float32)


@pytest.mark.slow
def test_chat_answers_paris(smollm2, capsys):
    path, _ = smollm2
    code = main(["chat", str(path), "--message", "What is the capital of France?", "--max-new-tokens", "32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    turn = json.loads(out)
    assert "Paris" in turn["answer"]
    assert turn["stop"] == "end_of_turn" and turn["generated_ids"][-1] == 2  # <|im_end|>
    assert "tok/s" in err


@pytest.mark.slow
def test_perplexity_equals_transformers(smollm2, tmp_path, capsys):
    from test_perplexity import reference_perplexity

    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    path, _ = smollm2
    text_file = tmp_path / "eiffel.txt"
    text_file.write_text(TEXT)
    assert main(["perplexity", str(path), str(text_file), "--context", "64", "--stride", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([ctxlab.load_tokenizer(path).encode(TEXT)])
    ppl, scored, windows = reference_perplexity(ref.eval(), ids, 64, 32)
    assert (result["tokens"], result["windows"]) == (scored, windows)
    assert abs(result["ppl"] - ppl) <= 1e-4 * ppl
    assert 1 < result["ppl"] < 100  # a real model finds this text predictable


def test_perplexity_scores_the_file_as_it_is_crlf_included(smollm2, tmp_path, monkeypatch):
    """Line ends are tokens to a byte-level BPE: the file's CRLF is scored, not a newline-translated copy."""
    import importlib

    module = importlib.import_module("ctxlab.perplexity")  # ctxlab.perplexity is also the function
    path, _ = smollm2
    text = "first line\r\nsecond line\r\n"
    (tmp_path / "crlf.txt").write_bytes(text.encode())
    seen = {}

    def scored(model, ids, context, stride, on_window=None):
        seen["ids"] = list(ids)
        return {"ppl": 1.0, "nll": 0.0, "tokens": len(ids) - 1, "windows": 1}

    monkeypatch.setattr(module, "perplexity", scored)
    assert main(["perplexity", str(path), str(tmp_path / "crlf.txt"), "--json"]) == 0
    tokenizer = ctxlab.load_tokenizer(path)
    assert seen["ids"] == tokenizer.encode(text) != tokenizer.encode(text.replace("\r\n", "\n"))


def test_a_gguf_file_is_known_by_its_magic_not_only_its_name(smollm2, tmp_path):
    """Ollama keeps GGUF files as sha256-... blobs."""
    from ctxlab.io.gguf import is_gguf

    path, _ = smollm2
    blob = tmp_path / "sha256-0123abcd"
    blob.symlink_to(path)
    (tmp_path / "notes").write_text("GGUX")
    assert is_gguf(blob) and not is_gguf(tmp_path / "notes") and not is_gguf(tmp_path) and not is_gguf(tmp_path / "x")
    assert ctxlab.load_config(blob).layers == ctxlab.load_config(path).layers  # the names differ: the file's
    assert ctxlab.load_tokenizer(blob).encode("hello world") == ctxlab.load_tokenizer(path).encode("hello world")
