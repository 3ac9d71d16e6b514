"""Routed mixture of experts: routers pick ``top_k`` experts per token, experts run as a loop
over experts (never over tokens), each on the tokens routed to it.

Expert weights are stored as 3-D tensors in HF's layout (``Gemma4TextExperts``):
``gate_up_proj`` [E, 2·I, H] with the gate rows first, ``down_proj`` [E, H, I].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import init
from ..config import LayerSpec, MoESpec
from ..errors import InputError
from ..registry import ACTIVATIONS, LAYER_CHECKS, MLP_KINDS, ROUTERS
from .mlp import GatedMLP, gated
from .norms import RMSNorm


def routed_sum(
    x: torch.Tensor,
    top_index: torch.Tensor,
    top_weight: torch.Tensor,
    num_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """x [N, H], top_index / top_weight [N, K] -> Σ_k top_weight · expert(top_index, x) [N, H]: a loop over
    the chosen experts (never over tokens), ``expert(e, x[tokens])`` running expert ``e`` on the tokens
    routed to it. An index >= ``num_experts`` is a "skip" class (ZAYA): no expert, no contribution.

    One token (a decode step) runs its K experts directly, in the same order (by expert), so the sum is
    the same to the bit: no grouping of tokens (``unique``, ``where``, ``index_add_``), ~100-150 us less
    per MoE layer at hidden 1024 (deepseek_v4's benchmark model, 2 threads)."""
    out = torch.zeros_like(x)
    if x.shape[0] == 1:
        chosen = top_index[0].tolist()
        for k in sorted(range(len(chosen)), key=chosen.__getitem__):
            if chosen[k] < num_experts:
                out += (expert(chosen[k], x) * top_weight[0, k]).to(out.dtype)
        return out
    for e in top_index.unique().tolist():
        if e >= num_experts:
            continue
        token, slot = torch.where(top_index == e)  # tokens routed to this expert
        out.index_add_(0, token, (expert(e, x[token]) * top_weight[token, slot, None]).to(out.dtype))
    return out


class Experts(nn.Module):
    def __init__(self, hidden_size: int, moe: MoESpec, activation: str, limit: float | None = None):
        super().__init__()
        e, i = moe.num_experts, moe.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i))
        self.act, self.limit = ACTIVATIONS[activation], limit
        self.build_args = (hidden_size, moe, activation, limit)  # to rebuild it (nn.packing.PackedExperts)

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.gate_up_proj, generator, std)
        init.normal_(self.down_proj, generator, std)

    def forward(self, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H], top_index / top_weight [N, K] -> weighted sum of the chosen experts [N, H].

        Eager: a loop over the chosen experts, reading each one's weights in place. Under
        ``torch.compile`` (decode steps: a handful of tokens) the chosen experts' weights are
        gathered instead, so the graph has no host sync and no data-dependent loop."""
        if torch.compiler.is_compiling():
            return self._gathered(x, top_index, top_weight)
        return routed_sum(x, top_index, top_weight, self.gate_up_proj.shape[0], self.expert)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s gated MLP on its tokens x [n, H] -> [n, H], its weights read in place."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(gated(self.act, gate, up, self.limit), self.down_proj[e])

    def _gathered(self, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """The same sum with the chosen experts' weights gathered: [N·K, 2·I, H] and [N·K, H, I]."""
        N, K = top_index.shape
        experts = self.gate_up_proj.shape[0]
        flat = top_index.reshape(-1).clamp(max=experts - 1)  # a "skip" class gets weight 0 below
        xs = x[:, None].expand(N, K, x.shape[-1]).reshape(N * K, -1, 1)  # [N·K, H, 1]
        gate, up = torch.bmm(self.gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [N·K, I]
        y = torch.bmm(self.down_proj[flat], gated(self.act, gate, up, self.limit)[..., None]).squeeze(-1)  # [N·K, H]
        weight = torch.where(top_index < experts, top_weight, torch.zeros_like(top_weight)).reshape(-1, 1)
        return (y * weight).to(x.dtype).view(N, K, -1).sum(dim=1)

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return 3 * moe.num_experts * hidden_size * moe.intermediate_size

    @staticmethod
    def active_param_count(hidden_size: int, moe: MoESpec) -> int:
        return 3 * moe.top_k * hidden_size * moe.intermediate_size


@ROUTERS.register("softmax_topk")
class SoftmaxTopKRouter(nn.Module):
    """Gemma 4's router (HF ``Gemma4TextRouter``): weight-less RMSNorm of the residual, times a
    learned ``scale`` and ``H^-1/2``; softmax (fp32) over experts; top-k; renormalise; times
    a learned ``per_expert_scale``."""

    def __init__(self, hidden_size: int, moe: MoESpec, eps: float, vocab_size: int = 0):
        super().__init__()
        self.top_k = moe.top_k
        self.norm = RMSNorm(hidden_size, eps, with_scale=False)
        self.proj = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts))
        self.root_size = hidden_size**-0.5

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        self.scale.fill_(1.0)
        self.per_expert_scale.fill_(1.0)

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (top_index [N, K], top_weight [N, K] fp32)."""
        probs = F.softmax(self.proj(self.norm(x) * self.scale * self.root_size), dim=-1, dtype=torch.float32)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight * self.per_expert_scale[index]

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return moe.num_experts * hidden_size + hidden_size + moe.num_experts


ROUTER_PRECISIONS = ("scores_fp32", "logits_fp32", "scores_model_dtype")  # MoESpec.router_precision
SCORE_FUNCTIONS = {"sigmoid": torch.sigmoid, "sqrtsoftplus": lambda x: F.softplus(x).sqrt()}


@ROUTERS.register("biased_topk")
class BiasedTopKRouter(nn.Module):
    """Routing with a selection-only correction bias (DeepSeek-V3 §2.1.2 "auxiliary-loss-free load
    balancing"; HF ``LagunaTopKRouter``, ``DeepseekV4TopKRouter``): logits (optionally tanh-capped)
    -> scores (``score_fn``: sigmoid, or sqrt(softplus) in DeepSeek V4);
    experts chosen by top-k of ``scores + e_score_correction_bias`` (within the best groups when
    ``n_group > 1``, HF ``DeepseekV32TopkRouter``); weights are the chosen *scores*, renormalised
    to sum to 1. Parameter names follow HF (``gate.weight``)."""

    def __init__(self, hidden_size: int, moe: MoESpec, eps: float, vocab_size: int = 0):
        super().__init__()
        self.top_k, self.softcap = moe.top_k, moe.router_logit_softcap
        self.n_group, self.topk_group = moe.n_group, moe.topk_group
        self.score = SCORE_FUNCTIONS[moe.score_fn]
        self.precision = moe.router_precision
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)

    keep_in_fp32 = ("e_score_correction_bias",)  # chooses experts by small margins (HF keeps it fp32 too)

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Router weights and the correction bias drawn normal(0, std), as ctxlab always has."""
        init.normal_(self.weight, generator, std)
        init.normal_(self.e_score_correction_bias, generator, std)

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (top_index [N, K], top_weight [N, K] in x's dtype)."""
        if self.precision == "logits_fp32":
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        else:
            logits = F.linear(x, self.weight)
        if self.precision == "scores_fp32":
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        scores = self.score(logits)  # float32, or the model dtype with "scores_model_dtype"
        choice = scores.float() + self.e_score_correction_bias.float()
        scores = scores.float()
        if self.n_group > 1:  # group-limited: only the best topk_group groups (by their two best) compete
            grouped = choice.view(-1, self.n_group, choice.shape[-1] // self.n_group)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        _, index = torch.topk(choice, self.top_k, dim=-1)
        weight = scores.gather(-1, index)
        return index, (weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)).to(x.dtype)

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return moe.num_experts * hidden_size + moe.num_experts


class RouterMLP(nn.Module):
    """RMSNorm -> Linear -> GELU -> Linear -> GELU -> Linear to the classes (HF ``ZayaRouterMLP``)."""

    def __init__(self, width: int, classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(width, eps)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, classes, bias=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(r))))))


