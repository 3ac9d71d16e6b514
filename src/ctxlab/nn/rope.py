"""Rotary position embeddings (Su et al. 2021, RoFormer) and their long-context variants.

Frequencies follow HF ``modeling_rope_utils``: ``_compute_default_rope_parameters``,
``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters`` (Llama 3.1 report)
and ``_compute_yarn_parameters`` (Peng et al. 2023, YaRN). Rotation is the rotate-half layout
(dim ``j`` paired with ``j + rot/2``); a partial rotary factor rotates the first
``int(head_dim * factor)`` dims and passes the rest through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import native
from ..config import LayerSpec, RopeSpec, yarn_mscale
from ..registry import ROPE_TYPES


def inv_frequencies(rope: RopeSpec, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim / 2] fp32, attention_factor)`` for a rope spec."""
    return ROPE_TYPES[rope.type].frequencies(rope, rotary_dim)


@dataclass(frozen=True)
class RopeType:
    """One rope type: its frequencies ``(RopeSpec, rotary_dim) -> (inv_freq, attention_factor)`` and
    the scaling fields of :class:`~ctxlab.config.RopeSpec` it needs."""

    frequencies: Callable[[RopeSpec, int], tuple[torch.Tensor, float]]
    needs: tuple[str, ...] = ()
    rotates: bool = True

    def validate(self, at: str, s: LayerSpec) -> list[str]:
        r, p = s.rope, []
        if not self.rotates:
            return p
        if not r.theta > 0:
            p.append(f"{at}.rope.theta = {r.theta!r}: must be > 0")
        if not 0 < r.partial_rotary_factor <= 1:
            p.append(f"{at}.rope.partial_rotary_factor = {r.partial_rotary_factor!r}: must be in (0, 1]")
        elif s.rotary_dim % 2 or s.rotary_dim == 0:
            p.append(
                f"{at}.rope: head_dim {s.head_dim} x partial_rotary_factor {r.partial_rotary_factor} = "
                f"{s.rotary_dim} rotary dims; must be a positive even number"
            )
        for n in self.needs:
            if getattr(r, n) is None:
                p.append(f"{at}.rope.{n} is missing: rope type {r.type!r} needs {list(self.needs)}")
        if r.factor is not None and not (
            isinstance(r.factor, (int, float)) and math.isfinite(r.factor) and r.factor > 0
        ):
            p.append(f"{at}.rope.factor = {r.factor!r}: must be > 0")
        return p


def _default(r: RopeSpec, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    return 1.0 / (r.theta**exponents)


def _proportional(r: RopeSpec, head_dim: int) -> torch.Tensor:
    """Gemma 4 global layers: the first ``factor * head_dim / 2`` frequencies of a full-head RoPE
    (exponent denominator = head_dim), the remaining ones zero (position-free dims)."""
    angles = int(r.partial_rotary_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / head_dim
    rotated = 1.0 / (r.theta**exponents)
    inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32, device="cpu")))
    return inv_freq / (r.factor or 1.0)


def _llama3(r: RopeSpec, rotary_dim: int) -> torch.Tensor:
    """Llama 3.1 frequency smoothing: long wavelengths divided by ``factor``, a ramp between."""
    inv_freq = _default(r, rotary_dim)
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
        r.high_freq_factor - r.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(r: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, linear ramp between (§3.2)."""

    factor = r.factor
    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1
    original = r.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where frequencies are extrapolated (kept as trained)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


ROPE_TYPES.register("default")(RopeType(lambda r, dim: (_default(r, dim), 1.0)))
ROPE_TYPES.register("none")(RopeType(lambda r, dim: (_default(r, dim), 1.0), rotates=False))
ROPE_TYPES.register("linear")(RopeType(lambda r, dim: (_default(r, dim) / r.factor, 1.0), needs=("factor",)))
ROPE_TYPES.register("llama3")(
    RopeType(
        lambda r, dim: (_llama3(r, dim), 1.0),
        needs=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    )
)
ROPE_TYPES.register("yarn")(RopeType(_yarn, needs=("factor", "original_max_position_embeddings")))
ROPE_TYPES.register("proportional")(RopeType(lambda r, dim: (_proportional(r, dim), 1.0)))


class Rotary:
    """Cos/sin tables for one layer's rope and their application to ``[B, H, T, D]`` tensors.

    ``inv_freq`` is kept in fp32 as a plain attribute (not a buffer), so casting the model to
    bf16 cannot round it (a trap HF's own ``.to(bf16)`` falls into).
    """

    def __init__(self, spec: LayerSpec):
        self.rotary_dim = spec.rotary_dim
        self.key = (spec.rope, self.rotary_dim)  # layers with equal keys share cos/sin tables
        self.inv_freq, self.attention_factor = inv_frequencies(spec.rope, max(self.rotary_dim, 2))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, 1, T, rotary_dim] in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [B, T, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        return cos[:, None], sin[:, None]

    def apply_interleaved(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate pairs (2i, 2i+1) of x [..., rotary_dim] by frequency i, keeping the interleaved
        layout (DeepSeek's RoPE; HF ``DeepseekV4`` ``apply_rotary_pos_emb``).

        Each pair is one complex number times ``cos + i sin``, in float32, rounded to x's dtype once:
        one multiply instead of strided even / odd products stacked back together (a 2048-token bf16
        prefill, 8 heads of 256 with 64 rotated: 7.6 -> 1.6 ms per call). Under ``torch.compile`` the
        same product is written out in real arithmetic, which inductor fuses with its neighbours
        (it has no complex kernels and would call the eager multiply from the compiled graph)."""
        half = x.shape[-1] // 2
        if torch.compiler.is_compiling():
            a, b = x.float().unflatten(-1, (half, 2)).unbind(-1)  # [..., half] each: real, imaginary
            c, s = cos[..., :half].float(), sin[..., :half].float()
            return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)
        rotation = torch.complex(cos[..., :half].float(), sin[..., :half].float())
        flat = x.float().contiguous()
        if flat.storage_offset() % 2:  # view_as_complex needs pairs aligned in storage (an odd slice of a latent)
            flat = flat.clone()
        pairs = torch.view_as_complex(flat.unflatten(-1, (half, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``rotary_dim`` dims of x [B, H, T, D]; the rest pass through. At inference on
        bf16 one native call (``ctxlab::rope``), bit for bit the PyTorch ops' numbers (bar subnormals, flushed to zero)."""
        if self.rotary_dim == 0:
            return x
        if self._kernel_takes(x, cos, sin):
            return torch.ops.ctxlab.rope(x, cos, sin, self.rotary_dim)
        return self.pytorch_apply(x, cos, sin)

    def _kernel_takes(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        if x.dim() != 4 or not native.runs_at_inference(x, (torch.bfloat16,)):
            return False
        B, _, T, _ = x.shape
        return all(t.dtype == torch.bfloat16 and t.shape == (B, 1, T, self.rotary_dim) for t in (cos, sin)) and all(
            t.stride(-1) == 1 for t in (x, cos, sin)
        )

    def pytorch_apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in PyTorch ops (HF ``rotate_half``): with autograd, under ``torch.compile``, in float32,
        and as the native kernel's oracle."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
