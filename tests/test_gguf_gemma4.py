"""GGUF architecture ``gemma4``: tiny random ctxlab Gemma 4 models written as llama.cpp's converter
writes them (tests/gguf_writer.py ``gemma4_to_gguf``: gguf-py's name map, llama.cpp's metadata keys,
arrays and ``rope_freqs``), loaded back by ``ctxlab.from_pretrained``.

The oracle is the model the file was written from: transformers 5.23 cannot build a Gemma 4 model
from a GGUF file (it reads none of the per-layer keys; see ``architectures.Gemma4``).
"""

from __future__ import annotations

import pytest
import torch

import ctxlab
from ctxlab.io.config_file import config_from_dict
from ctxlab.model import CausalLM

from conftest import randomize_

gguf = pytest.importorskip("gguf", reason="the gguf package (ctxlab[gguf] extra) is not installed")

from ctxlab.io.gguf import architectures
from gguf_writer import divisors, gemma4_to_gguf, rewritten

SEQ = 20  # longer than the window (8): sliding layers and their KV consumers wrap
BASE = dict(
    model_type="gemma4_text",
    vocab_size=128,
    vocab_size_per_layer_input=128,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=None,
    attention_k_eq_v=False,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    sliding_window=8,
    num_kv_shared_layers=3,
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    rope_parameters={  # not the defaults, so the bases must come from the file
        "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 200_000.0},
    },
    num_experts=None,
    top_k_experts=None,
    moe_intermediate_size=None,
)
CASES = {
    # E2B-like: per-layer embeddings; layers 3, 4 (sliding) read layer 1's K/V, layer 5 (full) layer 2's
    "ple-sharing-doublewide": {},
    # 26B-like: K = V full layers with their own KV-head count, 4 experts top-2, no PLE, no sharing
    "moe-k_eq_v": dict(
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=24,
    ),
}


def tiny_gemma4(case: str, seed: int = 0):
    """(HF config dict, ctxlab model with every parameter and layer scalar random)."""
    config = {**BASE, **CASES[case]}
    torch.manual_seed(seed)
    model = randomize_(CausalLM(config_from_dict(config)), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # moderate: Gemma 4 has no 1/sqrt(d)
                p.copy_(0.6 + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return config, model.eval()


def unused_shared_kv(config, model) -> dict[str, torch.Tensor]:
    """K/V weights of the KV-shared layers, which BF16 exports of the E models still carry."""
    extra, hidden, gen = {}, config["hidden_size"], torch.Generator().manual_seed(9)
    for i, spec in enumerate(model.config.layers):
        if spec.kv_source is not None:
            kv = spec.num_kv_heads * spec.head_dim
            for name, shape in (("k_proj", (kv, hidden)), ("v_proj", (kv, hidden)), ("k_norm", (spec.head_dim,))):
                extra[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(shape, generator=gen)
    return extra


@pytest.fixture(params=[*CASES, "ple-sharing-doublewide+unused-kv"])
def written(request, tmp_path):
    case, _, extra = request.param.partition("+")
    config, model = tiny_gemma4(case)
    state = model.state_dict()
    if extra:
        state = {**state, **unused_shared_kv(config, model)}
    path = tmp_path / f"{case}.gguf"
    gemma4_to_gguf(config, state, path)
    return config, model, path


def test_loaded_model_equals_the_model_it_was_written_from(written):
    _config, ref, path = written
    ours = ctxlab.from_pretrained(path)
    ids = torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids)).abs().max().item() <= 1e-5
    state = ours.state_dict()
    assert all(torch.equal(state[name], t) for name, t in ref.state_dict().items())  # norms as stored, no 1 + w


def test_config_round_trips(written):
    """Window, layer types, KV sharing, PLE width, head sizes, KV heads, RoPE bases and the proportional
    factor from ``rope_freqs``, FFN widths, experts, softcap: all of it from the GGUF metadata."""
    config, ref, path = written
    ours = ctxlab.load_config(path)
    assert ours.layers == ref.config.layers
    for field in ("per_layer_input_size", "per_layer_vocab_size", "final_logit_softcap", "norm_eps", "vocab_size"):
        assert getattr(ours, field) == getattr(ref.config, field), field
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, (1,), 0)
    sliding, full = ours.layers[0], ours.layers[2]
    assert (sliding.window, sliding.head_dim, full.window, full.head_dim) == (8, 16, None, 32)
    assert (sliding.rope.type, sliding.rope.theta) == ("default", 5_000.0)
    assert (full.rope.type, full.rope.theta, full.rope.partial_rotary_factor) == ("proportional", 200_000.0, 0.25)
    assert ours.per_layer_input_size == (config["hidden_size_per_layer_input"] or 0)
    shared = [i for i, s in enumerate(ours.layers) if s.kv_source is not None]
    assert shared == list(range(6 - config["num_kv_shared_layers"], 6))
    assert ours == ctxlab.from_pretrained(path).config


