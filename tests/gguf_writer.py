"""Writing small GGUF files for tests, the way llama.cpp's ``convert_hf_to_gguf.py`` writes them.

Names come from gguf-py's own tensor-name map (``gguf.get_tensor_name_map``), independent of
ctxlab's table; llama's q/k rows are permuted with llama.cpp's ``LlamaModel.permute``; Gemma's norm
weights are stored as ``1 + w``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: dict[str, tuple[np.ndarray, int, tuple]]):
    """``tensors``: name -> (data, GGML type id, logical shape in numpy order). F32 / F16 / int arrays
    are stored as they are; other types take uint8 blocks [rows, bytes per row] (the writer derives the
    logical shape from the byte shape)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key == "general.alignment":  # the writer pads its data to it
            w.add_custom_alignment(value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (data, type_id, shape) in tensors.items():
        kind = gguf.GGMLQuantizationType(type_id)
        if data.dtype != np.uint8:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute``: rotate-half pairs -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(model, arch: str, path: Path, vocab: int) -> None:
    """A float32 GGUF of a tiny HF model, with the metadata llama.cpp writes for ``arch``."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    meta = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.attention.key_length": c.head_dim,
        f"{arch}.attention.value_length": c.head_dim,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)],
        "tokenizer.ggml.token_type": [1] * vocab,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    rope = c.rope_parameters
    if arch == "gemma3":
        meta[f"{arch}.rope.freq_base"] = float(rope["full_attention"]["rope_theta"])
        meta[f"{arch}.rope.freq_base_swa"] = float(rope["sliding_attention"]["rope_theta"])
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    else:
        meta[f"{arch}.rope.freq_base"] = float(rope["rope_theta"])
        meta[f"{arch}.rope.dimension_count"] = c.head_dim
    tensors = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, _, kind = hf_name.rpartition(".")
        data = t.detach().float().numpy().copy()
        if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = c.num_attention_heads if stem.endswith("q_proj") else c.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        if arch == "gemma3" and "norm" in stem:
            data = data + 1.0
        tensors[f"{names.get_name(stem)}.{kind}"] = (data, 0, data.shape)
    write_gguf(path, arch, meta, tensors)
