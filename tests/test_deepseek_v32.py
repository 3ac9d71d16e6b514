"""DeepSeek V3.2: MLA (expanded and absorbed decode), the lightning indexer (DSA), DeepSeek MoE.

Tiny random ``DeepseekV32ForCausalLM`` models, every parameter randomised (router correction
biases included). Indexer heads are paired (head h + H/2 has the negated query projection and
the same weight row of head h), so each pair scores ``w·|q·k|`` and the top-k has no ties at the
ReLU's zero; the test checks the selection margin before comparing.
"""

from __future__ import annotations

import pytest
import torch

import ctxlab
from ctxlab.attention.mla import set_decode_path
from ctxlab.reporting.measure import tiny_like

from conftest import (
    assert_chunked_decode_matches,
    assert_matches_reference,
    assert_round_trip,
    randomize_,
    stepped_logits,
)

TOL = 1e-4
SEQ = 20
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=24,
    index_topk=6,
    index_head_dim=32,
    index_n_heads=4,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "rope_theta": 10000.0,
    },
)
CASES = {
    "dsa-topk6-groups": {},
    "dsa-topk10-4groups-routed3": dict(
        index_topk=10, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=1.5
    ),
}


def pair_indexer_heads_(model):
    """Make indexer scores w·|q·k| (no ReLU-zero ties): head h + H/2 = -head h, same weight row."""
    with torch.no_grad():
        for layer in model.model.layers:
            ix = layer.self_attn.indexer
            h, d = ix.n_heads, ix.head_dim
            wq = ix.wq_b.weight.view(h, d, -1)
            wq[h // 2 :] = -wq[: h // 2]
            ix.weights_proj.weight[h // 2 :] = ix.weights_proj.weight[: h // 2].abs()
            ix.weights_proj.weight[: h // 2] = ix.weights_proj.weight[: h // 2].abs()


def hf_v32(hf, case, seed=0):
    if not hasattr(hf, "DeepseekV32ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek V3.2")
    torch.manual_seed(seed)
    config = hf.DeepseekV32Config(**{**BASE, **CASES[case]})
    model = hf.DeepseekV32ForCausalLM._from_config(config, attn_implementation="eager", experts_implementation="eager")
    randomize_(model, seed=seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)))
    pair_indexer_heads_(model)
    return model.eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_v32(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path)


def selection_margin(model, ids) -> float:
    """Smallest gap between the k-th and (k+1)-th indexer score over queries with more than k past keys."""
    margins = []
    with torch.no_grad():  # recompute each layer's indexer scores with the model's own modules
        x = model.model.embed_tokens(ids)
        for block in model.model.layers:
            attn = block.self_attn
            hx = block.input_layernorm(x)
            q_res = attn.q_a_layernorm(attn.q_a_proj(hx))
            pos = torch.arange(ids.shape[1])[None]
            cos, sin = attn.rotary.cos_sin(pos, hx.dtype)
            keys = attn.indexer.keys(hx, attn.rotary, cos, sin)
            ix = attn.indexer
            q = attn.rotary.apply(
                ix.wq_b(q_res).view(1, -1, ix.spec.n_heads, ix.spec.head_dim).transpose(1, 2), cos, sin
            )
            scores = torch.relu(q @ keys.transpose(-1, -2) * ix.spec.head_dim**-0.5)
            index = torch.einsum("bth,bhts->bts", ix.weights_proj(hx) * ix.spec.n_heads**-0.5, scores)[0]
            k = ix.spec.topk
            for t in range(k, ids.shape[1]):
                top = index[t, : t + 1].sort(descending=True).values
                margins.append((top[k - 1] - top[k]).item())
            x = block(x, ctxlab.attention.context.ForwardContext(positions=pos))
    return min(margins)


def test_logits_and_greedy_tokens_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    assert selection_margin(ours, ids) > 1e-5, "indexer top-k nearly tied: parity would test float noise"
    assert_matches_reference(ref, ours, ids, 6, 12)


def test_save_pretrained_round_trip_through_transformers(pair, hf, tmp_path_factory):
    ref, ours = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    assert_round_trip(
        hf, ref, ours, tmp_path_factory.mktemp("ours"), ids, attn_implementation="eager", experts_implementation="eager"
    )


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_decode_paths_equal_full_forward(pair, path):
    """Absorbed decode == expanded decode == full forward, after a chunked prefill."""
    _, ours = pair
    set_decode_path(ours, path)
    assert_chunked_decode_matches(
        ours, torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3)), [7, 5]
    )
    set_decode_path(ours, "absorbed")


