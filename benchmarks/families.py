# ruff: noqa: C408  (HF config dicts read best as keyword arguments)
"""Tiny-but-wide models (~150M parameters, hidden 1024, 8 layers, vocab 32000) of every family,
benchmarked with ``ctxlab.bench`` against transformers on the same weights (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/families.py --contexts 512,16384 --json out.json
    PYTHONPATH=src python benchmarks/families.py --list        # parameter counts only

Each model is an HF ``config.json`` dict of its family (so transformers loads the saved weights),
turned into a ctxlab config by the family's own parser; weights are random (normal, std 0.02).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import ctxlab
from ctxlab.io.config_file import config_from_dict

COMMON = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=8,
    max_position_embeddings=131072,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rms_norm_eps=1e-6,
)
ROPE = {"rope_type": "default", "rope_theta": 500000.0}

FAMILIES = {
    "llama": dict(
        model_type="llama",
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        rope_parameters=ROPE,
    ),
    "qwen3-sliding": dict(
        model_type="qwen3",
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        rope_parameters=ROPE,
        use_sliding_window=True,
        sliding_window=1024,
        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        tie_word_embeddings=False,
    ),
    "gemma4": dict(
        model_type="gemma4_text",
        intermediate_size=2816,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        global_head_dim=256,
        sliding_window=512,
        num_kv_shared_layers=4,
        layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
        hidden_size_per_layer_input=64,
        vocab_size_per_layer_input=32000,
        final_logit_softcapping=30.0,
        use_double_wide_mlp=False,
    ),
    "laguna": dict(
        model_type="laguna",
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_attention_heads_per_layer=[12, 16, 16, 16] * 2,
        sliding_window=512,
        layer_types=(["full_attention"] + ["sliding_attention"] * 3) * 2,
        mlp_layer_types=["dense"] + ["sparse"] * 7,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        gating=True,
        rope_parameters={"full_attention": ROPE, "sliding_attention": ROPE},
    ),
    "zaya": dict(
        model_type="zaya",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        moe_intermediate_size=1024,
        num_experts=4,
        num_experts_per_tok=1,
        router_hidden_size=128,
        cca_time0=2,
        cca_time1=2,
        rope_parameters={
            "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        },
    ),
    "deepseek_v32": dict(
        model_type="deepseek_v32",
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=256,
        q_lora_rank=384,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        index_topk=2048,
        index_head_dim=64,
        index_n_heads=4,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "deepseek_v4": dict(
        model_type="deepseek_v4",
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        qk_rope_head_dim=64,
        q_lora_rank=384,
        o_groups=4,
        o_lora_rank=256,
        index_n_heads=4,
        index_head_dim=64,
        index_topk=512,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=512,
        num_hash_layers=2,
        sliding_window=128,
        layer_types=["sliding_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    ),
}


def family_config(name: str) -> ctxlab.ModelConfig:
    return config_from_dict({**COMMON, **FAMILIES[name]}, name=f"wide-{name}")


def build(name: str, dtype: torch.dtype = torch.bfloat16) -> ctxlab.CausalLM:
    return ctxlab.build_model(family_config(name), dtype=dtype, seed=0)


def markdown(results: list[dict]) -> str:
    """The docs/benchmarks.md tables of a list of results (``--render FILE.json``)."""
    contexts = [row["context"] for row in results[0]["decode"]]
    head = "| family | params (active) | prefill " + str(results[0]["prefill"][0]["prompt_tokens"])
    head += " tok/s: ctxlab / transformers (×) |"
    for c in contexts:
        head += f" decode @{c}: ctxlab / transformers ms (×) | roofline ratio @{c} |"
    lines = [head, "|" + "---|" * (3 + 2 * len(contexts))]
    for r in results:
        p = r["params"]
        pre = r["prefill"][0]
        cells = [r["family"], f"{p['total'] / 1e6:.0f}M ({p['active'] / 1e6:.0f}M)"]
        other = r["against"] if r["against"] and not r["against_skipped"] else None
        if other:
            cells.append(
                f"{pre['ctxlab_tokens_per_s']:.0f} / {pre[f'{other}_tokens_per_s']:.0f} ({pre['speedup']:.2f}×)"
            )
        else:
            cells.append(f"{pre['ctxlab_tokens_per_s']:.0f}")
        for row in r["decode"]:
            if other:
                cells.append(
                    f"{row['ctxlab_ms_per_token']:.1f} / {row[f'{other}_ms_per_token']:.1f} ({row['speedup']:.2f}×)"
                )
            else:
                cells.append(f"{row['ctxlab_ms_per_token']:.1f}")
            cells.append(f"{row['roofline_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    bandwidths = ", ".join(f"{r['bandwidth_gb_s']:.1f}" for r in results)
    lines.append("")
    lines.append(f"Copy bandwidth measured at the start of each family's run (GB/s): {bandwidths}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of: " + ", ".join(FAMILIES))
    p.add_argument("--contexts", default="512,16384")
    p.add_argument("--prompts", default="2048")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--against", default="transformers", help="transformers, or 'none'")
    p.add_argument("--quantize", choices=("int8", "int4"))
    p.add_argument("--compile", action="store_true", help="ctxlab decodes through its compiled decode step")
    p.add_argument("--no-pack", action="store_true", help="keep ctxlab's linear weights in PyTorch's layout")
    p.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate matmuls in ctxlab")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); 1 resists a shared machine's "
        "oversubscription far better (measured: 0.54 s vs 4.0 s per token at load 17 on 2 cores)",
    )
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument("--list", action="store_true", help="print parameter counts and exit")
    p.add_argument("--render", metavar="FILE.json", help="print the markdown tables of a --json file and exit")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return 0
    names = args.families.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        for name in names:
            c = ctxlab.count_params(family_config(name))
            print(f"{name:14s} total {c['total'] / 1e6:6.1f}M  active {c['active'] / 1e6:6.1f}M")
        return 0
    results = []
    for name in names:
        model = build(name)
        if not args.no_fuse:
            ctxlab.fuse_projections(model)
        if args.quantize:
            ctxlab.quantize(model, args.quantize)
        if not args.no_pack:  # with --compile only what inductor traces (the bf16 linears on the native matvec)
            ctxlab.pack_linears(model, for_compile=args.compile)
        print(f"[{name}]", file=sys.stderr, flush=True)
        result = ctxlab.bench(
            model,
            contexts=[int(c) for c in args.contexts.split(",")],
            prompts=[int(c) for c in args.prompts.split(",")],
            steps=args.steps,
            repeats=args.repeats,
            against=None if args.against == "none" else args.against,
            compile=args.compile,
            progress=lambda m: print("  " + m, file=sys.stderr, flush=True),
        )
        result["family"] = name
        result["params"] = ctxlab.count_params(model.config)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
