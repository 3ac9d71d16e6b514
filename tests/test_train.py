"""The training loop: loss goes down on every task, kill-and-resume is bit-identical, torchrun DDP and
gradient accumulation match one process, the schedule, checkpoints and the task data are what they say."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctxlab import LayerSpec, ModelConfig
from ctxlab.train import TrainConfig, make_task, train
from ctxlab.train.checkpoint import load, save_atomic
from ctxlab.train.schedule import WarmupCosine
from ctxlab.train.tasks import IGNORE

SCRIPT = Path(__file__).parent / "lab_scripts" / "tiny_train.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}


def tiny_config(layers: int = 2, hidden: int = 48) -> ModelConfig:
    layer = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=96)
    return ModelConfig(family="ctxlab", vocab_size=256, hidden_size=hidden, layers=(layer,) * layers)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize(
    "task,params",
    [
        ("mqar", {"seq_len": 32, "pairs": 4, "eval_examples": 16}),
        ("passkey", {"seq_len": 128, "eval_per_cell": 2}),
        ("code", {"seq_len": 64, "eval_windows": 4}),
    ],
)
def test_a_tiny_run_lowers_the_loss(tmp_path, task, params):
    result = train(
        tiny_config(),
        make_task(task, **params),
        TrainConfig(steps=40, micro_batch=8, warmup_steps=5, lr=1e-2),
        tmp_path,
        progress=False,
    )
    curve = [loss for _, loss in losses(tmp_path)]
    assert len(curve) == 40
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert result["eval"] and all(isinstance(v, (float, int, dict)) for v in result["eval"].values())
    if task == "code":  # a model that learned anything beats the uniform 8 bits per byte on held-out files
        assert result["eval"]["bits_per_byte"] < 7.0
        assert result["task"]["corpus"]["sha256"] and result["task"]["corpus"]["files"] > 100


def test_killed_run_resumes_bit_identical(tmp_path):
    steps = 150
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, str(SCRIPT), str(whole), str(steps), "4"], env=ENV, check=True, timeout=600)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), str(steps), "4"], env=ENV)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    state = load(killed / "checkpoint.pt")
    assert 0 < state["step"] < steps and state["examples"] == state["step"] * 4
    subprocess.run([sys.executable, str(SCRIPT), str(killed), str(steps), "4"], env=ENV, check=True, timeout=600)
    resumed, reference = losses(killed), losses(whole)
    assert [s for s, _ in resumed] == list(range(1, steps + 1))  # every step once, none lost or repeated
    assert resumed == reference  # bit-identical floats
    assert (
        json.loads((killed / "result.json").read_text())["eval"]
        == json.loads((whole / "result.json").read_text())["eval"]
    )


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = train(
        tiny_config(),
        make_task("mqar", seq_len=32, pairs=4, eval_examples=8),
        TrainConfig(steps=6, micro_batch=8, warmup_steps=2),
        tmp_path / "big",
        progress=False,
    )
    acc = train(
        tiny_config(),
        make_task("mqar", seq_len=32, pairs=4, eval_examples=8),
        TrainConfig(steps=6, micro_batch=2, grad_accum=4, warmup_steps=2),
        tmp_path / "acc",
        progress=False,
    )
    assert big["global_batch"] == acc["global_batch"] == 8
    for (s1, a), (s2, b) in zip(losses(tmp_path / "big"), losses(tmp_path / "acc")):
        assert s1 == s2 and abs(a - b) < 1e-5


def torchrun(out: Path, steps: int, micro: int, strategy: str = "ddp") -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        str(out),
        str(steps),
        str(micro),
        "1",
        strategy,
        "0",
    ]
    done = subprocess.run(cmd, env=ENV, timeout=900, capture_output=True, text=True)
    # a failure shows the processes' output (a CI run once failed with only the exit status to go on)
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(tmp_path, strategy):
    steps = 5
    subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one"), str(steps), "8", "1", "ddp", "0"],
        env=ENV,
        check=True,
        timeout=600,
    )
    torchrun(tmp_path / "two", steps, 4, strategy)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == steps
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and abs(a - b) <= 1e-5, (s1, a, b)
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch"] == 8


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"x": torch.arange(3)}, path)
    save_atomic({"x": torch.arange(4)}, path)
    assert torch.equal(load(path)["x"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left behind


class RunsCode:
    """An object whose unpickling would run code (``os.system``): what a hostile checkpoint.pt holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_other_objects_is_refused_not_unpickled(tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"train_config": RunsCode(marker)}, run / "checkpoint.pt")
    task = make_task("mqar", seq_len=32, pairs=2, eval_examples=4)
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a ctxlab training checkpoint.*never unpickles"):
        train(tiny_config(1, 16), task, TrainConfig(steps=1, micro_batch=2), run, progress=False)
    assert not marker.exists()
    train(tiny_config(1, 16), task, TrainConfig(steps=1, micro_batch=2), tmp_path / "fresh", progress=False)
    state = load(tmp_path / "fresh" / "checkpoint.pt")  # what ctxlab writes loads as plain data
    assert isinstance(state["rng"]["numpy"][1], list) and state["step"] == 1


