// mHC's hyper-connection at inference (no autograd), for x86 CPUs with AVX512: everything a connection
// computes before its block (the split) and after it (the merge), one call each.
//
// hc_split: x [..., n, H] float32 or bf16 (the n streams of N tokens, any leading dims), fn [M, n·H], base [M],
//   scale [3] (float32) -> u [..., H] (x's dtype; the block's input), post [..., n], comb [..., n, n], and for the
//   backward (hyper_connection_backward.cpp) mix = (x · fnᵀ) · inv_rms [M, N] and inv_rms [N] (all float32)
// hc_merge: x [..., n, H], the block's output y [..., H] (x's dtype), post [..., n], comb [..., n, n] (float32)
//   -> X' [..., n, H] (x's dtype), X'_j = Σ_i comb_ij x_i + post_j y
// (The leading dims are the caller's [B, T]: a decode step calls these with no reshapes around them.)
//
// The arithmetic of HF `DeepseekV4HyperConnection` and ctxlab's reference (ctxlab/nn/residual.py): per token,
// the inverse RMS of the n·H inputs, the M = 2n + n² mixing logits z = gain · (x · fnᵀ) · inv_rms + base
// (the norm applied to the logits, not to the inputs: the same numbers), pre = σ(z) + eps, post = 2σ(z),
// comb = Sinkhorn(z) (sinkhorn.cpp), and the collapse u = Σ_i pre_i x_i in float32, rounded to x's dtype once.
// With M = n (HF `DeepseekV4HyperHead`: one gain, pre only) post and comb come back empty.
//
// The merge rounds post and comb to x's dtype first, as the reference mixes in the residual's dtype, sums
// in float32 and rounds once (the reference rounds the mix and the update separately: within one bf16 ulp).
//
// At a decode step PyTorch spends the split as ~20 dispatched ops per connection (two per layer) and the
// merge as ~8, each on a handful of numbers; here a token reads its n·H inputs once (into L1), and the M
// dot products read fn. Blocks of tokens split across torch's thread pool; a decode step's few tokens split
// fn's rows instead. The reference path (ctxlab/nn/residual.py)
// is the oracle (tests/test_mhc_native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "hyper_connection.h"
#include "simd.h"
#include "sinkhorn.h"

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using ctxlab_hc::lanes;
using ctxlab_hc::load16;
using ctxlab_hc::store16;
using ctxlab_hc::MAX_LOGITS;
using ctxlab_hc::ROWS;
using ctxlab_hc::TOKENS;
using ctxlab_simd::dot;

// One token's n·H inputs as float32: read in place (float32) or widened into buf (bf16).
inline const float* token_row(const at::Tensor& x, int64_t t, int64_t K, float* buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + t * K;
  const auto* src = static_cast<const c10::BFloat16*>(x.data_ptr()) + t * K;
  for (int64_t k = 0; k < K; k += 16) _mm512_mask_storeu_ps(buf + k, lanes(K - k), load16(src + k, lanes(K - k)));
  return buf;
}

inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// x's leading dims (all but the last two, the streams and the width) followed by `tail`.
inline std::vector<int64_t> leading(const at::Tensor& x, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

// dots[b][m0 + r] = rows[b] · fn[m0 + r] for b < T, r < R: R rows of fn (`ld` floats apart) against T rows of
// K floats, T · R ≤ 24 accumulators in registers, each vector of fn loaded once for all T tokens.
template <int64_t T, int64_t R>
void project_rows(const float* const* rows, const float* fn, int64_t m0, int64_t K, int64_t ld, float (*dots)[MAX_LOGITS]) {
  __m512 acc[T][R];
  for (int64_t b = 0; b < T; ++b)
    for (int64_t r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 in = lanes(K - k);
    __m512 xv[T];
    for (int64_t b = 0; b < T; ++b) xv[b] = _mm512_maskz_loadu_ps(in, rows[b] + k);
    for (int64_t r = 0; r < R; ++r) {
      const __m512 f = _mm512_maskz_loadu_ps(in, fn + (m0 + r) * ld + k);
      for (int64_t b = 0; b < T; ++b) acc[b][r] = _mm512_fmadd_ps(xv[b], f, acc[b][r]);
    }
  }
  for (int64_t b = 0; b < T; ++b)
    for (int64_t r = 0; r < R; ++r) dots[b][m0 + r] = _mm512_reduce_add_ps(acc[b][r]);
}

// dots[b][m0 + r] for rows r < R ≤ ROWS of fn from m0: project_rows with R known at compile time.
template <int64_t T>
void project_tile(const float* const* rows, const float* fn, int64_t m0, int64_t R, int64_t K, int64_t ld,
                  float (*dots)[MAX_LOGITS]) {
  switch (R) {
    case 1: return project_rows<T, 1>(rows, fn, m0, K, ld, dots);
    case 2: return project_rows<T, 2>(rows, fn, m0, K, ld, dots);
    case 3: return project_rows<T, 3>(rows, fn, m0, K, ld, dots);
    case 4: return project_rows<T, 4>(rows, fn, m0, K, ld, dots);
    case 5: return project_rows<T, 5>(rows, fn, m0, K, ld, dots);
    case ROWS: return project_rows<T, ROWS>(rows, fn, m0, K, ld, dots);
    default: return;
  }
}

// dots[b][m] = rows[b] · fn[m] for T tokens and all M rows of fn: ROWS at a time, then the remaining M % ROWS.
template <int64_t T>
void project(const float* const* rows, const float* fn, int64_t M, int64_t K, int64_t ld, float (*dots)[MAX_LOGITS]) {
  for (int64_t m0 = 0; m0 < M; m0 += ROWS) project_tile<T>(rows, fn, m0, std::min(ROWS, M - m0), K, ld, dots);
}

// A decode step's few tokens (fewer than one block): all M dot products per token with fn's row tiles spread
// over the threads. fn (~200 KB per connection at n·H = 2048) is read from memory at every step, and one
// thread streams it at about half the rate two do.
constexpr int64_t PARALLEL_FN_FLOATS = 1 << 14;  // from 64 KiB of fn on (n·H = 683 at n = 4)
void project_few(const float* const* rows, int64_t count, const float* fn, int64_t M, int64_t K, int64_t ld,
                 float (*dots)[MAX_LOGITS]) {
  at::parallel_for(0, (M + ROWS - 1) / ROWS, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile)
      for (int64_t k = 0; k < count; ++k)
        project_tile<1>(rows + k, fn, tile * ROWS, std::min(ROWS, M - tile * ROWS), K, ld, dots + k);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hc_split(const at::Tensor& x, const at::Tensor& fn,
                                                       const at::Tensor& base, const at::Tensor& scale,
                                                       int64_t iters, double eps, double norm_eps) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "hc_split: x must be a contiguous [..., n, H], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "hc_split: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t n = x.size(-2), H = x.size(-1), K = n * H, N = K ? x.numel() / K : 0, M = fn.size(0);
  const bool mix = M != n;  // false: the head's pre-only collapse
  TORCH_CHECK(!mix || M == 2 * n + n * n, "hc_split: fn has ", M, " rows; n = ", n, " streams need ", 2 * n + n * n,
              " (a connection) or ", n, " (the head)");
  TORCH_CHECK(M <= MAX_LOGITS, "hc_split: n = ", n, " streams; allowed up to 8 (", MAX_LOGITS, " mixing logits)");
  for (const auto* t : {&fn, &base, &scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "hc_split: fn, base and scale must be contiguous float32");
  TORCH_CHECK(fn.dim() == 2 && fn.size(1) == K && base.numel() == M && scale.numel() == (mix ? 3 : 1),
              "hc_split: fn ", fn.sizes(), ", base ", base.sizes(), ", scale ", scale.sizes(), " do not fit x ", x.sizes());
  const float e = static_cast<float>(eps), ne = static_cast<float>(norm_eps);
  // More than one block of tokens: fn's rows padded off the 4 KiB stride (a decode step's one block reads fn once)
  const auto fn_rows = N > TOKENS ? ctxlab_hc::padded_rows(fn) : fn;
  const int64_t ld = fn_rows.size(1);
  const float *w = fn_rows.data_ptr<float>(), *b = base.data_ptr<float>(), *g = scale.data_ptr<float>();
  auto u32 = at::empty(leading(x, {H}), x.options().dtype(at::kFloat));
  auto post = at::empty(leading(x, {mix ? n : 0}), x.options().dtype(at::kFloat));
  auto comb_logits = at::empty({mix ? n * n : 0, N}, x.options().dtype(at::kFloat));  // tokens last, for Sinkhorn
  auto mixing = at::empty({M, N}, x.options().dtype(at::kFloat));  // (x · fnᵀ) · inv_rms, tokens last
  auto inv_rms = at::empty({N}, x.options().dtype(at::kFloat));
  float *up = u32.data_ptr<float>(), *pp = post.data_ptr<float>(), *cp = comb_logits.data_ptr<float>();
  float *mp = mixing.data_ptr<float>(), *rp = inv_rms.data_ptr<float>();
  // A decode step's few tokens, with fn large enough to be worth a parallel region: the projection first, over
  // the threads. Ad hoc, the mHC benchmark's models alternating in one process (medians of 11): its decode step
  // 5.53 → 5.39 ms at width 512 eager (plain 4.75), 4.50 → 4.32 ms compiled (plain 3.81), 2.54 → 2.48 ms at 256.
  const bool few = N < TOKENS && M * K >= PARALLEL_FN_FLOATS;
  std::vector<float> few_buf(few && x.scalar_type() != at::kFloat ? N * K : 0);
  const float* few_rows[TOKENS];
  float few_dots[TOKENS][MAX_LOGITS];
  if (few) {
    for (int64_t k = 0; k < N; ++k) few_rows[k] = token_row(x, k, K, few_buf.data() + k * K);
    project_few(few_rows, N, w, M, K, ld, few_dots);
  }
  at::parallel_for(0, (N + TOKENS - 1) / TOKENS, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(x.scalar_type() == at::kFloat || few ? 0 : TOKENS * K), pre(n);
    float block_dots[TOKENS][MAX_LOGITS];
    float (*dots)[MAX_LOGITS] = few ? few_dots : block_dots;
    for (int64_t t0 = begin * TOKENS; t0 < std::min(end * TOKENS, N); t0 += TOKENS) {
      const int64_t count = std::min(TOKENS, N - t0);  // a short last block goes one token at a time
      const float* rows[TOKENS];
      for (int64_t k = 0; k < count; ++k)  // (few: the one block, t0 = 0, rows and dots from above)
        rows[k] = few ? few_rows[k] : token_row(x, t0 + k, K, buf.data() + k * K);
      if (few) {
      } else if (count == TOKENS) {
        project<TOKENS>(rows, w, M, K, ld, dots);
      } else {
        for (int64_t k = 0; k < count; ++k) project<1>(rows + k, w, M, K, ld, dots + k);
      }
      for (int64_t k = 0; k < count; ++k) {
        const int64_t t = t0 + k;
        const float* row = rows[k];
        const float r = rp[t] = 1.f / std::sqrt(dot(row, row, K) / static_cast<float>(K) + ne);
        for (int64_t m = 0; m < M; ++m) {
          const float gain = g[!mix ? 0 : m < n ? 0 : m < 2 * n ? 1 : 2];
          const float z = gain * (mp[m * N + t] = dots[k][m] * r) + b[m];
          if (m < n) pre[m] = sigmoid(z) + e;
          else if (m < 2 * n) pp[t * n + m - n] = 2.f * sigmoid(z);
          else cp[(m - 2 * n) * N + t] = z;
        }
        float* u = up + t * H;  // Σ_i pre_i x_i
        for (int64_t h = 0; h < H; ++h) u[h] = 0.f;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t h = 0; h < H; ++h) u[h] += pre[i] * row[i * H + h];
      }
    }
  });
  auto comb = at::empty(leading(x, {mix ? n : 0, mix ? n : 0}), x.options().dtype(at::kFloat));
  if (mix) ctxlab_native::sinkhorn_token_major(cp, n, N, iters, eps, comb.data_ptr<float>());
  return {x.scalar_type() == at::kFloat ? u32 : u32.to(x.scalar_type()), post, comb, mixing, inv_rms};
}

