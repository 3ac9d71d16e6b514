"""Load a GGUF file (llama.cpp / Ollama / LM Studio) as a ctxlab model.

``ctxlab.from_pretrained("model.gguf", dtype=...)`` and ``ctxlab.load_config("model.gguf")`` come
here. The architecture's metadata becomes an HF config dict that the family parses
(:mod:`.architectures`); every tensor is checked by name, shape and type before any data is read
(one :class:`~ctxlab.errors.CheckpointError` lists every problem), then converted one tensor at a
time, about a million values at a time, straight into a tensor of the requested dtype: the float32
temporaries never exceed :data:`.dequant.CHUNK_ELEMENTS` values. The model is built on the meta
device and the converted tensors assigned, so the weights exist once.

Needs the ``gguf`` package (``pip install "ctxlab[gguf]"``) for the GGML type table and the
quantization types without a kernel of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError
from . import dequant
from .architectures import ARCHITECTURES, Architecture
from .reader import MAGIC, GGUFFile, TensorInfo, read_header, read_rows

SUFFIX = ".gguf"
INSTALL_HINT = 'pip install "ctxlab[gguf]"'

__all__ = ["SUFFIX", "hf_config", "is_gguf", "open_gguf", "read_header"]


def is_gguf(source: Any) -> bool:
    """True for a path ending in ``.gguf`` (existing or not: a missing one is reported by the loader), or a
    file of another name that starts with the GGUF magic (Ollama keeps its models as ``sha256-...`` blobs)."""
    if not isinstance(source, (str, Path)):
        return False
    if str(source).lower().endswith(SUFFIX):
        return True
    try:
        with open(source, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:  # a directory, a missing file: not a GGUF file
        return False


def require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}") from None


def open_gguf(path: str | Path) -> tuple[GGUFFile, Architecture]:
    require_gguf_package()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    f = read_header(path)
    arch = ARCHITECTURES.get(f.architecture)
    if arch is None:
        raise ConfigError(
            [f"{path}: GGUF architecture {f.architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}"]
        )
    return f, arch


def hf_config(f: GGUFFile, arch: Architecture) -> dict[str, Any]:
    """The HF ``config.json`` dict a GGUF file's metadata describes (its family's ``from_hf`` parses it)."""
    shapes = {n: t.shape for n, t in f.tensors.items()}
    config_tensors = [f.tensors[n] for n in arch.config_tensors if n in f.tensors]
    unreadable = [
        f"{t.name} ({dequant.type_name(t.type_id)})" for t in config_tensors if dequant.unsupported_types({t.type_id})
    ]
    if unreadable:
        raise CheckpointError(f"{f.path}: tensor(s) stored in an unsupported GGML type: {', '.join(unreadable)}")
    values = {t.name: read_float32(f, t) for t in config_tensors}
    return arch.config(f.metadata, shapes, values)


def read_float32(f: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """All of one small tensor, as float32 (for the few tensors a config is read from)."""
    block, size = dequant.block_layout(info.type_id)
    cols = info.shape[-1] if info.shape else 1
    with open(f.path, "rb") as fh:
        raw = read_rows(fh, info, cols // block * size, 0, info.numel // cols)
    return dequant.dequantize_rows(raw, info.type_id).float().reshape(info.shape)
