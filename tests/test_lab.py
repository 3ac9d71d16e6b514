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
    assert again["eval"] == first["eval"] and "gqa mqar seed 0" in logs[0]
    # the checkpoint carried the training time: the resumed result reports the run's, not zero seconds
    assert again["train_seconds"] == first["train_seconds"] and again["tokens_per_s"] == first["tokens_per_s"]
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


# --- found by a bug hunt (2026-12-05): bookkeeping, diverged runs, validation --------------------------------


def test_a_finished_run_of_another_model_is_trained_again(tmp_path):
    """``lab run`` skips a finished run only when its result is of the same model: after the recipe's model
    changes (here its KV heads), the old result is not reported under the new recipe."""
    recipe = tmp_path / "myr.json"
    recipe.write_text(json.dumps({"name": "myr", "base": "gqa", "layer": {"num_kv_heads": 2}}))
    logs = []
    run_recipe(str(recipe), tmp_path / "runs", budget="ci", tasks=["mqar"], seeds=[0], log=logs.append)
    run_recipe(str(recipe), tmp_path / "runs", budget="ci", tasks=["mqar"], seeds=[0], log=logs.append)
    assert "done already" in logs[-1]
    recipe.write_text(json.dumps({"name": "myr", "base": "gqa", "layer": {"num_kv_heads": 1}}))
    (result,) = run_recipe(str(recipe), tmp_path / "runs", budget="ci", tasks=["mqar"], seeds=[0], log=logs.append)
    assert "another model" in logs[-2] and "done already" not in logs[-1]
    assert result["recipe"]["config"]["layers"][0]["num_kv_heads"] == 1


def test_report_costs_follow_the_accounting_not_the_recorded_numbers(tmp_path):
    run_recipe("gqa", tmp_path, budget="ci", tasks=["mqar"], seeds=[0], log=lambda m: None)
    path = tmp_path / "gqa" / "mqar" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["recipe"]["costs"] = {"params": 1, "kv_bytes_per_token": 1.0, "decode_flops_4k": 1}  # an older accounting
    path.write_text(json.dumps(result))
    (row,) = summarize(tmp_path)["rows"]
    cfg = load_recipe("gqa").config
    assert row["params"] == count_params(cfg)["total"] and row["decode_flops_4k"] == decode_flops(cfg, 4096)


def _diverging_runs(runs, tmp_path):
    """Code-task runs of gqa (sane) and mhc (lr 1e9: NaN after its first step), two seeds each."""
    task = make_task("code", seq_len=16, eval_windows=2)
    for name, lr in (("gqa", 1e-3), ("mhc", 1e9)):
        recipe = load_recipe(name)
        for seed in (0, 1):
            cfg = TrainConfig(steps=2, micro_batch=2, warmup_steps=1, lr=lr, seed=seed, diagnostics_every=1)
            out = runs / name / "code" / f"seed{seed}"
            train(recipe.config, task, cfg, out, progress=False, extra_result={"recipe": recipe.to_dict()})


def test_report_shows_a_diverged_run_as_nan(tmp_path):
    """A run whose loss became NaN: the report is written (it crashed in statistics.stdev), its metric reads
    NaN with no significance mark, and its hyper-connection diagnostics read NaN (max() dropped the NaN)."""
    runs = tmp_path / "runs"
    _diverging_runs(runs, tmp_path)
    summary = write_report(runs, tmp_path / "lab.md", None)
    rows = {r["recipe"]: r for r in summary["rows"]}
    cell = rows["mhc"]["metrics"]["held-out bits/byte"]
    assert math.isnan(cell["mean"]) and math.isnan(cell["std"]) and cell["p"] is None and not cell["significant"]
    assert math.isnan(rows["mhc"]["diagnostics"]["max_grad_norm"])
    assert "(`mhc`) |" in (tmp_path / "lab.md").read_text()


