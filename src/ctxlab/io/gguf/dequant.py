"""GGML tensor types -> torch, a block of rows at a time.

Float types (F32, F16, BF16) are reinterpreted without arithmetic. Quantized types go through
``gguf.quants.dequantize`` (llama.cpp's own numpy port of ``dequantize_row_*``): measured here it is
several times faster than the same bit manipulation written with torch's uint8 ops, which are not
vectorised on CPU (Q4_K, 4M values, same run on a busy 2-core machine: 51 ms vs 660 ms). Types it
cannot dequantize are refused by :func:`unsupported_types` before anything is read.
"""

from __future__ import annotations

import numpy as np
import torch

F32, F16, BF16 = 0, 1, 30  # GGML type ids (ggml.h ``enum ggml_type``)
FLOATS = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
CHUNK_ELEMENTS = 1 << 20  # rows are converted this many values at a time (bounds the float32 temporaries)


def type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def block_layout(type_id: int) -> tuple[int, int]:
    """(values per block, bytes per block), from the gguf package's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]


def unsupported_types(type_ids: set[int]) -> list[int]:
    """The types in ``type_ids`` that cannot be turned into floats (tried on one zero block)."""
    import gguf

    out = []
    for t in sorted(type_ids):
        if t in FLOATS:
            continue
        try:
            _, size = block_layout(t)
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), gguf.GGMLQuantizationType(t))
        except (ValueError, KeyError, NotImplementedError):
            out.append(t)
    return out


def dequantize_rows(raw: np.ndarray, type_id: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] of one type -> [rows, row_values]: float32, or the file's float type."""
    if type_id in FLOATS:
        return torch.from_numpy(raw).view(FLOATS[type_id])
    import gguf

    # one flat row: gguf.quants works through 16 rows per numpy call, blocks are independent of rows
    flat = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType(type_id))
    return torch.from_numpy(flat).reshape(raw.shape[0], -1)
