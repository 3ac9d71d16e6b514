"""Model configuration as data: one :class:`LayerSpec` per layer inside a :class:`ModelConfig`.

A family file (``ctxlab.families``) turns an HF ``config.json`` into this; the model, the cache
planner and the accounting all read the same specs, so they cannot disagree. Nothing in a
``forward`` looks at the model's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding of one layer (HF ``rope_parameters``).

    ``partial_rotary_factor`` < 1 rotates only the first ``int(head_dim * factor)`` dims of each
    head (NeoX-style partial rotary, as HF's ``_compute_*_rope_parameters`` size ``dim``), except
    for ``"proportional"`` (Gemma 4 global layers), which rotates the whole head with only the
    first ``factor * head_dim / 2`` frequencies non-zero (HF ``_compute_proportional_rope_parameters``).
    The scaling fields are used by the rope type named in ``type`` and ignored otherwise.
    """

    type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None  # linear / llama3 / yarn
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3 / yarn
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn (None: derived from factor / mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    interleaved: bool = False  # rotate pairs (2i, 2i+1) instead of (i, i + rot/2) (DeepSeek MLA)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1;
    Peng et al. 2023 §3.4; HF ``get_mscale``), used by the rope tables and DeepSeek's softmax scale."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MoESpec:
    """A routed mixture of experts: ``num_experts`` gated MLPs of width ``intermediate_size``,
    ``top_k`` per token, chosen by ``router``:

    * ``"softmax_topk"``: softmax, top-k, renormalise, per-expert scale (HF ``Gemma4TextRouter``);
    * ``"biased_topk"``: ``score_fn`` scores (sigmoid, or sqrt(softplus) for DeepSeek V4), top-k of
      scores + a correction bias (used for choosing only), renormalised (HF ``LagunaTopKRouter``,
      ``DeepseekV4TopKRouter``; DeepSeek-V3's aux-loss-free routing);
    * ``"hash"``: experts fixed per token id by a table stored in the checkpoint, weights from the
      learned scores (HF ``DeepseekV4HashRouter``; DeepSeek V4's first layers).

    * ``"mlp_eda"``: ZAYA1's router (HF ``ZayaRouter``): down-projection to ``router_hidden_size``,
      plus the previous layer's router state when ``router_state_in`` (depth recurrence), a small
      MLP to ``num_experts + 1`` classes (the last one "skip": no expert), softmax, top-k of
      probabilities + balancing biases; weights are the unbiased probabilities.

    ``n_group`` / ``topk_group``: group-limited routing (DeepSeek-V3 §2.1.2): experts in
    ``n_group`` groups, each scored by the sum of its two best scores; only the best
    ``topk_group`` groups compete.
    ``routed_scaling`` multiplies the routed sum; ``shared_expert_size`` > 0 adds an always-on
    gated MLP of that width; ``router_logit_softcap`` caps router logits with tanh.
    ``router_precision`` (``biased_topk``; matters below float32 only): ``"scores_fp32"`` (logits
    in the model dtype, scores in float32; HF Laguna), ``"logits_fp32"`` (the logit matmul itself in
    float32; HF DeepSeek V3.2), ``"scores_model_dtype"`` (logits and scores in the model dtype, then
    the float32 bias added; HF DeepSeek V4). Choices near a tie follow the precision.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    router: str = "softmax_topk"
    routed_scaling: float = 1.0
    shared_expert_size: int = 0
    router_logit_softcap: float | None = None
    router_hidden_size: int = 0
    router_state_in: bool = False
    n_group: int = 1
    topk_group: int = 1
    score_fn: str = "sigmoid"
    router_precision: str = "scores_fp32"


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2 §2.1): queries through a ``q_lora_rank`` bottleneck
    (None: a direct projection), keys and values from one ``kv_lora_rank`` latent per token plus
    one shared ``qk_rope_head_dim`` RoPE key. Query/key heads are ``qk_nope_head_dim +
    qk_rope_head_dim`` wide (= the layer's ``head_dim``), value heads ``v_head_dim``."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


@dataclass(frozen=True)
class IndexerSpec:
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2): ``n_heads`` x ``head_dim``
    scoring heads (RoPE, half-split, on the first ``rope_dims``); each query attends to its
    ``topk`` best-scoring past tokens."""

    n_heads: int
    head_dim: int
    topk: int
    rope_dims: int


@dataclass(frozen=True)
class CompressSpec:
    """DeepSeek V4 attention (arXiv: DeepSeek-V4 report §2.3): one shared K=V head over a sliding
    window of raw tokens plus, when ``ratio`` > 0, compressed entries that pool ``ratio`` tokens each
    (CSA: ratio 4, overlapping windows, top-k chosen by an indexer; HCA: ratio 128, all entries).
    Queries come through a ``q_lora_rank`` bottleneck; the output through ``o_groups`` grouped
    low-rank projections of width ``o_lora_rank``."""

    ratio: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    overlap: bool = False  # CSA: each entry pools its own window and the previous one (width 2·ratio)


