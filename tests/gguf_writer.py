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
    if arch == "llama" and rope.get("rope_type") == "llama3":
        divisors = llama3_rope_freqs(rope, c.head_dim)
        tensors["rope_freqs.weight"] = (divisors, 0, divisors.shape)
    write_gguf(path, arch, meta, tensors)


def llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` llama.cpp's converter writes for HF ``rope_type = "llama3"``
    (``LlamaModel.generate_extra_tensors``): per RoPE pair of a ``head_dim`` head, in float32 like the
    converter, the divisor of its frequency: 1 below the wavelength ``original / high_freq_factor``,
    ``factor`` above ``original / low_freq_factor``, ``1 / ((1 - s) / factor + s)`` between, with the
    ramp ``s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

    ``original`` is taken from the rope parameters (where HF's llama3 RoPE reads it). The converter
    reads it from the top level of config.json, where Llama 3.x configs do not have it, so it uses its
    default 8192, which is what their rope parameters say too; for our tiny configs with another value,
    this writes what the converter would write if it read the value HF uses."""
    theta, factor = np.float32(rope["rope_theta"]), np.float32(rope["factor"])
    low, high = np.float32(rope["low_freq_factor"]), np.float32(rope["high_freq_factor"])
    original = np.float32(rope["original_max_position_embeddings"])
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    wavelength = np.float32(2 * np.pi) / (np.float32(1.0) / theta**exponent)
    ramp = (original / wavelength - low) / (high - low)
    blend = np.float32(1.0) / ((1 - ramp) / factor + ramp)
    divisors = np.where(wavelength > original / low, factor, blend)
    return np.where(wavelength < original / high, np.float32(1.0), divisors).astype(np.float32)


def llama_to_gguf(config: dict[str, Any], state: dict[str, Any], path: Path) -> None:
    """A float32 ``llama`` GGUF from an HF ``config.json`` dict and HF-named weights (a ctxlab model's
    state dict), as llama.cpp's ``LlamaModel`` writes one: gguf-py's names, q/k rows permuted, no
    ``output`` when tied, and for ``rope_type = "llama3"`` no ``rope.scaling.*`` key but ``rope_freqs``
    (:func:`llama3_rope_freqs`)."""
    import gguf

    c, arch = config, "llama"
    rope = c["rope_parameters"]
    meta = {
        f"{arch}.context_length": c["max_position_embeddings"],
        f"{arch}.embedding_length": c["hidden_size"],
        f"{arch}.block_count": c["num_hidden_layers"],
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.attention.head_count_kv": c["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        f"{arch}.attention.key_length": c["head_dim"],
        f"{arch}.attention.value_length": c["head_dim"],
        f"{arch}.rope.freq_base": float(rope["rope_theta"]),
        f"{arch}.rope.dimension_count": c["head_dim"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(c["vocab_size"])],
        "tokenizer.ggml.token_type": [1] * c["vocab_size"],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"])
    tensors = {}
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        stem, _, kind = hf_name.rpartition(".")
        data = t.detach().float().numpy().copy()
        if stem.endswith(("q_proj", "k_proj")):
            heads = c["num_attention_heads"] if stem.endswith("q_proj") else c["num_key_value_heads"]
            data = llama_cpp_permute(data, heads)
        tensors[f"{names.get_name(stem)}.{kind}"] = (data, 0, data.shape)
    if rope.get("rope_type") == "llama3":
        divisors = llama3_rope_freqs(rope, c["head_dim"])
        tensors["rope_freqs.weight"] = (divisors, 0, divisors.shape)
    write_gguf(path, arch, meta, tensors)


def gemma4_to_gguf(config: dict[str, Any], state: dict[str, Any], path: Path) -> None:
    """A float32 GGUF of a Gemma 4 text decoder from its HF ``config.json`` dict and HF-named weights,
    written the way llama.cpp's ``Gemma4Model`` (``convert_hf_to_gguf.py``, over ``Gemma3Model`` and
    ``TextModel.set_gguf_parameters``) writes one: head sizes of full / sliding layers as ``key_length``
    / ``key_length_swa``, per-layer arrays for the layer pattern, for the FFN width of a double-wide MLP
    and for KV heads when there are global ones; norms as they are; ``router.scale`` and
    ``per_expert_scale`` as ``.scale`` tensors; the proportional RoPE as ``rope_freqs``."""
    import gguf

    c, arch = config, "gemma4"
    n = c["num_hidden_layers"]
    swa = [t == "sliding_attention" for t in c["layer_types"]]
    first_shared = n - c["num_kv_shared_layers"]
    full_rope = c["rope_parameters"]["full_attention"]
    meta = {
        f"{arch}.context_length": c["max_position_embeddings"],
        f"{arch}.embedding_length": c["hidden_size"],
        f"{arch}.block_count": n,
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.attention.head_count_kv": c["num_key_value_heads"],
        f"{arch}.rope.freq_base": float(full_rope["rope_theta"]),
        f"{arch}.rope.freq_base_swa": float(c["rope_parameters"]["sliding_attention"]["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        f"{arch}.attention.key_length": c["global_head_dim"],
        f"{arch}.attention.value_length": c["global_head_dim"],
        f"{arch}.attention.key_length_swa": c["head_dim"],
        f"{arch}.attention.value_length_swa": c["head_dim"],
        f"{arch}.attention.sliding_window": c["sliding_window"],
        f"{arch}.attention.shared_kv_layers": c["num_kv_shared_layers"],
        f"{arch}.embedding_length_per_layer_input": c.get("hidden_size_per_layer_input") or 0,
        f"{arch}.attention.sliding_window_pattern": swa,
        f"{arch}.rope.dimension_count": c["global_head_dim"],
        f"{arch}.rope.dimension_count_swa": c["head_dim"],
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(c["vocab_size"])],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
    }
    if c.get("final_logit_softcapping"):
        meta[f"{arch}.final_logit_softcapping"] = float(c["final_logit_softcapping"])
    if c.get("use_double_wide_mlp"):
        ff = c["intermediate_size"]
        meta[f"{arch}.feed_forward_length"] = [ff if i < first_shared else 2 * ff for i in range(n)]
    if c.get("num_global_key_value_heads") is not None:
        kv_swa, kv_full = c["num_key_value_heads"], c["num_global_key_value_heads"]
        meta[f"{arch}.attention.head_count_kv"] = [kv_swa if s else kv_full for s in swa]
    if c.get("num_experts"):
        meta[f"{arch}.expert_count"] = c["num_experts"]
        meta[f"{arch}.expert_used_count"] = c["top_k_experts"]
        meta[f"{arch}.expert_feed_forward_length"] = c["moe_intermediate_size"]

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    tensors = {}
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight":
            continue
        data = t.detach().float().numpy().copy()
        bid = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("router.scale"):
            name = f"blk.{bid}.ffn_gate_inp.scale"
        elif hf_name.endswith("router.per_expert_scale"):
            name = f"blk.{bid}.ffn_down_exps.scale"
        else:
            if hf_name.endswith("layer_scalar") or (".experts." in hf_name and not hf_name.endswith(".weight")):
                hf_name += ".weight"
            stem, _, kind = hf_name.rpartition(".")
            name = f"{names.get_name(stem)}.{kind}"
        tensors[name] = (data, 0, data.shape)
    rotated = int(c["global_head_dim"] * full_rope["partial_rotary_factor"] / 2)
    divisors = np.array([1.0] * rotated + [1e30] * (c["global_head_dim"] // 2 - rotated), dtype=np.float32)
    tensors["rope_freqs.weight"] = (divisors, 0, divisors.shape)
    write_gguf(path, arch, meta, tensors)


def rewritten(path: Path, out: Path, meta_edits: dict[str, Any], tensor_edits: dict[str, Any]) -> Path:
    """The float32 GGUF file at ``path`` with some metadata / tensors replaced (None removes one),
    written to ``out`` under the same architecture."""
    import gguf

    f = gguf.GGUFReader(path)
    arch = f.fields["general.architecture"].contents()
    meta = {k: fl.contents() for k, fl in f.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in f.tensors}
    for edits, target in ((meta_edits, meta), (tensor_edits, tensors)):
        for key, value in edits.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    write_gguf(out, arch, meta, {k: (a, 0, a.shape) for k, a in tensors.items()})
    return out


def divisors(*values) -> np.ndarray:
    """A ``rope_freqs`` tensor: float32 RoPE frequency divisors."""
    return np.array(values, dtype=np.float32)
