"""Safetensors checkpoints in the HF layout: strict loading (never pickles); saving is in ``writer``.

``from_pretrained`` reads only tensor headers first, compares names and shapes with the model
built on the meta device, and raises one :class:`CheckpointError` listing every missing,
unexpected and mis-shaped tensor before any data is read: nothing is ever partly loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import progress
from ..dtypes import resolve_dtype
from ..errors import CheckpointError
from ..families import FAMILIES
from ..model import CausalLM, check_dtype
from . import layout
from .config_file import load_config
from .gguf import is_gguf
from .gguf.loader import load_gguf
from .layout import abbreviate, check_tensor_names
from .writer import INDEX_FILE, SINGLE_FILE, model_tensor_shapes

log = logging.getLogger("ctxlab")

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
    """tensor name -> safetensors file holding it: ``model.safetensors`` if there is one, else the shards of the
    index (transformers' order: a stale index beside a single file does not win)."""
    index = directory / INDEX_FILE
    if index.is_file() and not (directory / SINGLE_FILE).is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a JSON object with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file name")
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


def _headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every tensor's shape, and the names of those stored as integers (``get_dtype`` of the header: I*, U*, BOOL),
    without reading any data."""
    shapes: dict[str, tuple[int, ...]] = {}
    integers: set[str] = set()
    for path in sorted(set(files.values())):
        with open_safetensors(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    info = f.get_slice(name)
                    shapes[name] = tuple(info.get_shape())
                    if info.get_dtype().startswith(("I", "U", "BOOL")):
                        integers.add(name)
    missing_in_shards = sorted(set(files) - set(shapes))
    if missing_in_shards:
        raise CheckpointError(f"the index lists tensors its shards do not contain: {missing_in_shards}")
    return shapes, integers


def from_pretrained(directory: str | Path, dtype: torch.dtype | str = torch.float32, device=None) -> CausalLM:
    """Load ``config.json`` + safetensors weights from ``directory`` into a :class:`CausalLM` (or a
    ``.gguf`` file: :func:`ctxlab.io.gguf.loader.load_gguf`).

    ``dtype``: a torch dtype or its name (float32, bfloat16, float16). Each tensor is read and cast
    on its own, straight into the model's dtype (tensors declared ``keep_in_fp32`` stay float32),
    so the peak memory is the weights in ``dtype`` plus one tensor.
    """
    dtype = resolve_dtype(dtype)
    if is_gguf(directory):
        return load_gguf(directory, dtype=dtype, device=device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected config.json + *.safetensors)")
    cfg = load_config(directory)
    files = weight_files(directory)
    found, integers = _headers(files)
    if cfg.tie_word_embeddings and _stored_head_differs(cfg, found, files):
        log.warning(
            "%s: the config ties the LM head to the embedding, but the checkpoint holds an lm_head.weight with other "
            "values; loading it untied, as transformers does",
            directory,
        )
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)

    check_dtype(cfg, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)  # the dtype of every tensor, fp32-declared ones included
    names = checkpoint_names(cfg, found)  # checkpoint-layout name -> name in the file
    plan = layout.for_checkpoint(model_tensor_shapes(model), FAMILIES.get(cfg.family), set(names))
    expected = {n: s for src in plan.values() for n, s in zip(src.names, src.shapes)}
    dtypes = {n: t.dtype for n, t in model.state_dict().items()}
    floating = {n for ours, src in plan.items() if dtypes[ours].is_floating_point for n in src.names}
    check_tensor_names(  # (integer tensors are fine where ours are integers: V4's hash-routing table tid2eid)
        expected,
        {canonical: found[raw] for canonical, raw in names.items()},
        directory,
        not_floating=sorted(canonical for canonical, raw in names.items() if raw in integers and canonical in floating),
    )

    tensors = _read({names[n]: dtypes[ours] for ours, src in plan.items() for n in src.names}, files, device)
    state = {ours: src.combine([tensors.pop(names[n]) for n in src.names]) for ours, src in plan.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _stored_head_differs(cfg, found: dict[str, tuple[int, ...]], files: dict[str, Path]) -> bool:
    """Whether the files hold both ``lm_head.weight`` and the embedding with different values (transformers then
    leaves a tied config's head untied). Reads the two tensors only when both are there."""
    rename = getattr(FAMILIES.get(cfg.family), "checkpoint_key", lambda n: n)
    stored = {rename(n): n for n in found}
    head, embedding = (stored.get(layout_name(cfg, n)) for n in (HEAD, EMBEDDING))
    if head is None or embedding is None:
        return False
    if found[head] != found[embedding]:
        return True
    with open_safetensors(files[head]) as f:
        head_values = f.get_tensor(head)
    with open_safetensors(files[embedding]) as f:
        return not torch.equal(head_values, f.get_tensor(embedding))


READ_BATCH_BYTES = 64 << 20  # reopen a file after this much: its mapped pages leave the process's memory


def _read(wanted: dict[str, torch.dtype], files: dict[str, Path], device) -> dict[str, torch.Tensor]:
    """Read the named tensors one at a time, each cast to its dtype in ``wanted`` (floating point only).

    ``safe_open`` maps the file; pages it has read stay in the process's resident memory until the
    file is closed, so the file is reopened every ``READ_BATCH_BYTES``: the peak is the loaded
    tensors plus one batch, not plus the whole file."""
    out = {}
    for path in sorted({files[n] for n in wanted}):
        names = [n for n in wanted if files[n] == path]
        while names:
            with open_safetensors(path) as f:
                done = 0
                while names and done < READ_BATCH_BYTES:
                    name = names.pop()
                    t = f.get_tensor(name)
                    done += t.numel() * t.element_size()
                    out[name] = t.to(dtype=wanted[name] if t.is_floating_point() else t.dtype, device=device)
                    del t
                    progress.advance(out[name].numel() * out[name].element_size())
    return out


HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def layout_name(cfg, ours: str) -> str:
    return layout.checkpoint_name(FAMILIES.get(cfg.family), ours)


def checkpoint_names(cfg, found: dict[str, tuple]) -> dict[str, str]:
    """Name in the family's checkpoint layout -> name in the file, for every tensor to load.

    Drops, with one info line per reason, what no forward uses: tensors a family maps away
    (e.g. vision/audio towers of a multimodal checkpoint), K/V weights of layers that read
    another layer's K/V (published Gemma 4 checkpoints still carry them), a tied model's
    ``lm_head.weight`` (equal to the embedding: :func:`from_pretrained` unties the model where it is not), and
    old exports' ``rotary_emb.inv_freq``. Anything else unexpected
    stays, so ``check_tensor_names`` reports it.
    """
    family = FAMILIES.get(cfg.family)
    rename = getattr(family, "checkpoint_key", lambda n: n)
    consumers = {i for i, s in enumerate(cfg.layers) if s.kv_source is not None}
    head, embedding = layout_name(cfg, HEAD), layout_name(cfg, EMBEDDING)
    dropped: dict[str, list[str]] = {}
    names = {}
    stored = {rename(n): n for n in found}
    if cfg.tie_word_embeddings and head in stored and embedding not in stored:
        names[embedding] = stored[head]  # a tied model stored as its head only: transformers ties it the other way
    for theirs in found:
        ours = rename(theirs)
        reason = None
        if ours is None:
            reason = getattr(family, "DROPPED", "not used by this model")
        elif _is_consumer_kv(ours, consumers):
            reason = "K/V weights of layers that read another layer's K/V"
        elif ours == head and embedding in names and names[embedding] == theirs:
            continue  # (read as the embedding, above)
        elif ours.endswith(DEAD_KEY_SUFFIXES) or (cfg.tie_word_embeddings and ours == head):
            reason = "unused by the forward (tied head, rotary buffers)"
        if reason:
            dropped.setdefault(reason, []).append(theirs)
        else:
            names[ours] = theirs
    for reason, items in dropped.items():
        log.info("skipping %d checkpoint tensor(s), %s: %s", len(items), reason, abbreviate(sorted(items)))
    return names


def _is_consumer_kv(name: str, consumers: set[int]) -> bool:
    parts = name.split(".")  # model.layers.{i}.self_attn.{k_proj,v_proj,k_norm,v_norm}.*
    return (
        len(parts) > 4
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and int(parts[2]) in consumers
        and parts[3] == "self_attn"
        and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm")
    )
