"""GGUF ``llama`` files of Llama 3.1 / 3.2 / 3.3 models (HF ``rope_type = "llama3"``): llama.cpp writes
their RoPE scaling as the tensor ``rope_freqs`` (one frequency divisor per pair) and no metadata key;
``architectures._llama3_from_divisors`` reads the llama3 parameters back from it.

Files are written by tests/gguf_writer.py (``llama_to_gguf`` / ``hf_to_gguf``) with divisors computed
by its own ``llama3_rope_freqs``, following llama.cpp's converter. The oracle is the model each file
was written from (ctxlab's and HF's ``LlamaForCausalLM``). transformers 5.23 is no oracle here: its
GGUF loader loads such a file but ignores ``rope_freqs`` (the config it builds has
``rope_type = "default"``; ``modeling_gguf_pytorch_utils`` reads ``rope.scaling.*`` keys for
``gpt-oss`` only), so its logits are those of an unscaled RoPE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ctxlab
from ctxlab.io.config_file import config_from_dict
from ctxlab.model import CausalLM

from conftest import randomize_

gguf = pytest.importorskip("gguf", reason="the gguf package (ctxlab[gguf] extra) is not installed")

from ctxlab.io.gguf import architectures
from gguf_writer import divisors, hf_to_gguf, llama3_rope_freqs, llama_to_gguf, rewritten

SEQ = 100  # longer than every original context below (64): positions past it, where the scaling matters
HEAD_DIM = 16
BASE = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# theta 100 with 16-dim heads: pair wavelengths 6.3, 11, 20, 35, 63, 112, 199, 353; with original 64 the
# blend region [16, 64] holds three of them (checked in test_the_blend_region_is_not_empty).
THETA = 100.0
ROPES = {
    "factor8": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    "factor32": dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
}


def rope_parameters(**scaling) -> dict:
    return {"rope_type": "llama3", "rope_theta": THETA, **scaling}


def tiny_llama3(scaling: dict, seed: int = 0):
    """(HF config dict, random ctxlab model) with llama3 RoPE scaling ``scaling``."""
    config = {**BASE, "rope_parameters": rope_parameters(**scaling)}
    torch.manual_seed(seed)
    return config, randomize_(CausalLM(config_from_dict(config)), seed).eval()


@pytest.fixture(params=sorted(ROPES))
def written(request, tmp_path):
    config, model = tiny_llama3(ROPES[request.param])
    path = tmp_path / f"{request.param}.gguf"
    llama_to_gguf(config, model.state_dict(), path)
    return config, model, path


def _ids(n: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(1))


def test_the_blend_region_is_not_empty(written):
    """The file carries the three kinds of divisors: 1, ``factor``, and blended ones between."""
    config, _model, path = written
    divisors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    factor = config["rope_parameters"]["factor"]
    assert divisors.shape == (HEAD_DIM // 2,)
    assert (divisors == 1.0).sum() == 2 and (divisors == factor).sum() == 3
    assert ((divisors > 1.0) & (divisors < factor)).sum() == 3


def test_loaded_model_equals_the_model_it_was_written_from(written):
    _config, ref, path = written
    ours = ctxlab.from_pretrained(path)
    with torch.no_grad():
        assert (ours(_ids()) - ref(_ids())).abs().max().item() <= 1e-5


def test_config_round_trips(written):
    """factor, low / high frequency factors and original context come back exactly (the documented
    choice of ``original`` makes low_freq_factor 1, which these configs have)."""
    config, ref, path = written
    ours = ctxlab.load_config(path)
    assert ours.layers == ref.config.layers
    rope = ours.layers[0].rope
    expected = config["rope_parameters"]
    assert (rope.type, rope.theta, rope.factor) == ("llama3", THETA, expected["factor"])
    assert (rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings) == (1.0, 4.0, 64)
    assert ours == ctxlab.from_pretrained(path).config


def test_unscaled_rope_would_differ(written):
    """The scaling is not a no-op on these positions: without rope_freqs the logits move."""
    config, ref, path = written
    plain = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
    unscaled = CausalLM(config_from_dict(plain))
    unscaled.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert (unscaled.eval()(_ids()) - ref(_ids())).abs().max().item() > 1e-2


def test_equals_transformers_llama3_model(hf, tmp_path):
    """An HF ``LlamaForCausalLM`` with llama3 RoPE, written by ``hf_to_gguf``: ctxlab's model of the file
    has HF's logits (HF's own llama3 RoPE, ``_compute_llama3_parameters``)."""
    rope = rope_parameters(**ROPES["factor32"])
    config = hf.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, rope_parameters=rope)
    torch.manual_seed(0)
    ref = randomize_(hf.LlamaForCausalLM(config)).eval()
    hf_to_gguf(ref, "llama", tmp_path / "hf.gguf", vocab=128)
    ours = ctxlab.from_pretrained(tmp_path / "hf.gguf")
    with torch.no_grad():
        assert (ours(_ids()) - ref(_ids()).logits).abs().max().item() <= 1e-5
    assert ours.config.layers == config_from_dict(ref.config.to_dict()).layers


def test_other_low_freq_factor_loads_as_the_same_rope(tmp_path):
    """low 2, high 8, original 128 has the same wavelength thresholds (64, 16) as low 1, high 4, original
    64: the divisors cannot tell them apart, the loaded config is the latter, the logits are equal."""
    scaling = dict(factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=128)
    config, ref = tiny_llama3(scaling)
    llama_to_gguf(config, ref.state_dict(), tmp_path / "m.gguf")
    ours = ctxlab.from_pretrained(tmp_path / "m.gguf")
    rope = ours.config.layers[0].rope
    assert (rope.factor, rope.low_freq_factor, rope.high_freq_factor) == (8.0, 1.0, 4.0)
    assert rope.original_max_position_embeddings == 64
    with torch.no_grad():
        assert (ours(_ids()) - ref(_ids())).abs().max().item() <= 1e-5


def test_original_context_from_metadata_is_used(tmp_path):
    """A file that does carry ``llama.rope.scaling.original_context_length`` (llama.cpp's converter does
    not write it for llama3) keeps that value; low / high follow from the thresholds."""
    config, ref = tiny_llama3(ROPES["factor8"])
    llama_to_gguf(config, ref.state_dict(), tmp_path / "m.gguf")
    path = rewritten(
        tmp_path / "m.gguf", tmp_path / "edited.gguf", {"llama.rope.scaling.original_context_length": 128}, {}
    )
    ours = ctxlab.from_pretrained(path)
    rope = ours.config.layers[0].rope
    assert (rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor) == (128, 2.0, 8.0)
    with torch.no_grad():
        assert (ours(_ids()) - ref(_ids())).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("head_dim", "factor"),
    [(64, 32.0), (128, 32.0), (128, 8.0)],
    ids=["llama3.2-1b", "llama3.2-3b", "llama3.1-8b"],
)
def test_real_llama3_rope_parameters_are_recovered_exactly(head_dim, factor):
    """The published Llama 3.x rope parameters (theta 500,000; low 1, high 4, original 8192) from the
    divisors of a file of that head size; ctxlab's llama3 RoPE gives the file's divisors within 1e-7
    (relative), far inside ``LLAMA3_RTOL``."""
    rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": factor}
    rope.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    divisors = torch.from_numpy(llama3_rope_freqs(rope, head_dim))
    meta = {
        "llama.context_length": 131072,
        "llama.embedding_length": 32 * head_dim,
        "llama.block_count": 2,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 500_000.0,
        "llama.rope.dimension_count": head_dim,
    }
    out = architectures.ARCHITECTURES["llama"].config(
        meta,
        {"token_embd.weight": (128256, 32 * head_dim), "rope_freqs.weight": tuple(divisors.shape)},
        {"rope_freqs.weight": divisors},
    )
    assert out["rope_parameters"] == rope
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    assert architectures._llama3_mismatch(divisors.double(), 500_000.0, head_dim, scaling) < 1e-7  # the margin


GOOD = llama3_rope_freqs(rope_parameters(**ROPES["factor8"]), HEAD_DIM)
BLENDED = int(np.flatnonzero((GOOD > 1) & (GOOD < 8))[1])
NOT_LLAMA3 = {
    "one blended divisor off by 1e-3": (
        {},
        {"rope_freqs.weight": np.where(np.arange(8) == BLENDED, GOOD * np.float32(1.001), GOOD).astype(np.float32)},
        r"\(\[1, 1, 1.29398, 2.76794, 7.66739, 8, 8, 8\], 8 in all\): not Llama 3.1-style .*give divisors up to 0.0012 ",
    ),
    "Gemma 4 proportional divisors": (
        {},
        {"rope_freqs.weight": divisors(*([1.0] * 4 + [1e30] * 4))},
        r"\(\[1, 1, 1, 1, 1e\+30, 1e\+30, 1e\+30, 1e\+30\], 8 in all\): not Llama 3.1-style",
    ),
    "decreasing divisors": (
        {},
        {"rope_freqs.weight": divisors(8, 6, 4, 3, 2, 1.5, 1, 1)},
        r"\(\[8, 6, 4, 3, 2, 1.5, 1, 1\], 8 in all\): not Llama 3.1-style",
    ),
    "divisors below 1": (
        {},
        {"rope_freqs.weight": divisors(1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25)},
        r"no llama3 parameters fit them\); supported: 8 divisors >= 1 written by llama.cpp from HF rope_type 'llama3'",
    ),
    "one divisor per head dim": (
        {},
        {"rope_freqs.weight": np.concatenate([GOOD, GOOD])},
        r"16 in all\): not Llama 3.1-style RoPE frequency divisors \(no llama3 parameters fit them\); supported: 8",
    ),
    "with linear scaling": (
        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
        {},
        r"'rope_freqs.weight' together with llama.rope.scaling.type = 'linear': not supported",
    ),
}


@pytest.mark.parametrize("variant", sorted(NOT_LLAMA3))
def test_rope_freqs_that_are_not_llama3_are_one_clear_error(variant, tmp_path):
    meta_edits, tensor_edits, message = NOT_LLAMA3[variant]
    config, model = tiny_llama3(ROPES["factor8"])
    llama_to_gguf(config, model.state_dict(), tmp_path / "m.gguf")
    path = rewritten(tmp_path / "m.gguf", tmp_path / "edited.gguf", meta_edits, tensor_edits)
    with pytest.raises(ctxlab.ConfigError, match=message) as e:
        ctxlab.load_config(path)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("GGUF tensor 'rope_freqs.weight'")


def test_all_ones_is_plain_rope(tmp_path):
    """Divisors all 1 (factor 1) change nothing: plain RoPE."""
    config, model = tiny_llama3(ROPES["factor8"])
    llama_to_gguf(config, model.state_dict(), tmp_path / "m.gguf")
    path = rewritten(tmp_path / "m.gguf", tmp_path / "edited.gguf", {}, {"rope_freqs.weight": np.ones(8, np.float32)})
    assert ctxlab.load_config(path).layers[0].rope.type == "default"
