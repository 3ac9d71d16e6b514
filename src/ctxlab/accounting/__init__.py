"""What a model costs, derived from the same layer specs and cache specs that build it.

* :func:`kv_cache_bytes` (``kv.py``): cache bytes at a context length under a named convention;
* :func:`count_params` (``params.py``): total, embedding, non-embedding ("effective") and active;
* :func:`decode_flops` (``flops.py``): matmul FLOPs of decoding one token, by term;
* ``formats.py``: storage formats (FP8 / FP4 caches) and precision weights of FLOPs;
* ``savings.py``: what KV sharing saves under each convention, and comparison baselines.
"""

from ..dtypes import resolve_dtype as as_dtype
from .flops import decode_flops, decode_flops_terms
from .kv import KV_CONVENTIONS, kv_cache_bytes, kv_cache_bytes_per_layer
from .params import count_params

__all__ = [
    "KV_CONVENTIONS",
    "as_dtype",
    "count_params",
    "decode_flops",
    "decode_flops_terms",
    "kv_cache_bytes",
    "kv_cache_bytes_per_layer",
]
