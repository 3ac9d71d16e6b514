"""GGUF import on small synthetic files: header parsing, every tensor type, the name tables, llama.cpp's
q/k permutation and Gemma's (1 + w) norms, errors. The real models are in test_gguf_models.py.

Files are written by gguf-py's ``GGUFWriter`` the way llama.cpp's converter writes them
(tests/gguf_writer.py); the oracle is the HF model they were written from, and ``gguf.GGUFReader`` /
``gguf.quants`` for the container and the block formats.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

import ctxlab
from ctxlab.io.config_file import config_from_dict

from conftest import randomize_

gguf = pytest.importorskip("gguf", reason="the gguf package (ctxlab[gguf] extra) is not installed")

from ctxlab.io import gguf as ctx_gguf
from ctxlab.io.gguf import architectures, dequant, loader
from gguf_writer import hf_to_gguf, llama_cpp_permute, write_gguf

T = gguf.GGMLQuantizationType
TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}
# byte offsets of the float16 scale fields in each block (ggml-common.h block_q*), made finite in random blocks
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.Q3_K: [108],
    T.Q2_K: [80, 82],
}


def random_blocks(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes for [rows, cols] values of ``kind``, with finite float16 scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        raw[:, :, at : at + 2] = (
            rng.uniform(-0.05, 0.05, (rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        )
    return raw.reshape(rows, -1)


def tensor_data(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == T.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32)
    if kind == T.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16)
    if kind == T.BF16:
        return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), T.BF16)
    return random_blocks(kind, rows, cols, seed)


def tiny_hf(hf, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        model = hf.LlamaForCausalLM(hf.LlamaConfig(**TINY, tie_word_embeddings=False))
    elif arch == "qwen3":
        model = hf.Qwen3ForCausalLM(hf.Qwen3Config(**TINY, tie_word_embeddings=True))
    else:
        config = hf.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 7}, sliding_window=8, query_pre_attn_scalar=16)
        model = hf.Gemma3ForCausalLM(config)
        model.config._attn_implementation = "eager"
    randomize_(model, seed)
    if arch == "gemma3":  # norm weights are offsets from 1 in HF's Gemma 3
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    return model.eval()


@pytest.fixture(params=["llama", "qwen3", "gemma3"])
def written(request, hf, tmp_path):
    ref = tiny_hf(hf, request.param)
    path = tmp_path / f"{request.param}.gguf"
    hf_to_gguf(ref, request.param, path, vocab=128)
    return request.param, ref, path


def test_loaded_model_equals_the_model_the_file_was_written_from(written):
    """llama: q/k rows un-permuted; gemma3: 1 subtracted from every norm; tied / untied heads."""
    _arch, ref, path = written
    ours = ctxlab.from_pretrained(path)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-5
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    expected = config_from_dict(ref.config.to_dict())
    assert ours.config.layers == expected.layers
    assert (ours.config.hidden_size, ours.config.vocab_size, ours.config.norm_eps) == (64, 128, expected.norm_eps)
    assert (ours.config.bos_token_id, ours.config.eos_token_id) == (2, (1,))  # from tokenizer.ggml.*


def test_load_config_reads_only_the_metadata(written):
    _arch, _ref, path = written
    assert ctxlab.load_config(path) == ctxlab.from_pretrained(path).config


def test_gemma_norms_are_converted_in_float32_before_the_cast(hf, tmp_path):
    ref = tiny_hf(hf, "gemma3")
    hf_to_gguf(ref, "gemma3", tmp_path / "g.gguf", vocab=128)
    ours = ctxlab.from_pretrained(tmp_path / "g.gguf", dtype=torch.bfloat16)
    w = ref.model.layers[0].input_layernorm.weight.detach()
    assert torch.equal(ours.model.layers[0].input_layernorm.weight, ((w + 1.0) - 1.0).to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in ours.parameters())


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    for heads in (6, 3, 1):
        permuted = torch.from_numpy(llama_cpp_permute(w, heads))
        assert not torch.equal(permuted, torch.from_numpy(w))
        assert torch.equal(architectures.unpermute_rows(permuted, heads), torch.from_numpy(w))
    bias = np.arange(48, dtype=np.float32)
    assert torch.equal(
        architectures.unpermute_rows(torch.from_numpy(llama_cpp_permute(bias, 6)), 6), torch.from_numpy(bias)
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_name_table_agrees_with_gguf_py_name_map(hf, arch):
    """Every tensor of the model, named by gguf-py's map, comes back to its own name through our table."""
    model = tiny_hf(hf, arch)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    table = architectures.ARCHITECTURES[arch]
    for ours in model.state_dict():
        stem, _, kind = ours.rpartition(".")
        assert table.our_name(f"{names.get_name(stem)}.{kind}") == ours
    assert table.our_name("blk.0.attn_q.scale") is None and table.our_name("rope_freqs.weight") is None


TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_K, T.Q3_K]


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_every_type_converts_like_gguf_quants_in_chunks(tmp_path, monkeypatch, kind):
    """Offsets, reading in chunks of rows and conversion equal gguf's reader + dequantize."""
    rows, cols = 6, 512
    data = tensor_data(kind, rows, cols)
    write_gguf(
        tmp_path / "t.gguf",
        "llama",
        {},
        {"x.weight": (data, int(kind), (rows, cols)), "y.weight": (tensor_data(T.F32, 2, 32, 1), 0, (2, 32))},
    )
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    expected = torch.from_numpy(gguf.quants.dequantize(reader.tensors[0].data, kind).astype(np.float32))
    f = ctx_gguf.read_header(tmp_path / "t.gguf")
    table = architectures.ARCHITECTURES["llama"]
    with open(tmp_path / "t.gguf", "rb") as fh:
        for chunk in (2 * cols, rows * cols):  # three chunks of two rows; one chunk
            monkeypatch.setattr(dequant, "CHUNK_ELEMENTS", chunk)
            for dtype in (torch.float32, torch.bfloat16):
                got = loader._convert(fh, f.tensors["x.weight"], table, None, dtype, None)
                assert got.dtype == dtype and got.shape == (rows, cols)
                assert torch.equal(got, expected.reshape(rows, cols).to(dtype))


def test_header_matches_gguf_reader(tmp_path):
    meta = {
        "llama.block_count": 3,
        "general.name": "tiny",
        "llama.rope.freq_base": 1e-6,
        "flag": True,
        "tokenizer.ggml.tokens": ["a", "é", "日本", ""],
        "tokenizer.ggml.scores": [0.5, -1.0, 2.0, 0.0],
        "general.alignment": 64,
    }
    tensors = {
        "a.weight": (tensor_data(T.Q8_0, 3, 64), int(T.Q8_0), (3, 64)),
        "b.weight": (tensor_data(T.F32, 1, 5), 0, (1, 5)),
    }
    write_gguf(tmp_path / "h.gguf", "llama", meta, tensors)
    ours = ctx_gguf.read_header(tmp_path / "h.gguf")
    reader = gguf.GGUFReader(tmp_path / "h.gguf")
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == (float(str(np.float32(value))) if isinstance(value, float) else value), key
    assert ours.metadata["llama.rope.freq_base"] == 1e-6  # the float32 read back as its shortest decimal
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.shape, info.type_id) == (
            int(t.data_offset),
            tuple(int(d) for d in reversed(t.shape)),
            int(t.tensor_type),
        )


# ------------------------------------------------------------------------------------------------ errors


def test_unsupported_architecture_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", "mamba", {}, {"x.weight": (tensor_data(T.F32, 1, 4), 0, (1, 4))})
    with pytest.raises(
        ctxlab.ConfigError,
        match=r"architecture 'mamba' is not supported; supported: \['gemma3', 'gemma4', 'llama', 'qwen3'\]",
    ):
        ctxlab.from_pretrained(tmp_path / "m.gguf")


