// What mHC's connection kernels share (hyper_connection.cpp: the split and merge; hyper_connection_backward.cpp:
// their gradients).
#pragma once

#include "sinkhorn.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace ctxlab_hc {

constexpr int64_t MAX_STREAMS = ctxlab_native::SINKHORN_MAX_STREAMS;          // n: comb goes through Sinkhorn
constexpr int64_t MAX_LOGITS = 2 * MAX_STREAMS + MAX_STREAMS * MAX_STREAMS;  // M = 2n + n²
constexpr int64_t TOKENS = 4;       // tokens per block: each row of fn is loaded once for all of them
constexpr int64_t ROWS = 6;         // rows of fn per register tile of hc_split's projection (4 tokens x 6 rows)

// The lanes of a 16-float vector that hold columns, when `left` columns remain.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// fn [M, K] copied into rows `K + 16` floats apart. A block touches a column chunk of many rows of fn at once;
// at a row length of a multiple of 4 KiB (n·H = 2048 floats) those chunks all fall in the same set of the
// 8-way L1 and evict each other, and one cache line of padding spreads them over the sets.
inline at::Tensor padded_rows(const at::Tensor& fn) {
  auto out = at::empty({fn.size(0), fn.size(1) + 16}, fn.options());
  out.narrow(1, 0, fn.size(1)).copy_(fn);
  return out;
}

// f(std::integral_constant<int64_t, n>{}) for the runtime n in 1..MAX_STREAMS: loops over the streams unroll,
// and per-stream vectors stay in registers.
template <typename F>
void with_streams(int64_t n, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    case 5: return f(std::integral_constant<int64_t, 5>{});
    case 6: return f(std::integral_constant<int64_t, 6>{});
    case 7: return f(std::integral_constant<int64_t, 7>{});
    case 8: return f(std::integral_constant<int64_t, 8>{});
    default: TORCH_CHECK(false, "mHC kernels: n = ", n, " streams; allowed 1 to ", MAX_STREAMS);
  }
}

// 16 values of a float32 or bf16 row (the lanes in `in`; the rest read as 0), as float32.
inline __m512 load16(const float* p, __mmask16 in) { return _mm512_maskz_loadu_ps(in, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 in) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p)), 16));
}

// v into the lanes `in` of a float32 row, or of a bf16 row rounded to nearest even (as c10::BFloat16 rounds).
inline void store16(float* p, __m512 v, __mmask16 in) { _mm512_mask_storeu_ps(p, in, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 in) {
  _mm256_mask_storeu_epi16(p, in, (__m256i)_mm512_cvtneps_pbh(v));
}

}  // namespace ctxlab_hc
