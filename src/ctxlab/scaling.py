"""Config helpers that emit per-layer specs from a few numbers.

:func:`layer_wise_scaling` is OpenELM's layer-wise scaling (Mehta et al. 2024, "OpenELM: An
Efficient Language Model Family with Open Training and Inference Framework", arXiv 2404.14619,
§2.1): instead of the same attention and FFN in every layer, layer ``i`` of ``N`` gets
``α_i = α_min + (α_max - α_min) i / (N - 1)`` times ``d_model`` of query width and
``β_i = β_min + (β_max - β_min) i / (N - 1)`` times ``d_model`` of FFN width, so parameters
move from the first layers to the last. Widths are rounded to multiples as OpenELM's configs do
(query width to ``head_dim × gqa_groups``, FFN width to ``ffn_divisor``; a rounding that loses more
than 10% adds one multiple), and each layer has ``query heads / gqa_groups`` KV heads.

:func:`cross_layer_attention` is the KV-sharing schedule of cross-layer attention (Brandon et al.
2024, arXiv 2405.12981): each KV-producing layer is shared by the next ``sharing - 1`` layers.
Both return plain per-layer data; the model, cache and accounting need nothing new.
"""

from __future__ import annotations

import dataclasses

from .config import LayerSpec
from .errors import ConfigError


def round_to_multiple(value: float, divisor: int) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``), one more if that loses > 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def linear(lo: float, hi: float, n: int) -> list[float]:
    """``n`` evenly spaced values from ``lo`` to ``hi``, rounded to 2 decimals (as OpenELM's configs)."""
    return [round(lo + (hi - lo) * i / (n - 1), 2) if n > 1 else round(lo, 2) for i in range(n)]


def layer_wise_scaling(
    base: LayerSpec,
    hidden_size: int,
    num_layers: int,
    qkv_multipliers: tuple[float, float] = (0.5, 1.0),
    ffn_multipliers: tuple[float, float] = (0.5, 4.0),
    gqa_groups: int = 4,
    ffn_divisor: int = 256,
) -> tuple[LayerSpec, ...]:
    """Per-layer specs with OpenELM's layer-wise scaling; every other field comes from ``base``.

    Defaults are OpenELM's (``qkv_multipliers`` (0.5, 1.0), ``ffn_multipliers`` (0.5, 4.0), 4
    query heads per KV head, FFN widths in multiples of 256).
    """
    problems = []
    if not (isinstance(num_layers, int) and num_layers > 0):
        problems.append(f"num_layers = {num_layers!r}: must be a positive integer")
    if not (isinstance(gqa_groups, int) and gqa_groups > 0):
        problems.append(f"gqa_groups = {gqa_groups!r}: must be a positive integer (query heads per KV head)")
    for name, (lo, hi) in (("qkv_multipliers", qkv_multipliers), ("ffn_multipliers", ffn_multipliers)):
        if not 0 < lo <= hi:
            problems.append(f"{name} = {(lo, hi)}: need 0 < min <= max")
    if problems:
        raise ConfigError(problems, where="layer_wise_scaling")
    layers = []
    for alpha, beta in zip(linear(*qkv_multipliers, num_layers), linear(*ffn_multipliers, num_layers)):
        query_width = round_to_multiple(hidden_size * alpha, base.head_dim * gqa_groups)
        heads = query_width // base.head_dim
        width = round_to_multiple(hidden_size * beta, ffn_divisor)
        layers.append(
            dataclasses.replace(base, num_heads=heads, num_kv_heads=heads // gqa_groups, intermediate_size=width)
        )
    return tuple(layers)


def cross_layer_attention(layers: tuple[LayerSpec, ...], sharing: int = 2) -> tuple[LayerSpec, ...]:
    """CLA-``sharing``: layer ``i`` reads the K/V of layer ``i - i % sharing`` (none for producers)."""
    if not (isinstance(sharing, int) and sharing >= 1):
        raise ConfigError([f"sharing = {sharing!r}: must be a positive integer (1 = no sharing)"])
    return tuple(
        dataclasses.replace(s, kv_source=None if i % sharing == 0 else i - i % sharing) for i, s in enumerate(layers)
    )
