// A linear map of a few bf16 rows, for x86 CPUs with AVX512-BF16: the matrix-vector products of decoding.
//
//   x [M, K] bf16 (M small: the tokens of one decode step), w [N, K] bf16 (PyTorch's nn.Linear layout),
//   bias [N] bf16 or none -> x wᵀ + bias [M, N] bf16, accumulated in float32 and rounded once
//
// With groups = G > 1, a block-diagonal map: x [M, G·K], w [N, K] holds the G groups' N / G rows each (a multiple of
// 16), and group g's rows multiply x's columns [g·K, (g+1)·K) (DeepSeek V4's grouped output projection, CCA's
// grouped convolution at a decode step: one call instead of one per group).
//
// A decode step reads every weight once for a handful of multiply-adds each, so it runs at the speed the
// weights stream from memory. oneDNN's kernel on its own blocked layout reads them at ~21-23 GB/s here
// (2 cores, ~30 GB/s for a plain read of the same bytes), PyTorch's F.linear on the plain layout at
// ~16-17 GB/s; this kernel reads the plain layout at ~25-27 GB/s (docs/benchmarks.md, "Weights"; the EPYC and
// the Xeon hosts):
//
// * a tile of 16 output rows at a time: for every 32 columns, one AVX512-BF16 dot product (`vdpbf16ps`,
//   exact bf16 products summed in float32) per row with the same 32 values of x, 16 accumulators;
// * the 16 accumulators summed lane-wise in one transpose tree (`sum_lanes_16`), the bias added, and the
//   results rounded to bf16 (round to nearest even, as PyTorch rounds);
// * with several rows of x, a tile is walked in blocks of 512 columns, every row of x in turn, so the
//   block is read from memory once and from L1 by the other rows (their accumulators kept in memory);
// * the next tile's rows prefetched into L1 as the current one is read (ctxlab_simd::dot_rows16's `next`);
// * tiles split across torch's thread pool (at::parallel_for).
//
// Any K (a masked load for the last K % 32 columns) and any N (the last N % 16 rows one by one). Requirements
// (checked by the caller, ctxlab/nn/packing.py): x contiguous, w's rows contiguous (any row stride).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using ctxlab_simd::dot_bf16;
using ctxlab_simd::dot_rows16;
using ctxlab_simd::load_bf16x16;
using ctxlab_simd::sum_lanes_16;

constexpr int64_t ROWS = ctxlab_simd::ROWS16;  // output rows per tile (one float32 vector of results)
constexpr int64_t COLUMNS = 512;  // with several rows of x: columns per block of a tile (16 KiB of w, in L1)

inline float bf16_value(uint16_t bits) { return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits())); }

inline uint16_t bf16_bits(float value) { return c10::BFloat16(value).x; }  // round to nearest even, as PyTorch

// out[0, 16) = the 16 accumulated dot products + bias, rounded to bf16 in one store.
inline void finish(const __m512* acc, const uint16_t* bias, uint16_t* out) {
  __m512 sums = sum_lanes_16(acc);
  if (bias) sums = _mm512_add_ps(sums, load_bf16x16(bias));
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(sums));
}

// The same for the last rows < 16 of w, one row at a time.
void row(const uint16_t* x, const uint16_t* w, int64_t K, const uint16_t* bias, uint16_t* out) {
  *out = bf16_bits(dot_bf16(x, w, K) + (bias ? bf16_value(*bias) : 0.f));
}

at::Tensor matvec(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t groups) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "ctxlab::matvec takes bf16 x and w");
  TORCH_CHECK(groups >= 1 && x.dim() == 2 && w.dim() == 2 && x.size(1) == groups * w.size(1),
              "ctxlab::matvec: x [M, groups·K], w [N, K], groups >= 1; got x ", x.sizes(), ", w ", w.sizes(), ", groups ",
              groups);
  TORCH_CHECK(w.size(0) % groups == 0 && (groups == 1 || (w.size(0) / groups) % ROWS == 0),
              "ctxlab::matvec: with groups > 1, each group's rows (N / groups) must be a multiple of ", ROWS, "; got N = ",
              w.size(0), ", groups ", groups);
  TORCH_CHECK(x.is_contiguous() && w.stride(1) == 1, "ctxlab::matvec: x contiguous, w's rows contiguous");
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0), ldw = w.stride(0), ldx = x.size(1), R = N / groups;
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "ctxlab::matvec: bias [N] bf16 contiguous");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  auto out = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t tiles = N / ROWS;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));  // >= ~128 KiB of weights per task
  const int64_t block = M == 1 ? K : COLUMNS;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(M * ROWS);  // [M, 16] accumulators of the current tile
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* wt = wp + t * ROWS * ldw;
      const uint16_t* xt = xp + (t * ROWS / R) * K;  // the group's columns of x
      const uint16_t* next = t + 1 < end ? wt + ROWS * ldw : nullptr;  // prefetched while this tile is read
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t d = 0; d < K; d += block)  // a block of the tile's 16 rows: from memory for x's first row,
        for (int64_t m = 0; m < M; ++m)        // from L1 for the others
          dot_rows16(xt + m * ldx, wt, ldw, d, std::min(d + block, K), acc.data() + m * ROWS, m == 0 ? next : nullptr);
      for (int64_t m = 0; m < M; ++m) finish(acc.data() + m * ROWS, bp ? bp + t * ROWS : nullptr, op + m * N + t * ROWS);
    }
  });
  for (int64_t n = tiles * ROWS; n < N; ++n)  // (one group: with several, N is a multiple of 16)
    for (int64_t m = 0; m < M; ++m) row(xp + m * ldx, wp + n * ldw, K, bp ? bp + n : nullptr, op + m * N + n);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) { m.def("matvec(Tensor x, Tensor w, Tensor? bias, int groups) -> Tensor"); }

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("matvec", &matvec); }
