"""ctxlab's native decode-attention kernel (``ctxlab/csrc/decode_attention.cpp``): equal to
softmax attention in float64 within bf16 rounding (no worse than PyTorch's SDPA on the same inputs), its
log-sum-exp right, caches read in place, taken by the decode paths and by ``torch.compile``.

The kernel needs an x86 CPU with AVX512-BF16 and a C++ compiler; where either is absent the tests that
call it are skipped (and the decode paths keep SDPA, which the rest of the suite covers)."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxlab import native
from ctxlab.attention import decode_kernel
from ctxlab.attention.kernels import attention_with_sinks, grouped_attention

needs_kernel = pytest.mark.skipif(
    not native.available(), reason="no AVX512-BF16 CPU or no C++ compiler: the kernel cannot run here"
)


def reference(q, k, v, scale):
    """Softmax attention in float64 -> (out [B, H, G, Dv], lse [B, H, G])."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.softmax(-1) @ v.double(), scores.logsumexp(-1)


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 9),
    head_dim=st.sampled_from([32, 64, 96, 128, 256]),
    value_dim=st.sampled_from([64, 128, 256]),
    keys=st.one_of(st.integers(1, 40), st.integers(500, 1100)),  # tails of a 16-key tile, several 512-key splits
    sharpness=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_softmax_attention(batch, kv_heads, group, head_dim, value_dim, keys, sharpness, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, kv_heads, group, head_dim, generator=gen) * sharpness).bfloat16()
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=gen).bfloat16()
    v = torch.randn(batch, kv_heads, keys, value_dim, generator=gen).bfloat16()
    scale = head_dim**-0.5
    out, lse = decode_kernel.decode_attention(q, k, v, scale)
    expected, expected_lse = reference(q, k, v, scale)
    assert out.shape == expected.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # bf16 output rounding (2^-9 relative) bounds both; the kernel accumulates in float32 throughout
    assert relative_error(out, expected) <= max(1.25 * relative_error(sdpa, expected), 4e-3)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4 * (1 + sharpness * 10), rtol=1e-5)


@needs_kernel
def test_kernel_reads_strided_caches_in_place():
    """A cache's first S slots (rows of a larger buffer) and a head broadcast by ``expand``."""
    gen = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, 3, 700, 64, generator=gen).bfloat16()  # [B, H, capacity, D]
    k, v = buffer[:, :, :613], buffer.flip(-1)[:, :, :613].contiguous()
    shared = torch.randn(2, 1, 613, 64, generator=gen).bfloat16().expand(2, 3, 613, 64)  # stride 0 over heads
    q = torch.randn(2, 3, 4, 64, generator=gen).bfloat16()
    for keys in (k, shared):
        out = decode_kernel.decode_attention(q, keys, v, 0.125)[0]
        assert relative_error(out, reference(q, keys, v, 0.125)[0]) < 4e-3


@needs_kernel
def test_decode_paths_take_the_kernel_and_keep_sdpa_otherwise(monkeypatch):
    calls = []
    real = decode_kernel.decode_attention
    monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 50, 64, generator=gen).bfloat16() for _ in range(2))
    out = grouped_attention(q, k, v, None, 0.125)
    assert calls == [torch.Size([1, 2, 4, 64])]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125, enable_gqa=True)
    assert relative_error(out, expected.double()) < 4e-3
    mask = torch.ones(1, 1, 1, 50, dtype=torch.bool)
    grouped_attention(q, k, v, mask, 0.125)  # a mask: SDPA
    grouped_attention(q.float(), k.float(), v.float(), None, 0.125)  # float32: SDPA
    assert len(calls) == 1
    # DeepSeek V4's sink attention (one K = V head) takes the kernel's log-sum-exp
    kv = torch.randn(1, 1, 50, 64, generator=gen).bfloat16()
    sinks = torch.randn(8, generator=gen)
    out = attention_with_sinks(q, kv, None, 0.125, sinks)
    assert len(calls) == 2
    scores = torch.cat([(q.double() @ kv.double().transpose(-1, -2)) * 0.125, sinks.double().view(1, 8, 1, 1)], -1)
    expected = scores.softmax(-1)[..., :-1] @ kv.double()
    assert relative_error(out, expected) < 4e-3


