"""GGUF architectures -> ctxlab: metadata to an HF ``config.json`` dict (parsed by the family, so
defaults and validation are the family's own) and GGUF tensor names to ours, one explicit table per
architecture, with the per-tensor fixes the GGUF writer made necessary.

* ``llama``: llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.modify_tensors``) permutes
  the rows of ``attn_q`` / ``attn_k`` per head from HF's rotate-half layout to interleaved pairs;
  :func:`unpermute_rows` restores them (transformers' ``LlamaTensorProcessor`` does the same).
  Llama 3.1 / 3.2 / 3.3's RoPE scaling (HF ``rope_type = "llama3"``) is no metadata key but the tensor
  ``rope_freqs`` (``LlamaModel.generate_extra_tensors``): the llama3 parameters are read back from its
  divisors and checked by recomputing them (:class:`Llama`, :func:`_llama3_from_divisors`).
* ``qwen3``, ``gemma3``: written without that permutation (llama.cpp runs them with NeoX-style RoPE);
  checked on the real Gemma 3 file (tests/test_gguf_models.py) and, for qwen3, against transformers'
  loader on a file written like llama.cpp's converter writes it.
* ``gemma3``: llama.cpp's converter stores every RMSNorm weight as ``1 + w``; our Gemma 3 norm adds the
  1 itself, so the loader subtracts it (in float32, before the cast).
* ``gemma4``: see :class:`Gemma4` (norms as they are, per-layer geometry in arrays, proportional RoPE
  as a ``rope_freqs`` tensor, KV-shared layers, per-layer embeddings, experts).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...config import RopeSpec
from ...errors import ConfigError
from ...registry import ROPE_TYPES

# A table key is a GGUF name stem whose ``.weight`` / ``.bias`` belong to our module of that path, or a
# whole GGUF tensor name (``"ffn_gate_inp.scale"``) for a tensor of ours that is not a module's weight.
KINDS = ("weight", "bias", "scale")

# Per-layer names shared by the architectures: GGUF suffix -> our module path.
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
# Gemma 4 (llama.cpp ``llama_model_gemma4::load_arch_tensors``, src/models/gemma4.cpp): Gemma 3's sandwich
# layer plus per-layer embeddings, the expert branch and the layer scalar.
GEMMA4_LAYER = {
    **SANDWICH_LAYER,
    "inp_gate": "per_layer_input_gate",
    "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm",
    "ffn_gate_inp": "router.proj",
    "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1",
    "post_ffw_norm_2": "post_feedforward_layernorm_2",
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
}
GEMMA4_GLOBAL = {
    **GLOBAL,
    "per_layer_token_embd": "model.embed_tokens_per_layer",
    "per_layer_model_proj": "model.per_layer_model_projection",
    "per_layer_proj_norm": "model.per_layer_projection_norm",
}


class Architecture:
    """How one GGUF ``general.architecture`` maps onto ctxlab."""

    name: str
    model_type: str  # the ctxlab family that parses the config
    layer_table: dict[str, str]
    global_table: dict[str, str] = GLOBAL
    config_tensors: tuple[str, ...] = ()  # small tensors :meth:`config` reads the values of (not weights)
    permuted_qk = False  # llama.cpp reordered q/k rows for interleaved RoPE
    norm_plus_one = False  # norm weights stored as 1 + w

    def config(
        self, meta: dict[str, Any], tensors: dict[str, tuple[int, ...]], values: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The HF config.json dict the family parses. ``tensors``: every tensor's shape; ``values``: the
        float32 data of the :attr:`config_tensors` the file has."""
        raise NotImplementedError

    def our_name(self, gguf_name: str) -> str | None:
        """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not in the table."""
        stem, _, kind = gguf_name.rpartition(".")
        if kind not in KINDS:
            return None
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            path = _look_up(self.layer_table, parts[2], kind)
            return None if path is None else f"model.layers.{parts[1]}.{path}"
        return _look_up(self.global_table, stem, kind)

    def skipped(self, gguf_name: str, cfg) -> bool:
        """A tensor of the file that is no weight of ours: read by :meth:`config`, or unused."""
        return gguf_name in self.config_tensors

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


