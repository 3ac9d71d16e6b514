"""Writing a model as an HF-layout checkpoint: ``config.json`` + safetensors (sharded on request).

Below the model in the layer order (it needs only the model's config and state dict), so
``CausalLM.save_pretrained`` can call it; loading, which builds models, is ``io.checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..families import FAMILIES
from ..nn.fusion import separate_projections
from ..nn.packing import unpacked_linears
from . import layout
from .config_file import export_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def model_tensor_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``model`` holds (a tied head is not stored)."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def save_pretrained(model, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """``config.json`` + ``model.safetensors`` (or shards + index) that transformers loads back."""
    if getattr(model, "quantization", None):
        raise InputError(
            f"this model was quantized in place ({model.quantization}) for inference: its weights are codes and "
            "scales, not the checkpoint's tensors; save the model as loaded, before ctxlab.quantize"
        )
    with unpacked_linears(model), separate_projections(model):
        _write(model, directory, max_shard_bytes)


def _remove_old_weights(directory: Path) -> None:
    """Deletes the weight files an earlier save left in ``directory`` (``model.safetensors``, its shards and
    index), as transformers' ``save_pretrained`` does: a new single file beside an old index, or new shards beside
    an old single file, would otherwise be read in place of the new weights."""
    for path in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        path.unlink(missing_ok=True)


def _write(model, directory: str | Path, max_shard_bytes: int | None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    ours = model.state_dict()
    plan = layout.sources(model_tensor_shapes(model), FAMILIES.get(cfg.family))
    state = {
        name: part.detach().cpu().contiguous().clone()
        for ours_name, src in plan.items()
        for name, part in zip(src.names, src.split(ours[ours_name]))
    }
    config = export_config(cfg)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards = _split(state, max_shard_bytes)
    _remove_old_weights(directory)  # (after the tensors are copied out: a model may be saved where it was loaded)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _split(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