def test_every_unsupported_type_and_unknown_tensor_in_one_error(written, tmp_path):
    arch, _ref, path = written
    f = gguf.GGUFReader(path)
    tensors = {
        t.name: (np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))), int(t.tensor_type), None)
        for t in f.tensors
    }
    tensors["blk.0.attn_q.weight"] = (np.zeros((1, 292), np.uint8), int(T.Q8_K), (1, 256))
    tensors["blk.0.ffn_up.weight"] = (np.zeros((96, 64), np.int32), int(T.I32), (96, 64))
    tensors["blk.0.surprise.weight"] = (tensor_data(T.F32, 1, 4), 0, (1, 4))
    meta = {k: fl.contents() for k, fl in f.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
    write_gguf(tmp_path / "bad.gguf", arch, meta, tensors)
    with pytest.raises(ctxlab.CheckpointError) as e:
        ctxlab.from_pretrained(tmp_path / "bad.gguf")
    assert "unsupported GGML tensor type(s) ['Q8_K', 'I32']" in str(e.value) and "blk.0.surprise.weight" in str(e.value)
    assert "blk.0.attn_q.weight" in str(e.value) and "blk.0.ffn_up.weight" in str(e.value)


def test_truncated_files_are_reported(written, tmp_path):
    _arch, _ref, path = written
    data = path.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ctxlab.CheckpointError, match="truncated"):
        ctxlab.from_pretrained(tmp_path / "half.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:300])
    with pytest.raises(ctxlab.CheckpointError, match="truncated GGUF header"):
        ctxlab.load_config(tmp_path / "head.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(ctxlab.CheckpointError, match="not a GGUF file"):
        ctxlab.from_pretrained(tmp_path / "not.gguf")
    with pytest.raises(ctxlab.CheckpointError, match="no such GGUF file"):
        ctxlab.load_config(tmp_path / "absent.gguf")


def test_missing_gguf_package_names_the_extra(written, monkeypatch):
    _arch, _ref, path = written
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r'pip install "ctxlab\[gguf\]"'):
        ctxlab.from_pretrained(path)


def test_cli_inspect_reads_a_gguf_file(written, capsys):
    from ctxlab.cli import main

    _arch, ref, path = written
    assert main(["inspect", str(path), "--json", "--context", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == ref.config.num_hidden_layers and info["vocab_size"] == 128


def test_cli_generate_runs_the_gguf_weights(written, capsys):
    """Token ids in, the model's own greedy tokens out (no random-weights warning)."""
    from ctxlab.cli import main

    _arch, ref, path = written
    assert main(["generate", str(path), "--prompt-ids", "3,4,5", "--max-new-tokens", "4", "--json"]) == 0
    out = capsys.readouterr()
    assert "RANDOM" not in out.err
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert json.loads(out.out)["generated_ids"] == expected[0, 3:].tolist()


def test_a_file_without_a_rope_base_takes_llama_cpps_default(written):
    """llama.cpp's load_hparams reads 10,000 when ``{arch}.rope.freq_base`` is absent, for every architecture."""
    from ctxlab.io.gguf import ARCHITECTURES, read_header
    from ctxlab.io.gguf import hf_config as gguf_hf_config

    arch, _ref, path = written
    f = read_header(path)
    f.metadata.pop(f"{arch}.rope.freq_base", None)
    d = gguf_hf_config(f, ARCHITECTURES[arch])
    full = d["rope_parameters"].get("full_attention", d["rope_parameters"])
    assert full["rope_theta"] == 10_000.0


def _config_of(written, **edits):
    """The HF config dict of the written file with its metadata edited (None removes a key)."""
    from ctxlab.io.gguf import ARCHITECTURES, read_header
    from ctxlab.io.gguf import hf_config as gguf_hf_config

    arch, _ref, path = written
    f = read_header(path)
    for key, value in edits.items():
        key = key.replace("ARCH", arch)
        if value is None:
            f.metadata.pop(key, None)
        else:
            f.metadata[key] = value
    d = gguf_hf_config(f, ARCHITECTURES[arch])
    return d["rope_parameters"].get("full_attention", d["rope_parameters"]), d


@pytest.mark.parametrize(
    "edits",
    [
        {"ARCH.rope.scaling.type": "linear", "ARCH.rope.scaling.factor": 4.0},
        {"ARCH.rope.scaling.factor": 4.0},  # no type: llama.cpp's default is linear
        {"ARCH.rope.scale_linear": 4.0},  # the old key of 2023 conversions
    ],
)
def test_linear_rope_scaling_as_llama_cpp_reads_it(written, edits):
    """(The second and third were read as unscaled RoPE: logits off by up to 6 against llama.cpp.)"""
    rope, _ = _config_of(written, **edits)
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0


@pytest.mark.parametrize("edits", [{"ARCH.rope.scaling.type": "linear"}, {"ARCH.rope.scaling.type": "none"}])
def test_rope_scaling_without_a_factor_is_no_scaling(written, edits):
    rope, _ = _config_of(written, **edits)
    assert rope["rope_type"] == "default"


def test_the_head_size_left_out_is_embedding_length_over_heads(written):
    """As llama.cpp and the GGUF spec read it (qwen3 and gemma3 took their HF defaults, 128 and 256)."""
    _, d = _config_of(written, **{"ARCH.attention.key_length": None})
    assert d["head_dim"] == TINY["hidden_size"] // TINY["num_attention_heads"]


@pytest.mark.parametrize("alignment", [0, "32 bytes"])
def test_a_bad_alignment_is_a_checkpoint_error(tmp_path, alignment):
    """(0 was a ZeroDivisionError, a string a ValueError, both with a traceback.)"""
    from ctxlab.io.gguf import read_header

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    (w.add_uint32 if isinstance(alignment, int) else w.add_string)("general.alignment", alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ctxlab.CheckpointError, match=f"general.alignment = {alignment!r}; allowed: a positive integer"):
        read_header(path)


def test_unknown_type_tokens_are_special_as_in_llama_cpp():
    """A SentencePiece <unk> typed UNKNOWN (as llama.cpp's converter writes it) is matched whole and hidden when
    decoding without specials (it was split into '<', 'unk', '>')."""
    from ctxlab.io.gguf_tokenizer import tokenizer_from_gguf_fields

    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "\u2581b", "a", "b", "<", ">", "u", "n", "k", "\u2581"]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    tok = tokenizer_from_gguf_fields(meta)
    assert tok.encode("a <unk> b").ids.count(0) == 1
    assert tok.decode([3, 0, 4], skip_special_tokens=True) == "a b"


def test_a_file_without_a_vocabulary_is_a_config_error(written):
    """Neither token_embd.weight nor tokenizer.ggml.tokens: a ConfigError (it was a KeyError)."""
    from ctxlab.errors import ConfigError
    from ctxlab.io.gguf import ARCHITECTURES, read_header
    from ctxlab.io.gguf import hf_config as gguf_hf_config

    arch, _ref, path = written
    f = read_header(path)
    f.metadata.pop("tokenizer.ggml.tokens")
    f.tensors.pop("token_embd.weight")
    with pytest.raises(ConfigError, match="no vocabulary size"):
        gguf_hf_config(f, ARCHITECTURES[arch])


@pytest.mark.parametrize("written", ["llama"], indirect=True)  # the architecture that reads a config tensor
def test_a_config_tensor_of_an_unsupported_type_is_a_checkpoint_error(written):
    """Llama 3's rope_freqs is read for the config before the weights' type check: an unsupported type is named
    there (it was a TypeError from memoryview, or a ValueError for an unknown type id)."""
    from ctxlab.io.gguf import ARCHITECTURES, read_header
    from ctxlab.io.gguf import hf_config as gguf_hf_config
    from ctxlab.io.gguf.reader import TensorInfo

    arch, _ref, path = written
    f = read_header(path)
    assert "rope_freqs.weight" in ARCHITECTURES[arch].config_tensors
    for type_id, name in ((int(T.Q8_1), "Q8_1"), (99, "unknown type 99")):
        f.tensors["rope_freqs.weight"] = TensorInfo("rope_freqs.weight", (8,), type_id, 0)
        with pytest.raises(ctxlab.CheckpointError, match=re.escape(f"rope_freqs.weight ({name})")):
            gguf_hf_config(f, ARCHITECTURES[arch])


def _spm_fields(extra_tokens, extra_types):
    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "a", *extra_tokens]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, *extra_types],
        "tokenizer.ggml.scores": [0.0] * len(tokens),
    }


