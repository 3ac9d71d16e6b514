"""Published efficiency claims about these architectures, checked against the real configs.

Each :class:`Claim` holds the figure as published (with its source) and two computations from the
presets and the accounting code: the figure under the convention the claim needs, and the figure
a cache of this library really holds (or the config really says). ``evaluate`` compares both
with the published number within the claim's ``tolerance`` (half a unit of the published
precision, wider where the source rounds loosely, e.g. Gemma's "2.3B" for 2.35B) and gives a
verdict:

* ``reproduced``: the real figure matches;
* ``holds only under: <convention>``: only the convention's figure matches;
* ``not reproduced``: neither does.

No ctxlab figure is typed here: every one is computed when the claim is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ..accounting import count_params, decode_flops_terms, kv_cache_bytes
from ..accounting.savings import kv_sharing_saving, same_width_baselines
from ..config import ModelConfig
from ..io.config_file import load_config
from ..planner import layer_cache_spec
from .published import PUBLISHED_SHARING_ESTIMATES
from .rows import published_ratio_row

K128, M1 = 131072, 1 << 20


@lru_cache(maxsize=None)
def cfg(name: str) -> ModelConfig:
    return load_config(name)


@dataclass(frozen=True)
class Claim:
    model: str
    claim: str
    published: float
    unit: str
    tolerance: float  # how far a figure may be from ``published`` and still match its rounding
    source: str
    convention: str
    under_convention: Callable[[], float]
    realized: Callable[[], float] | None = None  # None: the convention is what the model really does

    def evaluate(self) -> dict:
        conv = self.under_convention()
        real = conv if self.realized is None else self.realized()
        if abs(real - self.published) <= self.tolerance:
            verdict = "reproduced"
        elif abs(conv - self.published) <= self.tolerance:
            verdict = f"holds only under: {self.convention}"
        else:
            verdict = "not reproduced"
        return {
            "model": self.model,
            "claim": self.claim,
            "published": self.published,
            "unit": self.unit,
            "tolerance": self.tolerance,
            "source": self.source,
            "convention": self.convention,
            "under_convention": conv,
            "realized": real,
            "verdict": verdict,
        }


# --- what the claims compute (small functions over the presets) ------------------------------


def producers(name: str) -> float:
    return sum(s.kv_source is None for s in cfg(name).layers)


def count(name: str, predicate) -> float:
    return sum(1 for s in cfg(name).layers if predicate(s))


def params(name: str, key: str) -> float:
    p = count_params(cfg(name))
    return (p["total"] + p["non_text"] if key == "total_with_towers" else p[key]) / 1e9


def text_only_effective(name: str) -> float:
    return count_params(cfg(name))["non_embedding"] / 1e9


def per_token_kib(name: str) -> float:
    c = cfg(name)
    return (
        kv_cache_bytes(c, 2, "bfloat16", convention="naive") - kv_cache_bytes(c, 1, "bfloat16", convention="naive")
    ) / 1024


def baseline_ratio(name: str, baseline_prefix: str, what: str, context: int = K128 - 1) -> float:
    """How much more a same-width baseline costs than the model (kv: bytes per token; flops: attention)."""
    c = cfg(name)
    base = next(v for k, v in same_width_baselines(c).items() if k.startswith(baseline_prefix))
    if what == "kv":
        grow = lambda m: kv_cache_bytes(m, 2, "bfloat16") - kv_cache_bytes(m, 1, "bfloat16")  # noqa: E731
        return grow(base) / grow(c)
    return decode_flops_terms(base, context)["attention"] / decode_flops_terms(c, context)["attention"]


def mha_cache_ratio_at_128k(name: str) -> float:
    c = cfg(name)
    mha = next(v for k, v in same_width_baselines(c).items() if k.startswith("MHA"))
    return kv_cache_bytes(mha, K128, "bfloat16") / kv_cache_bytes(c, K128, "bfloat16")  # fixed state included


def ratio(name: str, key: str) -> float:
    return 100 * published_ratio_row(name, M1)[key]


def tokens_per_entry(name: str, ratio_: int) -> float:
    """Context tokens per compressed entry a cache of 1M tokens holds, in the model's layers of this ratio."""
    spec = next(layer_cache_spec(s) for s in cfg(name).layers if s.compress and s.compress.ratio == ratio_)
    return M1 / spec.entries_held(M1)


