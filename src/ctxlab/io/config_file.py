"""``load_config``: a preset name, a ``config.json`` path or a checkpoint directory -> ModelConfig.

Also the inverse, :func:`export_config`: the HF ``config.json`` dict of a family when the
config is expressible in it, else ctxlab's native format (``"model_type": "ctxlab"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..families import FAMILIES
from ..families.fields import check_fields
from ..presets import did_you_mean, preset_names, preset_path
from .gguf import hf_config, is_gguf, open_gguf

NATIVE_MODEL_TYPE = "ctxlab"


def load_config(source: str | Path | ModelConfig) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, a ``config.json`` file, a checkpoint dir or a
    ``.gguf`` file (its metadata)."""
    if isinstance(source, ModelConfig):
        return source
    if is_gguf(source):
        return gguf_config(source)
    preset = preset_path(str(source))
    if preset is not None:
        return config_from_dict(_read_json(preset), name=str(source))
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError([f"{source}: a checkpoint directory needs a config.json; none found"])
    if path.is_file():
        return config_from_dict(_read_json(path), name=str(source))

    raise ConfigError(
        [
            (
                f"{source!r} is neither a preset nor an existing config.json / checkpoint directory / .gguf file; "
                f"{did_you_mean(str(source))}presets: {', '.join(preset_names())}"
            )
        ]
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not valid JSON ({e})"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read ({e.strerror or e})"]) from None
    if not isinstance(d, dict):
        raise ConfigError([f"{path}: a config.json holds one JSON object; got a {type(d).__name__}"])
    return d


def config_from_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
    """Dispatch on ``model_type`` to the family that parses it."""
    model_type = d.get("model_type")
    if model_type == NATIVE_MODEL_TYPE:
        if not isinstance(d.get("ctxlab"), dict):
            raise ConfigError(
                [f"{name or 'config'}: model_type 'ctxlab' needs the config object under the key 'ctxlab'"]
            )
        native = dict(d["ctxlab"])
        native["name"] = name or native.get("name", "")
        try:
            return ModelConfig.from_dict(native)
        except (TypeError, AttributeError) as e:
            raise ConfigError([f"{name or 'config'}: malformed ctxlab config ({e})"]) from None
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(
            [f"{name or 'config'}: model_type = {model_type!r} is not supported; supported: {sorted(FAMILIES)}"]
        )

    return FAMILIES[model_type].from_hf(check_fields(d, name or "config"), name=name)


def export_config(cfg: ModelConfig) -> dict[str, Any]:
    """The family's HF config if it reproduces ``cfg`` exactly, else the native format."""
    family = FAMILIES.get(cfg.family)
    if family is not None:
        hf = family.to_hf(cfg)
        try:
            if family.from_hf(hf, name=cfg.name) == cfg:
                return hf
        except ConfigError:
            pass
    return {"model_type": NATIVE_MODEL_TYPE, "ctxlab": cfg.to_dict()}


def gguf_config(path: str | Path, name: str = "") -> ModelConfig:
    """The :class:`ModelConfig` a GGUF file's metadata describes (no tensor data is read)."""
    f, arch = open_gguf(path)
    return config_from_dict(hf_config(f, arch), name=name or str(path))
