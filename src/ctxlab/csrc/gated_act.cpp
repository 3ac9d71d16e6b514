// A gated MLP's activation at inference, for x86 CPUs with AVX512: act(gate) · up in one pass, where PyTorch runs
// the activation and the product as two passes (the activation's output written and read back) over the two
// halves of the fused gate / up product, strided views that its element-wise kernels take on a slower path.
//
//   gate, up [..., I] bf16 of one shape (read in place when each row is contiguous and the rows evenly spaced,
//   as the halves of [..., 2·I] are; copied otherwise),
//   activation "silu" | "gelu_tanh", limit (DeepSeek V4's clamped SwiGLU: gate ≤ limit, |up| ≤ limit; inf: none)
//   -> [..., I] bf16, contiguous
//
// The arithmetic of ctxlab/nn/mlp.py's `gated` in bf16: the activation in float32 rounded to bf16 (as PyTorch's
// kernels do), then the product in float32 rounded again. silu(x) = x · σ(x), σ from one exp of −|x| (nothing
// overflows); gelu_tanh(x) = ½x(1 + tanh z), z = √(2/π)(x + 0.044715 x³), PyTorch's formula, tanh from one exp
// of −2|z|. The exp is simd.h's polynomial (relative error ~2e-7) where PyTorch calls SLEEF's: measured on
// 11.5M normal inputs (σ = 4), silu agrees bit for bit, gelu_tanh in 2.6% of the outputs to within 4e-6 (outputs
// near zero, where 1 + tanh z cancels in both). Only bf16: float32 outputs would differ by float32 ulps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace {

using bf16 = c10::BFloat16;
using ctxlab_simd::exp_ps;
using ctxlab_simd::lanes;
using ctxlab_simd::load16;
using ctxlab_simd::round_to;
using ctxlab_simd::store16;

inline __m512 silu(__m512 x) {  // x · σ(x): σ = 1 / (1 + e) for x ≥ 0, e / (1 + e) below, e = e^−|x| ≤ 1
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mul_ps(x, _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), r, e));
}

inline __m512 gelu_tanh(__m512 x) {  // ½x(1 + tanh z), tanh z = sign(z) (1 − e) / (1 + e), e = e^−2|z| ≤ 1
  const __m512 one = _mm512_set1_ps(1.f), x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_abs_ps(z), _mm512_set1_ps(-2.f)));
  const __m512 magnitude = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 tanh_z = _mm512_or_ps(magnitude, _mm512_and_ps(z, _mm512_set1_ps(-0.f)));  // z's sign
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, tanh_z));
}

template <__m512 (*act)(__m512)>
void gated_row(const bf16* gate, const bf16* up, int64_t I, float limit, bf16* out) {
  const __m512 hi = _mm512_set1_ps(limit), lo = _mm512_set1_ps(-limit);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 in = lanes(I - i);
    const __m512 g = _mm512_min_ps(hi, load16(gate + i, in));  // vminps returns its second operand on NaN
    const __m512 u = _mm512_max_ps(lo, _mm512_min_ps(hi, load16(up + i, in)));
    store16(out + i, _mm512_mul_ps(round_to(gate, act(g)), u), in);
  }
}

// The stride between consecutive rows of x [..., I] when its rows are evenly spaced (any leading shape that
// a view could flatten to [rows, I]), else -1. Dims of size 1 take no step, whatever stride they carry.
int64_t row_stride(const at::Tensor& x) {
  int64_t step = -1, next = 0;  // the innermost leading dim's stride; the stride the next one must have
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (step < 0) step = x.stride(d);
    else if (x.stride(d) != next) return -1;
    next = x.stride(d) * x.size(d);
  }
  return step < 0 ? x.size(-1) : step;  // one row (or none): any step reads it
}

// x itself when its rows are evenly spaced with contiguous elements, else a contiguous copy.
at::Tensor rows_of(const at::Tensor& x) { return x.stride(-1) == 1 && row_stride(x) >= 0 ? x : x.contiguous(); }

at::Tensor gated_act(const at::Tensor& gate_in, const at::Tensor& up_in, c10::string_view activation, double limit) {
  TORCH_CHECK(gate_in.scalar_type() == at::kBFloat16 && up_in.scalar_type() == at::kBFloat16 &&
                  gate_in.sizes() == up_in.sizes() && gate_in.dim() >= 1,
              "ctxlab::gated_act: gate and up must be bf16 [..., I] of one shape, got ", gate_in.sizes(), " ",
              gate_in.scalar_type(), " and ", up_in.sizes(), " ", up_in.scalar_type());
  const at::Tensor gate = rows_of(gate_in), up = rows_of(up_in);
  const int64_t lg = row_stride(gate), lu = row_stride(up);
  TORCH_CHECK(activation == "silu" || activation == "gelu_tanh",
              "ctxlab::gated_act: activation must be 'silu' or 'gelu_tanh', got '", std::string(activation), "'");
  TORCH_CHECK(limit > 0, "ctxlab::gated_act: limit must be positive (inf for none), got ", limit);
  const int64_t I = gate.size(-1), rows = I ? gate.numel() / I : 0;
  auto out = at::empty(gate.sizes(), gate.options());
  const float clamp = std::isinf(limit) ? std::numeric_limits<float>::infinity() : static_cast<float>(limit);
  const auto row_fn = activation == "silu" ? gated_row<silu> : gated_row<gelu_tanh>;
  const auto *g = static_cast<const bf16*>(gate.data_ptr()), *u = static_cast<const bf16*>(up.data_ptr());
  auto* o = static_cast<bf16*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));  // a decode step's rows: one thread
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(g + r * lg, u + r * lu, I, clamp, o + r * I);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) { m.def("gated_act(Tensor gate, Tensor up, str activation, float limit) -> Tensor"); }

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("gated_act", &gated_act); }
