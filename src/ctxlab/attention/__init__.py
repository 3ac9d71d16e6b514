"""Attention kinds, one per file. Each kind is an ``nn.Module`` class that also declares, as
static methods, what its layer caches (``cache_spec``), how many parameters it has
(``param_count``) and the matmul FLOPs of one decoded token (``decode_flops``)."""

from .cca import CCAttention
from .compressed import CompressedAttention
from .gqa import GQAttention
from .mla import MLAttention

ATTENTION_KINDS = {"gqa": GQAttention, "cca": CCAttention, "mla": MLAttention, "compressed": CompressedAttention}

__all__ = ["ATTENTION_KINDS", "CCAttention", "CompressedAttention", "GQAttention", "MLAttention"]
