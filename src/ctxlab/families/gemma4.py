"""Gemma 4 text decoder (Google DeepMind 2026; HF ``Gemma4ForCausalLM``, config ``gemma4_text``;
multimodal checkpoints ``Gemma4ForConditionalGeneration`` nest it under ``text_config``).

Wiring only; every mechanism lives in ``nn/`` and ``attention/``:
sandwich blocks with a layer scalar; sliding layers (head_dim 256, default RoPE θ=1e4) and
global layers (``global_head_dim`` 512, proportional RoPE θ=1e6 on a quarter of the
frequencies, K=V with ``num_global_key_value_heads`` when ``attention_k_eq_v``); q/k norms,
weight-less v norm, no 1/√d scaling; cross-layer KV sharing for the last
``num_kv_shared_layers`` layers, each reading the last non-shared layer of its own type
(HF ``Gemma4TextConfig.kv_sharing_modes``); double-wide MLP in shared layers; per-layer
embeddings; the 26B-A4B expert branch; embedding scale √H; tied head; final softcap.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import LayerSpec, ModelConfig, MoESpec
from ..errors import ConfigError
from .hf_fields import check_per_layer, parse_rope, require, rope_to_hf, token_ids

MODEL_TYPE = "gemma4_text"
MODEL_TYPES = ("gemma4", "gemma4_text")  # multimodal wrapper, text decoder
ARCHITECTURE = "Gemma4ForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# Weights of multimodal checkpoints: the text decoder lives under this prefix; the rest
# (vision / audio towers and their embedders) is not part of a text model.
TEXT_PREFIX = "model.language_model."
TOWER_KEY = "_multimodal_tower_params"  # ctxlab preset field: vision + audio parameters
DROPPED = "not part of the text decoder (vision / audio towers)"

log = logging.getLogger("ctxlab")


def from_hf(d: dict[str, Any], name: str = "") -> ModelConfig:
    where = name or "gemma4 config"
    text = d.get("text_config") or d
    require(text, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"], where)
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, False, "vision"):  # "vision": only image tokens see each other (no text effect)
        raise ConfigError(
            [
                f"{where}.use_bidirectional_attention = {bidirectional!r}: only causal Gemma 4 text decoders are "
                "supported (null, false or 'vision')"
            ]
        )
    n = text["num_hidden_layers"]
    layer_types = list(
        text.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    )
    check_per_layer(where, n, layer_types=(layer_types, LAYER_TYPES))
    if layer_types[-1] != "full_attention":  # Gemma4TextConfig.__post_init__ does the same
        log.warning("%s: the last Gemma 4 layer must be full_attention; forcing it, as transformers does", where)
        layer_types[-1] = "full_attention"

    shared = text.get("num_kv_shared_layers") or 0
    sources = _kv_sources(layer_types, shared, where)
    rope = {**DEFAULT_ROPE, **(text.get("rope_parameters") or {})}
    geometry = _geometry(text, layer_types)
    moe = None
    if text.get("enable_moe_block"):
        require(text, ["num_experts", "top_k_experts", "moe_intermediate_size"], where)
        moe = MoESpec(text["num_experts"], text["top_k_experts"], text["moe_intermediate_size"])
    double_wide = bool(text.get("use_double_wide_mlp"))
    layers = []
    for i, kind in enumerate(layer_types):
        sliding = kind == "sliding_attention"
        head_dim, kv_heads = geometry[i]
        layers.append(
            LayerSpec(
                num_heads=text["num_attention_heads"],
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=text["intermediate_size"] * (2 if double_wide and sources[i] is not None else 1),
                window=text.get("sliding_window", 512) if sliding else None,
                rope=parse_rope(rope[kind], f"{where}.rope_parameters.{kind}"),
                qk_norm=True,
                v_norm=True,
                k_eq_v=bool(text.get("attention_k_eq_v")) and not sliding,
                attention_bias=bool(text.get("attention_bias", False)),
                attn_scale=1.0,
                kv_source=sources[i],
                activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
                block="sandwich",
                layer_scalar=True,
                moe=moe,
            )
        )
    ple = text.get("hidden_size_per_layer_input", 256) or 0
    return ModelConfig(
        family=MODEL_TYPE,
        vocab_size=text.get("vocab_size", 262_144),
        hidden_size=text["hidden_size"],
        layers=tuple(layers),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", d.get("tie_word_embeddings", True))),
        final_logit_softcap=text.get("final_logit_softcapping"),
        max_position_embeddings=text.get("max_position_embeddings", 131_072),
        bos_token_id=text.get("bos_token_id", 2),
        eos_token_id=token_ids(d.get("eos_token_id", text.get("eos_token_id", 1))),
        pad_token_id=text.get("pad_token_id", 0),
        embedding_scale=text["hidden_size"] ** 0.5,
        norm_weight_float32=True,  # Gemma4RMSNorm: the weight multiplies in float32, one rounding
        per_layer_input_size=ple,
        per_layer_vocab_size=text.get("vocab_size_per_layer_input", 262_144) if ple else None,
        float16_ok=False,
        non_text_params=int(d.get(TOWER_KEY, 0)),
        name=name,
    )


def _kv_sources(layer_types: list[str], shared: int, where: str) -> list[int | None]:
    """Layer i >= L - shared reads the last non-shared layer of its own type."""
    n = len(layer_types)
    if not 0 <= shared < n:
        raise ConfigError([f"{where}.num_kv_shared_layers = {shared}: must be in [0, num_hidden_layers={n})"])
    first_shared = n - shared
    producer = {kind: i for i, kind in enumerate(layer_types[:first_shared])}  # last of each type wins
    missing = sorted({t for t in layer_types[first_shared:]} - set(producer))
    if missing:
        raise ConfigError([f"{where}: shared layers of type {missing} have no earlier layer of that type to read"])
    return [None if i < first_shared else producer[kind] for i, kind in enumerate(layer_types)]


def _geometry(text: dict[str, Any], layer_types: list[str]) -> list[tuple[int, int]]:
    """(head_dim, kv_heads) per layer, from ``per_layer_config`` (what transformers saves; ``{}`` when every
    layer has the base geometry) or, where the file has no such key, from ``global_head_dim`` /
    ``num_global_key_value_heads`` (the published files), as HF ``Gemma4TextConfig.__post_init__``."""
    head_dim, kv_heads = text.get("head_dim", 256), text.get("num_key_value_heads", 4)
    overrides = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
    if "per_layer_config" not in text:
        full = {"head_dim": text.get("global_head_dim", 512)}
        if text.get("attention_k_eq_v") and text.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = text["num_global_key_value_heads"]
        overrides = {i: full for i, t in enumerate(layer_types) if t == "full_attention"}
    return [
        (overrides.get(i, {}).get("head_dim", head_dim), overrides.get(i, {}).get("num_key_value_heads", kv_heads))
        for i in range(len(layer_types))
    ]


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``gemma4_text`` config.json (``Gemma4ForCausalLM``); ``export_config`` checks it round-trips."""
    sliding = next((s for s in cfg.layers if s.window is not None), cfg.layers[0])
    full = next((s for s in cfg.layers if s.window is None), cfg.layers[-1])
    producers = [s for s in cfg.layers if s.kv_source is None]
    shared = cfg.num_layers - len(producers)
    moe = full.moe
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": producers[0].intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": sliding.num_heads,
        "num_key_value_heads": sliding.num_kv_heads,
        "head_dim": sliding.head_dim,
        "global_head_dim": full.head_dim,
        "num_global_key_value_heads": full.num_kv_heads if full.k_eq_v else None,
        "attention_k_eq_v": full.k_eq_v,
        "sliding_window": sliding.window or 512,
        "layer_types": ["sliding_attention" if s.window is not None else "full_attention" for s in cfg.layers],
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": shared > 0 and cfg.layers[-1].intermediate_size == 2 * producers[0].intermediate_size,
        "hidden_size_per_layer_input": cfg.per_layer_input_size,
        "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
        "rope_parameters": {"sliding_attention": rope_to_hf(sliding.rope), "full_attention": rope_to_hf(full.rope)},
        "hidden_activation": sliding.activation,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": sliding.attention_bias,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "enable_moe_block": moe is not None,
        "num_experts": moe.num_experts if moe else None,
        "top_k_experts": moe.top_k if moe else None,
        "moe_intermediate_size": moe.intermediate_size if moe else None,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0],
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.non_text_params:
        out[TOWER_KEY] = cfg.non_text_params
    return out


def checkpoint_key(name: str) -> str | None:
    """Map a checkpoint tensor name to ours: text weights of multimodal checkpoints lose the
    ``language_model`` level (``model.language_model.*``, or ``language_model.model.*`` /
    ``language_model.lm_head.*`` as Gemma 3's published multimodal files and transformers' writer name
    them); vision / audio weights are not ours (None)."""
    if name.startswith(TEXT_PREFIX):
        return "model." + name[len(TEXT_PREFIX) :]
    if name.startswith("language_model."):
        return name[len("language_model.") :]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "audio_tower.")):
        return None
    if name.startswith("model.") and not name.startswith(
        ("model.layers.", "model.embed_tokens", "model.norm.", "model.per_layer")
    ):
        return None  # model.vision_tower.*, model.audio_tower.*, model.embed_vision.*, model.embed_audio.*
    return name