def csa_attended_entries(name: str) -> float:
    """Compressed entries a CSA query reads at position 1M (the indexer's top-k of all visible entries)."""
    s = next(s for s in cfg(name).layers if s.indexer is not None and s.compress is not None)
    return min(s.indexer.topk, M1 // s.compress.ratio)


def gemma_claims(model: str, shared: int, total: int, saving: float, effective: float, with_emb: float) -> list[Claim]:
    est = PUBLISHED_SHARING_ESTIMATES[model]
    towers = "the whole multimodal model (vision and audio towers included) minus token and PLE tables"
    return [
        Claim(
            model,
            f"{total - shared} of {total} layers compute K/V; the last {shared} reuse them",
            total - shared,
            "layers",
            0,
            "Gemma 4 model card; HF Gemma4TextConfig.num_kv_shared_layers",
            "config as published",
            lambda: producers(model),
        ),
        Claim(
            model,
            f"cross-layer KV sharing saves {est.published} at 128K tokens",
            saving,
            "GB",
            0.5 if "~" in est.published else 0.05,
            est.source,
            "uniform head_dim = emb_dim / n_heads for every layer, no sliding-window cap, bf16, GB = 1e9 B",
            lambda: est.estimate.saving(cfg(model), K128) / 1e9,
            lambda: kv_sharing_saving(cfg(model), K128, "bfloat16", "realized") / 1e9,
        ),
        Claim(
            model,
            f"{effective}B effective parameters",
            effective,
            "B params",
            0.06,
            "Gemma 4 model card",
            towers,
            lambda: params(model, "effective"),
            lambda: text_only_effective(model),
        ),
        Claim(
            model,
            f"{with_emb:g}B parameters with embeddings",
            with_emb,
            "B params",
            0.1,
            "Gemma 4 model card",
            "the whole multimodal model, vision and audio towers included",
            lambda: params(model, "total_with_towers"),
            lambda: params(model, "total"),
        ),
    ]


def deepseek_claims(model: str, kv: float, flops: float) -> list[Claim]:
    src = f"DeepSeek-V4 report, Figure 1 ({model} vs DeepSeek-V3.2 at 1M tokens)"
    return [
        Claim(
            model,
            f"KV cache {kv:g}% of V3.2's at 1M tokens",
            kv,
            "%",
            0.5,
            src,
            "deployed formats: V4 FP8+BF16 entries with FP4 indexer keys vs V3.2 FP8 latent + FP8 indexer keys",
            lambda: ratio(model, "kv_ratio_deployed"),
            lambda: ratio(model, "kv_ratio_bf16"),
        ),
        Claim(
            model,
            f"decode FLOPs {flops:g}% of V3.2's at 1M tokens",
            flops,
            "%",
            0.5,
            src,
            "precision-weighted (FP8 = 1/2, FP4 = 1/4; V4 core BF16, V3.2 core and indexer FP8, V4 indexer FP4)",
            lambda: ratio(model, "flops_ratio_weighted"),
            lambda: ratio(model, "flops_ratio_raw"),
        ),
    ]


def claims() -> list[Claim]:
    laguna_card = "Poolside Laguna XS.2 model card; architecture write-ups (Raschka's LLM Architecture Gallery)"
    cca_paper = "Figliolia et al., Compressed Convolutional Attention (arXiv 2510.04476); Zyphra ZAYA1 report"
    return [
        *gemma_claims("gemma4-e2b", shared=20, total=35, saving=2.7, effective=2.3, with_emb=5.1),
        *gemma_claims("gemma4-e4b", shared=18, total=42, saving=6.0, effective=4.5, with_emb=8.0),
        Claim(
            "laguna-xs2",
            "30 of 40 layers use 512-token sliding windows (3:1 with global)",
            30,
            "layers",
            0,
            laguna_card,
            "config as published",
            lambda: count("laguna-xs2", lambda s: s.window == 512),
        ),
        Claim(
            "laguna-xs2",
            "global layers get 48 query heads",
            48,
            "heads",
            0,
            laguna_card,
            "config as published",
            lambda: max(s.num_heads for s in cfg("laguna-xs2").layers if s.window is None),
        ),
        Claim(
            "laguna-xs2",
            "sliding layers get 64 query heads",
            64,
            "heads",
            0,
            laguna_card,
            "config as published",
            lambda: min(s.num_heads for s in cfg("laguna-xs2").layers if s.window is not None),
        ),
        Claim(
            "laguna-xs2",
            "33B total parameters",
            33,
            "B params",
            0.5,
            laguna_card,
            "config as published",
            lambda: params("laguna-xs2", "total"),
        ),
        Claim(
            "laguna-xs2",
            "3B active parameters",
            3,
            "B params",
            0.05,
            laguna_card,
            "embedding and head counted",
            lambda: params("laguna-xs2", "active"),
        ),
        Claim(
            "zaya1-8b",
            "KV cache 40 KiB per token (bf16)",
            40,
            "KiB",
            0.05,
            "LLM Architecture Gallery 'KV cache / token (bf16)'",
            "growth per token (fixed conv state excluded)",
            lambda: per_token_kib("zaya1-8b"),
        ),
        Claim(
            "zaya1-8b",
            "CCGQA caches 8x less than MHA of the same width",
            8,
            "x",
            0.05,
            cca_paper,
            "per-token bytes vs 16-head MHA",
            lambda: baseline_ratio("zaya1-8b", "MHA", "kv"),
            lambda: mha_cache_ratio_at_128k("zaya1-8b"),
        ),
        Claim(
            "zaya1-8b",
            "half the decode attention FLOPs of GQA of the same width (compression C = 2)",
            2,
            "x",
            0.01,
            cca_paper,
            "q·kᵀ + p·v of one token at 128K",
            lambda: baseline_ratio("zaya1-8b", "GQA (16q/4kv)", "flops"),
        ),
        Claim(
            "zaya1-8b",
            "a smaller cache than MLA of the same width (latent 512 + rope 64)",
            1.125,
            "x",
            0.01,
            "zaya.md §3 (the CCA paper's MLA comparison at ZAYA1's width)",
            "per-token bytes, bf16",
            lambda: baseline_ratio("zaya1-8b", "MLA", "kv"),
        ),
        Claim(
            "zaya1-8b",
            "far fewer decode attention FLOPs than MLA decoding in latent (absorbed) form",
            8.5,
            "x",
            0.05,
            "zaya.md §3",
            "q·kᵀ + p·v of one token at 128K",
            lambda: baseline_ratio("zaya1-8b", "MLA", "flops"),
        ),
        *deepseek_claims("deepseek-v4-pro", kv=10, flops=27),
        *deepseek_claims("deepseek-v4-flash", kv=7, flops=10),
        Claim(
            "deepseek-v4-pro",
            "HCA compresses 128 tokens into one KV entry",
            128,
            "tokens/entry",
            0,
            "DeepSeek-V4 report §2.3.2",
            "config as published",
            lambda: tokens_per_entry("deepseek-v4-pro", 128),
        ),
        Claim(
            "deepseek-v4-pro",
            "CSA compresses 4 tokens into one entry",
            4,
            "tokens/entry",
            0,
            "DeepSeek-V4 report §2.3.1",
            "config as published",
            lambda: tokens_per_entry("deepseek-v4-pro", 4),
        ),
        Claim(
            "deepseek-v4-pro",
            "CSA attends to the indexer's top-1024 entries",
            1024,
            "entries",
            0,
            "DeepSeek-V4 report §2.3.1 (index_topk)",
            "at 1M tokens",
            lambda: csa_attended_entries("deepseek-v4-pro"),
        ),
        Claim(
            "deepseek-v4-flash",
            "CSA attends to the indexer's top-512 entries",
            512,
            "entries",
            0,
            "DeepSeek-V4 report §2.3.1 (index_topk)",
            "at 1M tokens",
            lambda: csa_attended_entries("deepseek-v4-flash"),
        ),
    ]


def evaluate_all() -> list[dict]:
    return [c.evaluate() for c in claims()]
