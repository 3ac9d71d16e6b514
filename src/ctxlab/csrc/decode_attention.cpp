// One decode step of grouped-query attention over bf16 keys and values, for x86 CPUs with AVX512-BF16.
//
//   q [B, H, G, D] bf16 (the G query heads that share KV head h), k [B, H, S, D], v [B, H, S, Dv] bf16
//   -> out [B, H, G, Dv] bf16 and lse [B, H, G] float32 (the log-sum-exp of each query's scaled scores)
//
// Optionally the keys come in two parts, q2 [B, H, G, D2] against k2 [B, H, S, D2]: the scores are then
// q·k + q2·k2, as if q, q2 and k, k2 were concatenated (MLA's absorbed decode: the latent, which is also
// the value, and the shared RoPE key, stored apart; DeepSeek-V2 §2.1.3).
//
// Decoding one token reads every cached key and value once and does ~2·G·(D + Dv) flops per key: the
// step should run at memory bandwidth. PyTorch's flash kernel runs it as small GEMMs per 512-key block
// (6-8 GB/s here for 16 query / 4 KV heads of 64 over 16K keys); this kernel keeps everything in registers:
//
// * scores: for a tile of 16 keys, one AVX512-BF16 dot product (`vdpbf16ps`, exact bf16 products summed
//   in float32) per key and 32 dims, then the 16 accumulators are summed lane-wise in one transpose tree
//   (`sum_lanes_16`), so each key's score costs ~3 instructions instead of a horizontal reduction;
// * softmax: in float32 per split of keys (FlashDecoding's split-KV: Dao et al. 2023), exp vectorized;
// * values: float32 probabilities times float32-converted value rows, accumulated in registers for
//   4 queries x 64 dims at a time;
// * splits of SPLIT keys run in parallel (at::parallel_for: torch's own thread pool) and are merged by
//   their maxima and sums, so one KV head's 16K keys occupy every thread.
//
// Requirements (checked by the caller, ctxlab/attention/decode_kernel.py): D % 32 == 0 (and D2), Dv % 64 == 0,
// q (q2) contiguous, k (k2) and v with contiguous rows (any strides above: a cache's slice is read in place), every
// key attended (no mask). Built at first use with the other kernels here (ctxlab/native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using ctxlab_simd::exp_ps;
using ctxlab_simd::load_bf16x16;
using ctxlab_simd::sum_lanes_16;

constexpr int64_t SPLIT = 512;  // keys per parallel task
constexpr int64_t TILE = ctxlab_simd::ROWS16;  // keys per score tile (one float32 vector of scores)

// One part of the keys: rows k + t·rs of D dims (D % 32 == 0), the G queries' matching part at q (row stride D).
struct KeyPart {
  const uint16_t* q;
  const uint16_t* k;
  int64_t rs, D;
};

// acc[j] += q_g · k_{t+j} over one key part, for the 16 keys of a tile.
inline void dot_tile(const KeyPart& p, int64_t g, int64_t t, __m512* acc) {
  ctxlab_simd::dot_rows16(p.q + g * p.D, p.k + t * p.rs, p.rs, 0, p.D, acc);
}

inline __m512 dot_one(const KeyPart& p, int64_t g, int64_t t, __m512 a) {
  for (int64_t d = 0; d < p.D; d += 32)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(p.q + g * p.D + d), (__m512bh)_mm512_loadu_si512(p.k + t * p.rs + d));
  return a;
}

// Rows t .. t + 15 of `width` bf16 each (row stride rs) on their way into the cache (hint: _MM_HINT_T0 / T1).
template <_mm_hint HINT>
inline void prefetch_rows(const uint16_t* rows, int64_t rs, int64_t width, int64_t t) {
  for (int j = 0; j < TILE; ++j)
    for (int64_t d = 0; d < width; d += 32) _mm_prefetch((const char*)(rows + (t + j) * rs + d), HINT);
}

// The value rows a split's second pass reads (none when they are the keys already read: MLA's latent).
struct ValueRows {
  const uint16_t* v;
  int64_t rs, Dv;
};