def test_a_broken_byte_sequence_costs_only_itself():
    """SentencePiece byte tokens decode as llama.cpp joins them: the bytes, then UTF-8 with U+FFFD for each broken
    sequence. HF's ByteFallback turned the whole run into U+FFFD, so an answer cut one byte into a character lost
    the characters before it ('Math: 𝔘' + 3 bytes of the next decoded as 7 U+FFFD)."""
    from ctxlab.io.gguf_tokenizer import PieceDecoder

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    decode = PieceDecoder.from_fields(_spm_fields(byte_tokens, [6] * 256))
    byte_id = {b: 5 + b for b in range(256)}
    data = "𝔘𝔘".encode()[:-1] + b"<\x9a"
    ids = [3] + [byte_id[b] for b in data]
    assert decode(ids) == ("a" + data.decode("utf-8", errors="replace"))
    assert decode(ids).startswith("a𝔘\ufffd")
    assert decode([1, 3], skip_special_tokens=False) == "<s> a"  # the prefix space stays after a shown <s>


def test_user_defined_tokens_of_a_byte_level_vocabulary_decode_as_written():
    """A USER_DEFINED token is written as its text (llama.cpp's token_to_piece); HF's ByteLevel decoder byte-decoded
    it when all its characters were in GPT-2's alphabet ('café' came out 'caf\\ufffd', 'Ġx' as ' x')."""
    from ctxlab.io.gguf_tokenizer import PieceDecoder

    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "Ġcaf", "Ã©", "café", "Ġx", "été"],
        "tokenizer.ggml.token_type": [3, 1, 1, 4, 4, 4],
    }
    decode = PieceDecoder.from_fields(fields)
    assert decode([1, 2]) == " café"  # normal pieces: GPT-2's byte alphabet
    assert decode([3, 4, 5]) == "caféĠxété"
    assert decode([0, 3]) == "café" and decode([0, 3], skip_special_tokens=False) == "<|endoftext|>café"
