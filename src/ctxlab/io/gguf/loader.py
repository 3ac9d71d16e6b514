"""Loading a GGUF file's weights into a :class:`~ctxlab.model.CausalLM`, tensor by tensor.

Above the model in the layer order (it builds one); reading the header and mapping the metadata to a
config is ``io/gguf/__init__.py``, below it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import ModelConfig
from ...errors import CheckpointError
from ...model import CausalLM, check_dtype
from ..config_file import config_from_dict
from ..layout import abbreviate, check_tensor_names
from ..writer import model_tensor_shapes
from . import dequant, hf_config, open_gguf
from .architectures import Architecture
from .reader import GGUFFile, TensorInfo, read_rows


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device=None) -> torch.nn.Module:
    """A :class:`~ctxlab.model.CausalLM` with the GGUF file's weights, converted to ``dtype``."""
    f, arch = open_gguf(path)
    cfg = config_from_dict(hf_config(f, arch), name=str(path))
    check_dtype(cfg, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = model_tensor_shapes(model)
    names, unmapped = {}, []
    for gguf_name in f.tensors:
        if arch.skipped(gguf_name, cfg):
            continue
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
        problems.append(f"unsupported GGML tensor type(s) {names}, used by {abbreviate(sorted(users))}")
    for t in f.tensors.values():
        if t.type_id in bad_types:
            continue
        block, size = dequant.block_layout(t.type_id)
        if t.shape and t.shape[-1] % block:
            problems.append(f"{t.name}: row length {t.shape[-1]} is not a multiple of the {block}-value block")
        elif t.offset + t.numel // block * size > f.size:
            problems.append(f"{t.name}: its data ends past the end of the file ({f.size} bytes): truncated file")
    return problems


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
