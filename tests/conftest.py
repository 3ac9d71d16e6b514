"""Shared test helpers: tiny random HF models (the parity oracle) and tiny ctxlab configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Give every parameter a random value, including those initialised to 0 or 1.

    Norm weights become 1 + noise (so they are not 1, but stay moderate), everything else
    normal(0, std), so no parameter keeps its initial value.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(std * noise)
    return module


@pytest.fixture
def hf():
    """The transformers module; the test is skipped (with the reason) when it is not installed."""
    return pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
