"""``ctxlab.bench`` and ``ctxlab bench``: the numbers it reports are consistent with the model and
cache it measured (timings themselves are not asserted: the machine is shared)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import ctxlab
from ctxlab.bench import AGREEMENT_TEXT, agreement_prompt, decode_read_bytes, greedy_agreement
from ctxlab.cli import main
from ctxlab.quant import weight_bytes


@pytest.fixture(scope="module")
def model():
    return ctxlab.build_model(ctxlab.load_config("tiny-qwen3-sliding"), dtype=torch.bfloat16, seed=0)


def test_bench_reports_cache_bytes_and_a_consistent_roofline(model):
    messages = []
    result = ctxlab.bench(model, contexts=(8, 40), prompts=(16,), steps=3, repeats=1, progress=messages.append)
    assert [row["context"] for row in result["decode"]] == [8, 40]
    for row in result["decode"]:
        # the cache at the context (what a step reads at least), not the room allocated for the timed steps
        assert row["cache_bytes"] == ctxlab.kv_cache_bytes(model.config, row["context"], "bfloat16")
        assert row["bytes_read_per_token"] == decode_read_bytes(model, row["cache_bytes"])
        assert row["roofline_ms"] == pytest.approx(1e3 * row["bytes_read_per_token"] / (result["bandwidth_gb_s"] * 1e9))
        assert row["roofline_ratio"] == pytest.approx(row["ctxlab_ms_per_token"] / row["roofline_ms"])
    assert result["prefill"][0]["prompt_tokens"] == 16 and result["prefill"][0]["ctxlab_tokens_per_s"] > 0
    assert result["bandwidth_gb_s"] > 0 and result["peak_rss_bytes"] > 0
    assert "speedup" not in result["decode"][0]
    assert messages[0] == "copy bandwidth" and any("decode at 40" in m for m in messages)
    prefills = [m for m in messages if m.startswith("prefill 16 tokens")]  # an untimed one first
    assert prefills == ["prefill 16 tokens: ctxlab (warm-up)", "prefill 16 tokens: ctxlab (1/1)"]


def test_compiled_bench_compiles_in_its_warm_up_not_in_the_timed_steps(model):
    """``compile=True``: the untimed warm-up decode at the shortest context builds every graph the timed
    decode there needs, so ``compile_seconds`` holds the compilation and the timings hold none. Context 4
    is below the tiny model's 8-token window: a warm-up at 8 tokens (as the bench once did) compiles the
    full-ring step and leaves the filling ring's graph to the timed steps (checked: this test fails then)."""
    graphs = torch._dynamo.utils.counters["stats"]
    seen = {}

    def progress(message: str) -> None:
        seen.setdefault(message.split(":")[0], graphs["unique_graphs"])  # graphs compiled before each phase

    result = ctxlab.bench(model, contexts=(4,), prompts=(8,), steps=3, repeats=2, compile=True, progress=progress)
    assert result["compile"] and result["compile_seconds"] > 0 and result["decode"][0]["ctxlab_ms_per_token"] > 0
    assert seen["prefill 8 tokens"] > seen["compiling the decode step"]  # the warm-up compiled
    assert graphs["unique_graphs"] == seen["prefill 8 tokens"]  # the timed prefill and decode did not


def test_bytes_read_per_token_skip_the_per_layer_embedding_table():
    """Gemma 4's per-layer embedding table is looked up a row a token, as an untied token embedding is."""
    from ctxlab.reporting.measure import tiny_like

    model = ctxlab.build_model(tiny_like(ctxlab.load_config("gemma4-e2b"), hidden=64, vocab=512), dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings
    assert (
        decode_read_bytes(model, 1000) == weight_bytes(model) - weight_bytes(model.model.embed_tokens_per_layer) + 1000
    )


def test_bytes_read_per_token_skip_the_untied_input_embedding():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype=torch.bfloat16, seed=0)
    assert not model.config.tie_word_embeddings
    embedding = model.model.embed_tokens.weight.numel() * 2
    assert decode_read_bytes(model, 1000) == weight_bytes(model) - embedding + 1000