def test_mqar_examples_ask_for_the_paired_values():
    task = make_task("mqar", seq_len=64, pairs=6)
    for i in range(20):
        inputs, targets = task.example(seed=3, index=i)
        pairs = {int(inputs[2 * j]): int(inputs[2 * j + 1]) for j in range(6)}
        assert len(pairs) == 6 and all(k < 128 <= v for k, v in pairs.items())
        asked = (targets != IGNORE).nonzero().flatten().tolist()
        assert len(asked) == 6 and all(p >= 12 for p in asked)
        assert sorted(int(inputs[p]) for p in asked) == sorted(pairs)
        assert all(int(targets[p]) == pairs[int(inputs[p])] for p in asked)
    a, b = task.example(seed=3, index=0), task.example(seed=4, index=0)
    assert not torch.equal(a[0], b[0]) and torch.equal(a[0], task.example(seed=3, index=0)[0])


def test_passkey_examples_hide_the_number_that_is_asked_for():
    task = make_task("passkey", seq_len=200)
    for i in range(10):
        inputs, targets = task.example(seed=0, index=i)
        text = bytes(inputs.tolist()).decode()
        number = text.split("The pass key is ")[1][:5]
        assert number.isdigit() and text.count(number) == 2  # "The pass key is N. Remember it. N is the pass key."
        answer = bytes(targets[targets != IGNORE].tolist()).decode()
        assert answer == number and len(inputs) == 200
        assert text.endswith("What is the pass key? The pass key is " + answer[:-1])


def test_code_corpus_split_is_by_file_and_recorded():
    task = make_task("code", seq_len=32)
    m = task.manifest
    paths = [f["path"] for f in m["file_list"]]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    held = {f["path"] for f in m["file_list"] if f["split"] == "heldout"}
    assert 0 < len(held) < len(paths) / 5
    assert m["heldout_bytes"] == sum(f["bytes"] for f in m["file_list"] if f["split"] == "heldout") + len(held) - 1
    assert len(m["sha256"]) == 64 and not any("site-packages" in p for p in paths)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    task = make_task("mqar", seq_len=32, pairs=2, eval_examples=4)
    train(tiny_config(1, 16), task, TrainConfig(steps=2, micro_batch=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train(tiny_config(1, 16), task, TrainConfig(steps=2, micro_batch=2, lr=1e-4), tmp_path, progress=False)


def test_resume_refuses_a_checkpoint_of_another_model_task_or_batch(tmp_path):
    """The same training config is not the same run: a checkpoint of another model (whose weights may well fit),
    another task, or another global batch (another number of processes: the data position and the token count
    would not continue) is refused by name."""
    task, cfg = make_task("mqar", seq_len=32, pairs=2, eval_examples=4), TrainConfig(steps=2, micro_batch=2)
    layer = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=96)
    sliding = ModelConfig(
        family="ctxlab", vocab_size=256, hidden_size=16, layers=(LayerSpec(**{**layer.__dict__, "window": 8}),)
    )
    train(tiny_config(1, 16), task, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different model config"):
        train(sliding, task, cfg, tmp_path, progress=False)  # the same parameter shapes
    with pytest.raises(ValueError, match="different task"):
        train(
            tiny_config(1, 16), make_task("mqar", seq_len=32, pairs=3, eval_examples=4), cfg, tmp_path, progress=False
        )
    state = load(tmp_path / "checkpoint.pt")
    save_atomic({**state, "global_batch": 4}, tmp_path / "checkpoint.pt")  # as two processes would have written it
    with pytest.raises(ValueError, match=r"different global batch \(4 examples a step, here 2"):
        train(tiny_config(1, 16), task, cfg, tmp_path, progress=False)


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="micro_batch = 0"):
        TrainConfig(micro_batch=0)
    with pytest.raises(ValueError, match="strategy = 'zero'"):
        TrainConfig(strategy="zero")
    with pytest.raises(ValueError, match="task = 'nope'"):
        make_task("nope")


def test_bits_per_byte_is_cross_entropy_in_bits():
    task = make_task("code", seq_len=16, eval_windows=3)

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 256)

    assert task.evaluate(Uniform())["bits_per_byte"] == pytest.approx(math.log2(256))


def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path, capsys):
    task = make_task("mqar", seq_len=32, pairs=2, eval_examples=4)
    train(tiny_config(1, 16), task, TrainConfig(steps=3, micro_batch=2), tmp_path / "a", progress=True)
    out = capsys.readouterr()
    assert "loss" in out.err and "tok/s" in out.err and "3/3" in out.err and out.out == ""
    train(tiny_config(1, 16), task, TrainConfig(steps=3, micro_batch=2), tmp_path / "b")  # stderr is not a TTY here
    assert capsys.readouterr().err == ""
