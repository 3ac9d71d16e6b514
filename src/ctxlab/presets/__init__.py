"""Built-in presets: published ``config.json`` files (verbatim) and tiny configs for tests.

A preset's name is its file name without ``.json``.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def is_tiny(name: str) -> bool:
    """Tiny test presets (``tiny-*``, ``*-tiny``): random-weight models of a mechanism, not published models."""
    return name.startswith("tiny-") or name.endswith("-tiny")


def preset_names(include_tiny: bool = True) -> list[str]:
    names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    return names if include_tiny else [n for n in names if not is_tiny(n)]


def preset_path(name: str) -> Path | None:
    path = PRESET_DIR / f"{name}.json"
    return path if path.is_file() else None
