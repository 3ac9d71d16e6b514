"""Published figures and the data behind them, each with its source: the deployed cache formats
and compute precisions of DeepSeek's models, the uniform-geometry estimator inputs behind the
quoted Gemma 4 KV-sharing savings, and DeepSeek V4's published ratios against V3.2."""

from __future__ import annotations

from dataclasses import dataclass

from ..accounting.formats import Part, PrecisionWeights, StorageFormat
from ..accounting.savings import UniformEstimate


@dataclass(frozen=True)
class PublishedEstimate:
    """A published savings figure and the estimator inputs that reproduce it."""

    estimate: UniformEstimate
    published: str
    source: str


_RASCHKA = (
    "S. Raschka, 'Recent Developments in LLM Architectures: KV Sharing, mHC, and Compressed Attention' "
    "(Ahead of AI, 2026-05-16), via rasbt/LLMs-from-scratch ch04/10_kv-sharing memory_estimator_kv_sharing.py "
    "README presets"
)
# The estimator inputs that reproduce the widely quoted Gemma 4 savings at 128K (bf16, decimal GB).
# Note E2B's emb_dim 2048 is not the model's hidden size (1536): it is what makes head_dim 256.
PUBLISHED_SHARING_ESTIMATES = {
    "gemma4-e2b": PublishedEstimate(UniformEstimate(emb_dim=2048, n_heads=8, n_kv_heads=1), "2.7 GB", _RASCHKA),
    "gemma4-e4b": PublishedEstimate(UniformEstimate(emb_dim=2560, n_heads=8, n_kv_heads=2), "~6 GB", _RASCHKA),
}


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

# Attention kinds whose papers compare them with standard attention of the same width (MHA, GQA,
# MLA): ``report`` shows that comparison for models using them.
SAME_WIDTH_COMPARISONS = {"cca": "ZAYA1 / CCA paper (arXiv 2510.04476), zaya.md §3"}
