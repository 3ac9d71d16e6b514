"""Named accounting conventions behind published figures, next to what a real cache holds.

Published savings are often computed under simplifications (uniform head dims, no sliding-window
cap, decimal GB). Each convention here is a function with its assumptions in the docstring, so a
report can reproduce a published figure *and* show the realized one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .accounting import as_dtype, kv_cache_bytes
from .config import ModelConfig

SHARING_CONVENTIONS = ("realized", "uncapped")


def without_sharing(cfg: ModelConfig) -> ModelConfig:
    """The same model with every layer computing and caching its own K/V."""
    return cfg.replace(layers=tuple(dataclasses.replace(s, kv_source=None) for s in cfg.layers))


def kv_sharing_saving(cfg: ModelConfig, context_len: int, dtype="bfloat16", convention: str = "realized") -> int:
    """Cache bytes that cross-layer KV sharing saves, per sequence.

    ``realized``: what this library's caches hold without vs with sharing (sliding layers capped
    at their window). ``uncapped``: every layer holds every token with its true geometry.
    """
    if convention not in SHARING_CONVENTIONS:
        raise ValueError(f"convention = {convention!r}: allowed: {list(SHARING_CONVENTIONS)}")
    return kv_cache_bytes(without_sharing(cfg), context_len, dtype, convention=convention) - kv_cache_bytes(
        cfg, context_len, dtype, convention=convention
    )


@dataclass(frozen=True)
class UniformEstimate:
    """Inputs of a uniform-geometry KV estimator: every layer has ``n_kv_heads`` heads of
    ``emb_dim / n_heads`` dims and holds every token (no window cap)."""

    emb_dim: int
    n_heads: int
    n_kv_heads: int
    published: str
    source: str

    def saving(self, cfg: ModelConfig, context_len: int, dtype="bfloat16") -> int:
        """Bytes saved by the model's consumer layers under these assumptions."""
        consumers = sum(s.kv_source is not None for s in cfg.layers)
        itemsize = torch.empty((), dtype=as_dtype(dtype)).element_size()
        return consumers * context_len * self.n_kv_heads * (self.emb_dim // self.n_heads) * 2 * itemsize


_RASCHKA = (
    "S. Raschka, 'Recent Developments in LLM Architectures: KV Sharing, mHC, and Compressed Attention' "
    "(Ahead of AI, 2026-05-16), via rasbt/LLMs-from-scratch ch04/10_kv-sharing memory_estimator_kv_sharing.py "
    "README presets"
)
# The estimator inputs that reproduce the widely quoted Gemma 4 savings at 128K (bf16, decimal GB).
# Note E2B's emb_dim 2048 is not the model's hidden size (1536): it is what makes head_dim 256.
PUBLISHED_SHARING_ESTIMATES = {
    "gemma4-e2b": UniformEstimate(emb_dim=2048, n_heads=8, n_kv_heads=1, published="2.7 GB", source=_RASCHKA),
    "gemma4-e4b": UniformEstimate(emb_dim=2560, n_heads=8, n_kv_heads=2, published="~6 GB", source=_RASCHKA),
}


def uniform_head_budget(cfg: ModelConfig) -> ModelConfig | None:
    """The same model with its query heads spread evenly over the layers (same total heads).

    The baseline that per-layer head budgets (Laguna XS.2: 48 heads on global, 64 on sliding
    layers) are compared against. KV heads become the largest count dividing the new head
    number, which leaves the attention FLOPs (4·H·d per key) unchanged. None when the model's
    heads are already uniform or the total does not split evenly.
    """
    heads = [s.num_heads for s in cfg.layers]
    total = sum(heads)
    if len(set(heads)) == 1 or total % len(heads):
        return None
    per_layer = total // len(heads)
    return cfg.replace(
        layers=tuple(
            dataclasses.replace(s, num_heads=per_layer, num_kv_heads=math.gcd(per_layer, s.num_kv_heads))
            for s in cfg.layers
        ),
        name=f"{cfg.name} (uniform {per_layer} heads)",
    )


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
                raise ValueError(f"storage format {self.name!r} does not say how to store cached tensor {name!r}")
            left = math.prod(shape)
            for part in formats[name]:
                n = left if part.elements is None else part.elements
                total += part.nbytes(n)
                left -= n
        return total


def kv_cache_bytes_stored(cfg: ModelConfig, context_len: int, fmt: StorageFormat, batch_size: int = 1) -> int:
    """Cache bytes if every layer's cached tensors were stored in ``fmt``: token slots and compressed
    entries (fixed decode state, a few KB, is left out, as the published figures do)."""
    from .cache import layer_cache_spec

    total = 0
    for s in cfg.layers:
        spec = layer_cache_spec(s)
        total += spec.tokens_held(context_len) * fmt.bytes_per_token(spec)
        total += spec.entries_held(context_len) * fmt.bytes_per_token(spec, spec.entry_shapes)
    return batch_size * total


FP8_BLOCK128_FP32_SCALE = Part(bits=8, block=128, scale_bytes=4)
DEPLOYED_FORMATS = {
    "deepseek-v3.2": StorageFormat(
        name="DeepSeek V3.2 FP8 MLA cache + FP8 indexer keys",
        tensors=(
            ("latent", (FP8_BLOCK128_FP32_SCALE,)),  # 512 FP8 + 4 fp32 scales = 528 B
            ("k_rope", (Part(bits=16),)),  # 64 BF16 = 128 B
            ("index_k", (FP8_BLOCK128_FP32_SCALE,)),  # 128 FP8 + 1 fp32 scale = 132 B
        ),
        source="FlashMLA README ('FP8 with scale' entry, 656 B) and DeepSeek's V3.2 reference indexer "
        "(FP8 k_cache + fp32 k_scale_cache, 132 B); shared/specs/deepseek.md §4.1",
    ),
}
_V4_FORMAT = StorageFormat(
    name="DeepSeek V4 FP8+BF16 KV entries + FP4 indexer keys",
    tensors=(
        # 448 FP8 (one ue8m0 scale byte per 64) + 64 BF16 rope channels + 1 pad byte = 584 B
        ("kv", (Part(bits=8, elements=448, block=64, scale_bytes=1), Part(bits=16, extra_bytes=1))),
        ("index_kv", (Part(bits=4, block=128, scale_bytes=4),)),  # 128 FP4 + one fp32 scale = 68 B
    ),
    source="SGLang deepseek_v4_memory_pool.py (bytes_per_token == 448 + 64*2 + 8 == 584; FP4 indexer "
    "index_head_dim//2 + 4 = 68); DeepSeek-V4 report: 'BF16 for RoPE dims, FP8 for remaining dims'; deepseek.md §4.1",
)
DEPLOYED_FORMATS["deepseek-v4-pro"] = DEPLOYED_FORMATS["deepseek-v4-flash"] = _V4_FORMAT


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


# The convention that reproduces both published V4 ratios (27% Pro, 10% Flash, deepseek.md §4.2
# "B3"; an inference: the report's text stating its convention was not available).
PRECISION_WEIGHTS = {
    "deepseek-v3.2": PrecisionWeights(0.5, 0.5, 0.5, "FP8 weights, FP8 sparse-MLA core (its KV is FP8), FP8 indexer"),
    "deepseek-v4-pro": PrecisionWeights(0.5, 1.0, 0.25, "FP8 weights, BF16 attention core, FP4 indexer"),
    "deepseek-v4-flash": PrecisionWeights(0.5, 1.0, 0.25, "FP8 weights, BF16 attention core, FP4 indexer"),
}

# Published comparisons: (model, baseline, claim, source)
PUBLISHED_RATIOS = {
    "deepseek-v4-pro": ("deepseek-v3.2", {"kv": "10%", "flops": "27%"}, "DeepSeek-V4 report, Figure 1 (9.5x / 3.7x)"),
    "deepseek-v4-flash": ("deepseek-v3.2", {"kv": "7%", "flops": "10%"}, "DeepSeek-V4 report, Figure 1 (13.7x / 9.8x)"),
}


def same_width_baselines(cfg: ModelConfig) -> dict[str, ModelConfig]:
    """The model with every layer's attention replaced by a standard one of the same width
    (``hidden / head_dim`` query heads of ``head_dim``, global, cached at full length): MHA, GQA
    with 4 and 2 KV heads, and a DeepSeek-V2-Lite-like MLA (KV latent 512 + RoPE key 64, 128-d
    no-RoPE query/key part, 128-d values). Everything else (MLP, norms) is kept, so attention
    FLOPs and cache bytes compare like with like (the CCA paper's comparison; zaya.md §3)."""
    from .config import MLASpec, RopeSpec

    first = cfg.layers[0]
    d = first.head_dim
    heads = cfg.hidden_size // d

    def swap(**attention) -> ModelConfig:
        plain = dict(
            attention="gqa", window=None, num_heads=heads, head_dim=d, qk_norm=False, v_norm=False, k_eq_v=False,
            output_gate=None, kv_source=None, attn_scale=None, mla=None, indexer=None,
        )  # fmt: skip
        changes = {**plain, **attention}
        return cfg.replace(
            layers=tuple(dataclasses.replace(s, rope=RopeSpec(theta=s.rope.theta), **changes) for s in cfg.layers)
        )

    mla = MLASpec(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    return {
        f"MHA ({heads}q/{heads}kv)": swap(num_kv_heads=heads),
        f"GQA ({heads}q/4kv)": swap(num_kv_heads=4),
        f"GQA ({heads}q/2kv)": swap(num_kv_heads=2),
        f"MLA ({heads} heads, latent 512 + rope 64)": swap(attention="mla", num_kv_heads=1, head_dim=192, mla=mla),
    }
