"""Built-in presets: published ``config.json`` files (verbatim) and tiny configs for tests.

A preset's name is its file name without ``.json``.
"""

from __future__ import annotations

import difflib
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


def did_you_mean(name: str, names: list[str] | None = None) -> str:
    """' (did you mean 'qwen3-8b'?)' for a near miss among ``names`` (the presets), else ''."""
    close = difflib.get_close_matches(str(name), names if names is not None else preset_names(), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
