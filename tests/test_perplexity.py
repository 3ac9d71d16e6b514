"""``ctxlab perplexity``: the strided sliding-window perplexity equals the one computed from transformers'
logits with the recipe of the transformers guide (labels masked to -100, the model's own shifted loss)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ctxlab
from ctxlab.cli import main
from ctxlab.perplexity import windows

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
from tiny_chat_checkpoint import WORDS, write_checkpoint

TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(90))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-ppl"))


def reference_perplexity(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int, int]:
    """(ppl, scored tokens, windows): "Perplexity of fixed-length models" (transformers docs), each window's
    loss from ``model(input_ids, labels=...)`` over the labels not masked to -100 after the shift."""
    nll_sum, scored, count, previous_end = 0.0, 0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + context, ids.shape[1])
        target_len = end - previous_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the first label has no logits before it
        nll_sum += loss.item() * n
        scored += n
        count += 1
        previous_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll_sum / scored), scored, count


@pytest.mark.parametrize(("context", "stride"), [(32, 8), (32, 32), (40, 17), (500, 250)])
def test_cli_perplexity_equals_transformers(checkpoint, tmp_path, capsys, context, stride):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    code = main(
        ["perplexity", str(checkpoint), str(text_file), "--context", str(context), "--stride", str(stride), "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert result["text_tokens"] == ids.shape[1] > context or context == 500
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ppl, scored, count = reference_perplexity(ref, ids, context, stride)
    assert (result["tokens"], result["windows"]) == (scored, count)
    assert abs(result["ppl"] - ppl) <= 1e-4 * ppl
    assert abs(math.exp(result["nll"]) - result["ppl"]) <= 1e-9 * ppl
    assert err == ""  # no progress bar when stderr is not a terminal


def test_human_output(checkpoint, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    assert main(["perplexity", str(checkpoint), str(text_file), "--context", "32"]) == 0
    out = capsys.readouterr().out
    model = ctxlab.from_pretrained(checkpoint)
    expected = ctxlab.perplexity(model, ctxlab.load_tokenizer(checkpoint).encode(TEXT), context=32, stride=16)
    assert f"perplexity {expected['ppl']:.4f}" in out and "stride 16" in out


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(100, 32, 8), (100, 32, 32), (7, 32, 5), (33, 32, 31), (64, 8, 3)]
)
def test_windows_score_every_token_once(n, context, stride):
    seen = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        seen.extend(range(first, end))
    assert len(seen) == len(set(seen))  # no token twice
    unscored = {0} | (set(range(stride, n, stride)) if stride == context else set())  # no context before them
    assert set(seen) == set(range(n)) - unscored


def test_bad_options(checkpoint, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    assert main(["perplexity", str(checkpoint), str(text_file), "--context", "8", "--stride", "9"]) == 2
    assert "stride = 9: must be in [1, context = 8]" in capsys.readouterr().err
    assert main(["perplexity", str(checkpoint), str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["perplexity", "tiny-llama", str(text_file)]) == 2
    assert "not a checkpoint directory or .gguf file" in capsys.readouterr().err
    assert main(["perplexity", str(checkpoint), str(text_file), "--context", "600"]) == 2  # trained for 512
    assert "--context = 600 positions" in capsys.readouterr().err
    argv = ["perplexity", str(checkpoint), str(text_file), "--context", "600", "--allow-past-max-positions"]
    assert main([*argv, "--json"]) == 0
    assert "max_position_embeddings = 512" in capsys.readouterr().err


def test_quantized_perplexity_is_the_quantized_models(checkpoint, tmp_path, capsys):
    """``--quantize`` scores the text with the weight-only quantized model: the perplexity
    ``ctxlab.perplexity`` gives for ``quantize_(model, mode)``, near the unquantized one (tiny random
    weights quantize coarsely, so 'near' is loose) and not equal to it."""
    from ctxlab.quant import quantize_

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    ids = ctxlab.load_tokenizer(checkpoint).encode(TEXT)
    base = ctxlab.perplexity(ctxlab.from_pretrained(checkpoint, dtype=torch.bfloat16), ids, context=32, stride=16)
    for mode in ("int8", "int4"):
        argv = ["perplexity", str(checkpoint), str(text_file), "--context", "32", "--dtype", "bfloat16"]
        assert main([*argv, "--quantize", mode, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        model = quantize_(ctxlab.from_pretrained(checkpoint, dtype=torch.bfloat16), mode)
        expected = ctxlab.perplexity(model, ids, context=32, stride=16)
        assert result["quantize"] == mode and result["dtype"] == "bfloat16"
        assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
        assert result["ppl"] != base["ppl"] and abs(math.log(result["ppl"] / base["ppl"])) < 0.5
    assert main(["perplexity", str(checkpoint), str(text_file), "--quantize", "int4"]) == 2
    assert "need a bfloat16 model" in capsys.readouterr().err
