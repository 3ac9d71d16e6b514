"""The ``ctxlab`` command line, run in-process (``ctxlab.cli.main``) and once as an installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ctxlab
from ctxlab.cli import main
from ctxlab.io.tokenizer import decode, encode, load_tokenizer

PROMPT_IDS = [1, 5, 7, 9]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny-llama checkpoint (random weights, seed 0) without tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory) -> Path:
    """The same checkpoint plus a WordLevel tokenizer.json trained here (128 words = the model's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny-llama-tok")
    ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the cat sat on the mat", "a dog ran in the park", " ".join(f"w{i}" for i in range(300))]
    trainer = trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == 128 and tok.token_to_id("</s>") == 2  # the model's eos_token_id
    tok.save(str(path / "tokenizer.json"))
    return path


def greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    model = ctxlab.from_pretrained(model_dir)
    return ctxlab.generate(model, [prompt], max_new_tokens=n)[0][len(prompt) :]


# ---------------------------------------------------------------------------------------- report


def test_report_json_equals_accounting(capsys):
    code, out, _ = run(capsys, "report", "--json", "--models", "llama-3-8b", "qwen3-8b", "--context", "131072")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)["models"]}
    assert set(rows) == {"llama-3-8b", "qwen3-8b"}
    llama = rows["llama-3-8b"]
    cfg = ctxlab.load_config("llama-3-8b")
    assert llama["kv_bytes_realized"] == ctxlab.kv_cache_bytes(cfg, 131072, "bfloat16") == 17179869184
    assert llama["kv_bytes_naive"] == 17179869184
    assert llama["kv_bytes_per_token_naive"] == 131072  # 32 layers x 8 KV heads x 128 dims x (K + V) x 2 bytes
    assert llama["params_total"] == ctxlab.count_params(cfg)["total"]
    assert llama["params_effective"] == ctxlab.count_params(cfg)["effective"]
    assert llama["decode_flops"] == ctxlab.decode_flops(cfg, 131072)
    assert (llama["context"], llama["dtype"], llama["batch_size"], llama["num_layers"]) == (131072, "bfloat16", 1, 32)


def test_report_json_sliding_batch_dtype(capsys):
    code, out, _ = run(
        capsys,
        "report",
        "--json",
        "--models",
        "tiny-qwen3-sliding",
        "--context",
        "4k",
        "--dtype",
        "float32",
        "--batch-size",
        "3",
    )
    assert code == 0
    (row,) = json.loads(out)["models"]
    cfg = ctxlab.load_config("tiny-qwen3-sliding")
    assert row["context"] == 4096 and row["batch_size"] == 3 and row["dtype"] == "float32"
    assert row["kv_bytes_realized"] == ctxlab.kv_cache_bytes(cfg, 4096, "float32", 3)
    assert row["kv_bytes_naive"] == ctxlab.kv_cache_bytes(cfg, 4096, "float32", 3, convention="naive")
    assert row["kv_bytes_realized"] < row["kv_bytes_naive"]  # sliding layers hold only their window
    assert row["kv_bytes_per_token_naive"] == ctxlab.kv_cache_bytes(cfg, 1, "float32", convention="naive")


def test_report_default_models(capsys):
    code, out, _ = run(capsys, "report", "--json")
    assert code == 0
    assert [r["model"] for r in json.loads(out)["models"]] == ctxlab.preset_names(include_tiny=False)
    code, out, _ = run(capsys, "report", "--json", "--all")
    assert [r["model"] for r in json.loads(out)["models"]] == ctxlab.preset_names()


