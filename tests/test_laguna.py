"""Laguna XS.2: per-layer head budgets, softplus output gate, sigmoid-routed MoE; parity with transformers."""

from __future__ import annotations

import pytest
import torch

import ctxlab
from ctxlab.accounting.savings import uniform_head_budget

from conftest import assert_chunked_decode_matches, assert_matches_reference, assert_round_trip, randomize_

TOL = 1e-4
SEQ = 20  # longer than the window (8)

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    num_attention_heads_per_layer=[6, 8, 2, 4],
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "dense"],
    sliding_window=8,
    max_position_embeddings=4096,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_routed_scaling_factor=2.5,
    gating=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={
        "full_attention": {
            "rope_theta": 500000.0,
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 128,
            "beta_slow": 1.0,
            "beta_fast": 64.0,
            "attention_factor": 1.0,
            "partial_rotary_factor": 0.5,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    },
)
CASES = {
    "per-head-gate": {},
    "per-element-gate-softcap": dict(
        gating="per-element", moe_router_logit_softcapping=2.0, num_attention_heads_per_layer=[4, 2, 8, 6]
    ),
    "all-sparse-top3": dict(mlp_layer_types=["sparse"] * 4, shared_expert_intermediate_size=16, num_experts_per_tok=3),
}


def hf_laguna(hf, case, seed=0):
    if not hasattr(hf, "LagunaForCausalLM"):
        pytest.skip("this transformers has no Laguna")
    torch.manual_seed(seed)
    model = hf.LagunaForCausalLM(hf.LagunaConfig(**{**BASE, **CASES[case]}))
    model.config._attn_implementation = "eager"
    randomize_(model, seed=seed)  # includes the router weights and e_score_correction_bias
    with torch.no_grad():  # biases that decide expert choice: large enough to matter
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_laguna(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path)


def test_logits_and_greedy_tokens_match_transformers(pair):
    ref, ours = pair
    assert_matches_reference(
        ref, ours, torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(1)), 5, 12
    )


def test_heads_come_from_the_per_layer_list(pair):
    ref, ours = pair
    assert [s.num_heads for s in ours.config.layers] == ref.config.num_attention_heads_per_layer
    assert {s.num_kv_heads for s in ours.config.layers} == {2}


def test_save_pretrained_round_trip_through_transformers(pair, hf, tmp_path_factory):
    ref, ours = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    assert_round_trip(hf, ref, ours, tmp_path_factory.mktemp("ours"), ids, attn_implementation="eager")


@pytest.mark.parametrize("chunks", [[SEQ], [3, 9], [11]])
def test_chunked_prefill_then_decode_equals_full_forward(pair, chunks):
    _, ours = pair
    assert_chunked_decode_matches(
        ours, torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3)), chunks
    )


def test_moe_routes_a_batch_exactly_as_token_by_token(pair):
    """Routing is vectorised over tokens (loop over experts only): a 64-token batch equals 64 single tokens."""
    _, ours = pair
    moe = next(b.mlp for b in ours.model.layers if b.spec.mlp == "moe")
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = moe(x)
        one_by_one = torch.stack([moe(x[b, t][None, None])[0, 0] for b in range(4) for t in range(16)]).view_as(x)
    assert (batched - one_by_one).abs().max().item() <= 1e-5


def test_correction_bias_changes_the_choice_not_the_weights():
    """The selection bias picks experts; the weights are the chosen sigmoid scores, renormalised."""
    from ctxlab.config import MoESpec
    from ctxlab.nn.moe import BiasedTopKRouter

    router = BiasedTopKRouter(4, MoESpec(num_experts=3, top_k=1, intermediate_size=2, router="biased_topk"), 1e-6)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3, 4))
        x = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
        assert router(x)[0].item() == 0
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        index, weight = router(x)
    assert index.item() == 1 and weight.item() == pytest.approx(1.0)


def test_published_numbers():
    """Spec §3: KV 5.058 GiB at 128K bf16 (sliding capped), 33.44B total / 3.02B active, 32.7 vs 40.7 GFLOP."""
    cfg = ctxlab.load_config("laguna-xs2")
    assert [s.num_heads for s in cfg.layers] == [48, 64, 64, 64] * 10
    assert sum(s.window is None for s in cfg.layers) == 10 and {s.window for s in cfg.layers} == {None, 512}
    kv = ctxlab.kv_cache_bytes(cfg, 131072, "bfloat16")
    assert kv == 10 * 4096 * 131072 + 30 * 4096 * 512  # a 512-slot ring per sliding layer
    assert round(kv / 2**30, 3) == 5.059  # HF keeps 511 slots: 5.058 GiB; the difference is 30 x 4 KiB
    params = ctxlab.count_params(cfg)
    assert params["total"] == 33_442_617_088 and params["active"] == 3_017_135_872
    budget = ctxlab.decode_flops_terms(cfg, 131071)["attention"]  # the token at position 131071 sees 131072 keys
    uniform = ctxlab.decode_flops_terms(uniform_head_budget(cfg), 131071)["attention"]
    assert round(budget / 1e9, 1) == 32.7 and round(uniform / 1e9, 1) == 40.7
    assert budget == 10 * 4 * 48 * 128 * 131072 + 30 * 4 * 64 * 128 * 512


def test_transformers_internal_layout_loads(hf, tmp_path):
    """``save_pretrained(save_original_format=False)`` writes transformers' module names with the experts stacked
    ([E, 2·I, H], [E, H, I]), which are ctxlab's own: such a file loads as it is (it was refused)."""
    ref = hf_laguna(hf, sorted(CASES)[0])
    ref.save_pretrained(tmp_path, save_original_format=False)
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
