"""Lab recipes, the study runner and the report: every recipe builds, matches the baseline's parameters
within 2 %, carries its mechanism and trains a few steps; the report's statistics are Welch's test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctxlab import count_params, decode_flops, kv_cache_bytes
from ctxlab.cli import main
from ctxlab.errors import InputError
from ctxlab.lab import load_recipe, recipe_names
from ctxlab.lab.report import collect, summarize, write_report
from ctxlab.lab.runner import run_recipe
from ctxlab.lab.stats import welch_p
from ctxlab.nn.hyper_unconstrained import UnconstrainedHyperConnection
from ctxlab.train import TrainConfig, make_task, train
from ctxlab.train.diagnostics import residual_gains

MECHANISMS = {  # recipe -> a check that the config really has the mechanism
    "gqa": lambda c: all(s.attention == "gqa" and s.num_kv_heads == 2 and s.window is None for s in c.layers),
    "mqa": lambda c: all(s.num_kv_heads == 1 for s in c.layers),
    "mla": lambda c: all(s.attention == "mla" for s in c.layers),
    "kv_share": lambda c: [s.kv_source for s in c.layers] == [None] * 4 + [3, 3],
    "cla2": lambda c: [s.kv_source for s in c.layers] == [None, 0, None, 2, None, 4],
    "sliding": lambda c: sum(s.window is not None for s in c.layers) == 5 and c.layers[-1].window is None,
    "head_budget": lambda c: len({s.num_heads for s in c.layers}) > 1 and len({s.num_kv_heads for s in c.layers}) == 1,
    "cca": lambda c: all(s.attention == "cca" for s in c.layers),
    "csa": lambda c: all(s.compress.ratio == 4 and s.compress.overlap and s.indexer for s in c.layers),
    "hca": lambda c: all(s.compress.ratio > 4 and s.indexer is None for s in c.layers),
    "mhc": lambda c: c.residual == "mhc" and c.hc_mult == 4,
    "hc": lambda c: c.residual == "mhc" and c.hc_mult == 4,
    "ple": lambda c: c.per_layer_input_size > 0,
}


def test_every_mechanism_has_a_recipe():
    assert set(recipe_names()) == set(MECHANISMS) and recipe_names()[0] == "gqa"


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_recipe_matches_the_baseline_and_has_its_mechanism(name):
    recipe, base = load_recipe(name), load_recipe("gqa")
    assert MECHANISMS[name](recipe.config), name
    params, target = count_params(recipe.config)["total"], count_params(base.config)["total"]
    assert abs(params / target - 1) <= 0.02, (name, params, target)
    assert recipe.config.hidden_size == base.config.hidden_size and recipe.config.vocab_size == 256
    costs = recipe.costs()
    assert costs["kv_bytes_per_token"] == kv_cache_bytes(recipe.config, 4096, "bfloat16") / 4096
    assert costs["decode_flops_4k"] == decode_flops(recipe.config, 4096)


def test_mechanisms_cut_the_cache_they_claim_to_cut():
    kv = {n: load_recipe(n).costs()["kv_bytes_per_token"] for n in MECHANISMS}
    assert kv["mqa"] == kv["gqa"] / 2 and kv["cla2"] == kv["gqa"] / 2 and kv["kv_share"] == kv["gqa"] * 4 / 6
    assert kv["sliding"] < kv["gqa"] / 4 and kv["hca"] < kv["csa"] < kv["mla"] < kv["gqa"]
    assert kv["mhc"] == kv["head_budget"] == kv["ple"] == kv["gqa"]


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_every_recipe_trains_a_few_steps(tmp_path, name):
    (result,) = run_recipe(name, tmp_path, budget="ci", tasks=["mqar"], seeds=[0], log=lambda m: None)
    lines = [json.loads(x) for x in (tmp_path / name / "mqar" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == result["train"]["steps"] and all(math.isfinite(x["loss"]) for x in lines)
    assert 0 <= result["eval"]["mqar_accuracy"] <= 1 and result["recipe"]["name"] == name


def test_hc_recipe_swaps_in_unconstrained_connections():
    recipe = load_recipe("hc")
    from ctxlab import build_model

    model = build_model(recipe.config)
    assert recipe.model_transform()(model) == 2 * recipe.config.num_layers
    assert all(type(m) is UnconstrainedHyperConnection for n, m in model.named_modules() if n.endswith("_hc"))


def test_hyper_connection_gains():
    from ctxlab import build_model

    cfg = load_recipe("mhc").config
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mhc = residual_gains(build_model(cfg, seed=0), ids)
    # Sinkhorn makes every mixing matrix (nearly) doubly stochastic, so every product is too
    assert mhc["hc_composite_gain_fwd"] == pytest.approx(1.0, abs=1e-3)
    assert mhc["hc_composite_gain_bwd"] == pytest.approx(1.0, abs=1e-3)
    model = build_model(cfg, seed=0)
    load_recipe("hc").model_transform()(model)
    with torch.no_grad():  # a static mixing of I + 0.5 everywhere: each of the 12 connections gains 1 + 4 * 0.5
        for m in model.modules():
            if isinstance(m, UnconstrainedHyperConnection):
                m.base[8:].fill_(0.5)
                m.scale.zero_()
    hc = residual_gains(model, ids)
    assert hc["hc_max_layer_gain"] == pytest.approx(3.0, rel=1e-6)
    assert hc["hc_composite_gain_fwd"] == pytest.approx(3.0**12, rel=1e-6)
    assert residual_gains(build_model(load_recipe("gqa").config), ids) == {}


def test_welch_p_values():
    from scipy import stats

    a, b = [1.0, 1.2, 0.9], [2.0, 2.4, 2.1]
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    # Welch's t by hand: t = (m1 - m2) / sqrt(v1/n1 + v2/n2), df by Welch-Satterthwaite
    v1, v2 = stats.tvar(a) / 3, stats.tvar(b) / 3
    t = (sum(a) / 3 - sum(b) / 3) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 2)
    assert welch_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert welch_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0 and welch_p([0.0, 0.0], [1.0, 1.0]) == 0.0
    assert welch_p([1.0], [2.0, 3.0]) is None


def test_report_table_and_plots(tmp_path):
    runs = tmp_path / "runs"
    for name in ("gqa", "mqa"):
        run_recipe(name, runs, budget="ci", tasks=["mqar", "code"], seeds=[0, 1], log=lambda m: None)
    data = collect(runs)
    summary = write_report(runs, tmp_path / "lab.md", tmp_path / "plots")
    rows = {r["recipe"]: r for r in summary["rows"]}
    acc = [r["eval"]["bits_per_byte"] for r in data["mqa"]["code"]]
    base = [r["eval"]["bits_per_byte"] for r in data["gqa"]["code"]]
    cell = rows["mqa"]["metrics"]["held-out bits/byte"]
    assert cell["mean"] == pytest.approx(sum(acc) / 2) and cell["p"] == welch_p(acc, base)
    text = (tmp_path / "lab.md").read_text()
    assert "| MQA (`mqa`) | " in text and "| GQA baseline (`gqa`) |" in text and "plots/loss_curves.png" in text
    for png in ("bits_per_byte_vs_kv.png", "loss_curves.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # the hand-written text around the markers survives a regeneration
    (tmp_path / "lab.md").write_text("intro\n" + text + "\nafter\n")
    write_report(runs, tmp_path / "lab.md", None)
    again = (tmp_path / "lab.md").read_text()
    assert again.startswith("intro\n") and again.endswith("\nafter\n") and again.count("lab-report:begin") == 1
    assert summarize(runs)["meta"]["corpus"]["sha256"]


def test_cli_train_lab_run_and_errors(tmp_path, capsys):
    assert (
        main(["lab", "run", "gqa", "--budget", "ci", "--tasks", "mqar", "--seeds", "0", "--runs", str(tmp_path)]) == 0
    )
    assert (tmp_path / "gqa" / "mqar" / "seed0" / "result.json").exists()
    assert (
        main(["lab", "run", "gqa", "--budget", "ci", "--tasks", "mqar", "--seeds", "0", "--runs", str(tmp_path)]) == 0
    )
    assert "done already" in capsys.readouterr().err
    assert main(["train", "--recipe", "nope", "--task", "mqar", "--out", str(tmp_path / "x")]) == 2
    assert "recipe 'nope'" in capsys.readouterr().err
    assert (
        main(["train", "--recipe", "gqa", "--task", "mqar", "--task-param", "pairs=100", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "pairs = 100" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--recipe",
            "mqa",
            "--task",
            "mqar",
            "--task-param",
            "seq_len=32",
            "--task-param",
            "pairs=2",
            "--steps",
            "2",
            "--micro-batch",
            "2",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    assert code == 0 and json.loads((tmp_path / "t" / "result.json").read_text())["train"]["steps"] == 2
    assert main(["lab", "report", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "r.md")]) == 2


def test_bf16_autocast_trains(tmp_path):
    r = train(
        load_recipe("gqa").config,
        make_task("mqar", seq_len=32, pairs=2, eval_examples=4),
        TrainConfig(steps=2, micro_batch=2, bf16=True),
        tmp_path,
        progress=False,
    )
    assert math.isfinite(r["eval"]["mqar_accuracy"])


def test_runner_finishes_a_run_killed_after_its_last_checkpoint(tmp_path):
    from ctxlab.lab.runner import run_plan

    ((task_name, params, cfg),) = run_plan("ci", ["mqar"])
    recipe, out = load_recipe("gqa"), tmp_path / "gqa" / "mqar" / "seed0"
    first = train(
        recipe.config,
        make_task(task_name, **params),
        cfg,
        out,
        progress=False,
        extra_result={"recipe": recipe.to_dict()},
    )
    (out / "result.json").unlink()  # as if killed between the final checkpoint and result.json
    logs = []
    (again,) = run_recipe("gqa", tmp_path, budget="ci", tasks=["mqar"], seeds=[0], log=logs.append)
    assert again["eval"] == first["eval"] and again["tokens_per_s"] is None and "gqa mqar seed 0" in logs[0]
    assert (out / "result.json").exists() and not (out / "checkpoint.pt").exists()


def test_unconstrained_connections_never_take_the_sinkhorn_path():
    """The default (fused) mHC path projects with Sinkhorn; an HC connection must mix with its own
    unprojected matrix on every path, even after ``set_hc_impl(model, "fused")``."""
    from ctxlab import build_model
    from ctxlab.nn.residual import set_hc_impl

    model = build_model(load_recipe("mhc").config, seed=0)
    load_recipe("hc").model_transform()(model)
    set_hc_impl(model, "fused")
    m = next(m for m in model.modules() if isinstance(m, UnconstrainedHyperConnection))
    with torch.no_grad():
        m.base[8:].fill_(0.5)  # a static mix I + 0.5: rows sum to 3, far from doubly stochastic
        m.scale.zero_()
    x = torch.randn(1, 3, m.n, m.fn.shape[1] // m.n, generator=torch.Generator().manual_seed(0))
    _, (post, comb) = m.split(x)
    torch.testing.assert_close(comb, m.mixing(x)[2])
    torch.testing.assert_close(comb.sum(-1), torch.full_like(comb.sum(-1), 3.0))


def test_parallel_jobs_give_the_results_of_one_process(tmp_path):
    """``lab run --jobs 2``: the runs are shared out to worker processes, and each run's losses and
    evaluation are those of the same run trained in this process (a run depends only on its seed)."""
    from ctxlab.lab.runner import run_study

    logs = []
    run_study(
        ["gqa", "mqa"], tmp_path / "par", budget="ci", tasks=["mqar"], seeds=[0, 1], threads=1, jobs=2, log=logs.append
    )
    assert len(logs) == 4 and all(" mqar seed " in line for line in logs)
    run_study(["gqa", "mqa"], tmp_path / "one", budget="ci", tasks=["mqar"], seeds=[0, 1], log=lambda m: None)
    for name in ("gqa", "mqa"):
        for seed in (0, 1):
            par, one = (tmp_path / d / name / "mqar" / f"seed{seed}" for d in ("par", "one"))
            assert _losses(par) == _losses(one) and len(_losses(one)) == 2
            assert _result(par)["eval"] == _result(one)["eval"] and _result(par)["threads"] == 1
    with pytest.raises(InputError, match="jobs = 0"):
        run_study(["gqa"], tmp_path, budget="ci", jobs=0)
    with pytest.raises(InputError, match="nope"):
        run_study(["gqa", "nope"], tmp_path, budget="ci")


def _losses(run) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _result(run) -> dict:
    return json.loads((run / "result.json").read_text())