@ROUTERS.register("mlp_eda")
class EDARouter(nn.Module):
    """ZAYA1's router (HF ``ZayaRouter``; arXiv 2605.05365): a down-projection to a small width,
    plus the previous layer's router state times a learned scale (depth recurrence, "EDA"; the
    sum is handed on to the next layer through ``ctx.router_state``), an MLP to
    ``num_experts + 1`` classes, softmax; top-k of probabilities + ``balancing_biases`` (a
    checkpoint buffer) chooses; the weight is the unbiased probability. The extra class is
    "skip": the token gets no expert (weight 0)."""

    def __init__(self, hidden_size: int, moe: MoESpec, eps: float, vocab_size: int = 0):
        super().__init__()
        self.top_k, self.num_experts = moe.top_k, moe.num_experts
        width = moe.router_hidden_size
        self.down_proj = nn.Linear(hidden_size, width)
        self.router_states_scale = nn.Parameter(torch.ones(width)) if moe.router_state_in else None
        self.router_mlp = RouterMLP(width, moe.num_experts + 1, eps)
        self.register_buffer("balancing_biases", torch.zeros(moe.num_experts + 1, dtype=torch.float32))

    keep_in_fp32 = ("balancing_biases",)  # chooses experts by small margins (HF keeps it fp32 too)

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        if self.router_states_scale is not None:
            self.router_states_scale.fill_(1.0)

    def reset_buffers(self, generator: torch.Generator | None = None) -> None:
        self.balancing_biases.zero_()

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (top_index [N, K], top_weight [N, K]); reads and sets ``ctx.router_state`` [N, R]."""
        r = self.down_proj(x)
        if self.router_states_scale is not None and ctx is not None and ctx.router_state is not None:
            r = r + ctx.router_state * self.router_states_scale
        if ctx is not None:
            ctx.router_state = r
        probs = torch.softmax(self.router_mlp(r), dim=-1)  # [N, E + 1], in the model's dtype
        _, index = torch.topk(probs.float() + self.balancing_biases, self.top_k, dim=-1)
        weight = probs.gather(-1, index).masked_fill(index == self.num_experts, 0)
        return index, weight

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        r = moe.router_hidden_size
        state = r if moe.router_state_in else 0
        return hidden_size * r + r + state + r + 2 * (r * r + r) + r * (moe.num_experts + 1)

    @staticmethod
    def flops_per_token(hidden_size: int, moe: MoESpec) -> int:
        r = moe.router_hidden_size
        return 2 * (hidden_size * r + 2 * r * r + r * (moe.num_experts + 1))

    @staticmethod
    def validate(at: str, moe: MoESpec) -> list[str]:
        if moe.router_hidden_size <= 0:
            return [
                f"{at}.moe.router_hidden_size = {moe.router_hidden_size}: the mlp_eda router needs a positive width"
            ]
        return []


@ROUTERS.register("hash")
class HashRouter(nn.Module):
    """Hash routing (DeepSeek V4 §2.1; HF ``DeepseekV4HashRouter``): the experts of a token are
    fixed by its id through ``tid2eid`` [vocab, k], a table stored in the checkpoint; the learned
    gate only weights them (``score_fn`` scores of the chosen experts, renormalised). Needs the
    token ids (``ctx.input_ids``)."""

    def __init__(self, hidden_size: int, moe: MoESpec, eps: float, vocab_size: int):
        super().__init__()
        self.score = SCORE_FUNCTIONS[moe.score_fn]
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden_size))
        self.register_buffer("tid2eid", torch.zeros(vocab_size, moe.top_k, dtype=torch.long))

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        init.normal_(self.weight, generator, std)

    def reset_buffers(self, generator: torch.Generator | None = None) -> None:
        """Distinct random experts for every token id."""
        experts = self.weight.shape[0]
        ranks = torch.rand(self.tid2eid.shape[0], experts, generator=generator, device=self.tid2eid.device)
        self.tid2eid.copy_(ranks.argsort(-1)[:, : self.tid2eid.shape[1]])

    def forward(self, x: torch.Tensor, ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx is None or ctx.input_ids is None:
            raise InputError("hash-routed MoE layers need the token ids (call the model with input_ids)")
        index = self.tid2eid[ctx.input_ids.reshape(-1)]  # [N, K]
        weight = self.score(F.linear(x, self.weight)).gather(-1, index)
        return index, weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)

    @staticmethod
    def param_count(hidden_size: int, moe: MoESpec) -> int:
        return moe.num_experts * hidden_size


def make_router(hidden_size: int, moe: MoESpec, eps: float, vocab_size: int) -> nn.Module:
    """The router a spec names (the hash router also needs the vocabulary size for its table)."""
    return ROUTERS[moe.router](hidden_size, moe, eps, vocab_size)


def router_flops(hidden_size: int, moe: MoESpec) -> int:
    """Router FLOPs per token: the router's own count, or the logits of a linear router."""
    own = getattr(ROUTERS[moe.router], "flops_per_token", None)
    return own(hidden_size, moe) if own else 2 * hidden_size * moe.num_experts


