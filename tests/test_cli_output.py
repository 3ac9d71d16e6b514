"""What the command line shows a person: names never cut, MoE active parameters, trained context,
integers as integers, DeepSeek V4 layer kinds, the preset list, progress and the generate summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import ctxlab
from ctxlab import cli
from ctxlab.cli import main
from ctxlab.reporting.tables import fmt_number
from test_cli_errors import ctxlab_run, script


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("argv", [["report", "--all"], ["list"], ["claims"]])
def test_model_names_are_never_cut(argv, columns):
    done = ctxlab_run(*argv, columns=columns)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "…" not in "\n".join(line for line in lines if "│" in line)  # no cell cut with an ellipsis
    names = (
        ctxlab.preset_names()
        if argv[0] != "claims"
        else sorted({r["model"] for r in json.loads(ctxlab_run("claims", "--json").stdout)["claims"]})
    )
    for name in names:
        assert re.search(rf"│ {re.escape(name)} +│", done.stdout), name


def test_columns_left_out_at_80_are_named():
    done = ctxlab_run("report", columns=80)
    assert "columns left out at 80 terminal columns: Family" in done.stdout.replace("\n", " ")


def test_inspect_header_keeps_the_name_at_80_columns():
    done = ctxlab_run("inspect", "deepseek-v4-flash", columns=80)
    assert done.returncode == 0 and done.stdout.startswith("deepseek-v4-flash: family deepseek_v4")


def test_report_shows_active_params_and_trained_context(capsys):
    code, out, _ = run(capsys, "report", "--json", "--models", "llama-3-8b", "deepseek-v4-flash", "--context", "128k")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)["models"]}
    v4 = rows["deepseek-v4-flash"]
    assert v4["params_active"] == ctxlab.count_params(ctxlab.load_config("deepseek-v4-flash"))["active"]
    assert v4["params_active"] < v4["params_total"]
    assert (v4["trained_context"], v4["beyond_trained_context"]) == (1048576, False)
    assert (rows["llama-3-8b"]["trained_context"], rows["llama-3-8b"]["beyond_trained_context"]) == (8192, True)
    _, out, _ = run(capsys, "report", "--models", "llama-3-8b", "deepseek-v4-flash", "--context", "128k")
    assert "8,192*" in out and "1,048,576 " in out and "13.80B" in out and "= total" in out
    assert "beyond the context these models were trained for" in out


def test_claims_print_counts_as_integers(capsys):
    assert (fmt_number(1024.0), fmt_number(15), fmt_number(2.6843), fmt_number(0.115)) == (
        "1024",
        "15",
        "2.68",
        "0.115",
    )
    code, out, _ = run(capsys, "claims")
    assert code == 0 and "e+0" not in out and "15 ±0 layers" in out


def test_inspect_deepseek_v4_names_csa_hca_and_sliding_layers(capsys):
    cfg = ctxlab.load_config("deepseek-v4-flash")
    code, out, _ = run(capsys, "inspect", "deepseek-v4-flash", "--json")
    assert code == 0
    variants = [r["attention_variant"] for r in json.loads(out)["layers"]]
    expected = [
        "sliding only"
        if s.compress.ratio == 0
        else f"{'CSA' if s.compress.overlap else 'HCA'} ratio {s.compress.ratio}"
        for s in cfg.layers
    ]
    assert variants == expected
    assert (variants.count("sliding only"), variants.count("CSA ratio 4"), variants.count("HCA ratio 128")) == (
        2,
        21,
        20,
    )
    _, out, _ = run(capsys, "inspect", "deepseek-v4-flash")
    assert "2 sliding only, 21 CSA ratio 4, 20 HCA ratio 128" in out
    assert not re.search(r"│ +\d+ │ compressed", out)  # the attention column names the variant
    assert len(re.findall(r"│ +\d+ │ (?:CSA ratio 4|HCA ratio 128|sliding only) ", out)) == 43


@pytest.mark.parametrize("command", ["list", "presets"])
def test_list_presets(capsys, command):
    code, out, _ = run(capsys, command, "--json")
    rows = json.loads(out)["presets"]
    assert rows == ctxlab.list_presets()
    assert [r["name"] for r in rows] == ctxlab.preset_names()
    v32 = next(r for r in rows if r["name"] == "deepseek-v3.2")
    params = ctxlab.count_params(ctxlab.load_config("deepseek-v3.2"))
    assert (v32["params_total"], v32["params_active"], v32["num_layers"], v32["trained_context"]) == (
        params["total"],
        params["active"],
        61,
        163840,
    )
    assert all(r["description"] for r in rows)
    code, out, _ = run(capsys, command)
    assert code == 0 and "deepseek_v32" in out and "671.88B" in out


def test_generate_prints_a_summary_line(capsys):
    code, out, err = run(capsys, "generate", "tiny-llama", "--prompt-ids", "1,5,7", "--max-new-tokens", "4")
    assert code == 0
    summary = [line for line in err.splitlines() if "tok/s" in line]
    assert len(summary) == 1 and "3 prompt tokens, 4 new tokens" in summary[0] and "decode" in summary[0]
    code, out, err = run(capsys, "generate", "tiny-llama", "--prompt-ids", "1,5,7", "--max-new-tokens", "4", "--json")
    s = json.loads(out)["summary"]
    assert (s["prompt_tokens"], s["new_tokens"]) == (3, 4) and s["decode_tokens_per_s"] > 0
    assert "tok/s" not in err


def test_top_level_help_lists_every_command_without_markup(capsys):
    _, out, _ = run(capsys, "--help")
    commands = list(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"report", "inspect", "claims", "generate", "list"} <= set(commands)
    for name in commands:
        assert name in out, name
    assert "``" not in out
    for name in ("report", "inspect", "claims", "generate", "list"):
        assert f"ctxlab {name}" in cli.__doc__, name


def test_progress_bar_shows_on_a_terminal_and_not_otherwise():
    """claims --measure: a bar on stderr when it is a terminal; nothing with --json or into a pipe."""
    import pty

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "COLUMNS": "100"}
    argv = [*script(), "claims", "--measure", "--tokens", "16"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=600) == 0
    assert b"measuring caches" in seen
    quiet = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert quiet.returncode == 0 and quiet.stderr == ""
    piped = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert piped.returncode == 0 and piped.stderr == ""


def test_progress_reports_reach_the_bar_only_while_it_shows(monkeypatch):
    from ctxlab import progress

    seen = []
    progress.advance(5)  # no bar: nothing happens
    token = progress._current.set(seen.append)
    try:
        ctxlab.build_model(ctxlab.load_config("tiny-llama"))
    finally:
        progress._current.reset(token)
    assert sum(seen) == sum(p.numel() * 4 for p in ctxlab.build_model(ctxlab.load_config("tiny-llama")).parameters())


def test_kv_roles_name_every_run_of_producers():
    from ctxlab.reporting.rows import kv_roles, layer_ranges

    assert layer_ranges([0, 2, 3, 4, 7]) == "0, 2-4, 7" and layer_ranges([5]) == "5"
    line = kv_roles(ctxlab.load_config("cla2-tiny"))
    assert line.startswith("KV producers: layers 0, 2, 4;") and "layers 1 read layer 0" in line