def test_bench_against_transformers_reports_both_engines(model, hf):
    result = ctxlab.bench(model, contexts=(12,), prompts=(8,), steps=2, repeats=1, against="transformers")
    row = result["decode"][0]
    assert row["transformers_ms_per_token"] > 0
    assert row["speedup"] == pytest.approx(row["transformers_ms_per_token"] / row["ctxlab_ms_per_token"])
    assert result["prefill"][0]["speedup"] > 0


def test_greedy_agreement_against_transformers_on_the_same_float32_weights(hf):
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    result = ctxlab.bench(
        model, contexts=(4,), prompts=(4,), steps=1, repeats=1, against="transformers", agreement_tokens=12
    )
    assert result["greedy_agreement"] == {"prompt_tokens": 32, "new_tokens": 12, "agree": 12, "leading": 12}


class Disagreeing:
    """An engine whose greedy choice differs from ctxlab's at the given generated positions."""

    def __init__(self, model, prompt_len: int, wrong: set[int]):
        self.model, self.prompt_len, self.wrong = model, prompt_len, wrong

    def next_tokens(self, ids):
        with torch.no_grad():
            choice = self.model(ids)[0].argmax(-1)
        for k in self.wrong:
            choice[self.prompt_len - 1 + k] += 1
        return choice.tolist()


@pytest.mark.parametrize("wrong, agree, leading", [(set(), 10, 10), ({3}, 9, 3), ({0, 7}, 8, 0)])
def test_greedy_agreement_counts_matches_and_the_leading_run(wrong, agree, leading):
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    prompt = agreement_prompt(model, None, seed=3)
    result = greedy_agreement(model, Disagreeing(model, prompt.shape[1], wrong), prompt, 10)
    assert result == {"prompt_tokens": prompt.shape[1], "new_tokens": 10, "agree": agree, "leading": leading}


def test_agreement_prompt_is_the_text_in_the_models_own_tokens(tmp_path, hf):
    from tiny_chat_checkpoint import write_checkpoint

    directory = write_checkpoint(tmp_path / "chat")
    model = ctxlab.from_pretrained(directory)
    prompt = agreement_prompt(model, str(directory), seed=0)
    assert prompt[0].tolist() == ctxlab.load_tokenizer(directory).encode(AGREEMENT_TEXT)
    assert prompt.shape[1] > 10


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python (optional, built from source) is not installed")
def test_against_llama_cpp_on_the_real_smollm2_file():
    from gguf_files import smollm2_path

    model = ctxlab.from_pretrained(smollm2_path(), dtype=torch.float32)
    result = ctxlab.bench(
        model, contexts=(16,), prompts=(16,), steps=2, repeats=1, against="llama.cpp", source=str(smollm2_path())
    )
    assert result["against_skipped"] is None and result["decode"][0]["llama.cpp_ms_per_token"] > 0
    a = result["greedy_agreement"]
    assert a["new_tokens"] == 64 and a["agree"] >= 56  # llama.cpp multiplies Q4_1 weights by 8-bit activations


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python (optional, built from source) is not installed")
def test_a_file_llama_cpp_cannot_load_is_a_checkpoint_error(tmp_path):
    from ctxlab.bench_engines import LlamaCppEngine

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ctxlab.CheckpointError, match="broken.gguf: llama.cpp cannot load it"):
        LlamaCppEngine(str(bad), 64)


@pytest.mark.skipif(LLAMA_CPP, reason="llama-cpp-python is installed")
def test_llama_cpp_comparison_is_skipped_with_the_reason(model):
    result = ctxlab.bench(model, contexts=(4,), prompts=(4,), steps=1, repeats=1, against="llama.cpp")
    assert "llama-cpp-python is not installed" in result["against_skipped"]
    assert "llama.cpp_ms_per_token" not in result["decode"][0]


def test_bad_bench_arguments_are_refused(model):
    with pytest.raises(ValueError, match="contexts = \\[0\\]"):
        ctxlab.bench(model, contexts=(0,))
    for lengths in ((), (True,)):
        with pytest.raises(ValueError, match="at least one length, each a positive integer"):
            ctxlab.bench(model, contexts=(4,), prompts=lengths)
    with pytest.raises(ValueError, match="against = 'vllm'"):
        ctxlab.bench(model, contexts=(4,), against="vllm")


