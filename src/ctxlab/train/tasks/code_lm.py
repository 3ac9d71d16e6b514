"""Byte-level language modelling on real code: the ``.py`` files of the running Python's standard library.

The corpus is gathered deterministically: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
(``site-packages`` / ``dist-packages`` excluded), sorted by relative POSIX path. A file is held out when
the SHA-256 of its path, read as an integer, is divisible by ``heldout_every`` (a fixed split by file that
does not move when files are added elsewhere). Files are joined by one newline. The manifest (Python
version, every file's path, split, size and SHA-256, and one SHA-256 over all of them) is recorded with
every result. Metric: bits per byte on the held-out files (mean next-byte cross-entropy / ln 2).
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import InputError
from .base import Task, example_generator, require_positive_ints


@functools.lru_cache(maxsize=4)
def gather(root: str | None = None, heldout_every: int = 20) -> dict:
    """{manifest, train: uint8 tensor, heldout: uint8 tensor} of the stdlib ``.py`` files under ``root``."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    paths = sorted(
        (p for p in base.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(base).parts)),
        key=lambda p: p.relative_to(base).as_posix(),
    )
    if not paths:
        raise InputError(f"code_lm: no .py files under {base}")
    files, parts, corpus_hash = [], {"train": [], "heldout": []}, hashlib.sha256()
    for p in paths:
        rel, data = p.relative_to(base).as_posix(), p.read_bytes()
        split = "heldout" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % heldout_every == 0 else "train"
        digest = hashlib.sha256(data).hexdigest()
        corpus_hash.update(f"{rel}\0{digest}\0{split}\n".encode())
        files.append({"path": rel, "split": split, "bytes": len(data), "sha256": digest})
        parts[split].append(data)
    tensors = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    manifest = {
        "python": platform.python_version(),
        "root": str(base),
        "heldout_every": heldout_every,
        "files": len(files),
        "heldout_files": sum(f["split"] == "heldout" for f in files),
        "train_bytes": tensors["train"].numel(),
        "heldout_bytes": tensors["heldout"].numel(),
        "sha256": corpus_hash.hexdigest(),
        "file_list": files,
    }
    return {"manifest": manifest, **tensors}


class CodeLM(Task):
    name = "code"

    def __init__(self, seq_len: int = 256, eval_windows: int = 64, root: str | None = None, heldout_every: int = 20):
        require_positive_ints("code", seq_len=seq_len, eval_windows=eval_windows, heldout_every=heldout_every)
        self.seq_len, self.eval_windows = seq_len, eval_windows
        self.corpus = gather(root, heldout_every)

    @property
    def manifest(self) -> dict:
        return self.corpus["manifest"]

    def example(self, seed: int, index: int):
        data = self.corpus["train"]
        start = int(
            torch.randint(0, data.numel() - self.seq_len - 1, (1,), generator=example_generator(seed, "train", index))
        )
        window = data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 32) -> dict:
        """Bits per byte over ``eval_windows`` windows spread evenly over the held-out files."""
        data, T = self.corpus["heldout"], self.seq_len
        starts = torch.linspace(0, data.numel() - T - 1, self.eval_windows).long().tolist()
        nats = 0.0
        for i in range(0, len(starts), batch_size):
            windows = torch.stack([data[s : s + T + 1].long() for s in starts[i : i + batch_size]])  # [B, T + 1]
            logits = model(windows[:, :-1]).float()
            nats += float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
        return {"bits_per_byte": nats / (len(starts) * T * math.log(2)), "eval_bytes": len(starts) * T}

    def describe(self) -> dict:
        m = {k: v for k, v in self.manifest.items() if k != "file_list"}
        return {"name": self.name, "seq_len": self.seq_len, "eval_windows": self.eval_windows, "corpus": m}
