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
