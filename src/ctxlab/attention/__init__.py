"""Attention kinds, one per file. Each kind is an ``nn.Module`` class registered in
:data:`ctxlab.registry.ATTENTION_KINDS` that also declares, as static methods, its checks
(``validate``), what its layer caches (``cache_spec``), how many parameters it has
(``param_count``) and the matmul FLOPs of one decoded token (``decode_flops``). Importing this
package registers them."""

from .cca import CCAttention
from .compressed import CompressedAttention
from .gqa import GQAttention
from .mla import MLAttention

__all__ = ["CCAttention", "CompressedAttention", "GQAttention", "MLAttention"]