def test_quantized_weights_are_not_compared_with_transformers(capsys, monkeypatch, model):
    """transformers cannot load ctxlab's packed weights: the CLI refuses before loading the model, the
    API before anything is saved or timed."""
    import ctxlab.cli as cli

    monkeypatch.setattr(cli, "load_for_generation", lambda *a, **k: pytest.fail("loaded a model it then refused"))
    args = ["bench", "tiny-llama", "--context", "8", "--prompt", "8", "--steps", "1", "--repeats", "1"]
    assert main([*args, "--quantize", "int4", "--against", "transformers"]) != 0
    err = capsys.readouterr().err
    assert "quantized int4" in err and "transformers cannot load" in err and "no --quantize" in err
    ctxlab.quantize(model, "int8")
    with pytest.raises(ctxlab.InputError, match="quantized int8.*transformers cannot load"):
        ctxlab.bench(model, contexts=(4,), against="transformers")


def test_cli_bench_json(capsys):
    code = main(
        [
            "bench",
            "tiny-llama",
            "--context",
            "8,16",
            "--prompt",
            "8",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--quantize",
            "int8",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantization"] == "int8" and result["dtype"] == "bfloat16"
    assert [row["context"] for row in result["decode"]] == [8, 16]


def test_cli_bench_table_and_bad_context(capsys):
    assert main(["bench", "tiny-llama", "--context", "8", "--prompt", "8", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ctxlab ms/token" in out and "copy bandwidth" in out
    assert main(["bench", "tiny-llama", "--context", "0"]) == 2
    assert "--context" in capsys.readouterr().err
    for empty in (",", ""):
        assert main(["bench", "tiny-llama", "--prompt", empty]) == 2
        assert "give at least one length" in capsys.readouterr().err


def test_cli_bench_past_the_trained_context_warns_in_its_own_name(capsys):
    """Speed past max_position_embeddings is still speed: a warning, not a refusal; messages say bench."""
    argv = ["bench", "tiny-llama", "--context", "300", "--prompt", "8", "--steps", "1", "--repeats", "1", "--json"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ctxlab bench: warning: tiny-llama is not a checkpoint directory" in err
    assert "ctxlab bench: warning:" in err and "max_position_embeddings = 256" in err
    assert "ctxlab generate" not in err


def test_report_tables_follow_the_batch_and_the_layers():
    """The same-width table's cache is the batch's, as the main table's is; KV-sharing consumers that are not
    consecutive are listed as they are; DeepSeek V4's per-token growth counts its compressed entries."""
    from rich.console import Console

    from ctxlab.reporting import rows, tables

    assert (
        rows.baseline_rows("zaya1-8b", 1024, "bfloat16", 4)[0]["kv_bytes"]
        == rows.report_row("zaya1-8b", 1024, "bfloat16", 4)["kv_bytes_realized"]
        == 4 * rows.baseline_rows("zaya1-8b", 1024, "bfloat16")[0]["kv_bytes"]
    )
    console = Console(width=200, record=True)
    console.print(tables.sharing_table([rows.sharing_row("cla2-tiny", 1024, "bfloat16")], 1024, "bfloat16"))
    assert "3 (1, 3, 5)" in console.export_text()
    cfg, n = ctxlab.load_config("deepseek-v4-flash"), 1 << 19
    naive = [ctxlab.kv_cache_bytes(cfg, t, "bfloat16", convention="naive") for t in (n, 2 * n)]
    assert naive[1] - naive[0] == n * rows.report_row("deepseek-v4-flash", n, "bfloat16", 1)["kv_bytes_per_token_naive"]


def test_cli_bench_against_llama_cpp_refuses_a_model_that_is_no_gguf_before_loading(capsys):
    """(It built and timed the model, then skipped the comparison with a note and exit 0.)"""
    from ctxlab.cli import main

    assert main(["bench", "tiny-llama", "--against", "llama.cpp", "--context", "16"]) == 2
    err = capsys.readouterr().err
    assert "runs MODEL as a GGUF file" in err and "'tiny-llama' is not one" in err