@LAYER_CHECKS.register("moe")
def validate_moe(at: str, layer_index: int, spec: LayerSpec, cfg) -> list[str]:
    """Checks of a layer's :class:`MoESpec`, whichever MLP kind or block uses it."""
    m, p = spec.moe, []
    if m is None:
        return p
    if not (0 < m.top_k <= m.num_experts and m.intermediate_size > 0):
        p.append(f"{at}.moe = {m}: need 0 < top_k <= num_experts and intermediate_size > 0")
    if m.router not in ROUTERS:
        p.append(f"{at}.moe.router = {m.router!r}: allowed: {ROUTERS.names()}")
    else:
        p.extend(getattr(ROUTERS[m.router], "validate", lambda at, m: [])(at, m))
    if m.router_precision not in ROUTER_PRECISIONS:
        p.append(f"{at}.moe.router_precision = {m.router_precision!r}: allowed: {list(ROUTER_PRECISIONS)}")
    if m.score_fn not in SCORE_FUNCTIONS:
        p.append(f"{at}.moe.score_fn = {m.score_fn!r}: allowed: {list(SCORE_FUNCTIONS)}")
    if m.num_experts % max(m.n_group, 1):
        p.append(f"{at}.moe.n_group = {m.n_group}: must divide num_experts = {m.num_experts}")
    elif m.n_group > 1:
        size = m.num_experts // m.n_group
        if size < 2 or not 1 <= m.topk_group <= m.n_group or m.top_k > m.topk_group * size:
            p.append(
                f"{at}.moe: group-limited routing needs groups of >= 2 experts, 1 <= topk_group <= n_group and "
                f"top_k <= topk_group x group size; got {m.num_experts} experts in {m.n_group} groups, "
                f"topk_group {m.topk_group}, top_k {m.top_k}"
            )
    return p