def _look_up(table: dict[str, str], stem: str, kind: str) -> str | None:
    if f"{stem}.{kind}" in table:
        return table[f"{stem}.{kind}"]
    if stem in table and kind != "scale":
        return f"{table[stem]}.{kind}"
    return None


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
    if "token_embd.weight" not in tensors and "tokenizer.ggml.tokens" not in meta:
        raise ConfigError([f"{arch}: neither a token_embd.weight tensor nor tokenizer.ggml.tokens: no vocabulary size"])
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
    # llama.cpp (and the GGUF spec): the head size is embedding_length / head_count when the file does not say
    out["head_dim"] = _get(meta, arch, "attention.key_length") or out["hidden_size"] // max(heads, 1)
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            out[ours] = int(meta[f"tokenizer.ggml.{key}"])
    return out


def _rope(meta: dict[str, Any], arch: str, theta: float, where: str) -> dict[str, Any]:
    """``rope_parameters`` from ``{arch}.rope.freq_base`` and ``{arch}.rope.scaling.*``; without the key,
    ``theta`` (llama.cpp's ``load_hparams`` reads 10,000 for every architecture)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(_get(meta, arch, "rope.freq_base", theta))}
    # llama.cpp's load_hparams: the type defaults to linear; the factor is rope.scaling.factor, else the old key
    # rope.scale_linear, and none (or 0) is no scaling; the positions are scaled by 1 / factor whatever the type
    # says but yarn (which adds its ramp and attention factor)
    kind = _get(meta, arch, "rope.scaling.type", "linear")
    factor = _get(meta, arch, "rope.scaling.factor") or _get(meta, arch, "rope.scale_linear") or 0.0
    if kind not in ("none", "linear", "yarn"):
        raise ConfigError(
            [f"{where}: {arch}.rope.scaling.type = {kind!r} is not supported (allowed: none, linear, yarn)"]
        )
    if kind == "yarn" and factor:
        params.update(
            rope_type="yarn",
            factor=float(factor),
            original_max_position_embeddings=_get(meta, arch, "rope.scaling.original_context_length"),
        )
    elif factor and float(factor) != 1.0:
        params.update(rope_type="linear", factor=float(factor))
    return params


class Llama(Architecture):
    """Llama 1 to 3.x (and the many models written as ``llama``: SmolLM2, Mistral 7B, ...).

    Llama 3.1 / 3.2 / 3.3 (HF ``rope_type = "llama3"``): llama.cpp's converter writes no
    ``llama.rope.scaling.*`` key for them (``TextModel.set_gguf_parameters`` passes over ``"llama3"``:
    "Handled in generate_extra_tensors") but the tensor ``rope_freqs``, one frequency divisor per RoPE
    pair (``LlamaModel.generate_extra_tensors``, convert_hf_to_gguf.py): 1 where the wavelength is
    below ``original / high_freq_factor``, ``factor`` above ``original / low_freq_factor``, and
    ``1 / ((1 - s) / factor + s)`` between, with ``s = (original / wavelength - low) / (high - low)``.
    :func:`_llama3_from_divisors` reads HF's llama3 parameters back from those divisors and checks
    them by recomputing the divisors with ctxlab's own llama3 RoPE.
    """

    name, model_type, layer_table, permuted_qk = "llama", "llama", PRE_NORM_LAYER, True
    config_tensors = ("rope_freqs.weight",)

    def config(self, meta, tensors, values):
        out = {"model_type": "llama", **_common(meta, "llama", tensors)}
        out["rope_parameters"] = _rope(meta, "llama", 10_000.0, "llama")
        out["head_dim"] = out.get("head_dim") or _get(meta, "llama", "rope.dimension_count")
        if "rope_freqs.weight" in values:
            head_dim = out["head_dim"] or out["hidden_size"] // out["num_attention_heads"]
            original = _get(meta, "llama", "rope.scaling.original_context_length")
            out["rope_parameters"] = _llama3_from_divisors(
                values["rope_freqs.weight"].flatten(), out["rope_parameters"], head_dim, original
            )
        return out


class Qwen3(Architecture):
    name, model_type, layer_table = "qwen3", "qwen3", PRE_NORM_LAYER

    def config(self, meta, tensors, values):
        out = {"model_type": "qwen3", **_common(meta, "qwen3", tensors)}
        out["rope_parameters"] = _rope(meta, "qwen3", 10_000.0, "qwen3")
        return out


class Gemma3(Architecture):
    """Gemma 3: llama.cpp hard-codes what the metadata leaves out (``llama-model.cpp``, LLM_ARCH_GEMMA3):
    5 sliding : 1 global, local RoPE base 10,000 unless ``rope.freq_base_swa``, and the attention scale
    1/sqrt(hidden / heads) for the 27B model (62 layers), 1/sqrt(key_length) otherwise."""

    name, model_type, layer_table, norm_plus_one = "gemma3", "gemma3_text", SANDWICH_LAYER, True
    SLIDING_PATTERN = 6
    LAYERS_27B = 62

    def config(self, meta, tensors, values):
        a = "gemma3"
        out = {"model_type": "gemma3_text", **_common(meta, a, tensors)}
        n, head_dim = out["num_hidden_layers"], out.get("head_dim", 256)
        pattern = _get(meta, a, "attention.sliding_window_pattern", self.SLIDING_PATTERN)
        if isinstance(pattern, list):  # per layer: True = sliding
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            out["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        out["sliding_window"] = _get(meta, a, "attention.sliding_window", 4096)
        full = _rope(meta, a, 10_000.0, a)
        local = {"rope_type": "default", "rope_theta": float(_get(meta, a, "rope.freq_base_swa", 10_000.0))}
        out["rope_parameters"] = {"sliding_attention": local, "full_attention": full}
        scalar = out["hidden_size"] // out["num_attention_heads"] if n == self.LAYERS_27B else head_dim
        out["query_pre_attn_scalar"] = scalar
        if _get(meta, a, "final_logit_softcapping") is not None:
            out["final_logit_softcapping"] = float(_get(meta, a, "final_logit_softcapping"))
        return out


class Gemma4(Architecture):
    """Gemma 4 text decoders (E2B / E4B with per-layer embeddings and KV sharing, 26B-A4B with experts,
    31B), as llama.cpp's converter writes them (``convert_hf_to_gguf.py``: ``Gemma4Model`` on top of
    ``Gemma3Model`` and ``TextModel.set_gguf_parameters``) and ``llama_model_gemma4::load_arch_hparams``
    / ``load_arch_tensors`` read them (src/models/gemma4.cpp):

    * Norms are stored as they are (``Gemma4Model.norm_shift`` is 0: Gemma 4's RMSNorm multiplies by
      w, not 1 + w); q/k rows are not permuted (llama.cpp runs Gemma with NeoX-style RoPE).
    * ``attention.sliding_window_pattern``: one bool per layer, True = sliding;
      ``attention.key_length`` / ``key_length_swa``: head size of full / sliding layers (values the
      same); ``attention.head_count_kv``: a number, or one per layer when the model has
      ``num_global_key_value_heads`` (26B, 31B); ``feed_forward_length``: a number, or one per layer,
      doubled on the KV-shared layers (``use_double_wide_mlp``, E2B); ``attention.shared_kv_layers``:
      the last N layers attend over an earlier layer's K/V (HF ``num_kv_shared_layers``);
      ``embedding_length_per_layer_input``: the per-layer-embedding width, 0 = none;
      ``expert_count`` / ``expert_used_count`` / ``expert_feed_forward_length``: the expert branch.
    * K = V on full layers (``attention_k_eq_v``, 26B / 31B) has no key: those layers have no
      ``attn_v`` (llama.cpp then takes V from K's projection).
    * RoPE: ``rope.freq_base`` for full layers, ``rope.freq_base_swa`` for sliding ones (10,000 when
      absent, ``llama-hparams.h``). HF's proportional RoPE on full layers (the first ``factor * D / 2``
      frequencies of a D-dimensional RoPE, the rest 0) is ``rope.dimension_count = D`` plus the tensor
      ``rope_freqs``: D / 2 frequency divisors, 1 for a rotated pair and 1e30 for a position-free one
      (``Gemma4Model.generate_extra_tensors``); the factor is read back from it.
    * Experts: ``ffn_gate_up_exps`` is HF's fused ``gate_up_proj`` unchanged (gate rows first, the
      half ``build_moe_ffn`` takes as gate), ``ffn_gate_inp.scale`` is ``router.scale``,
      ``ffn_down_exps.scale`` is ``router.per_expert_scale`` (``Gemma4Model.modify_tensors``);
      ``layer_output_scale`` is the layer scalar.
    * ``final_logit_softcapping``: absent means llama.cpp's default 30 (``llama-hparams.h``), 0 none.
    * BF16 exports keep ``attn_k`` / ``attn_v`` / ``attn_k_norm`` on the KV-shared layers, where
      nothing reads them; quantized ones leave them out. Both load: they are skipped.

    transformers 5.23 maps a few ``gemma4`` keys (``integrations/ggml.py``) but not the window pattern,
    sliding head size, KV sharing, per-layer-embedding width or RoPE bases, and it stops on a per-layer
    ``feed_forward_length`` ("expected int, got list"): it cannot rebuild these models from a GGUF
    file, so tests/test_gguf_gemma4.py compares with the model each file was written from.
    """

    name, model_type, layer_table, global_table = "gemma4", "gemma4_text", GEMMA4_LAYER, GEMMA4_GLOBAL
    config_tensors = ("rope_freqs.weight",)
    UNUSED_IN_SHARED_LAYERS = ("attn_k", "attn_v", "attn_k_norm")
    POSITION_FREE = 1e20  # a rope_freqs divisor this large leaves its pair unrotated (llama.cpp writes 1e30)

    def skipped(self, gguf_name, cfg):
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in self.UNUSED_IN_SHARED_LAYERS:
            return cfg.layers[int(parts[1])].kv_source is not None
        return super().skipped(gguf_name, cfg)

    def config(self, meta, tensors, values):
        a = self.name
        needed = ["block_count", "attention.sliding_window", "attention.sliding_window_pattern"]
        _require(meta, a, [*needed, "attention.key_length", "attention.key_length_swa"])
        n = _get(meta, a, "block_count")
        pattern = _get(meta, a, "attention.sliding_window_pattern")
        if not isinstance(pattern, list) or len(pattern) != n:
            raise ConfigError(
                [
                    f"{a}.attention.sliding_window_pattern = {pattern!r}: must be one boolean per layer ({n}, True = sliding)"
                ]
            )
        shared = _get(meta, a, "attention.shared_kv_layers", 0)
        head_full, head_swa = _get(meta, a, "attention.key_length"), _get(meta, a, "attention.key_length_swa")
        for key, allowed in (
            ("attention.value_length", head_full),
            ("attention.value_length_swa", head_swa),
            ("rope.dimension_count", head_full),  # RoPE over part of a head: only through rope_freqs
            ("rope.dimension_count_swa", head_swa),
        ):
            if _get(meta, a, key, allowed) != allowed:
                raise ConfigError([f"{a}.{key} = {_get(meta, a, key)}: not supported (allowed: {allowed})"])
        ffn, double_wide = _gemma4_ffn(meta, a, n - shared)
        kv_swa, kv_full = _gemma4_kv_heads(meta, a, pattern)
        full_with_kv = [i for i, sliding in enumerate(pattern[: n - shared]) if not sliding]
        k_eq_v = bool(full_with_kv) and all(f"blk.{i}.attn_v.weight" not in tensors for i in full_with_kv)
        if kv_full != kv_swa and not k_eq_v:
            raise ConfigError(
                [
                    f"{a}.attention.head_count_kv = {_get(meta, a, 'attention.head_count_kv')}: other KV-head "
                    "counts on full layers than on sliding ones need K = V full layers (no attn_v), as in "
                    "Gemma 4 26B / 31B"
                ]
            )
        scalars = {**meta, f"{a}.feed_forward_length": ffn, f"{a}.attention.head_count_kv": kv_swa}
        out = {"model_type": self.model_type, **_common(scalars, a, tensors)}
        ple = _get(meta, a, "embedding_length_per_layer_input", 0)
        softcap = _get(meta, a, "final_logit_softcapping", 30.0)
        out.update(
            layer_types=["sliding_attention" if sliding else "full_attention" for sliding in pattern],
            sliding_window=_get(meta, a, "attention.sliding_window"),
            num_kv_shared_layers=shared,
            use_double_wide_mlp=double_wide,
            head_dim=head_swa,
            global_head_dim=head_full,
            attention_k_eq_v=k_eq_v,
            num_global_key_value_heads=kv_full if k_eq_v else None,
            hidden_size_per_layer_input=ple,
            rope_parameters=self._rope(meta, values, head_full),
            final_logit_softcapping=float(softcap) if softcap else None,
        )
        if ple:
            out["vocab_size_per_layer_input"] = tensors.get("per_layer_token_embd.weight", (out["vocab_size"],))[0]
        experts = _get(meta, a, "expert_count", 0)
        if experts:
            _require(meta, a, ["expert_used_count", "expert_feed_forward_length"])
            out.update(
                enable_moe_block=True,
                num_experts=experts,
                top_k_experts=_get(meta, a, "expert_used_count"),
                moe_intermediate_size=_get(meta, a, "expert_feed_forward_length"),
            )
        return out

    def _rope(self, meta, values, head_full: int) -> dict[str, Any]:
        a = self.name
        kind = _get(meta, a, "rope.scaling.type", "none")
        if kind != "none":
            raise ConfigError([f"{a}.rope.scaling.type = {kind!r} is not supported (allowed: none)"])
        full = {"rope_type": "default", "rope_theta": float(_get(meta, a, "rope.freq_base", 10_000.0))}
        if "rope_freqs.weight" in values:
            rotated = _rotated_pairs(values["rope_freqs.weight"].flatten(), head_full, self.POSITION_FREE)
            full.update(rope_type="proportional", partial_rotary_factor=2 * rotated / head_full)
        sliding = {"rope_type": "default", "rope_theta": float(_get(meta, a, "rope.freq_base_swa", 10_000.0))}
        return {"sliding_attention": sliding, "full_attention": full}


def _gemma4_ffn(meta: dict[str, Any], arch: str, first_shared: int) -> tuple[int, bool]:
    """(intermediate_size, use_double_wide_mlp) from ``feed_forward_length``: a number, or one per layer
    that doubles on the KV-shared layers (how ``Gemma4Model.set_gguf_parameters`` writes the E2B's)."""
    widths = _get(meta, arch, "feed_forward_length")
    if not isinstance(widths, list):
        return widths, False
    for double_wide in (False, True):
        if widths == [widths[0] * (2 if double_wide and i >= first_shared else 1) for i in range(len(widths))]:
            return widths[0], double_wide
    raise ConfigError(
        [
            f"{arch}.feed_forward_length = {widths}: per-layer widths are supported only as one width, doubled "
            f"on the KV-shared layers {first_shared}.. (use_double_wide_mlp)"
        ]
    )


def _gemma4_kv_heads(meta: dict[str, Any], arch: str, pattern: list[bool]) -> tuple[int, int]:
    """(KV heads of sliding layers, of full layers) from ``attention.head_count_kv``: a number, or one
    per layer, the same within each layer type."""
    kv = _get(meta, arch, "attention.head_count_kv", _get(meta, arch, "attention.head_count"))
    if not isinstance(kv, list):
        return kv, kv
    per_type = {sliding: {h for h, s in zip(kv, pattern) if s == sliding} for sliding in (True, False)}
    if len(kv) != len(pattern) or any(len(counts) > 1 for counts in per_type.values()):
        raise ConfigError(
            [
                f"{arch}.attention.head_count_kv = {kv}: must be one number per layer, the same within sliding and within full layers"
            ]
        )
    full = next(iter(per_type[False]))  # the last layer is a full one
    return next(iter(per_type[True]), full), full


def _rotated_pairs(divisors: torch.Tensor, head_dim: int, position_free: float) -> int:
    """How many leading RoPE pairs llama.cpp's ``rope_freqs`` divisors leave rotating: 1 for each rotated
    pair, then at least ``position_free`` for each pair that must not move."""
    rotated = int((divisors == 1.0).sum())
    if not (
        divisors.numel() == head_dim // 2
        and bool((divisors[:rotated] == 1.0).all())
        and bool((divisors[rotated:] >= position_free).all())
    ):
        raise ConfigError(
            [
                f"GGUF tensor 'rope_freqs.weight' (first values {divisors[:4].tolist()}, {divisors.numel()} in all): "
                f"must be {head_dim // 2} RoPE frequency divisors, 1 for each rotated pair then >= {position_free:g} "
                "(Gemma 4's proportional RoPE, as llama.cpp writes it); other frequency factors are not supported"
            ]
        )
    return rotated


# The converter's defaults, Llama 3.x's values (used when the divisors leave the thresholds open).
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original": 8192}
# Largest relative difference allowed between the file's divisors and ours. Both are float32 arithmetic:
# on Llama 3.2-shaped heads they differ by < 1e-7 (tests/test_gguf_llama3.py); a wrong parameter by far more.
LLAMA3_RTOL = 1e-5


def _llama3_from_divisors(
    divisors: torch.Tensor, rope: dict[str, Any], head_dim: int, original: int | None
) -> dict[str, Any]:
    """HF ``rope_parameters`` of type ``"llama3"`` that reproduce llama.cpp's ``rope_freqs`` divisors
    (``LlamaModel.generate_extra_tensors``, convert_hf_to_gguf.py; see :class:`Llama`).

    * ``factor`` is the largest divisor (the low-frequency pairs).
    * Each blended pair (divisor strictly between 1 and ``factor``) gives its ramp value
      ``s = (1 / d - 1 / factor) / (1 - 1 / factor)``, which is affine in the pair's inverse wavelength
      ``u``: ``s = (u - u_low) / (u_high - u_low)``, with ``u_low = low_freq_factor / original`` and
      ``u_high = high_freq_factor / original``. A least-squares line through the blended pairs (two
      at least) gives ``u_low`` and ``u_high``.
    * The divisors depend on ``original``, ``low_freq_factor`` and ``high_freq_factor`` only through
      these two ratios (the two wavelength thresholds), so ``original`` is a free choice and any value
      is exact: ``llama.rope.scaling.original_context_length`` when the file has it (llama.cpp does not
      write it for llama3), otherwise the low-frequency wavelength ``1 / u_low`` rounded to an integer,
      which makes ``low_freq_factor`` 1 as in every Llama 3.x release (original 8192, low 1, high 4).
      ``low`` / ``high`` / ``factor`` within 1e-5 of a multiple of 0.001 are rounded to it.
    * Fewer than two blended pairs leave the thresholds open between two wavelengths; then Llama 3's
      low 1 and high 4 (the converter's defaults) are tried, with ``original`` from the metadata, else
      from the one blended pair, else the converter's default 8192.

    The result is checked: ctxlab's llama3 RoPE (the ``ROPE_TYPES`` registry, nn/rope.py) must give
    the same divisors within :data:`LLAMA3_RTOL`, else one :class:`ConfigError`. All divisors 1 is
    plain RoPE (returned unchanged).
    """
    d = divisors.double()
    n = head_dim // 2
    if rope["rope_type"] != "default":
        raise ConfigError(
            [
                f"GGUF tensor 'rope_freqs.weight' together with llama.rope.scaling.type = {rope['rope_type']!r}: not supported"
            ]
        )
    if d.numel() == n and bool(torch.isfinite(d).all()) and bool((d == 1.0).all()):
        return rope
    theta = rope["rope_theta"]
    candidate = None
    if d.numel() == n and bool(torch.isfinite(d).all()) and bool((d >= 1.0).all()):
        candidate = _llama3_candidate(d, theta, head_dim, original)
    worst = None if candidate is None else _llama3_mismatch(d, theta, head_dim, candidate)
    if worst is None or not worst <= LLAMA3_RTOL:  # NaN fails too
        shown = [f"{v:.6g}" for v in d.tolist()]
        few = ", ".join(shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-3:]])
        found = "no llama3 parameters fit them"
        if worst is not None:
            fitted = ", ".join(f"{k} {v:.6g}" for k, v in candidate.items())
            found = f"the closest llama3 parameters ({fitted}) give divisors up to {worst:.2g} (relative) away"
        raise ConfigError(
            [
                f"GGUF tensor 'rope_freqs.weight' ([{few}], {d.numel()} in all): not Llama 3.1-style RoPE frequency "
                f"divisors ({found}); supported: {n} divisors >= 1 written by llama.cpp from HF rope_type 'llama3' "
                "(1 for high frequencies, factor for low ones, llama3's smooth blend between)"
            ]
        )
    return {**rope, "rope_type": "llama3", **candidate}