// Scores of G queries against keys [0, n) of a split, the keys in one or two parts (parts[1].D == 0: one):
// s[g·ld + t] = scale · Σ_parts q_g·k_t. Tile by tile, so a tile's 16 key rows stay in L1 while every query
// reads them. Two parts are MLA's absorbed keys: the latent and the shared RoPE key, stored apart.
// Meanwhile the tile's value rows are fetched into L2 for the second pass: two streams from memory at a
// time instead of one (measured with 16K cached keys per layer, 8 layers: ~7% faster per layer).
void scores(const KeyPart* parts, const ValueRows& vr, int64_t G, int64_t n, float scale, float* s, int64_t ld) {
  const __m512 sv = _mm512_set1_ps(scale);
  const int np = parts[1].D > 0 ? 2 : 1;
  int64_t t = 0;
  __m512 acc[TILE];
  for (; t + TILE <= n; t += TILE) {
    for (int p = 0; p < np; ++p)  // the tile after next: arrives meanwhile
      prefetch_rows<_MM_HINT_T0>(parts[p].k, parts[p].rs, parts[p].D, t + 2 * TILE);
    prefetch_rows<_MM_HINT_T1>(vr.v, vr.rs, vr.Dv, t);
    for (int64_t g = 0; g < G; ++g) {
      for (int j = 0; j < TILE; ++j) acc[j] = _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) dot_tile(parts[p], g, t, acc);
      _mm512_storeu_ps(s + g * ld + t, _mm512_mul_ps(sum_lanes_16(acc), sv));
    }
  }
  for (; t < n; ++t)  // the last n % 16 keys
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) a = dot_one(parts[p], g, t, a);
      s[g * ld + t] = _mm512_reduce_add_ps(a) * scale;
    }
}

// s[0, n) -> exp(s - max) in place; returns (max, sum). The maximum vectorized: a scalar loop of
// `std::max` (a chain of dependent `vmaxss`) was ~1/4 of the kernel's time.
std::pair<float, float> softmax_terms(float* s, int64_t n) {
  __m512 running = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) running = _mm512_max_ps(running, _mm512_loadu_ps(s + t));
  float m = _mm512_reduce_max_ps(running);
  for (; t < n; ++t) m = std::max(m, s[t]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t + 16 <= n; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  float l = _mm512_reduce_add_ps(sum);
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    l += s[t];
  }
  return {m, l};
}