def test_absorbed_decode_reads_latents_in_blocks_and_masks_the_unwritten_tail():
    """Decode from 60 to 140 tokens in a cache of 200 (key blocks of 64: the reads end at 64, 128, 192),
    the indexer's top-k (2048) above the length so every latent is read: == the full forward, although
    every slot not yet written holds large finite garbage."""
    model = ctxlab.build_model(tiny_like(ctxlab.load_config("deepseek-v3.2")), dtype=torch.float32, seed=0)
    randomize_(model, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(1, 200)
    with torch.no_grad():
        for layer in range(len(model.model.layers)):
            for buffer in cache[layer].buffers.values():
                buffer.fill_(1e4)
        full = model(ids)
        stepped = stepped_logits(model, ids, [60] + [1] * 80, cache)
    assert (stepped - full).abs().max().item() <= 1e-4


def test_cache_holds_latent_rope_key_and_indexer_key_only(pair):
    _, ours = pair
    cache = ours.new_cache(1, 30)
    layer = cache[1]
    assert {n: tuple(t.shape) for n, t in layer.buffers.items()} == {
        "latent": (1, 1, 30, 32),
        "k_rope": (1, 1, 30, 16),
        "index_k": (1, 1, 30, 32),
    }
    assert cache.nbytes() == ctxlab.kv_cache_bytes(ours.config, 30, "float32") == 3 * 30 * (32 + 16 + 32) * 4


def test_group_limited_routing_picks_only_inside_the_best_groups():
    from ctxlab.config import MoESpec
    from ctxlab.nn.moe import BiasedTopKRouter

    router = BiasedTopKRouter(4, MoESpec(8, 2, 4, "biased_topk", n_group=4, topk_group=1), 1e-6)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 4))
    index, weight = router(torch.randn(200, 4))
    assert (index // 2).unique(dim=-1).shape[-1] == 1 or ((index[:, 0] // 2) == (index[:, 1] // 2)).all()
    assert torch.allclose(weight.sum(-1), torch.ones(200))


def test_published_numbers():
    """Spec §3-4: 671.9B total; bf16 cache 90.06 GB at 1M; the indexer scan dominates decode FLOPs."""
    cfg = ctxlab.load_config("deepseek-v3.2")
    params = ctxlab.count_params(cfg)
    assert round(params["total"] / 1e9, 1) == 671.9
    assert round((params["active"] - params["embedding"]) / 1e9, 2) == 37.48
    n = 1 << 20
    assert ctxlab.kv_cache_bytes(cfg, n, "bfloat16") == 61 * n * (512 + 64 + 128) * 2
    terms = ctxlab.decode_flops_terms(cfg, n - 1)
    assert round(terms["indexer_scan"] / 1e9, 1) == 1056.2  # 61 x 2^20 x (64 x 128 + 64) x 2
    assert round(terms["attention"] / 1e9, 1) == 34.8  # 61 x 2048 keys x 128 heads x (576 + 512) x 2


def test_deployed_format_cache_at_1m_tokens():
    """Spec §4.1: FP8 latent + fp32 scales + BF16 rope key (656 B) + FP8 indexer key (132 B) -> 50.40 GB at 1M."""
    from ctxlab.accounting.formats import kv_cache_bytes_stored
    from ctxlab.planner import layer_cache_spec
    from ctxlab.reporting.published import DEPLOYED_FORMATS

    cfg, fmt = ctxlab.load_config("deepseek-v3.2"), DEPLOYED_FORMATS["deepseek-v3.2"]
    assert {fmt.bytes_per_token(layer_cache_spec(s)) for s in cfg.layers} == {656 + 132}
    assert round(kv_cache_bytes_stored(cfg, 1 << 20, fmt) / 1e9, 2) == 50.40


def test_an_odd_latent_rank_decodes_as_the_full_forward():
    """kv_lora_rank 7: the RoPE key starts at an odd offset of the latent row (view_as_complex needs it aligned)."""
    cfg = ctxlab.io.config_file.config_from_dict({**BASE, "kv_lora_rank": 7, "model_type": "deepseek_v32"})
    model = ctxlab.build_model(cfg, seed=0)
    ids = torch.randint(3, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    assert_chunked_decode_matches(model, ids, [5, 1, 1, 1])


def test_the_published_mtp_layer_is_skipped_as_transformers_skips_it(hf, tmp_path):
    """DeepSeek's checkpoints hold the multi-token-prediction layer as ``model.layers.61.*`` (after the 61
    decoder layers); transformers ignores those tensors on load, and ctxlab does too (it refused them)."""
    from safetensors.torch import load_file, save_file

    ref = hf_v32(hf, sorted(CASES)[0])
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    width = ref.config.hidden_size
    state["model.layers.61.eh_proj.weight"] = torch.zeros(width, 2 * width)
    state["model.layers.61.enorm.weight"] = torch.ones(width)
    state["model.layers.61.shared_head.norm.weight"] = torch.ones(width)
    state["model.layers.61.self_attn.kv_a_layernorm.weight"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_transformers_internal_layout_loads(hf, tmp_path):
    """As tests/test_laguna.py's: transformers' internal names with stacked experts are ctxlab's own."""
    ref = hf_v32(hf, sorted(CASES)[0])
    ref.save_pretrained(tmp_path, save_original_format=False)
    ours = ctxlab.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