// X'_j = Σ_i comb_ij x_i + post_j y for one token, 16 columns at a time, its n rows of x in registers; post and
// comb as x's dtype holds them (the reference mixes in the residual's dtype), one rounding of the float32 sum.
template <int64_t n, typename T>
void merge_token(const T* x, const T* y, const float* post, const float* comb, int64_t H, T* out) {
  float p[n], c[n * n];
  for (int64_t j = 0; j < n; ++j) p[j] = static_cast<float>(static_cast<T>(post[j]));
  for (int64_t k = 0; k < n * n; ++k) c[k] = static_cast<float>(static_cast<T>(comb[k]));
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 in = lanes(H - h);
    __m512 xv[n];
    for (int64_t i = 0; i < n; ++i) xv[i] = load16(x + i * H + h, in);
    const __m512 yv = load16(y + h, in);
    for (int64_t j = 0; j < n; ++j) {
      __m512 v = _mm512_mul_ps(_mm512_set1_ps(p[j]), yv);
      for (int64_t i = 0; i < n; ++i) v = _mm512_fmadd_ps(_mm512_set1_ps(c[i * n + j]), xv[i], v);
      store16(out + j * H + h, v, in);
    }
  }
}

at::Tensor hc_merge(const at::Tensor& x, const at::Tensor& y, const at::Tensor& post, const at::Tensor& comb) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "hc_merge: x must be a contiguous [..., n, H], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "hc_merge: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t n = x.size(-2), H = x.size(-1), N = n * H ? x.numel() / (n * H) : 0;
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == x.scalar_type() && y.sizes() == at::IntArrayRef(leading(x, {H})),
              "hc_merge: y must be a contiguous ", at::IntArrayRef(leading(x, {H})), " of x's dtype, got ", y.sizes(), " ",
              y.scalar_type());
  TORCH_CHECK(post.is_contiguous() && post.scalar_type() == at::kFloat && post.sizes() == at::IntArrayRef(leading(x, {n})),
              "hc_merge: post must be a contiguous float32 ", at::IntArrayRef(leading(x, {n})), ", got ", post.sizes(), " ",
              post.scalar_type());
  TORCH_CHECK(comb.is_contiguous() && comb.scalar_type() == at::kFloat &&
                  comb.sizes() == at::IntArrayRef(leading(x, {n, n})),
              "hc_merge: comb must be a contiguous float32 ", at::IntArrayRef(leading(x, {n, n})), ", got ", comb.sizes(),
              " ", comb.scalar_type());
  auto out = at::empty_like(x);
  const float *pp = post.data_ptr<float>(), *cp = comb.data_ptr<float>();
  auto run = [&](auto* xp, auto* op) {  // float32 or bf16 rows
    const auto* yp = reinterpret_cast<decltype(xp)>(y.data_ptr());
    ctxlab_hc::with_streams(n, [&](auto streams) {
      constexpr int64_t S = decltype(streams)::value;
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          merge_token<S>(xp + t * S * H, yp + t * H, pp + t * S, cp + t * S * S, H, op + t * S * H);
      });
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(static_cast<const c10::BFloat16*>(x.data_ptr()), static_cast<c10::BFloat16*>(out.data_ptr()));
  else
    run(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) {
  m.def("hc_split(Tensor x, Tensor fn, Tensor base, Tensor scale, int iters, float eps, float norm_eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hc_merge(Tensor x, Tensor y, Tensor post, Tensor comb) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) {
  m.impl("hc_split", &hc_split);
  m.impl("hc_merge", &hc_merge);
}
