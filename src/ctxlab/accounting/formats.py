"""Storage formats: how a deployment stores each cached tensor (FP8 with block scales, FP4, BF16),
and cache bytes if a model's caches were stored that way. The formats of real deployments, with
their sources, are data in :mod:`ctxlab.reporting.published`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import InputError
from ..planner import layer_cache_spec
from .kv import check_sizes


@dataclass(frozen=True)
class Part:
    """``elements`` of one cached vector stored at ``bits`` each, with one ``scale_bytes`` scale per
    ``block`` elements (0: unscaled). ``elements=None``: the rest of the vector."""

    bits: int
    elements: int | None = None
    block: int = 0
    scale_bytes: int = 0
    extra_bytes: int = 0  # padding stored with the part

    def nbytes(self, elements: int) -> int:
        scales = -(-elements // self.block) * self.scale_bytes if self.block else 0
        return elements * self.bits // 8 + scales + self.extra_bytes


@dataclass(frozen=True)
class StorageFormat:
    """How a deployment stores each named cached tensor (per token): a list of parts per tensor
    name, plus padding bytes per token and layer. Tensor names are the cache specs' own."""

    name: str
    tensors: tuple[tuple[str, tuple[Part, ...]], ...]
    source: str
    pad_bytes: int = 0

    def bytes_per_token(self, spec, shapes=None) -> int:
        """Stored bytes of one token's (or, with ``shapes=spec.entry_shapes``, one entry's) tensors."""
        formats = dict(self.tensors)
        shapes = spec.token_shapes if shapes is None else shapes
        total = self.pad_bytes if shapes else 0
        for name, shape in shapes:
            if name not in formats:
                raise InputError(f"storage format {self.name!r} does not say how to store cached tensor {name!r}")
            left = math.prod(shape)
            for part in formats[name]:
                n = left if part.elements is None else part.elements
                total += part.nbytes(n)
                left -= n
        return total


def kv_cache_bytes_stored(cfg: ModelConfig, context_len: int, fmt: StorageFormat, batch_size: int = 1) -> int:
    """Cache bytes if every layer's cached tensors were stored in ``fmt``: token slots and compressed
    entries (fixed decode state, a few KB, is left out, as the published figures do)."""
    check_sizes(context_len, batch_size)
    total = 0
    for s in cfg.layers:
        spec = layer_cache_spec(s)
        total += spec.tokens_held(context_len) * fmt.bytes_per_token(spec)
        total += spec.entries_held(context_len) * fmt.bytes_per_token(spec, spec.entry_shapes)
    return batch_size * total


@dataclass(frozen=True)
class PrecisionWeights:
    """Decode FLOPs weighted by the precision each term runs at, in BF16 equivalents (FP8 = 1/2,
    FP4 = 1/4): ``linear`` (every weight matmul), ``attention`` (the core over cached keys) and
    ``indexer_scan`` (the lightning indexer's scan)."""

    linear: float
    attention: float
    indexer_scan: float
    note: str

    def weigh(self, terms: dict[str, int]) -> float:
        special = {"attention": self.attention, "indexer_scan": self.indexer_scan}
        return sum(v * special.get(k, self.linear) for k, v in terms.items())
