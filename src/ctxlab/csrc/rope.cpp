// Rotary position embedding by halves at inference, for x86 CPUs with AVX512: one call per tensor where PyTorch
// dispatches ~8 ops (two slices, a negation, a concatenation, two products, a sum, a concatenation with the
// unrotated dims) on a decode step's few rows.
//
//   x [B, H, T, D] bf16 (rows contiguous, any strides above: the query and key heads as the projections'
//   transposed views), cos, sin [B, 1, T, R] bf16 (rows contiguous), R even, R ≤ D
//   -> [B, H, T, D] bf16, contiguous: the first R dims rotated, the other D − R copied. For i < R/2:
//   out[i] = x[i]·c[i] − x[i + R/2]·s[i],   out[i + R/2] = x[i + R/2]·c[i + R/2] + x[i]·s[i + R/2]
//
// ctxlab/nn/rope.py's `Rotary.apply` (HF rotate_half) in bf16 rounds each product and the sum to bf16 (three
// bf16 ops); so does this kernel, so the two agree bit for bit (bf16 subnormals, below 1.2e-38, flush to zero here:
// simd.h's store16). Only bf16: in float32 a compiler may fuse a product
// and a sum into one FMA, one rounding fewer than PyTorch's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

using bf16 = c10::BFloat16;
using ctxlab_simd::lanes;
using ctxlab_simd::load16;
using ctxlab_simd::round_to;
using ctxlab_simd::store16;

void rotate_row(const bf16* x, const bf16* c, const bf16* s, int64_t R, int64_t D, bf16* out) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 in = lanes(half - i);
    const __m512 a = load16(x + i, in), b = load16(x + half + i, in);
    const __m512 first = _mm512_sub_ps(round_to(x, _mm512_mul_ps(a, load16(c + i, in))),
                                       round_to(x, _mm512_mul_ps(b, load16(s + i, in))));
    const __m512 second = _mm512_add_ps(round_to(x, _mm512_mul_ps(b, load16(c + half + i, in))),
                                        round_to(x, _mm512_mul_ps(a, load16(s + half + i, in))));
    store16(out + i, first, in);
    store16(out + half + i, second, in);
  }
  std::memcpy(out + R, x + R, (D - R) * sizeof(bf16));
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1,
              "ctxlab::rope: x must be a bf16 [B, H, T, D] with contiguous rows, got ", x.sizes(), " ", x.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), R = rotary_dim;
  TORCH_CHECK(R > 0 && R % 2 == 0 && R <= D, "ctxlab::rope: rotary_dim must be even, in 2..", D, ", got ", R);
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(0) == B && t->size(1) == 1 &&
                    t->size(2) == T && t->size(3) == R && t->stride(3) == 1,
                "ctxlab::rope: cos and sin must be bf16 [", B, ", 1, ", T, ", ", R, "] with contiguous rows, got ",
                t->sizes(), " ", t->scalar_type());
  auto out = at::empty({B, H, T, D}, x.options());
  const auto *xp = static_cast<const bf16*>(x.data_ptr()), *cp = static_cast<const bf16*>(cos.data_ptr()),
             *sp = static_cast<const bf16*>(sin.data_ptr());
  auto* op = static_cast<bf16*>(out.data_ptr());
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * T), h = row / T % H, t = row % T;
      rotate_row(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), cp + b * cos.stride(0) + t * cos.stride(2),
                 sp + b * sin.stride(0) + t * sin.stride(2), R, D, op + row * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin, int rotary_dim) -> Tensor"); }

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("rope", &rope); }
