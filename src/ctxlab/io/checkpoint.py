"""Safetensors checkpoints in the HF layout: strict loading and saving (never pickles).

``from_pretrained`` reads only tensor headers first, compares names and shapes with the model
built on the meta device, and raises one :class:`CheckpointError` listing every missing,
unexpected and mis-shaped tensor before any data is read: nothing is ever partly loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..model import CausalLM
from .config_file import export_config, load_config

log = logging.getLogger("ctxlab")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors some published checkpoints carry that no forward uses (old Llama exports).
DEAD_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` whose failures (truncated or corrupt files) name the file, as CheckpointError."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it (single file or sharded index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: directory / shard for name, shard in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {absent}")
        return files
    candidates = [directory / SINGLE_FILE] if (directory / SINGLE_FILE).is_file() else []
    candidates = candidates or sorted(directory.glob("*.safetensors"))
    if len(candidates) == 1:
        with open_safetensors(candidates[0]) as f:
            return {name: candidates[0] for name in f.keys()}
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle checkpoint file(s) {pickles}; ctxlab never loads pickles "
            "(they can run arbitrary code). Convert them to safetensors first, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    if not candidates:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file found")
    raise CheckpointError(
        f"{directory}: several .safetensors files {[p.name for p in candidates]} but no {INDEX_FILE} to say which holds what"
    )


def _headers(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with open_safetensors(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing_in_shards = sorted(set(files) - set(shapes))
    if missing_in_shards:
        raise CheckpointError(f"the index lists tensors its shards do not contain: {missing_in_shards}")
    return shapes


def from_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device=None) -> CausalLM:
    """Load ``config.json`` + safetensors weights from ``directory`` into a :class:`CausalLM`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected config.json + *.safetensors)")
    cfg = load_config(directory)
    files = weight_files(directory)
    found = _headers(files)

    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    ignored = sorted(
        n for n in found if n.endswith(DEAD_KEY_SUFFIXES) or (cfg.tie_word_embeddings and n == "lm_head.weight")
    )
    if ignored:
        log.info("ignoring %d tensor(s) no forward uses: %s", len(ignored), ", ".join(ignored))
    check_tensor_names(expected, {n: s for n, s in found.items() if n not in ignored}, directory)

    state = {}
    for path in sorted(set(files[n] for n in expected)):
        with open_safetensors(path) as f:
            for name in f.keys():
                if name in expected:
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype=dtype if t.is_floating_point() else t.dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def check_tensor_names(expected: dict[str, tuple], found: dict[str, tuple], where: Path | str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {list(found[n])}, model {list(expected[n])}"
        for n in set(expected) & set(found)
        if tuple(found[n]) != tuple(expected[n])
    )
    if not (missing or unexpected or misshaped):
        return
    parts = [f"checkpoint {where} does not match the model its config.json describes:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            parts.append(f"  {title} ({len(items)}):")
            parts.extend(f"    {item}" for item in items)
    raise CheckpointError("\n".join(parts))


def save_pretrained(model: CausalLM, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """``config.json`` + ``model.safetensors`` (or shards + index) that transformers loads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = export_config(cfg)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards = _split(state, max_shard_bytes)
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
