"""Models are built and loaded straight into their dtype: the peak resident memory of a process that
builds or loads a ~240 MB model is at most 1.15x its weights + cache, and the CLI's pre-flight
estimate is within 15% of that peak. Measured in a subprocess (peak RSS), never by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctxlab

PROBE = Path(__file__).with_name("memory_probe.py")
TOKENS = 2048
# Llama-shaped, ~118M parameters (236 MB in bfloat16), no tensor above 6 MB in bfloat16
CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 10,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def probe(mode: str, source: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, str(PROBE), mode, str(source), dtype, str(TOKENS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("medium") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def bf16_checkpoint(config_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("medium-ckpt")
    ctxlab.build_model(ctxlab.load_config(config_file), dtype=torch.bfloat16).save_pretrained(path)
    return path


def check(m: dict) -> None:
    need = m["weights"] + m["cache"]
    assert m["peak"] <= 1.15 * need, f"peak {m['peak'] / 2**20:.0f} MiB vs weights + cache {need / 2**20:.0f} MiB"
    assert abs(m["estimate"] - m["peak"]) <= 0.15 * m["peak"], m


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_building_peaks_at_the_weights_in_their_dtype(config_file, dtype):
    m = probe("build", config_file, dtype)
    assert m["weights"] > 200e6 if dtype == "bfloat16" else m["weights"] > 400e6
    check(m)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loading_a_bfloat16_checkpoint_peaks_at_the_weights_in_the_target_dtype(bf16_checkpoint, dtype):
    check(probe("load", bf16_checkpoint, dtype))


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3-sliding", "gemma4_text", "zaya", "deepseek_v4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_estimate_counts_the_rope_tables_a_cache_holds_beside_its_kv_state(family, dtype):
    from ctxlab.io.config_file import config_from_dict
    from ctxlab.memory import generation_bytes, rope_table_bytes
    from test_config_fields import CONFIGS

    cfg = config_from_dict(CONFIGS[family], name=family)
    cache = ctxlab.build_model(cfg, dtype=dtype, seed=0).new_cache(1, 37)
    assert cache.rope_nbytes() == rope_table_bytes(cfg, dtype, 37) > 0
    assert cache.nbytes() == ctxlab.kv_cache_bytes(cfg, 37, dtype)  # the K/V state: the accounting's "realized"
    assert generation_bytes(cfg, dtype, 37)["cache"] == cache.nbytes() + cache.rope_nbytes()


@pytest.mark.parametrize("family", ["tiny-llama", "gemma4_text", "laguna", "zaya", "deepseek_v32", "deepseek_v4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_estimate_counts_each_weight_in_the_dtype_it_is_built_in(family, dtype):
    """Every family's tiny model, and an mHC one (whose float32 mixing projections are a third of a tiny DeepSeek
    V4's bytes in bf16): the estimate is the bytes the built model's tensors hold."""
    from ctxlab.io.config_file import config_from_dict
    from ctxlab.lab import load_recipe
    from ctxlab.memory import weights_bytes
    from test_config_fields import CONFIGS

    for cfg in (config_from_dict(CONFIGS[family], name=family), load_recipe("mhc").config):
        model = ctxlab.build_model(cfg, dtype=dtype, seed=0)
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        assert weights_bytes(cfg, getattr(torch, dtype)) == sum(t.numel() * t.element_size() for t in tensors.values())
