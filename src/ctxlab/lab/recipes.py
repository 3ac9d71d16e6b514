"""Lab recipes: one small model per mechanism, as data files (``lab/recipes/*.json``).

A recipe names a ``base`` recipe (or none, for the baseline) and changes it: ``model`` updates global
``ModelConfig`` fields, ``layer`` updates the fields every layer shares, ``layers`` is a list of per-layer
overrides (its length is the depth; otherwise ``num_layers`` copies), ``transform`` names an in-place
edit of the built model (only ``unconstrained_hc``). The result is a ctxlab native config
(``ModelConfig.from_dict``), so any per-layer combination the library implements can be a recipe.

Parameter matching: with ``"match": "intermediate_size"`` the FFN width (the same on every layer,
a multiple of 8) is chosen to bring the total parameter count (``count_params(cfg)["total"]``)
closest to the root baseline's; everything else stays as the recipe says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..accounting import count_params, decode_flops, kv_cache_bytes
from ..config import ModelConfig
from ..errors import InputError
from ..nn.hyper_unconstrained import unconstrain
from ..presets import did_you_mean

TRANSFORMS = {"unconstrained_hc": unconstrain}
MATCHABLE = ("intermediate_size",)
COST_CONTEXT = 4096  # KV bytes per token and decode FLOPs are quoted at this context length
WIDTH_STEP = 8


def costs(config: ModelConfig) -> dict:
    """Parameters, KV bytes per token (bfloat16 cache, averaged over a 4K context, as ring and compressed caches
    make it context-dependent) and decode FLOPs per token at position 4K."""
    return {
        "params": count_params(config)["total"],
        "kv_bytes_per_token": kv_cache_bytes(config, COST_CONTEXT, "bfloat16") / COST_CONTEXT,
        "decode_flops_4k": decode_flops(config, COST_CONTEXT),
    }


@dataclass(frozen=True)
class Recipe:
    name: str
    mechanism: str
    description: str
    config: ModelConfig
    baseline: str  # the root recipe whose parameter count this one matches
    transform: str | None = None
    matched: dict | None = None  # {"field", "value", "baseline_value", "params", "baseline_params"}

    def costs(self) -> dict:
        return costs(self.config)

    def model_transform(self):
        return TRANSFORMS[self.transform] if self.transform else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "mechanism": self.mechanism,
            "description": self.description,
            "baseline": self.baseline,
            "transform": self.transform,
            "matched": self.matched,
            "costs": self.costs(),
            "config": self.config.to_dict(),
        }


def recipe_dir():
    return resources.files("ctxlab.lab") / "recipes"


def recipe_names() -> list[str]:
    """Every shipped recipe, the baseline first."""
    names = sorted(p.name[:-5] for p in recipe_dir().iterdir() if p.name.endswith(".json"))
    return sorted(names, key=lambda n: n != "gqa")


def _read(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    entry = recipe_dir() / f"{name_or_path}.json"
    if not entry.is_file():
        names = recipe_names()
        hint = did_you_mean(name_or_path, names)
        raise InputError(f"recipe {name_or_path!r}: not a recipe file or shipped recipe; {hint}shipped: {names}")
    return json.loads(entry.read_text())


KNOWN_KEYS = {
    "name",
    "base",
    "mechanism",
    "description",
    "model",
    "layer",
    "layers",
    "num_layers",
    "transform",
    "match",
}


def _resolve(raw: dict, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Merge a recipe onto its base chain; returns (merged, root recipe name)."""
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise InputError(f"recipe {raw.get('name')!r}: unknown key(s) {unknown}; allowed: {sorted(KNOWN_KEYS)}")
    if not raw.get("base"):
        return dict(raw), raw["name"]
    if raw["base"] in seen:
        raise InputError(f"recipe {raw['name']!r}: base chain loops through {raw['base']!r}")
    base, root = _resolve(_read(raw["base"]), (*seen, raw["name"]))
    merged = {
        **base,
        "model": {**base.get("model", {}), **raw.get("model", {})},
        "layer": {**base.get("layer", {}), **raw.get("layer", {})},
    }
    for key in ("name", "mechanism", "description", "layers", "num_layers", "transform", "match"):
        if key in raw:
            merged[key] = raw[key]
        elif key == "match":
            merged.pop("match", None)
    return merged, root


def _config(merged: dict, width: int | None = None) -> ModelConfig:
    overrides = merged.get("layers") or [{}] * merged.get("num_layers", 1)
    layers = [{**merged.get("layer", {}), **o} for o in overrides]
    if width is not None:
        layers = [{**layer, "intermediate_size": width} for layer in layers]
    return ModelConfig.from_dict({**merged.get("model", {}), "layers": layers, "name": merged["name"]})


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (``gqa``, ``mla``, ...) or a recipe ``.json`` file."""
    raw = _read(name_or_path)
    merged, root = _resolve(raw)
    if merged.get("transform") and merged["transform"] not in TRANSFORMS:
        raise InputError(f"recipe {merged['name']!r}: transform = {merged['transform']!r}; allowed: {list(TRANSFORMS)}")
    cfg, matched = _config(merged), None
    if merged.get("match"):
        if merged["match"] not in MATCHABLE:
            raise InputError(f"recipe {merged['name']!r}: match = {merged['match']!r}; allowed: {list(MATCHABLE)}")
        base_cfg = _config(_resolve(_read(root))[0])
        target = count_params(base_cfg)["total"]
        # total params are affine in the shared FFN width: solve, then round to a multiple of WIDTH_STEP
        p1, p2 = (count_params(_config(merged, w))["total"] for w in (WIDTH_STEP, 2 * WIDTH_STEP))
        exact = WIDTH_STEP + (target - p1) * WIDTH_STEP / (p2 - p1)
        width = max(WIDTH_STEP, WIDTH_STEP * round(exact / WIDTH_STEP))
        cfg = _config(merged, width)
        matched = {
            "field": "intermediate_size",
            "value": width,
            "baseline_value": base_cfg.layers[0].intermediate_size,
            "params": count_params(cfg)["total"],
            "baseline_params": target,
        }
    return Recipe(
        merged["name"],
        merged.get("mechanism", merged["name"]),
        merged.get("description", ""),
        cfg,
        root,
        merged.get("transform"),
        matched,
    )
