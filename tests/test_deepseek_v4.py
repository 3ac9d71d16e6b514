"""DeepSeek V4: mHC residual streams, CSA / HCA compressed attention and caches, hash-routed MoE.

Tiny random ``DeepseekV4ForCausalLM`` models, every parameter randomised (attention sinks,
position biases, static mHC biases and gains, router correction biases, the hash table).
Compression ratios are shrunk (CSA 4, HCA 8) and the window to 6, so a 30-token sequence has
several full blocks and a partial one in every compressed layer. Indexer heads are paired (head
h + H/2 has the negated query projection, same positive weight row), so scores are w·|q·k| and
the top-k has no ReLU-zero ties.
"""

from __future__ import annotations

import pytest
import torch

import ctxlab
from ctxlab.nn.residual import HyperConnection

from conftest import assert_chunked_decode_matches, assert_matches_reference, assert_round_trip, randomize_

TOL = 1e-4
SEQ = 30
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=3,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    num_hash_layers=1,
    sliding_window=6,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    rope_scaling={
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
)
CASES = {
    "swa-csa-hca-csa": {},
    "hca-first-topk5-routed2.5": dict(
        layer_types=[
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "sliding_attention",
        ],
        index_topk=5,
        routed_scaling_factor=2.5,
        num_hash_layers=2,
        o_groups=4,
    ),
}