def _llama3_candidate(d: torch.Tensor, theta: float, head_dim: int, original: int | None) -> dict[str, Any] | None:
    """llama3 parameters fitted to divisors ``d`` (float64), or None when none fit (see the caller)."""
    factor = float(d.max())
    u = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim) / (2 * math.pi)
    blended = (d > 1.0 + 1e-6) & (d < factor * (1 - 1e-6))
    if int(blended.sum()) >= 2:
        s = ((1 / d - 1 / factor) / (1 - 1 / factor))[blended]
        x = u[blended]
        slope = float(((s - s.mean()) * (x - x.mean())).sum() / ((s - s.mean()) ** 2).sum())
        u_low = float(x.mean()) - slope * float(s.mean())
        u_high = u_low + slope
        if not 0 < u_low < u_high:
            return None
        original = original or round(1 / u_low)
        low, high = original * u_low, original * u_high
    else:  # Llama 3's low 1, high 4; one blended pair fixes original, none leaves the default
        low, high = LLAMA3_DEFAULTS["low_freq_factor"], LLAMA3_DEFAULTS["high_freq_factor"]
        if int(blended.sum()) == 1 and original is None:
            s = float(((1 / d - 1 / factor) / (1 - 1 / factor))[blended])
            original = round((low + s * (high - low)) / float(u[blended]))  # s = (original * u - low) / (high - low)
        original = original or LLAMA3_DEFAULTS["original"]
    return {
        "factor": _tidy(factor),
        "low_freq_factor": _tidy(low),
        "high_freq_factor": _tidy(high),
        "original_max_position_embeddings": int(original),
    }


def _llama3_mismatch(d: torch.Tensor, theta: float, head_dim: int, params: dict[str, Any]) -> float:
    """Largest relative difference between divisors ``d`` and those ctxlab's llama3 RoPE gives."""
    plain = ROPE_TYPES["default"].frequencies(RopeSpec(theta=theta), head_dim)[0]
    spec = RopeSpec(
        type="llama3",
        theta=theta,
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
    )
    ours = plain.double() / ROPE_TYPES["llama3"].frequencies(spec, head_dim)[0].double()
    return float(((ours - d).abs() / d).max())


def _tidy(x: float) -> float:
    """``x`` rounded to a multiple of 0.001 when within 1e-5 (relative) of one: 0.9999999 -> 1.0."""
    r = round(x, 3)
    return r if abs(r - x) <= 1e-5 * max(abs(x), 1e-3) else x


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llama(), Qwen3(), Gemma3(), Gemma4())}
