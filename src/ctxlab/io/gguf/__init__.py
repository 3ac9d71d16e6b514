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

from ...config import ModelConfig
from ...errors import CheckpointError, ConfigError
from . import dequant
from .architectures import ARCHITECTURES, Architecture
from .reader import GGUFFile, TensorInfo, read_header, read_rows

SUFFIX = ".gguf"
INSTALL_HINT = 'pip install "ctxlab[gguf]"'

__all__ = ["SUFFIX", "gguf_config", "is_gguf", "load_gguf", "read_header"]


def is_gguf(source: Any) -> bool:
    """True for a path ending in ``.gguf`` (existing or not: a missing one is reported by the loader)."""
    return isinstance(source, (str, Path)) and str(source).lower().endswith(SUFFIX)


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


def gguf_config(path: str | Path, name: str = "") -> ModelConfig:
    """The :class:`ModelConfig` a GGUF file's metadata describes (no tensor data is read)."""
    f, arch = open_gguf(path)
    return _config(f, arch, name or str(path))


def _config(f: GGUFFile, arch: Architecture, name: str) -> ModelConfig:
    from ..config_file import config_from_dict

    shapes = {n: t.shape for n, t in f.tensors.items()}
    return config_from_dict(arch.config(f.metadata, shapes), name=name)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
    """A :class:`~ctxlab.model.CausalLM` with the GGUF file's weights, converted to ``dtype``."""
    from ...model import CausalLM, check_dtype
    from ..checkpoint import check_tensor_names, model_tensor_shapes

    f, arch = open_gguf(path)
    cfg = _config(f, arch, str(path))
    check_dtype(cfg, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = model_tensor_shapes(model)
    names, unmapped = {}, []
    for gguf_name in f.tensors:
        ours = arch.our_name(gguf_name)
        if ours is None:
            unmapped.append(gguf_name)
        else:
            names[ours] = gguf_name
    problems = _problems(f, unmapped)
    if problems:
        raise CheckpointError(f"{path}: cannot load this GGUF file:\n" + "\n".join(f"  {p}" for p in problems))
    check_tensor_names(expected, {ours: f.tensors[g].shape for ours, g in names.items()}, path)

    state = {}
    with open(f.path, "rb") as fh:
        for ours, gguf_name in names.items():
            state[ours] = _convert(fh, f.tensors[gguf_name], arch, cfg, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _problems(f: GGUFFile, unmapped: list[str]) -> list[str]:
    """Every reason the tensors cannot be read: unknown names, unsupported types, data past the end."""
    problems = []
    if unmapped:
        problems.append(f"tensors with no counterpart in a {f.architecture} model: {sorted(unmapped)}")
    bad_types = dequant.unsupported_types({t.type_id for t in f.tensors.values()})
    if bad_types:
        names = [dequant.type_name(t) for t in bad_types]
        users = sorted(t.name for t in f.tensors.values() if t.type_id in bad_types)
        problems.append(f"unsupported GGML tensor type(s) {names}, used by {_abbreviate(users)}")
    for t in f.tensors.values():
        if t.type_id in bad_types:
            continue
        block, size = dequant.block_layout(t.type_id)
        if t.shape and t.shape[-1] % block:
            problems.append(f"{t.name}: row length {t.shape[-1]} is not a multiple of the {block}-value block")
        elif t.offset + t.numel // block * size > f.size:
            problems.append(f"{t.name}: its data ends past the end of the file ({f.size} bytes): truncated file")
    return problems


def _abbreviate(items: list[str], keep: int = 4) -> str:
    return ", ".join(items[:keep]) + (f", ... ({len(items) - keep} more)" if len(items) > keep else "")


def _convert(fh, info: TensorInfo, arch: Architecture, cfg: ModelConfig, dtype, device) -> torch.Tensor:
    """One tensor, read and converted ``CHUNK_ELEMENTS`` values at a time into a ``dtype`` tensor."""
    block, size = dequant.block_layout(info.type_id)
    cols = info.shape[-1] if info.shape else 1
    rows = info.numel // cols
    row_bytes = cols // block * size
    work = torch.float32 if arch.needs_float32(info.name) else dtype  # e.g. 1 + w -> w before rounding
    step = max(1, dequant.CHUNK_ELEMENTS // cols)
    if step >= rows:  # one chunk: use the converted tensor itself, no copy into a second buffer
        out = dequant.dequantize_rows(read_rows(fh, info, row_bytes, 0, rows), info.type_id).to(work)
    else:
        out = torch.empty(rows, cols, dtype=work)  # [rows, cols]
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out[start:stop] = dequant.dequantize_rows(read_rows(fh, info, row_bytes, start, stop), info.type_id)
    return arch.fix(info.name, out.reshape(info.shape), cfg).to(dtype=dtype, device=device)
