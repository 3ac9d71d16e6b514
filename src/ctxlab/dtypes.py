"""Dtype names accepted everywhere (CLI, ``from_pretrained``, accounting)."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or one of the names in :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]
