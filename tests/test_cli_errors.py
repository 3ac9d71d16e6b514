"""Bad input to the installed ``ctxlab`` script: one clear line on stderr naming the option or field and
what is allowed, exit code 2, never a Python traceback (each case run as a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctxlab
from ctxlab import cli
from ctxlab.cli import main


def script() -> list[str]:
    found = shutil.which("ctxlab", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "ctxlab.cli"]


def ctxlab_run(*argv: str, columns: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [*script(), *argv], capture_output=True, text=True, env=env, timeout=600, check=False, **kwargs
    )


def assert_user_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    ctxlab.build_model(ctxlab.load_config("tiny-llama"), seed=0).save_pretrained(path)
    return path


def test_corrupt_tokenizer_is_named_and_not_read_for_prompt_ids(checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    (broken / "tokenizer.json").write_text("{not json")
    done = ctxlab_run("generate", str(broken), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["generated_ids"]) == 3
    assert_user_error(ctxlab_run("generate", str(broken), "--prompt", "hello"), "tokenizer.json", str(broken))


def test_sharded_index_that_is_not_json_names_the_file(checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00001.safetensors")  # a sharded checkpoint
    (broken / "model.safetensors.index.json").write_text("not json")
    assert_user_error(ctxlab_run("generate", str(broken), "--prompt-ids", "1"), "model.safetensors.index.json")
    with pytest.raises(ctxlab.CheckpointError, match="index.json"):
        ctxlab.from_pretrained(broken)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--prompt-ids", "1,,2"], ["--prompt-ids", "'1,,2'"]),
        (["--prompt-ids", "1", "--temperature", "nan"], ["--temperature", "finite"]),
        (["--prompt-ids", "1", "--temperature", "0.5", "--top-p", "nan"], ["--top-p", "(0, 1]"]),
        (["--prompt-ids", "1", "--max-memory-gb", "-1"], ["--max-memory-gb", "> 0"]),
        (
            ["--prompt-ids", ",".join(["1"] * 250), "--max-new-tokens", "20"],
            ["max_position_embeddings = 256", "--allow-past-max-positions"],
        ),
        (["--prompt-ids", "1", "--dtype", "float8"], ["--dtype", "bfloat16"]),
        (["--prompt-ids", "1", "--temperature", "1", "--seed", str(1 << 64)], ["--seed", "[-2^63, 2^64)"]),
    ],
)
def test_generate_argument_errors(argv, needles):
    assert_user_error(ctxlab_run("generate", "tiny-llama", *argv), *needles)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--temperature", "inf"], ["--temperature", "finite"]),
        (["--temperature", "1", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--temperature", "1", "--seed", str(-(1 << 63) - 1)], ["--seed", "[-2^63, 2^64)"]),
    ],
)
def test_chat_sampling_options_are_checked_before_anything_loads(checkpoint, argv, needles):
    assert_user_error(ctxlab_run("chat", str(checkpoint), "--message", "hi", *argv), *needles)


def test_generation_past_the_trained_context_runs_when_allowed():
    done = ctxlab_run(
        "generate",
        "tiny-llama",
        "--prompt-ids",
        ",".join(["1"] * 250),
        "--max-new-tokens",
        "20",
        "--allow-past-max-positions",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["generated_ids"]) == 20


def test_float16_refused_for_gemma_by_name(tmp_path):
    from test_config_fields import CONFIGS

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gemma4_text"]))
    assert_user_error(
        ctxlab_run("generate", str(tmp_path / "config.json"), "--prompt-ids", "1", "--dtype", "float16"),
        "float16",
        "bfloat16",
    )


@pytest.mark.parametrize("value", ["100000000000000000000000", "0", "2000000000000000"])
def test_context_has_a_sane_upper_bound(value):
    assert_user_error(ctxlab_run("report", "--context", value, "--models", "tiny-llama"), "--context", "2^40")


def test_config_field_of_the_wrong_type_is_one_line(tmp_path):
    d = json.loads(ctxlab.presets.preset_path("tiny-llama").read_text())
    for field, value in (("num_hidden_layers", "ten"), ("num_hidden_layers", True), ("rope_parameters", "yes")):
        (tmp_path / "config.json").write_text(json.dumps({**d, field: value}))
        done = ctxlab_run("inspect", str(tmp_path / "config.json"))
        assert_user_error(done, field, "must be")
        assert len(done.stderr.strip().splitlines()) == 1


def test_unknown_names_get_suggestions_everywhere():
    for argv in (
        ["inspect", "qwen3-8"],
        ["report", "--models", "llama-3-8"],
        ["generate", "tiny-lama", "--prompt-ids", "1"],
    ):
        done = ctxlab_run(*argv)
        assert_user_error(done, "did you mean")
    assert "'qwen3-8b'" in ctxlab_run("inspect", "qwen3-8").stderr


@pytest.mark.parametrize("where", ["missing", "file"])
def test_plot_into_a_missing_or_unusable_directory_names_the_path(tmp_path, where):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    parent = tmp_path / "nope"
    if where == "file":
        parent.write_text("x")
    target = parent / "kv.png"
    reason = "does not exist" if where == "missing" else "is not a directory"
    assert_user_error(ctxlab_run("report", "--models", "tiny-llama", "--plot", str(target)), str(target), reason)


def test_report_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen(
        [*script(), "report", "--all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) in (0, 141)
    assert err == "", err


def test_internal_bugs_keep_their_traceback(monkeypatch):
    """Only ctxlab's own errors become exit-2 messages; a ValueError from a bug propagates."""
    monkeypatch.setattr(cli.rows, "report_row", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["report", "--models", "tiny-llama"])


# -------------------------------------------------------------------------------- Python API errors


def test_flat_list_prompt_says_what_prompts_are():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"))
    with pytest.raises(ctxlab.InputError, match=r"\[B, T\] tensor or a list of token-id lists.*\[\[1, 2, 3\]\]"):
        ctxlab.generate(model, [1, 2, 3])


@pytest.mark.parametrize("kwargs", [{"temperature": float("nan")}, {"temperature": 1.0, "top_p": float("nan")}])
def test_nan_sampling_settings_are_refused(kwargs):
    with pytest.raises(ctxlab.InputError):
        ctxlab.sample(torch.zeros(1, 8), **kwargs)


def test_dtype_names_are_the_cli_names(checkpoint):
    with pytest.raises(ctxlab.InputError, match="float32, bfloat16, float16"):
        ctxlab.from_pretrained(checkpoint, dtype="float8_whatever")
    with pytest.raises(ctxlab.InputError, match="float32, bfloat16, float16"):
        ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype=torch.float64)
    assert ctxlab.from_pretrained(checkpoint, dtype="bfloat16").dtype == torch.bfloat16
    assert ctxlab.build_model(ctxlab.load_config("tiny-llama"), dtype="float16").dtype == torch.float16


def test_past_the_trained_context_needs_the_keyword():
    model = ctxlab.build_model(ctxlab.load_config("tiny-llama"))
    with pytest.raises(ctxlab.InputError, match="max_position_embeddings = 256"):
        ctxlab.generate(model, [[1] * 250], max_new_tokens=20)
    out = ctxlab.generate(model, [[1] * 250], max_new_tokens=20, allow_past_max_positions=True, eos_token_id=[])
    assert len(out[0]) == 270
