// The lightning indexer's scores for a few queries, for x86 CPUs with AVX512-BF16 (DeepSeek-V3.2's DSA, V4's CSA).
//
//   q [B, H, T, D] bf16 (the indexer's H query heads), keys [B, 1, S, D] bf16 (one key per token or entry),
//   w [B, T, H] float32 (the head weights, already scaled by 1/sqrt(H)), scale (1/sqrt(D))
//   -> I [B, T, S] float32,  I[b, t, s] = Σ_h w[b, t, h] · ReLU(scale · q[b, h, t] · keys[b, 0, s])
//
// The arithmetic of ctxlab/attention/dsa.py's indexer_topk in float32 (exact bf16 products, float32 sums, in
// another order than PyTorch's matmul and einsum: within a few ulps). At a decode step PyTorch converts every
// cached key to float32 first (4 MiB written and read again for 16K keys of 64 dims) and runs a [H, D] x [D, S]
// product on it, ~0.7 ms at 16K keys on 2 cores; the keys here are read once, as stored, ~2 MiB:
//
// * a tile of 16 keys at a time: per head, one `vdpbf16ps` per key and 32 dims (ctxlab_simd::dot_rows16), the 16
//   sums as one vector (sum_lanes_16), then ReLU(scale ·) and the head's weight, added into the tile's scores;
//   the tile's 16 keys (2 KiB at D = 64) stay in L1 across the heads, and the next tile's are prefetched meanwhile;
// * tiles split across torch's thread pool (at::parallel_for); the last S % 16 keys one by one.
//
// Any D. Requirements (checked by the caller): q and w contiguous, the keys' rows contiguous (any strides above:
// a cache's slice is read in place).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>

namespace {

using ctxlab_simd::dot_bf16;
using ctxlab_simd::dot_rows16;
using ctxlab_simd::ROWS16;
using ctxlab_simd::sum_lanes_16;

at::Tensor indexer_scores(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& w, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat,
              "ctxlab::indexer_scores takes bf16 q and keys, float32 w");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && w.dim() == 3, "ctxlab::indexer_scores: q [B, H, T, D], keys [B, 1, S, D], w [B, T, H]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(1) == 1 && keys.size(3) == D && w.size(0) == B && w.size(1) == T &&
                  w.size(2) == H,
              "ctxlab::indexer_scores: q ", q.sizes(), ", keys ", keys.sizes(), ", w ", w.sizes(), " do not match");
  TORCH_CHECK(q.is_contiguous() && w.is_contiguous() && keys.stride(3) == 1,
              "ctxlab::indexer_scores: q and w contiguous, the keys' rows contiguous");
  auto out = at::empty({B, T, S}, q.options().dtype(at::kFloat));
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(keys.data_ptr());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldk = keys.stride(2), kb = keys.stride(0);
  const float sc = static_cast<float>(scale);
  const int64_t tiles = S / ROWS16, tasks = B * T * tiles;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(D * H, 1));  // ~4-8 KiB of keys a head: >= 32 tiles
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / tiles, b = bt / T, t = bt % T, s0 = (task % tiles) * ROWS16;
      const uint16_t* k = kp + b * kb + s0 * ldk;
      const uint16_t* next = task + 1 < end && s0 + 2 * ROWS16 <= S ? k + ROWS16 * ldk : nullptr;  // the next tile
      const float* wt = wp + bt * H;
      __m512 index = _mm512_setzero_ps();
      for (int64_t h = 0; h < H; ++h) {
        __m512 acc[ROWS16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        dot_rows16(qp + ((b * H + h) * T + t) * D, k, ldk, 0, D, acc, h == 0 ? next : nullptr);
        // ReLU as max(0, x), in this order: vmaxps returns its second operand when one is NaN, so a NaN stays NaN
        const __m512 score = _mm512_max_ps(_mm512_setzero_ps(), _mm512_mul_ps(sum_lanes_16(acc), _mm512_set1_ps(sc)));
        index = _mm512_fmadd_ps(_mm512_set1_ps(wt[h]), score, index);
      }
      _mm512_storeu_ps(op + bt * S + s0, index);
    }
  });
  for (int64_t bt = 0; bt < B * T; ++bt)  // the last S % 16 keys
    for (int64_t s = tiles * ROWS16; s < S; ++s) {
      const int64_t b = bt / T, t = bt % T;
      float index = 0.f;
      for (int64_t h = 0; h < H; ++h)
        index += wp[bt * H + h] * std::max(sc * dot_bf16(qp + ((b * H + h) * T + t) * D, kp + b * kb + s * ldk, D), 0.f);
      op[bt * S + s] = index;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) { m.def("indexer_scores(Tensor q, Tensor keys, Tensor w, float scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("indexer_scores", &indexer_scores); }
