"""bfloat16 routing: every MoE family's tiny model picks, in bfloat16, the experts transformers picks
in bfloat16 on the same weights, because the routing biases (DeepSeek's ``e_score_correction_bias``,
ZAYA's ``balancing_biases``) stay float32 in every dtype path, as in transformers.

Each router is compared on the hidden states transformers' own router receives (captured by a hook),
so the comparison is of the routing decision, not of bf16 drift in the layers before it.
"""

from __future__ import annotations

import pytest
import torch

import ctxlab
import test_deepseek_v4
import test_deepseek_v32
import test_gemma4
import test_laguna
import test_zaya
from ctxlab.attention.context import ForwardContext
from ctxlab.nn.moe import ROUTERS

FAMILIES = {
    "laguna": (test_laguna.hf_laguna, "per-head-gate"),
    "zaya": (test_zaya.hf_zaya, "cca-k2-k2"),
    "deepseek_v32": (test_deepseek_v32.hf_v32, "dsa-topk6-groups"),
    "deepseek_v4": (test_deepseek_v4.hf_v4, "swa-csa-hca-csa"),
    "gemma4": (test_gemma4.hf_gemma, "moe"),
}
TOKENS = (4, 48)


def biases_(model, scale: float, offset: float = 16.0, seed: int = 0) -> None:
    """Routing biases that decide choices, with values bfloat16 cannot hold: around ``offset`` (a shift
    every expert shares) bf16's grid is 2^-4 apart, coarse next to the differences that choose."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "balancing_biases")):
                t.copy_(t + offset + scale * torch.randn(t.shape, generator=gen, dtype=torch.float32))


def hf_router_calls(ref, ids) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(router name, its input, the experts it chose) for every MoE layer of a transformers model."""
    calls = []
    routers = [(n, m) for n, m in ref.named_modules() if type(m).__name__.endswith(("Router", "TopkRouter"))]
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: calls.append((n, args, out))) for n, m in routers]
    with torch.no_grad():
        ref(ids)
    for h in hooks:
        h.remove()
    return calls


def our_choice(router, args, ids) -> torch.Tensor:
    x = args[0].reshape(-1, args[0].shape[-1])
    ctx = ForwardContext(
        positions=torch.arange(ids.shape[1]).expand(ids.shape), cache=None, sources=frozenset(), input_ids=ids
    )
    if len(args) > 1 and args[1] is not None and torch.is_tensor(args[1]) and args[1].is_floating_point():
        ctx.router_state = args[1].reshape(-1, args[1].shape[-1])  # ZAYA: the previous layer's router state
    index, _ = router(x, ctx)
    return index


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bfloat16_experts_equal_transformers(family, hf, tmp_path):
    make, case = FAMILIES[family]
    ref = make(hf, case)
    biases_(ref, scale=0.05)
    if family == "laguna":  # transformers casts Laguna's bias to the model dtype: a checkpoint of bf16 values
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(p.bfloat16().float())
    ref.save_pretrained(tmp_path)  # float32 checkpoint, biases included
    ref16 = hf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = ctxlab.from_pretrained(tmp_path, dtype="bfloat16")
    ids = torch.randint(3, 128, TOKENS, generator=torch.Generator().manual_seed(5))
    routers = [m for m in ours.modules() if type(m) in ROUTERS.values()]
    calls = hf_router_calls(ref16, ids)
    assert len(calls) == len(routers) > 0
    compared = 0
    for (name, args, out), router in zip(calls, routers):
        theirs = out[2].reshape(-1, out[2].shape[-1])
        mine = our_choice(router, args, ids)
        if family == "zaya":  # transformers reports the skip class as expert 0 with weight 0
            mine = mine.masked_fill(mine == router.num_experts, 0)
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values), name
        compared += mine.numel()
    assert compared >= TOKENS[0] * TOKENS[1]