// o[g][0, 64) = Σ_t p[g][t] · v_t[0, 64) for GC queries (p[g] at p + g·ld; value row t at v + t·rs).
template <int GC>
void weighted_values(const float* p, int64_t ld, const uint16_t* v, int64_t rs, int64_t n, float* o, int64_t ldo) {
  __m512 acc[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    _mm_prefetch((const char*)(v + (t + 8) * rs), _MM_HINT_T0);
    _mm_prefetch((const char*)(v + (t + 8) * rs + 32), _MM_HINT_T0);
    __m512 row[4];
    for (int c = 0; c < 4; ++c) row[c] = load_bf16x16(v + t * rs + 16 * c);
    for (int g = 0; g < GC; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * ld + t]);
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(pg, row[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + g * ldo + 16 * c, acc[g][c]);
}

// o [G, Dv] = p [G, n] (row stride ld) @ the n value rows at v (row stride rs).
void values(const float* p, int64_t ld, const uint16_t* v, int64_t rs, int64_t n, int64_t G, int64_t Dv, float* o) {
  for (int64_t d = 0; d < Dv; d += 64) {
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) weighted_values<4>(p + g * ld, ld, v + d, rs, n, o + g * Dv + d, Dv);
    for (; g + 2 <= G; g += 2) weighted_values<2>(p + g * ld, ld, v + d, rs, n, o + g * Dv + d, Dv);
    for (; g < G; ++g) weighted_values<1>(p + g * ld, ld, v + d, rs, n, o + g * Dv + d, Dv);
  }
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale, const std::optional<at::Tensor>& q2,
                                                   const std::optional<at::Tensor>& k2) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "ctxlab::decode_attention takes bf16 q, k, v");
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1,
              "ctxlab::decode_attention: q contiguous, k and v rows contiguous");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B && v.size(1) == H && v.size(2) == S,
              "ctxlab::decode_attention: q [B, H, G, D], k [B, H, S, D], v [B, H, S, Dv]");
  TORCH_CHECK(D % 32 == 0 && Dv % 64 == 0 && S > 0, "ctxlab::decode_attention: D % 32 == 0, Dv % 64 == 0, S > 0");
  TORCH_CHECK(q2.has_value() == k2.has_value(), "ctxlab::decode_attention: q2 and k2 together");
  int64_t D2 = 0;
  const uint16_t *q2p = nullptr, *k2p = nullptr;
  if (q2.has_value()) {  // a second part of the keys (MLA: the RoPE key beside the latent)
    D2 = q2->size(3);
    TORCH_CHECK(q2->scalar_type() == at::kBFloat16 && k2->scalar_type() == at::kBFloat16 && q2->is_contiguous() &&
                    k2->stride(3) == 1,
                "ctxlab::decode_attention: q2, k2 bf16, q2 contiguous, k2 rows contiguous");
    TORCH_CHECK(q2->size(0) == B && q2->size(1) == H && q2->size(2) == G && k2->size(0) == B && k2->size(1) == H &&
                    k2->size(2) == S && k2->size(3) == D2 && D2 % 32 == 0,
                "ctxlab::decode_attention: q2 [B, H, G, D2], k2 [B, H, S, D2], D2 % 32 == 0");
    q2p = reinterpret_cast<const uint16_t*>(q2->data_ptr());
    k2p = reinterpret_cast<const uint16_t*>(k2->data_ptr());
  }
  const bool values_are_keys = v.data_ptr() == k.data_ptr() && v.strides() == k.strides();  // MLA's latent
  const int64_t splits = (S + SPLIT - 1) / SPLIT, tasks = B * H * splits;
  std::vector<float> part_o(tasks * G * Dv), part_m(tasks * G), part_l(tasks * G);  // per (b, h, split, g)
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * SPLIT);  // [G, SPLIT] scores, then probabilities
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / splits, b = bh / H, h = bh % H, t0 = (task % splits) * SPLIT, n = std::min(S - t0, SPLIT);
      const uint16_t* kh = kp + b * k.stride(0) + h * k.stride(1) + t0 * k.stride(2);
      const uint16_t* vh = vp + b * v.stride(0) + h * v.stride(1) + t0 * v.stride(2);
      KeyPart parts[2] = {{qp + bh * G * D, kh, k.stride(2), D}, {nullptr, nullptr, 0, 0}};
      if (D2 > 0)
        parts[1] = {q2p + bh * G * D2, k2p + b * k2->stride(0) + h * k2->stride(1) + t0 * k2->stride(2), k2->stride(2), D2};
      const ValueRows vr = {vh, v.stride(2), values_are_keys ? 0 : Dv};
      scores(parts, vr, G, n, static_cast<float>(scale), s.data(), SPLIT);
      for (int64_t g = 0; g < G; ++g)
        std::tie(part_m[task * G + g], part_l[task * G + g]) = softmax_terms(s.data() + g * SPLIT, n);
      values(s.data(), SPLIT, vh, v.stride(2), n, G, Dv, part_o.data() + task * G * Dv);
    }
  });
  auto out = at::empty({B, H, G, Dv}, q.options());
  auto lse = at::empty({B, H, G}, q.options().dtype(at::kFloat));
  auto* op = reinterpret_cast<at::BFloat16*>(out.data_ptr());
  auto* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {  // merge the splits of each query
    std::vector<float> acc(Dv);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / G, g = i % G;
      float m = -INFINITY, l = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_m[(bh * splits + sp) * G + g]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t j = (bh * splits + sp) * G + g;
        const float w = std::exp(part_m[j] - m);
        l += w * part_l[j];
        const float* o = part_o.data() + j * Dv;
        for (int64_t d = 0; d < Dv; ++d) acc[d] += w * o[d];
      }
      for (int64_t d = 0; d < Dv; ++d) op[i * Dv + d] = static_cast<at::BFloat16>(acc[d] / l);
      lp[i] = m + std::log(l);
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? q2, Tensor? k2) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) { m.impl("decode_attention", &decode_attention); }
