"""Helpers for reading HF ``config.json`` dicts: required fields, rope parameters, token ids."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..config import RopeSpec
from ..errors import ConfigError
from ..registry import ROPE_TYPES
from .fields import ROPE_FIELDS, check_fields

_ROPE_FIELDS = {
    "rope_theta": "theta",
    "partial_rotary_factor": "partial_rotary_factor",
    "factor": "factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "original_max_position_embeddings",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "truncate": "truncate",
}


def require(d: dict[str, Any], fields: list[str], where: str) -> None:
    """Raise one ConfigError naming every required field that is missing."""
    missing = [f for f in fields if d.get(f) is None]
    if missing:
        raise ConfigError([f"{where}: required field {f!r} is missing" for f in missing])


def parse_rope(params: dict[str, Any] | None, where: str, default_theta: float = 10_000.0) -> RopeSpec:
    """A :class:`RopeSpec` from HF ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x).

    Fails loudly on rope types that change the math and are not implemented here.
    """

    if params is not None and not isinstance(params, dict):
        raise ConfigError([f"{where} = {params!r}: must be a JSON object of rope parameters"])
    params = check_fields(dict(params or {}), where, ROPE_FIELDS)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError([f"{where}.rope_type = {rope_type!r}: not supported; allowed: {list(ROPE_TYPES)}"])
    kwargs: dict[str, Any] = {"type": rope_type, "theta": float(params.pop("rope_theta", default_theta))}
    for hf_name, field in _ROPE_FIELDS.items():
        if params.get(hf_name) is not None and field != "theta":
            kwargs[field] = params.pop(hf_name)
    return RopeSpec(**kwargs)


def legacy_rope_params(d: dict[str, Any]) -> dict[str, Any] | None:
    """The rope parameters of a config as HF ``convert_rope_params_to_dict`` reads them: a 4.x
    ``rope_scaling`` over ``rope_parameters``, then a top-level ``rope_theta`` / ``partial_rotary_factor``
    for what that dict does not say itself."""
    given = d.get("rope_scaling") or d.get("rope_parameters")
    if given is not None and not isinstance(given, dict):
        return given  # parse_rope names the field and the value
    params = dict(given or {})
    for field in ("rope_theta", "partial_rotary_factor"):
        if d.get(field) is not None:
            params.setdefault(field, d[field])
    if _rope_type(params) in SCALED_ROPE_TYPES and d.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = d["original_max_position_embeddings"]  # the top-level one wins
    return fill_scaled_rope(params, d.get("max_position_embeddings")) or None


SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")  # transformers moves the pretraining length into their dict


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def fill_scaled_rope(params: dict[str, Any], max_positions: Any) -> dict[str, Any]:
    """What transformers fills in a scaled rope dict that leaves it out (``standardize_rope_params``,
    ``_compute_yarn_parameters``): ``original_max_position_embeddings`` = ``max_position_embeddings``, and a yarn
    ``factor`` = ``max_position_embeddings / original_max_position_embeddings``."""
    if _rope_type(params) not in SCALED_ROPE_TYPES or not isinstance(max_positions, int) or max_positions < 1:
        return params
    params = dict(params)
    params.setdefault("original_max_position_embeddings", max_positions)
    original = params["original_max_position_embeddings"]
    if _rope_type(params) == "yarn" and params.get("factor") is None and isinstance(original, int) and original > 0:
        params["factor"] = max_positions / original
    return params


def rope_to_hf(rope: RopeSpec) -> dict[str, Any]:
    """Inverse of :func:`parse_rope` (only the fields that are set)."""
    defaults = {"theta": None, "partial_rotary_factor": 1.0, "truncate": True}  # theta is written first
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    for hf_name, field in _ROPE_FIELDS.items():
        value = getattr(rope, field)
        if field != "theta" and value is not None and value != defaults.get(field):
            out[hf_name] = value
    return out


def token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def model_fields(
    d: dict[str, Any],
    eps: float = 1e-6,
    tie: bool = False,
    max_positions: int = 4096,
    bos: int | None = None,
    eos: Any = None,
    pad: int | None = None,
) -> dict[str, Any]:
    """The ``ModelConfig`` fields every family reads the same way (defaults differ per family)."""
    return {
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "norm_eps": float(d.get("rms_norm_eps", eps)),
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", tie)),
        "max_position_embeddings": d.get("max_position_embeddings") or max_positions,
        "bos_token_id": d.get("bos_token_id", bos),
        "eos_token_id": token_ids(d.get("eos_token_id", eos)),
        "pad_token_id": d.get("pad_token_id", pad),
    }


def hf_fields(cfg, model_type: str, architecture: str) -> dict[str, Any]:
    """Inverse of :func:`model_fields`, plus ``model_type`` and ``architectures``."""
    eos = list(cfg.eos_token_id)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }


def per_layer_problems(where: str, n: int, **lists: tuple[list, Collection | None]) -> list[str]:
    """Problems with per-layer lists of a config (``layer_types``, ``mlp_layer_types``, ...): each
    must have one entry per layer, each entry from ``allowed`` (None: any value)."""
    problems = []
    for field, (values, allowed) in lists.items():
        if not isinstance(values, list):
            problems.append(f"{where}.{field} = {values!r}: must be a list with one entry per layer")
            continue
        if len(values) != n:
            problems.append(f"{where}.{field} has {len(values)} entries; num_hidden_layers is {n} (one per layer)")
        unknown = sorted({str(v) for v in values if allowed is not None and v not in allowed})
        if unknown:
            problems.append(f"{where}.{field} contains {unknown}: allowed: {list(allowed)}")
    return problems


def check_per_layer(where: str, n: int, **lists: tuple[list, Collection | None]) -> None:
    """Raise one :class:`ConfigError` listing every :func:`per_layer_problems`."""
    problems = per_layer_problems(where, n, **lists)
    if problems:
        raise ConfigError(problems)
