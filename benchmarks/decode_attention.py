"""One decode step of attention over S cached tokens, the ways ctxlab did and does it (docs/benchmarks.md).

    PYTHONPATH=src nice -n 5 python benchmarks/decode_attention.py --keys 16384
    PYTHONPATH=src nice -n 5 python benchmarks/decode_attention.py --keys 16384 --kind mla

GQA: 16 query heads, 4 KV heads, head dim 64. MLA (``--kind mla``): the absorbed step of DeepSeek's
shapes, 16 heads against one latent of 512 and one RoPE key of 64 per token (``MLAttention._absorbed``).
bf16, one query token; medians of --repeats, the variants alternating within every repeat. ctxlab's
decode path takes its native kernel where the CPU has AVX512-BF16 (``ctxlab.attention.decode_kernel``),
SDPA (GQA) or matmuls (MLA) otherwise.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from alternating import alternate, timed

from ctxlab import native
from ctxlab.attention import decode_kernel
from ctxlab.attention.kernels import grouped_attention
from ctxlab.attention.mla import MLAttention
from ctxlab.config import LayerSpec, MLASpec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--kind", choices=("gqa", "mla"), default="gqa")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants, nbytes = (gqa_variants if args.kind == "gqa" else mla_variants)(args.keys)
    print(f"ctxlab's decode kernel: {'on' if native.available() else 'off'}")
    medians = alternate(lambda name: timed(variants[name]), variants, args.repeats)
    print(
        f"{args.kind}, keys {args.keys}, cache read {nbytes / 2**20:.1f} MiB, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, median in medians.items():
        print(f"  {name:50s} {1e3 * median:8.2f} ms")
    return 0


def gqa_variants(S: int) -> tuple[dict, int]:
    B, Hq, Hkv, D = 1, 16, 4, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=gen).bfloat16()
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    variants = {
        "SDPA enable_gqa + boolean mask (before)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        ),
        "SDPA enable_gqa, no mask": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "grouped SDPA: heads folded into the query axis": lambda: F.scaled_dot_product_attention(
            q.view(B, Hkv, Hq // Hkv, D), k, v, scale=D**-0.5
        ),
        "grouped_attention (now)": lambda: grouped_attention(q, k, v, None, D**-0.5),
    }
    return variants, 2 * k.numel() * k.element_size()


def mla_variants(S: int) -> tuple[dict, int]:
    """The absorbed step of one MLA layer over S cached latents, through the kernel and through matmuls."""
    mla = MLASpec(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536)
    spec = LayerSpec(attention="mla", num_heads=16, num_kv_heads=16, head_dim=192, intermediate_size=1, mla=mla)
    layer = MLAttention(1024, spec, 0, 1e-6).bfloat16()
    gen = torch.Generator().manual_seed(0)
    q_nope, q_rot = (
        torch.randn(1, 16, 1, 128, generator=gen).bfloat16(),
        torch.randn(1, 16, 1, 64, generator=gen).bfloat16(),
    )
    stored = {
        "latent": torch.randn(1, 1, S, 512, generator=gen).bfloat16(),
        "k_rope": torch.randn(1, 1, S, 64, generator=gen).bfloat16(),
    }
    k_pos = torch.arange(S)[None]

    def absorbed(kernel: bool):
        real = decode_kernel.applies
        decode_kernel.applies = real if kernel else (lambda *a: False)
        try:
            with torch.no_grad():
                return layer._absorbed(q_nope, q_rot, stored, k_pos, None, None, True)
        finally:
            decode_kernel.applies = real

    variants = {"matmuls (latent @ qᵀ, float32 softmax)": lambda: absorbed(False)}
    if native.available():
        variants["ctxlab's kernel (two-part keys)"] = lambda: absorbed(True)
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())
    return variants, nbytes


if __name__ == "__main__":
    raise SystemExit(main())
