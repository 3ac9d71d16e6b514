"""GGUF architectures -> ctxlab: metadata to an HF ``config.json`` dict (parsed by the family, so
defaults and validation are the family's own) and GGUF tensor names to ours, one explicit table per
architecture, with the per-tensor fixes the GGUF writer made necessary.

* ``llama``: llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.modify_tensors``) permutes
  the rows of ``attn_q`` / ``attn_k`` per head from HF's rotate-half layout to interleaved pairs;
  :func:`unpermute_rows` restores them (transformers' ``LlamaTensorProcessor`` does the same).
* ``qwen3``, ``gemma3``: written without that permutation (llama.cpp runs them with NeoX-style RoPE);
  checked on the real Gemma 3 file (tests/test_gguf_models.py) and, for qwen3, against transformers'
  loader on a file written like llama.cpp's converter writes it.
* ``gemma3``: llama.cpp's converter stores every RMSNorm weight as ``1 + w``; our Gemma 3 norm adds the
  1 itself, so the loader subtracts it (in float32, before the cast).
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError

# Per-layer names shared by the three architectures: GGUF suffix -> our module path.
_ATTENTION_AND_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
PRE_NORM_LAYER = {**_ATTENTION_AND_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
SANDWICH_LAYER = {
    **_ATTENTION_AND_MLP,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class Architecture:
    """How one GGUF ``general.architecture`` maps onto ctxlab."""

    name: str
    model_type: str  # the ctxlab family that parses the config
    layer_table: dict[str, str]
    permuted_qk = False  # llama.cpp reordered q/k rows for interleaved RoPE
    norm_plus_one = False  # norm weights stored as 1 + w

    def config(self, meta: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """The HF config.json dict the family parses."""
        raise NotImplementedError

    def our_name(self, gguf_name: str) -> str | None:
        """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not in the table."""
        stem, _, kind = gguf_name.rpartition(".")
        if kind not in ("weight", "bias"):
            return None
        if stem in GLOBAL:
            return f"{GLOBAL[stem]}.{kind}"
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.layer_table:
            return f"model.layers.{parts[1]}.{self.layer_table[parts[2]]}.{kind}"
        return None

    def needs_float32(self, gguf_name: str) -> bool:
        """Whether :meth:`fix` must see this tensor in float32 (arithmetic, not a reordering)."""
        return self.norm_plus_one and gguf_name.endswith("norm.weight")

    def fix(self, gguf_name: str, t: torch.Tensor, cfg) -> torch.Tensor:
        """Undo what the GGUF writer did to this tensor (float32 when :meth:`needs_float32`)."""
        if self.needs_float32(gguf_name):
            return t - 1.0
        if self.permuted_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            spec = cfg.layers[int(gguf_name.split(".")[1])]
            heads = spec.num_heads if ".attn_q." in gguf_name else spec.num_kv_heads
            return unpermute_rows(t, heads)
        return t


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: rows of each head go from interleaved pairs (0, 1), (2, 3), ...
    back to the two halves rotate-half pairs. w [heads * D, ...] (weight or bias)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _get(meta: dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def _require(meta: dict[str, Any], arch: str, keys: list[str]) -> None:
    missing = [f"{arch}.{k}" for k in keys if f"{arch}.{k}" not in meta]
    if missing:
        raise ConfigError([f"GGUF metadata key {k!r} is missing (needed for architecture {arch!r})" for k in missing])


def _common(meta: dict[str, Any], arch: str, tensors: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Fields every architecture reads the same way."""
    _require(meta, arch, ["embedding_length", "block_count", "feed_forward_length", "attention.head_count"])
    heads = _get(meta, arch, "attention.head_count")
    if isinstance(heads, list) or isinstance(_get(meta, arch, "feed_forward_length"), list):
        raise ConfigError([f"{arch}: per-layer head counts / FFN widths in GGUF metadata are not supported"])
    vocab = tensors["token_embd.weight"][0] if "token_embd.weight" in tensors else len(meta["tokenizer.ggml.tokens"])
    out = {
        "vocab_size": vocab,
        "hidden_size": _get(meta, arch, "embedding_length"),
        "intermediate_size": _get(meta, arch, "feed_forward_length"),
        "num_hidden_layers": _get(meta, arch, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(meta, arch, "attention.head_count_kv", heads),
        "rms_norm_eps": _get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": _get(meta, arch, "context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if _get(meta, arch, "attention.key_length") is not None:
        out["head_dim"] = _get(meta, arch, "attention.key_length")
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            out[ours] = int(meta[f"tokenizer.ggml.{key}"])
    return out


def _rope(meta: dict[str, Any], arch: str, theta: float, where: str) -> dict[str, Any]:
    """``rope_parameters`` from ``{arch}.rope.freq_base`` and ``{arch}.rope.scaling.*``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(_get(meta, arch, "rope.freq_base", theta))}
    kind = _get(meta, arch, "rope.scaling.type", "none")
    if kind == "linear":
        params.update(rope_type="linear", factor=float(_get(meta, arch, "rope.scaling.factor")))
    elif kind == "yarn":
        params.update(
            rope_type="yarn",
            factor=float(_get(meta, arch, "rope.scaling.factor")),
            original_max_position_embeddings=_get(meta, arch, "rope.scaling.original_context_length"),
        )
    elif kind != "none":
        raise ConfigError(
            [f"{where}: {arch}.rope.scaling.type = {kind!r} is not supported (allowed: none, linear, yarn)"]
        )
    return params


class Llama(Architecture):
    name, model_type, layer_table, permuted_qk = "llama", "llama", PRE_NORM_LAYER, True

    def config(self, meta, tensors):
        if "rope_freqs.weight" in tensors:
            raise ConfigError(
                ["GGUF tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not supported yet"]
            )
        out = {"model_type": "llama", **_common(meta, "llama", tensors)}
        out["rope_parameters"] = _rope(meta, "llama", 10_000.0, "llama")
        out["head_dim"] = out.get("head_dim") or _get(meta, "llama", "rope.dimension_count")
        return out


class Qwen3(Architecture):
    name, model_type, layer_table = "qwen3", "qwen3", PRE_NORM_LAYER

    def config(self, meta, tensors):
        out = {"model_type": "qwen3", **_common(meta, "qwen3", tensors)}
        out["rope_parameters"] = _rope(meta, "qwen3", 1_000_000.0, "qwen3")
        return out


class Gemma3(Architecture):
    """Gemma 3: llama.cpp hard-codes what the metadata leaves out (``llama-model.cpp``, LLM_ARCH_GEMMA3):
    5 sliding : 1 global, local RoPE base 10,000 unless ``rope.freq_base_swa``, and the attention scale
    1/sqrt(hidden / heads) for the 27B model (62 layers), 1/sqrt(key_length) otherwise."""

    name, model_type, layer_table, norm_plus_one = "gemma3", "gemma3_text", SANDWICH_LAYER, True
    SLIDING_PATTERN = 6
    LAYERS_27B = 62

    def config(self, meta, tensors):
        a = "gemma3"
        out = {"model_type": "gemma3_text", **_common(meta, a, tensors)}
        n, head_dim = out["num_hidden_layers"], out.get("head_dim", 256)
        pattern = _get(meta, a, "attention.sliding_window_pattern", self.SLIDING_PATTERN)
        if isinstance(pattern, list):  # per layer: True = sliding
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            out["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        out["sliding_window"] = _get(meta, a, "attention.sliding_window", 4096)
        full = _rope(meta, a, 1_000_000.0, a)
        local = {"rope_type": "default", "rope_theta": float(_get(meta, a, "rope.freq_base_swa", 10_000.0))}
        out["rope_parameters"] = {"sliding_attention": local, "full_attention": full}
        scalar = out["hidden_size"] // out["num_attention_heads"] if n == self.LAYERS_27B else head_dim
        out["query_pre_attn_scalar"] = scalar
        if _get(meta, a, "final_logit_softcapping") is not None:
            out["final_logit_softcapping"] = float(_get(meta, a, "final_logit_softcapping"))
        return out


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llama(), Qwen3(), Gemma3())}
