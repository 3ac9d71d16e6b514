"""The element types ctxlab builds, loads and caches in, by name: one list for the CLI and the Python API."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short names the accounting also takes


def resolve_dtype(dtype: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; anything else is an InputError listing the names."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if ALIASES.get(name, name) in DTYPES:
            return DTYPES[ALIASES.get(name, name)]
    raise InputError(f"{what} = {dtype!r}: allowed: {', '.join(DTYPES)} (names or the torch dtypes)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