@needs_kernel
def test_compiled_decode_attention_calls_the_kernel_in_one_graph():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 100, 64, generator=gen).bfloat16() for _ in range(2))
    compiled = torch.compile(lambda q, k, v: grouped_attention(q, k, v, None, 0.125), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), grouped_attention(q, k, v, None, 0.125), atol=0, rtol=0)


@pytest.mark.skipif(
    not native.cpu_has_avx512_bf16() or shutil.which("c++") is None or os.environ.get(native.ENV_SWITCH) == "0",
    reason="no AVX512-BF16 CPU, no C++ compiler, or the kernels switched off: nothing to build",
)
def test_the_kernels_build_where_they_can_run():
    """Where the CPU and a compiler are there, a failed build is a defect, not a reason to skip: every
    test marked ``needs_kernel`` (here and in the matvec / mHC files) would otherwise pass by skipping."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build's failure warning carries the compiler's message
        assert native.available()


def test_switch_off_keeps_sdpa(monkeypatch):
    """``CTXLAB_NATIVE_KERNELS=0`` (or a CPU without AVX512-BF16) turns the kernel off; nothing else changes."""
    native._build.cache_clear()
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    try:
        assert not native.available()
        q = torch.randn(1, 4, 1, 64).bfloat16()
        k = torch.randn(1, 2, 20, 64).bfloat16()
        assert not decode_kernel.applies(q.view(1, 2, 2, 64), k, k, None)
    finally:
        native._build.cache_clear()


def test_the_pip_ninja_is_found_without_an_activated_venv(monkeypatch):
    ninja = pytest.importorskip("ninja", reason="the ninja package (a ctxlab dependency) is not installed")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    native._ninja_on_path()
    assert native.os.environ["PATH"].split(native.os.pathsep) == [ninja.BIN_DIR, "/nowhere"]


def assert_decodes_through_the_kernel_as_its_full_forward(monkeypatch, layer, name: str) -> None:
    """A bf16 model of two ``layer`` layers: cached decode through the kernel (every layer of every step)
    is as close to the full forward's logits as the decode path without it (+ 0.02), and the compiled
    step gives the eager kernel path's logits."""
    import ctxlab
    from ctxlab import ModelConfig
    from ctxlab.generate import compiled_decode_step, decode_step, prefill

    config = ModelConfig(family="test", vocab_size=128, hidden_size=128, layers=(layer,) * 2, name=name)
    model = ctxlab.build_model(config, dtype=torch.bfloat16, seed=0).eval()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).float()  # [1, 30, V]

        def decoded(step):
            cache = model.new_cache(1, 30)
            logits = [prefill(model, ids[:, :10], cache)]
            logits += [step(model, ids[:, t], cache) for t in range(10, 29)]
            return torch.stack(logits, 1).float()  # positions 9 .. 28

        calls = []
        real = decode_kernel.decode_attention
        monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a: calls.append(1) or real(*a))
        with_kernel = decoded(decode_step)
        assert len(calls) == 2 * 19  # every layer of every decode step
        compiled = decoded(compiled_decode_step(model))
        monkeypatch.setattr(decode_kernel, "applies", lambda *a: False)
        without = decoded(decode_step)
    reference = full[:, 9:29]
    assert (with_kernel - reference).abs().max() <= 1.5 * (without - reference).abs().max() + 0.02
    torch.testing.assert_close(compiled, with_kernel, atol=0.05, rtol=0)