def test_report_refuses_an_unknown_baseline_and_an_out_directory(tmp_path):
    run_recipe("gqa", tmp_path / "runs", budget="ci", tasks=["mqar"], seeds=[0], log=lambda m: None)
    with pytest.raises(InputError, match=r"baseline = 'GQA': .* no runs of it; recipes there: \['gqa'\]"):
        summarize(tmp_path / "runs", baseline="GQA")
    with pytest.raises(InputError, match="is a directory"):
        write_report(tmp_path / "runs", tmp_path, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()  # refused before anything was written


def test_the_baseline_is_listed_once_in_the_diagnostics(tmp_path):
    from ctxlab.lab.report import markdown

    runs = tmp_path / "runs"
    _diverging_runs(runs, tmp_path)
    diagnostics = markdown(summarize(runs, baseline="mhc")).split("Hyper-connection diagnostics")[1]
    assert diagnostics.count("| `mhc` |") == 1


@pytest.mark.parametrize(
    "task, params, message",
    [
        ("mqar", {"eval_examples": 0}, "eval_examples = 0"),
        ("mqar", {"seq_len": 16.5}, "seq_len = 16.5"),
        ("code", {"eval_windows": -5}, "eval_windows = -5"),
        ("code", {"heldout_every": 0}, "heldout_every = 0"),
        ("passkey", {"eval_per_cell": 0}, "eval_per_cell = 0"),
        ("passkey", {"eval_depths": []}, "need one or more"),
        ("passkey", {"eval_depths": [0.5, 1.5]}, "eval_depths entry 1.5"),
        ("passkey", {"eval_lengths": [64]}, "eval_lengths entry = 64 is too short"),
    ],
)
def test_tasks_refuse_sizes_that_would_fail_after_training(task, params, message):
    with pytest.raises(InputError, match=message):
        make_task(task, **params)


def test_passkey_evaluates_lengths_without_the_trained_one():
    """eval_lengths of extrapolation only: the @T metric is None, not a KeyError after training."""
    task = make_task("passkey", seq_len=128, eval_lengths=[256], eval_per_cell=1, eval_depths=[0.5])
    model = __import__("ctxlab").build_model(load_recipe("gqa").config, seed=0)
    out = task.evaluate(model)
    assert out["passkey_accuracy"] is None and out["passkey_accuracy_2x"] is not None


@pytest.mark.parametrize(
    "field, value", [("weight_decay", math.nan), ("grad_clip", math.nan), ("grad_clip", math.inf), ("beta2", 1.0)]
)
def test_train_config_refuses_nan_and_out_of_range_optimizer_values(field, value):
    with pytest.raises(InputError, match=f"{field} = "):
        TrainConfig(**{field: value})


def test_a_resumed_run_counts_the_training_time_before_it(tmp_path):
    """train_seconds (and tokens/s) cover every step, those before an interruption included: the checkpoint
    carries the time trained so far. Each step's time is in metrics.jsonl (tokens per step / tokens/s)."""
    task = make_task("mqar", seq_len=32, pairs=2, eval_examples=2)
    cfg = TrainConfig(steps=4, micro_batch=2, checkpoint_every=2)
    batch = task.batch

    def interrupted(seed, start, count):  # killed while building step 3's batch
        if start >= 2 * count:
            raise KeyboardInterrupt
        return batch(seed, start, count)

    task.batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe("gqa").config, task, cfg, tmp_path, progress=False)
    task.batch = batch
    result = train(load_recipe("gqa").config, task, cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    per_step = [r["tokens"] / r["step"] / r["tokens_per_s"] for r in records]
    assert result["train_seconds"] == pytest.approx(sum(per_step), rel=1e-9)
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["train_seconds"], rel=1e-9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lab", "run", "gqa", "--threads", "-1"], "--threads: '-1': expected an integer in [1,"),
        (["lab", "run", "gqa", "--threads", "0"], "--threads: '0'"),
        (["lab", "run", "gqa", "--seeds", "99999999999999999999"], "--seeds: '99999999999999999999'"),
        (["train", "--recipe", "gqa", "--task", "mqar", "--seed", "99999999999999999999"], "--seed: "),
        (["train", "--recipe", "gqa", "--task", "mqar", "--weight-decay", "nan"], "--weight-decay: 'nan'"),
        (["train", "--recipe", "gqa", "--task", "mqar", "--task-param", "seq_len=16.5"], "seq_len = 16.5"),
        (["train", "--recipe", "gqa", "--task", "code", "--task-param", "heldout_every=0"], "heldout_every = 0"),
    ],
)
def test_lab_cli_bad_values_are_usage_errors(tmp_path, capsys, argv, message):
    argv = [*argv, "--out" if argv[0] == "train" else "--runs", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lab_cli_refuses_a_file_as_the_run_directory_and_a_directory_as_the_report(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["train", "--recipe", "gqa", "--task", "mqar", "--steps", "1", "--out", str(tmp_path / "file")]
    assert main(argv) == 2 and "is a file" in capsys.readouterr().err
    assert main(["lab", "report", "--runs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--recipe", "gqa", "--task", "mqar", "--steps", "1", "--out", "{file}/run"],
        ["lab", "run", "gqa", "--budget", "ci", "--tasks", "mqar", "--seeds", "0", "--runs", "{file}"],
        ["lab", "report", "--runs", "{runs}", "--out", "{file}/x.md", "--plots", "{tmp}/plots"],
        ["lab", "report", "--runs", "{runs}", "--out", "{tmp}/x.md", "--plots", "{file}"],
    ],
)
def test_output_paths_that_cannot_be_written_are_usage_errors(tmp_path, capsys, argv):
    """A file where a directory goes: one line naming the path, exit 2 (they were tracebacks)."""
    (tmp_path / "file").write_text("")
    runs = tmp_path / "runs"
    run_recipe("gqa", runs, budget="ci", tasks=["mqar"], seeds=[0], log=lambda m: None)
    filled = [a.format(file=tmp_path / "file", runs=runs, tmp=tmp_path) for a in argv]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert "file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_misspelt_recipe_gets_a_suggestion():
    with pytest.raises(InputError, match="did you mean 'mla'"):
        load_recipe("mlaa")