def test_report_kv_sharing_conventions(capsys):
    """The Gemma 4 sharing table: realized and uncapped savings, and the estimator reproducing the published figure."""
    code, out, _ = run(capsys, "report", "--json", "--models", "gemma4-e2b", "gemma4-e4b", "llama-3-8b")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)["kv_sharing"]}
    assert set(rows) == {"gemma4-e2b", "gemma4-e4b"}  # llama shares nothing
    e2b, e4b = rows["gemma4-e2b"], rows["gemma4-e4b"]
    assert e2b["consumer_layers"] == list(range(15, 35))
    assert (round(e2b["saving_realized"] / 1e9, 2), round(e4b["saving_realized"] / 1e9, 2)) == (1.08, 1.63)
    assert (round(e2b["saving_uncapped"] / 1e9, 2), round(e4b["saving_uncapped"] / 1e9, 2)) == (3.22, 5.64)
    assert e2b["saving_uniform_estimator"] == 2_684_354_560 and e2b["published"] == "2.7 GB"
    assert e4b["saving_uniform_estimator"] == 6_039_797_760 and e4b["published"] == "~6 GB"
    code, out, _ = run(capsys, "report", "--models", "gemma4-e2b")
    assert "KV saved by cross-layer sharing" in out and "2.68 GB" in out


def test_report_human(capsys):
    code, out, _ = run(capsys, "report")
    assert code == 0
    for text in ("llama-3-8b", "qwen3-8b", "8.03B", "16.00 GiB", "128.00 KiB", "131,072", "realized", "2^30"):
        assert text in out
    assert "tiny-llama" not in out


# --------------------------------------------------------------------------------------- inspect


def test_inspect_preset(capsys):
    cfg = ctxlab.load_config("tiny-qwen3-sliding")
    code, out, _ = run(capsys, "inspect", "tiny-qwen3-sliding", "--context", "4096")
    assert code == 0
    for text in ("qwen3", "ring", "full", "global", "own", "realized", "naive"):
        assert text in out
    code, out, _ = run(capsys, "inspect", "tiny-qwen3-sliding", "--context", "4096", "--json")
    info = json.loads(out)
    assert info["params"] == ctxlab.count_params(cfg)
    assert info["kv_bytes_realized"] == ctxlab.kv_cache_bytes(cfg, 4096, "bfloat16")
    assert [r["cache_bytes"] for r in info["layers"]] == ctxlab.kv_cache_bytes_per_layer(cfg, 4096, "bfloat16")
    assert [r["cache_kind"] for r in info["layers"]] == ["ring", "full", "ring", "full"]
    assert [r["window"] for r in info["layers"]] == [8, None, 8, None]


def test_inspect_big_preset_lists_every_layer(capsys):
    code, out, _ = run(capsys, "inspect", "qwen3-8b", "--json")
    assert code == 0
    assert len(json.loads(out)["layers"]) == 36
    code, out, _ = run(capsys, "inspect", "qwen3-8b")
    assert code == 0 and out.count(" gqa ") == 36


def test_inspect_checkpoint_dir(capsys, checkpoint):
    code, out, _ = run(capsys, "inspect", str(checkpoint), "--json", "--context", "256")
    assert code == 0
    info = json.loads(out)
    cfg = ctxlab.load_config(checkpoint)
    assert (info["family"], info["num_layers"], info["vocab_size"]) == ("llama", 3, 128)
    assert info["kv_bytes_realized"] == ctxlab.kv_cache_bytes(cfg, 256, "bfloat16")
    code, out, _ = run(capsys, "inspect", str(checkpoint))
    assert code == 0 and "llama3" in out


# -------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("mode", ["--json", "--stream", "--no-stream"])
def test_generate_ids_equal_library_greedy(capsys, checkpoint, mode):
    expected = greedy(checkpoint, PROMPT_IDS, 8)
    code, out, err = run(capsys, "generate", str(checkpoint), "--prompt-ids", "1,5,7,9", "--max-new-tokens", "8", mode)
    assert code == 0, err
    if mode == "--json":
        result = json.loads(out)
        assert result["prompt_ids"] == PROMPT_IDS and result["text"] is None
        assert result["generated_ids"] == expected
    else:
        assert [int(t) for t in out.split()] == expected
    assert "random" not in err.lower()