def test_name_table_agrees_with_gguf_py_name_map():
    """Every tensor of both variants, named by gguf-py's map (and the converter's renames), comes back to
    its own name through our table."""
    for case in CASES:
        _config, model = tiny_gemma4(case)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, model.config.num_layers)
        table = architectures.ARCHITECTURES["gemma4"]
        renamed = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}
        for ours in model.state_dict():
            if ours == "lm_head.weight":
                continue
            parts = ours.split(".")
            tail = ".".join(parts[3:])
            if tail in renamed:
                gguf_name = f"blk.{parts[2]}.{renamed[tail]}"
            else:
                stem, _, kind = (ours if ours.endswith((".weight", ".bias")) else ours + ".weight").rpartition(".")
                gguf_name = f"{names.get_name(stem)}.{kind}"
            assert table.our_name(gguf_name) == ours, gguf_name


UNSUPPORTED = {
    "llama3-style rope_freqs": (
        {},
        {"rope_freqs.weight": divisors(*([1.0] * 4 + [2.5] * 12))},
        r"'rope_freqs.weight' \(first values \[1.0, 1.0, 1.0, 1.0\], 16 in all\): must be 16 RoPE frequency divisors",
    ),
    "irregular FFN widths": (
        {"gemma4.feed_forward_length": [96, 96, 128, 192, 192, 192]},
        {},
        r"gemma4.feed_forward_length = \[96, 96, 128, 192, 192, 192\]: per-layer widths are supported only as "
        r"one width, doubled on the KV-shared layers 3..",
    ),
    "global KV heads without K = V": (
        {"gemma4.attention.head_count_kv": [2, 2, 1, 2, 2, 1]},
        {},
        r"gemma4.attention.head_count_kv = \[2, 2, 1, 2, 2, 1\]: other KV-head counts on full layers than on "
        r"sliding ones need K = V full layers",
    ),
    "partial RoPE on sliding layers": (
        {"gemma4.rope.dimension_count_swa": 8},
        {},
        r"gemma4.rope.dimension_count_swa = 8: not supported \(allowed: 16\)",
    ),
    "window period instead of a per-layer pattern": (
        {"gemma4.attention.sliding_window_pattern": 3},
        {},
        r"gemma4.attention.sliding_window_pattern = 3: must be one boolean per layer \(6, True = sliding\)",
    ),
    "rope scaling": (
        {"gemma4.rope.scaling.type": "yarn"},
        {},
        r"gemma4.rope.scaling.type = 'yarn' is not supported \(allowed: none\)",
    ),
    "missing sliding head size": (
        {"gemma4.attention.key_length_swa": None},
        {},
        r"'gemma4.attention.key_length_swa' is missing",
    ),
}


@pytest.mark.parametrize("variant", sorted(UNSUPPORTED))
def test_unsupported_variants_are_one_clear_error(variant, tmp_path):
    meta_edits, tensor_edits, message = UNSUPPORTED[variant]
    config, model = tiny_gemma4("ple-sharing-doublewide")
    gemma4_to_gguf(config, model.state_dict(), tmp_path / "m.gguf")
    path = rewritten(tmp_path / "m.gguf", tmp_path / "edited.gguf", meta_edits, tensor_edits)
    with pytest.raises(ctxlab.ConfigError, match=message):
        ctxlab.from_pretrained(path)