@dataclass(frozen=True)
class LayerSpec:
    """Everything that distinguishes one decoder layer from another.

    ``window`` is the number of keys a query sees *including itself* (HF's
    ``kv_idx > q_idx - sliding_window``); ``None`` means global attention.
    ``kv_source`` names an earlier layer whose K/V this layer reads instead of computing its
    own (cross-layer KV sharing); such a layer has no K/V projections and no cache storage.
    ``v_norm`` applies a weight-less RMSNorm to V; ``k_eq_v`` drops ``v_proj`` and takes V from
    the raw K projection (Gemma 4 global layers). ``block`` is the residual wiring: ``pre_norm``
    (Llama) or ``sandwich`` (norms before and after each sub-block, Gemma). ``layer_scalar``
    multiplies the residual stream at the end of the layer by a stored scalar. ``moe`` adds a
    routed expert branch beside the dense MLP (Gemma 4 26B-A4B) when ``mlp = "gated"``, or
    replaces the MLP when ``mlp = "moe"`` (Laguna). ``output_gate`` multiplies each head's
    attention output by ``softplus(g_proj(x))`` per head or per element (Laguna).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention: str = "gqa"
    window: int | None = None
    rope: RopeSpec = field(default_factory=RopeSpec)
    qk_norm: bool = False
    attention_bias: bool = False
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    kv_source: int | None = None
    v_norm: bool = False
    k_eq_v: bool = False
    output_gate: str | None = None
    conv_kernels: tuple[int, int] = (2, 2)
    mla: MLASpec | None = None
    indexer: IndexerSpec | None = None
    compress: CompressSpec | None = None
    swiglu_limit: float | None = None
    mlp: str = "gated"
    mlp_bias: bool = False
    activation: str = "silu"
    block: str = "pre_norm"
    layer_scalar: bool = False
    moe: MoESpec | None = None

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def rotary_dim(self) -> int:
        """Dims the rotation touches (proportional RoPE spans the head, with zero frequencies)."""
        if self.rope.type == "none":
            return 0
        if self.rope.type == "proportional":
            return self.head_dim
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.rope.partial_rotary_factor)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM: global fields plus ``layers``, one :class:`LayerSpec` per layer.

    ``family`` names the HF ``model_type`` the config came from (used for checkpoint export
    and display only). ``name`` is the preset name or the path it was loaded from.
    ``embedding_scale`` multiplies the token embeddings (Gemma: sqrt(hidden), rounded to the
    weight dtype). ``per_layer_input_size`` > 0 switches on per-layer embeddings (PLE, Gemma 4
    E2B/E4B) with a table of ``per_layer_vocab_size`` rows. ``float16_ok=False`` refuses fp16
    (Gemma overflows). ``non_text_params``: parameters of towers outside the text decoder
    (vision, audio) that published totals include; accounting only. ``input_affine`` adds a
    learned bias and scale to the embeddings, and ``residual_fp32`` keeps the residual stream in
    float32 whatever the weights' dtype (ZAYA). ``residual = "mhc"`` widens the residual into
    ``hc_mult`` streams joined by manifold-constrained hyper-connections (DeepSeek V4); ``"plain"``
    is one stream with ordinary additions (used by ``block = "hyper"`` layers).
    ``norm_unit_offset``: every weighted RMSNorm multiplies by ``1 + w`` (in fp32) instead of ``w``
    (Gemma 1-3, HF ``Gemma3RMSNorm``), so stored norm weights are offsets from 1.
    ``norm_weight_float32``: every weighted RMSNorm multiplies by ``w`` in fp32 and rounds the product once
    (HF ``Gemma4RMSNorm``), where Llama's rounds the normalised input first.
    """

    family: str
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    embedding_scale: float | None = None
    per_layer_input_size: int = 0
    per_layer_vocab_size: int | None = None
    float16_ok: bool = True
    non_text_params: int = 0
    input_affine: bool = False
    residual_fp32: bool = False
    residual: str = "plain"
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_unit_offset: bool = False
    norm_weight_float32: bool = False
    name: str = ""

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        from .validation import validate  # validation reads these classes

        problems = validate(self)
        if problems:
            raise ConfigError(problems, where=f"config {self.name!r}" if self.name else "config")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (ctxlab's native config format)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = dict(d)
        layers = []
        for i, ld in enumerate(d.pop("layers", ())):
            ld = dict(ld)
            rope = RopeSpec(**_only_known(RopeSpec, ld.pop("rope", {}), f"layers[{i}].rope"))
            moe = ld.pop("moe", None)
            moe = MoESpec(**_only_known(MoESpec, moe, f"layers[{i}].moe")) if moe else None
            for key, cls in (("mla", MLASpec), ("indexer", IndexerSpec), ("compress", CompressSpec)):
                if ld.get(key):
                    ld[key] = cls(**_only_known(cls, ld[key], f"layers[{i}].{key}"))
            if "conv_kernels" in ld:
                ld["conv_kernels"] = tuple(ld["conv_kernels"])
            layers.append(LayerSpec(rope=rope, moe=moe, **_only_known(LayerSpec, ld, f"layers[{i}]")))
        d = _only_known(ModelConfig, d, "config")
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return ModelConfig(layers=tuple(layers), **d)


def _only_known(cls, d: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError([f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}"])
    return d