@needs_kernel
@pytest.mark.parametrize("window", [None, 12])
def test_a_bf16_model_decodes_through_the_kernel_as_its_full_forward(monkeypatch, window, fresh_dynamo):
    """Cached decode of a bf16 GQA model (head dim 64, a sliding ring past its window when ``window``)
    matches the full forward's logits as closely as the SDPA decode path does, eager and compiled."""
    from ctxlab import LayerSpec

    layer = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256, window=window)
    assert_decodes_through_the_kernel_as_its_full_forward(monkeypatch, layer, "kernel-gqa")


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(
    heads=st.integers(1, 9),
    latent_dim=st.sampled_from([64, 128, 512]),
    rope_dim=st.sampled_from([32, 64]),
    keys=st.one_of(st.integers(1, 40), st.integers(500, 1100)),
    sharpness=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**16),
)
def test_two_part_keys_equal_attention_over_the_concatenated_keys(heads, latent_dim, rope_dim, keys, sharpness, seed):
    """MLA's absorbed decode: scores q·latent + q_rope·k_rope, values = the latents (one shared head)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, 1, heads, latent_dim, generator=gen) * sharpness / latent_dim**0.25).bfloat16()
    q_rope = (torch.randn(1, 1, heads, rope_dim, generator=gen) * sharpness / rope_dim**0.25).bfloat16()
    latent = torch.randn(1, 1, keys, latent_dim, generator=gen).bfloat16()
    k_rope = torch.randn(1, 1, keys, rope_dim, generator=gen).bfloat16()
    scale = (latent_dim + rope_dim) ** -0.5
    assert decode_kernel.applies(q, latent, latent, None, q_rope, k_rope)
    out, lse = decode_kernel.decode_attention(q, latent, latent, scale, q_rope, k_rope)
    full_q, full_k = torch.cat([q, q_rope], -1), torch.cat([latent, k_rope], -1)
    expected, expected_lse = reference(full_q, full_k, latent, scale)
    sdpa = F.scaled_dot_product_attention(full_q, full_k, latent, scale=scale)
    assert relative_error(out, expected) <= max(1.25 * relative_error(sdpa, expected), 4e-3)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4 * (1 + sharpness * 10), rtol=1e-5)


@needs_kernel
def test_a_bf16_mla_model_decodes_through_the_kernel_as_its_full_forward(monkeypatch, fresh_dynamo):
    """Cached absorbed decode of a bf16 MLA model (latent 64, RoPE key 32) through the kernel matches the
    full forward (expanded attention) as closely as the matmul path does, eager and compiled."""
    from ctxlab import LayerSpec
    from ctxlab.config import MLASpec

    mla = MLASpec(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, q_lora_rank=48)
    layer = LayerSpec(attention="mla", num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=256, mla=mla)
    assert_decodes_through_the_kernel_as_its_full_forward(monkeypatch, layer, "kernel-mla")


def test_flop_counter_counts_the_kernels_as_the_products_they_replace():
    """``FlopCounterMode`` sees the native ops as it sees torch's: the decode kernel as SDPA over the
    expanded heads (with a second key part, over the concatenated keys), matvec as ``F.linear``."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    gen = torch.Generator().manual_seed(0)
    q, q2 = (torch.randn(1, 2, 3, d, generator=gen).bfloat16() for d in (64, 32))
    k, v, k2 = (torch.randn(1, 2, 50, d, generator=gen).bfloat16() for d in (64, 128, 32))
    expanded = [t.repeat_interleave(3, dim=1) for t in (torch.cat([k, k2], -1), v)]
    sdpa = flops(lambda: F.scaled_dot_product_attention(torch.cat([q, q2], -1).view(1, 6, 1, 96), *expanded))
    assert flops(lambda: torch.ops.ctxlab.decode_attention(q, k, v, 0.1, q2, k2)) == sdpa
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    assert flops(lambda: torch.ops.ctxlab.matvec(x, w, None, 1)) == flops(lambda: F.linear(x, w)) > 0