@MLP_KINDS.register("moe")
class SparseMoE(nn.Module):
    """An MLP replaced by experts (HF ``LagunaSparseMoeBlock``): ``routed_scaling`` times the
    routed experts' weighted sum, plus an always-on shared expert (not scaled, not gated).
    Submodule names follow HF: ``gate`` (router), ``experts``, ``shared_experts``."""

    EXPERTS_INSIDE = True  # the LayerSpec.moe experts are this MLP

    def __init__(self, hidden_size: int, spec: LayerSpec, norm_eps: float, vocab_size: int = 0):
        super().__init__()
        m = spec.moe
        self.routed_scaling = m.routed_scaling
        self.gate = make_router(hidden_size, m, norm_eps, vocab_size)
        self.experts = Experts(hidden_size, m, spec.activation, spec.swiglu_limit)
        self.shared_experts = (
            GatedMLP(hidden_size, m.shared_expert_size, spec.activation, limit=spec.swiglu_limit)
            if m.shared_expert_size
            else None
        )

    @classmethod
    def from_spec(cls, hidden_size: int, spec: LayerSpec, norm_eps: float, vocab_size: int = 0) -> SparseMoE:
        return cls(hidden_size, spec, norm_eps, vocab_size)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        flat = x.reshape(-1, x.shape[-1])
        index, weight = self.gate(flat, ctx)
        # Not torch.add(shared, routed, alpha=routed_scaling) in one pass: torch 2.13's inductor drops add's alpha
        # when an input is a matmul's output (compiled decode of the tiny Laguna was off by 1e-2; 2026-12-05).
        out = self.experts(flat, index, weight) * self.routed_scaling
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(x.shape)

    @staticmethod
    def param_count(hidden_size: int, spec: LayerSpec) -> dict[str, int]:
        m = spec.moe
        always = ROUTERS[m.router].param_count(hidden_size, m) + GatedMLP.size(hidden_size, m.shared_expert_size)
        return {
            "total": always + Experts.param_count(hidden_size, m),
            "active": always + Experts.active_param_count(hidden_size, m),
        }

    @staticmethod
    def flops_per_token(hidden_size: int, spec: LayerSpec) -> int:
        m = spec.moe
        shared = GatedMLP.size(hidden_size, m.shared_expert_size)
        return router_flops(hidden_size, m) + 2 * Experts.active_param_count(hidden_size, m) + 2 * shared

    @staticmethod
    def validate(at: str, spec: LayerSpec) -> list[str]:
        return [] if spec.moe is not None else [f"{at}.mlp = 'moe' needs a MoESpec in {at}.moe"]
