// RMSNorm at inference, for x86 CPUs with AVX512: one call per norm where PyTorch dispatches ~8 ops (the float32
// cast, square, mean, add, rsqrt, multiply, cast back, weight) on a decode step's handful of rows.
//
//   x [..., D] float32 or bf16 (contiguous), weight [D] of x's dtype or none -> [..., D] x's dtype
//
// The arithmetic of ctxlab/nn/norms.py (HF LlamaRMSNorm, Gemma3RMSNorm, Gemma4RMSNorm): per row,
// r = 1 / sqrt(mean(x²) + eps) in float32, then w · round(x·r) (the weight multiplies in x's dtype, one more
// rounding), or round(x·r·(1 + w)) (unit_offset: in float32, one rounding), or round(x·r·w) (weight_float32: the
// same without the offset), or round(x·r) without a weight. Every rounding is where the module
// rounds; only the sum of squares is added in another order than PyTorch's mean (r within an ulp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

namespace {

using ctxlab_simd::lanes;
using ctxlab_simd::load16;
using ctxlab_simd::round_to;
using ctxlab_simd::store16;

template <typename T>
void norm_row(const T* x, const T* w, int64_t D, float eps, bool unit_offset, bool weight_float32, T* out) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 v = load16(x + d, lanes(D - d));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(D) + eps));
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 in = lanes(D - d);
    __m512 h = _mm512_mul_ps(load16(x + d, in), r);
    if (w != nullptr && unit_offset)
      h = _mm512_mul_ps(h, _mm512_add_ps(_mm512_set1_ps(1.f), load16(w + d, in)));
    else if (w != nullptr && weight_float32)
      h = _mm512_mul_ps(h, load16(w + d, in));
    else if (w != nullptr)
      h = _mm512_mul_ps(load16(w + d, in), round_to(x, h));
    store16(out + d, h, in);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps, bool unit_offset,
                    bool weight_float32) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "ctxlab::rms_norm: x must be a contiguous float32 or bf16 [..., D], got ", x.sizes(), " ", x.scalar_type());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  if (weight.has_value())
    TORCH_CHECK(weight->is_contiguous() && weight->scalar_type() == x.scalar_type() && weight->dim() == 1 &&
                    weight->size(0) == D,
                "ctxlab::rms_norm: weight must be a contiguous [", D, "] of x's dtype, got ", weight->sizes(), " ",
                weight->scalar_type());
  auto out = at::empty_like(x);
  const float e = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));  // a decode step's rows: one thread
  auto run = [&](const auto* xp, const auto* wp, auto* op) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) norm_row(xp + row * D, wp, D, e, unit_offset, weight_float32, op + row * D);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), weight ? weight->data_ptr<float>() : nullptr, out.data_ptr<float>());
  } else {
    using bf16 = c10::BFloat16;
    run(static_cast<const bf16*>(x.data_ptr()), weight ? static_cast<const bf16*>(weight->data_ptr()) : nullptr,
        static_cast<bf16*>(out.data_ptr()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, bool unit_offset, bool weight_float32) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("rms_norm", &rms_norm); }
