// Helpers shared by ctxlab's AVX512 kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace ctxlab_simd {

// 16 bf16 values (bit patterns) -> 16 float32: a bf16 is the upper half of a float32.
inline __m512 widen_bf16(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }

// The lanes of a 16-float vector that hold columns, when `left` columns remain.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// 16 values of a float32 or bf16 row (the lanes in `in`; the rest read as 0), as float32.
inline __m512 load16(const float* p, __mmask16 in) { return _mm512_maskz_loadu_ps(in, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 in) {
  return widen_bf16(_mm256_maskz_loadu_epi16(in, p));
}

// v into the lanes `in` of a float32 row, or of a bf16 row rounded to nearest even (as c10::BFloat16 rounds normal
// values; vcvtneps2bf16 flushes subnormals, below 1.2e-38, to zero, where c10::BFloat16 keeps them).
inline void store16(float* p, __m512 v, __mmask16 in) { _mm512_mask_storeu_ps(p, in, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 in) {
  _mm256_mask_storeu_epi16(p, in, (__m256i)_mm512_cvtneps_pbh(v));
}

// v rounded to float32's or bf16's precision (to nearest even; bf16 subnormals flush to zero, as in store16), kept as
// float32: where PyTorch rounds a result. The
// first argument, a pointer of the row's type, only picks the precision (as load16 / store16 are picked).
inline __m512 round_to(const float*, __m512 v) { return v; }
inline __m512 round_to(const c10::BFloat16*, __m512 v) {
  return widen_bf16((__m256i)_mm512_cvtneps_pbh(v));
}

// 16 bf16 values -> 16 float32.
inline __m512 load_bf16x16(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256((const __m256i*)p));
}

// Σ a[k] b[k] over K floats (a masked load for the last K % 16).
inline float dot(const float* a, const float* b, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  if (k < K) {
    const __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + k), _mm512_maskz_loadu_ps(tail, b + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// 32 bf16 values as a vdpbf16ps operand (the lanes outside `mask` read as 0).
inline __m512bh load_bf16x32(const uint16_t* p, __mmask32 mask) { return (__m512bh)_mm512_maskz_loadu_epi16(mask, p); }

constexpr int64_t ROWS16 = 16;  // the rows of a dot_rows16 tile: one float32 vector of results

// acc[j] += Σ_d x[d] w_j[d] over columns [d0, d1), w_j = w + j·ldw, for 16 bf16 rows at once: one AVX512-BF16 dot
// product (`vdpbf16ps`, exact bf16 products summed in float32) per row and 32 columns, x's 32 values loaded once.
// Any d1 - d0 (a masked load for the last ones). sum_lanes_16(acc) then gives the 16 sums as one vector.
//
// `next` (or null): the 16 rows (ldw apart) the caller reads after these, whose same columns are prefetched into L1
// as these are read, one prefetch per line loaded, so that the next tile's loads are in flight while this one
// computes. A stream of 16-row tiles reads ~20% faster so (the matvec over a llama model's weights on the Xeon host:
// 25 -> 30 GB/s, alternating in one process), where prefetching the whole next tile at once, or two or more tiles
// ahead, gained less or lost.
inline void dot_rows16(const uint16_t* x, const uint16_t* w, int64_t ldw, int64_t d0, int64_t d1, __m512* acc,
                       const uint16_t* next = nullptr) {
  __m512 a[ROWS16];
  for (int j = 0; j < ROWS16; ++j) a[j] = acc[j];
  int64_t d = d0;
  for (; d + 32 <= d1; d += 32) {
    const __m512bh xd = (__m512bh)_mm512_loadu_si512(x + d);
    if (next != nullptr)
      for (int j = 0; j < ROWS16; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + d), _MM_HINT_T0);
    for (int j = 0; j < ROWS16; ++j) a[j] = _mm512_dpbf16_ps(a[j], xd, (__m512bh)_mm512_loadu_si512(w + j * ldw + d));
  }
  if (d < d1) {  // the last (d1 - d0) % 32 columns
    const __mmask32 tail = (__mmask32)((1ULL << (d1 - d)) - 1);
    const __m512bh xd = load_bf16x32(x + d, tail);
    for (int j = 0; j < ROWS16; ++j) a[j] = _mm512_dpbf16_ps(a[j], xd, load_bf16x32(w + j * ldw + d, tail));
  }
  for (int j = 0; j < ROWS16; ++j) acc[j] = a[j];
}

// Σ_d x[d] w[d] over K bf16 values, float32 sums of exact products (one row of dot_rows16).
inline float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < K; d += 32) {
    const __mmask32 mask = K - d >= 32 ? (__mmask32)~0u : (__mmask32)((1ULL << (K - d)) - 1);
    acc = _mm512_dpbf16_ps(acc, load_bf16x32(x + d, mask), load_bf16x32(w + d, mask));
  }
  return _mm512_reduce_add_ps(acc);
}

// x[j] -> one vector whose lane j is the sum of x[j]'s 16 lanes (a transpose tree, 15 adds and shuffles).
inline __m512 sum_lanes_16(const __m512* x) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: x[2i]'s partial sums in the even slots, x[2i+1]'s in the odd
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's partial sums of x[4i .. 4i+3]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes (0+1, 2+3) of b[2i] then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),   // lanes 0, 2 | 0, 2
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));  // lanes 1, 3 | 1, 3
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// exp(x) for x <= 0 (scores minus their maximum): 2^(x·log2 e) = 2^n · 2^f, f in [-0.5, 0.5], 2^f by a
// degree-6 polynomial (relative error ~2e-7), 2^n by vscalefps (which also flushes very negative x to 0).
inline __m512 exp_ps(__m512 x) {
  // max(-200, x), in this order: vmaxps returns its second operand when one is NaN, so a NaN stays NaN
  const __m512 y = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-200.f), x), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);  // Taylor coefficients of 2^f = e^(f ln 2): (ln 2)^k / k!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace ctxlab_simd