def test_generate_prefill_chunk_same_tokens(capsys, checkpoint):
    code, out, _ = run(
        capsys,
        "generate",
        str(checkpoint),
        "--prompt-ids",
        "1,5,7,9",
        "--max-new-tokens",
        "6",
        "--prefill-chunk",
        "3",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["generated_ids"] == greedy(checkpoint, PROMPT_IDS, 6)


def test_generate_text_with_tokenizer(capsys, checkpoint_with_tokenizer):
    path = checkpoint_with_tokenizer
    tok = load_tokenizer(path)
    prompt = encode(tok, "the cat sat on the mat")
    expected = greedy(path, prompt, 10)
    code, out, err = run(
        capsys, "generate", str(path), "--prompt", "the cat sat on the mat", "--max-new-tokens", "10", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_ids"] == prompt
    assert result["generated_ids"] == expected
    assert result["text"] == decode(tok, expected) and result["text"].strip()
    for mode in ("--stream", "--no-stream"):
        code, out, _ = run(
            capsys, "generate", str(path), "--prompt", "the cat sat on the mat", "--max-new-tokens", "10", mode
        )
        assert code == 0 and out.strip() == result["text"].strip()


def test_generate_preset_uses_random_weights_with_warning(capsys):
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0)
    expected = ctxlab.generate(model, [PROMPT_IDS], max_new_tokens=5)[0][len(PROMPT_IDS) :]
    code, out, err = run(capsys, "generate", "tiny-llama", "--prompt-ids", "1,5,7,9", "--max-new-tokens", "5", "--json")
    assert code == 0
    assert "RANDOM weights" in err
    assert json.loads(out)["generated_ids"] == expected


def test_generate_refuses_big_model(capsys):
    code, out, err = run(capsys, "generate", "llama-3-8b", "--prompt-ids", "1")
    assert code == 2 and out == ""
    assert "--max-memory-gb" in err and "GiB" in err and "Traceback" not in err


def test_generate_prompt_without_tokenizer(capsys, checkpoint):
    code, _, err = run(capsys, "generate", str(checkpoint), "--prompt", "hello")
    assert code == 2
    assert "tokenizer.json" in err and "--prompt-ids" in err
    assert len(err.strip().splitlines()) == 1


def test_generate_out_of_vocab_ids(capsys, checkpoint):
    code, _, err = run(capsys, "generate", str(checkpoint), "--prompt-ids", "1,500")
    assert code == 2 and "[0, 128)" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- errors, help


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_bad_model_name(capsys, command):
    argv = [command, "no-such-model"] + (["--prompt-ids", "1"] if command == "generate" else [])
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "no-such-model" in err
    for name in ctxlab.preset_names():
        assert name in err
    assert len(err.strip().splitlines()) == 1


def test_bad_option_values_exit_2(capsys):
    assert run(capsys, "report", "--context", "0")[0] == 2
    assert run(capsys, "report", "--dtype", "int8")[0] == 2
    assert run(capsys, "generate", "tiny-llama", "--prompt-ids", "a,b")[0] == 2
    code, _, err = run(capsys, "generate", "tiny-llama", "--prompt-ids", "1", "--temperature", "-1")
    assert code == 2 and "temperature" in err


@pytest.mark.parametrize(
    "command, expected",
    [("report", "--batch-size"), ("inspect", "MODEL"), ("generate", "--max-memory-gb")],
)
def test_subcommand_help(capsys, command, expected):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert expected in out and "default" in out


def test_version_and_top_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and ctxlab.__version__ in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("report", "inspect", "generate"))


# ------------------------------------------------------------------------------ installed script


def test_console_script_subprocess():
    script = shutil.which("ctxlab", path=str(Path(sys.executable).parent)) or shutil.which("ctxlab")
    base = [script] if script else [sys.executable, "-m", "ctxlab.cli"]
    done = subprocess.run([*base, "report", "--json", "--models", "llama-3-8b"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["kv_bytes_realized"] == 17179869184
    bad = subprocess.run([sys.executable, "-m", "ctxlab.cli", "inspect", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "presets:" in bad.stderr and "Traceback" not in bad.stderr


def test_plot_to_a_directory_or_unwritable_path_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    code, _, err = run(capsys, "inspect", "tiny-llama", "--plot", str(tmp_path))
    assert code == 2 and "is a directory" in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = run(capsys, "report", "--models", "tiny-llama", "--plot", str(blocker / "x.png"))
    assert code == 2 and "error" in err and "Traceback" not in err
    code, _, err = run(capsys, "report", "--models", "tiny-llama", "--plot", str(tmp_path / "noext"))
    assert code == 0 and (tmp_path / "noext.png").is_file() and "noext.png" in err