def hf_v4(hf, case, seed=0):
    if not hasattr(hf, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek V4")
    torch.manual_seed(seed)
    config = hf.DeepseekV4Config(**{**BASE, **CASES[case]})
    model = hf.DeepseekV4ForCausalLM._from_config(config, experts_implementation="eager")
    randomize_(model, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            if name.endswith("tid2eid"):  # distinct experts per token
                b.copy_(torch.stack([torch.randperm(8, generator=gen)[: b.shape[1]] for _ in range(b.shape[0])]))
        for layer in model.model.layers:
            indexer = getattr(layer.self_attn.compressor, "indexer", None) if layer.self_attn.compressor else None
            if indexer is not None:
                h, d = indexer.num_heads, indexer.head_dim
                wq = indexer.q_b_proj.weight.view(h, d, -1)
                wq[h // 2 :] = -wq[: h // 2]
                w = indexer.scorer.weights_proj.weight
                w[: h // 2] = w[: h // 2].abs()
                w[h // 2 :] = w[: h // 2]
    return model.eval()


@pytest.fixture(params=sorted(CASES))
def pair(request, hf, tmp_path):
    ref = hf_v4(hf, request.param)
    ref.save_pretrained(tmp_path)
    return ref, ctxlab.from_pretrained(tmp_path)


def test_logits_and_greedy_tokens_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    assert_matches_reference(ref, ours, ids, 10, 14)


def test_save_pretrained_round_trip_through_transformers(pair, hf, tmp_path_factory):
    ref, ours = pair
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    assert_round_trip(hf, ref, ours, tmp_path_factory.mktemp("ours"), ids, experts_implementation="eager")


@pytest.mark.parametrize("chunks", [[3, 7, 2], [13], [1, 1, 1, 5, 9], [17]])
def test_chunked_prefill_inside_blocks_then_decode(pair, chunks):
    """Chunk boundaries anywhere inside blocks (pending tokens and overlap carried), then decode."""
    _, ours = pair
    assert_chunked_decode_matches(
        ours, torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3)), chunks
    )


def test_cache_grows_one_entry_per_completed_block(pair):
    _, ours = pair
    cache = ours.new_cache(1, 40)
    compressed = [(i, c) for i, c in enumerate(cache.layers) if c.spec.kind == "compressed"]
    counts = []
    with torch.no_grad():
        for t in range(40):
            ours(torch.tensor([[5 + t]]), cache=cache)
            counts.append([int((c.entries["kv"] != 0).any(-1).sum()) for _, c in compressed])  # written
    for j, (i, c) in enumerate(compressed):
        ratio = c.spec.compress_ratio
        assert [row[j] for row in counts] == [(t + 1) // ratio for t in range(40)]
        storage = {n: t.shape[-2] for n, t in c.entries.items()}
        assert set(storage.values()) == {40 // ratio}  # allocated for complete blocks only


def test_hash_layers_route_by_token_id(pair):
    """Hash-routed layers pick the experts in tid2eid[token] whatever the hidden state."""
    _, ours = pair
    hashed = [b for b in ours.model.layers if b.spec.moe.router == "hash"]
    assert hashed
    gate = hashed[0].mlp.gate
    ctx = ctxlab.attention.context.ForwardContext(positions=torch.arange(3)[None], input_ids=torch.tensor([[7, 7, 9]]))
    index, weight = gate(torch.randn(3, 64), ctx)
    assert torch.equal(index, gate.tid2eid[torch.tensor([7, 7, 9])])
    assert torch.allclose(weight.sum(-1), torch.ones(3))


@pytest.mark.parametrize("seed", range(5))
def test_mhc_mixing_matrices_are_doubly_stochastic(seed):
    """20 Sinkhorn iterations: columns exact (the last step), rows within 1e-5, for dynamic mixing
    weights of the size mHC starts from (small fn, any static bias). Sharper logits converge
    slower: with fn ~ N(0, 0.3) rows are off by ~3e-2 after 20 iterations (measured)."""
    torch.manual_seed(seed)
    hc = HyperConnection(hidden_size=16, streams=4, iters=20, eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        hc.fn.normal_(0, 0.02)
        hc.base.normal_(0, 1.0)
        hc.scale.uniform_(0.5, 1.5)
    _, _, comb = hc.mixing(torch.randn(8, 32, 4, 16))
    assert (comb >= 0).all()
    assert (comb.sum(-1) - 1).abs().max() <= 1e-5
    assert (comb.sum(-2) - 1).abs().max() <= 1e-5


def test_mhc_swaps_for_a_plain_residual_by_config_alone():
    """The same model with residual='plain' runs the same code with one stream and x + branch."""
    cfg = ctxlab.io.config_file.config_from_dict({**BASE, "model_type": "deepseek_v4"})
    plain = cfg.replace(residual="plain", hc_mult=1)
    m_hc, m_plain = ctxlab.build_model(cfg), ctxlab.build_model(plain)
    names_hc, names_plain = set(dict(m_hc.named_parameters())), set(dict(m_plain.named_parameters()))
    assert names_plain < names_hc and all("hc" in n for n in names_hc - names_plain)
    assert ctxlab.count_params(plain)["total"] == sum(p.numel() for p in m_plain.parameters())
    ids = torch.arange(3, 3 + SEQ)[None]
    cache = m_plain.new_cache(1, SEQ)
    with torch.no_grad():
        stepped = torch.cat(
            [m_plain(ids[:, :9], cache=cache)] + [m_plain(ids[:, i : i + 1], cache=cache) for i in range(9, SEQ)], 1
        )
        assert (stepped - m_plain(ids)).abs().max() <= TOL


def test_left_padded_batches_are_refused_clearly():
    cfg = ctxlab.io.config_file.config_from_dict({**BASE, "model_type": "deepseek_v4"})
    with pytest.raises(ValueError, match="left-padded"):
        ctxlab.generate(ctxlab.build_model(cfg), [[5, 6, 7], [8]], max_new_tokens=2)


def test_published_numbers():
    """Spec §3/§4: layer schedules, totals, bf16 cache and decode FLOP terms at 1M tokens."""
    flash, pro = ctxlab.load_config("deepseek-v4-flash"), ctxlab.load_config("deepseek-v4-pro")
    kinds = lambda c: [(s.compress.ratio, s.indexer is not None) for s in c.layers]  # noqa: E731
    assert kinds(flash) == [(0, False)] * 2 + [(4, True), (128, False)] * 20 + [(4, True)]
    assert kinds(pro) == [(128, False)] * 2 + [(4, True), (128, False)] * 29 + [(4, True)]
    assert [s.moe.router for s in flash.layers[:4]] == ["hash"] * 3 + ["biased_topk"]
    for cfg, total, active in ((flash, 0.284, 13.27), (pro, 1.573, 48.85)):
        p = ctxlab.count_params(cfg)
        assert round(p["total"] / 1e12, 3) == total
        assert round((p["active"] - p["embedding"]) / 1e9, 2) == active
    n = 1 << 20
    for cfg, attention, scan in ((flash, 23.6, 90.9), (pro, 76.7, 129.9)):
        terms = ctxlab.decode_flops_terms(cfg, n - 1)
        assert (round(terms["attention"] / 1e9, 1), round(terms["indexer_scan"] / 1e9, 1)) == (attention, scan)


def test_published_comparison_with_v32_at_1m_tokens():
    """Spec §4: deployed-format KV 10.48% (Pro) / 7.32% (Flash) of V3.2; precision-weighted decode
    FLOPs 27.1% / 10.2% (published 27% / 10%); raw FLOPs 26.1% / 12.1%; what bf16 caches hold here."""
    from ctxlab.reporting.published import DEPLOYED_FORMATS
    from ctxlab.reporting.rows import published_ratio_row

    n = 1 << 20
    pro, flash = published_ratio_row("deepseek-v4-pro", n), published_ratio_row("deepseek-v4-flash", n)
    assert (round(pro["kv_ratio_deployed"], 4), round(flash["kv_ratio_deployed"], 4)) == (0.1048, 0.0732)
    assert (round(pro["flops_ratio_weighted"], 3), round(flash["flops_ratio_weighted"], 3)) == (0.271, 0.102)
    assert (round(pro["flops_ratio_raw"], 3), round(flash["flops_ratio_raw"], 3)) == (0.261, 0.121)
    assert round(pro["kv_bytes_deployed"] / 1e9, 2) == 5.28 and round(flash["kv_bytes_deployed"] / 1e9, 2) == 3.69
    # the deployed V4 entry: 448 FP8 + 7 scale bytes + 64 BF16 + 1 pad = 584 B; FP4 indexer key 68 B
    fmt = DEPLOYED_FORMATS["deepseek-v4-flash"]
    from ctxlab.planner import layer_cache_spec

    csa = layer_cache_spec(ctxlab.load_config("deepseek-v4-flash").layers[2])
    assert fmt.bytes_per_token(csa) == 584 and fmt.bytes_per_token(csa, csa.entry_shapes) == 584 + 68
    # bf16, as this library's caches hold it (window of 128 per layer, entries, pending blocks, overlap state)
    assert round(ctxlab.kv_cache_bytes(ctxlab.load_config("deepseek-v4-pro"), n, "bfloat16") / 1e9, 2) == 10.34


@pytest.mark.parametrize("prompt_len", [1, 2, 9, 23, 31])  # 1, 2: before the first CSA entry (no indexer queries)
def test_decode_flops_match_flop_counter(prompt_len):
    """Every V4 term (mHC, compressors, indexer scan, window + chosen entries, experts) as torch counts it."""
    from test_accounting import measured_decode_flops

    for case in CASES:
        cfg = ctxlab.io.config_file.config_from_dict({**BASE, **CASES[case], "model_type": "deepseek_v4"})
        model = ctxlab.build_model(cfg, seed=1)
        assert ctxlab.decode_flops(cfg, prompt_len) == measured_decode_flops(model, prompt_len), (case, prompt_len)


def test_mtp_layer_weights_are_skipped_with_one_info_line(hf, tmp_path, caplog):
    """Checkpoints carry the multi-token-prediction layer: skipped (not an error), said once."""
    import logging

    from safetensors.torch import load_file, save_file

    ref = hf_v4(hf, "swa-csa-hca-csa")
    ref.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.update({"mtp.0.attn.wq_a.weight": torch.zeros(2, 2), "mtp.0.ffn.gate.weight": torch.zeros(2, 2)})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="ctxlab"):
        ours = ctxlab.from_pretrained(tmp_path)
    assert [r.message.count("mtp.0") > 0 for r in caplog.records].count(True) == 1
    assert "multi-token-prediction" in caplog.text
    ids = torch.arange(3, 3 + SEQ)[None]
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL
