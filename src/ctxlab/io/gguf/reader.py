"""The GGUF container (llama.cpp's file format, ``ggml/docs/gguf.md``): metadata and tensor directory.

We parse the header ourselves, straight from the bytes: ``gguf.GGUFReader`` builds a numpy view per
array element, which took 30 s for Gemma 3's 262,144-entry vocabulary here (busy machine), where
this took 0.6 s. Tensor data is never mapped: :func:`read_rows` reads the byte range of some rows
of one tensor into a buffer, so nothing but the tensors being converted is resident.

Layout (little-endian, version 2 or 3): ``"GGUF"``, version u32, tensor count u64, metadata count
u64, the metadata (key string, value type u32, value), the tensor infos (name string, n_dims u32,
dims u64 each, fastest-varying first, type u32, offset u64 from the data section), padding to
``general.alignment`` (default 32), the data section.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# metadata value types -> struct format (scalars) / numpy dtype (arrays); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
FLOAT32, STRING, ARRAY = 6, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the directory. ``shape`` is in PyTorch order (slowest dimension first)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute, in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Sequential little-endian reads over a buffer; running past its end is a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF header (ends inside the metadata or tensor directory)")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF header (a string runs past the end of the file)")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _strings(self, count: int) -> list[str]:
        """``count`` strings in a row (vocabularies, merges): one tight loop, no per-item calls."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        if pos > end or len(out) != count:
            raise CheckpointError(f"{self.path}: truncated GGUF header (a string array runs past the end of the file)")
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind == FLOAT32:  # the shortest decimal that is this float32 (1e-06, not 9.99999997e-07)
            return float(str(np.float32(self.take("f"))))
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise CheckpointError(
                        f"{self.path}: truncated GGUF header (an array runs past the end of the file)"
                    )
                out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
                self.pos = end
                return out
            if item == STRING:
                return self._strings(count)
            return [self.value(item) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown GGUF metadata value type {kind} at byte {self.pos}")


def read_header(path: str | Path) -> GGUFFile:
    """Metadata and tensor directory of a GGUF file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a GGUF file (truncated?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _parse(buf, path: Path, size: int) -> GGUFFile:
    if buf[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {MAGIC!r})")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise CheckpointError(
            f"{path}: GGUF version {version} is not supported (allowed: 2, 3; a huge number means a big-endian file)"
        )
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        infos.append((name, tuple(reversed(dims)), cur.take("I"), cur.take("Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise CheckpointError(f"{path}: general.alignment = {alignment!r}; allowed: a positive integer (default 32)")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {name: TensorInfo(name, shape, kind, data_start + offset) for name, shape, kind, offset in infos}
    return GGUFFile(path, version, metadata, tensors, size)


def read_rows(f, info: TensorInfo, row_bytes: int, start: int, stop: int) -> np.ndarray:
    """Raw bytes of rows ``start:stop`` of a tensor stored ``row_bytes`` per row -> uint8 [rows, row_bytes]."""
    out = np.empty((stop - start, row_bytes), dtype=np.uint8)
    f.seek(info.offset + start * row_bytes)
    got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise CheckpointError(f"{f.name}: truncated: tensor {info.name!r} ends past the end of the file")
    return out
