// The backward of mHC's connection (hyper_connection.cpp) for training, float32, x86 AVX512: the split's and
// the merge's vector-Jacobian products, one pass over the n-times-wide stream each.
//
//   hc_split_backward(x [N, n, H], fn [M, K = n·H], gains [M], mix [M, N], inv_rms [N], s_pre [n, N],
//                     g_u [N, H], g_z_rest [M - n, N], g_stream [N, n, H]?, eps)
//     -> g_x [N, n, H], g_fn [M, K], g_z_pre [n, N]
//   hc_merge_backward(x [N, n, H], y [N, H], post [N, n], comb [N, n, n], g [N, n, H])
//     -> g_x [N, n, H], g_y [N, H], g_post [N, n], g_comb [N, n, n]
//
// The split computes, per token, inv_rms = (mean(x²) + norm_eps)^-½, mix = (x · fnᵀ) · inv_rms, the logits
// z = gains ⊙ mix + base, pre = σ(z[:n]) + eps and the collapse u = Σ_i pre_i x_i (post and comb come from
// z[n:], whose gradient g_z_rest the caller has already taken through 2σ and Sinkhorn). Its vector-Jacobian
// product, per token (the arithmetic of HyperSplit.backward in ctxlab/nn/mhc_fused.py, the oracle):
//
//   g_z[i]  = (x_i · g_u) σ_i (1 - σ_i)                         for the n pre logits (returned as g_z_pre)
//   g_raw   = g_z ⊙ gains · inv_rms                             [M]
//   g_x     = Σ_m g_raw[m] fn[m] + c · x + pre_i g_u (stream i), c = -(Σ_m g_z[m] gains[m] mix[m]) inv_rms² / K
//   g_fn   += g_raw ⊗ x                                         (summed over tokens)
//
// g_stream, when given, is the gradient x has from its other consumer, the merge after the block: it is added
// into g_x in the same pass (autograd would otherwise sum the two in a pass of its own over three streams).
//
// In PyTorch that is two skinny matrix products with the [M, K] projection (g_rawᵀ fn and g_raw x: each
// reads or writes the n-times-wide stream; ~60-100 GFLOP/s at M = 24 here) and three element-wise
// passes; here a block of 6 tokens reads its rows once, and each row of fn (and of the thread's g_fn
// accumulator) is loaded once per block for all six tokens, 32 columns at a time in registers. Tokens
// split across torch's thread pool, each part with its own g_fn, summed at the end.
//
// The merge X'_j = Σ_i comb_ij x_i + post_j y (HyperMerge in mhc_fused.py) has, per token, g_x_i = Σ_j comb_ij g_j,
// g_y = Σ_j post_j g_j, g_post_j = y · g_j and g_comb_ij = x_i · g_j: one pass over a token's rows, where
// PyTorch runs four batched matrix products, each a pass over the stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "hyper_connection.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using ctxlab_hc::lanes;
using ctxlab_hc::MAX_LOGITS;
using ctxlab_simd::dot;

// Tokens per block of the split's backward, and 16-float vectors per row and step of accumulate(): each row of fn
// and of g_fn (200 KB each at M = 24, n·H = 2048: from L2) is read once per block, and the block's rows of x and g_x
// stay in 2 · BLOCK · VECTORS registers. 6 x 2 (28 of the 32 registers) against the 4 x 2 before it: 1.43-1.49 vs
// 1.59-1.72 ms warm, 2.45-2.47 vs 2.51-2.61 ms after 256 MiB of other traffic (N = 1024, n = 4, H = 512, 2 threads,
// medians of 31, ad hoc); 8 x 2 (spilling) measured as 6 x 2, 8 x 1 and 12 x 1 slower than 4 x 2.
constexpr int64_t BLOCK = 6;
constexpr int64_t VECTORS = 2;

// A block of tokens: its rows of x and of g_x (a zero row and a scratch row pad a short block), and g_raw.
struct Block {
  const float* x[BLOCK];
  float* g_x[BLOCK];
  float g_raw[BLOCK][MAX_LOGITS];
};

// g_x[b] += Σ_m g_raw[b][m] fn[m] and g_fn[m] += Σ_b g_raw[b][m] x[b], 16 · VECTORS columns at a time; the rows of
// fn and g_fn are `ld` floats apart.
void accumulate(const Block& blk, const float* fn, int64_t M, int64_t K, int64_t ld, float* g_fn) {
  constexpr int64_t C = 16 * VECTORS;
  for (int64_t k = 0; k < K; k += C) {
    __mmask16 in[VECTORS];
    for (int64_t v = 0; v < VECTORS; ++v) in[v] = lanes(K - k - 16 * v);
    __m512 xv[BLOCK][VECTORS], gv[BLOCK][VECTORS];
    for (int64_t b = 0; b < BLOCK; ++b)
      for (int64_t v = 0; v < VECTORS; ++v) {
        xv[b][v] = _mm512_maskz_loadu_ps(in[v], blk.x[b] + k + 16 * v);
        gv[b][v] = _mm512_maskz_loadu_ps(in[v], blk.g_x[b] + k + 16 * v);
      }
    for (int64_t m = 0; m < M; ++m) {
      const float* f = fn + m * ld + k;
      float* acc = g_fn + m * ld + k;
      __m512 fv[VECTORS], av[VECTORS];
      for (int64_t v = 0; v < VECTORS; ++v)
        fv[v] = _mm512_maskz_loadu_ps(in[v], f + 16 * v), av[v] = _mm512_maskz_loadu_ps(in[v], acc + 16 * v);
      for (int64_t b = 0; b < BLOCK; ++b) {
        const __m512 w = _mm512_set1_ps(blk.g_raw[b][m]);
        for (int64_t v = 0; v < VECTORS; ++v)
          gv[b][v] = _mm512_fmadd_ps(w, fv[v], gv[b][v]), av[v] = _mm512_fmadd_ps(w, xv[b][v], av[v]);
      }
      for (int64_t v = 0; v < VECTORS; ++v) _mm512_mask_storeu_ps(acc + 16 * v, in[v], av[v]);
    }
    for (int64_t b = 0; b < BLOCK; ++b)
      for (int64_t v = 0; v < VECTORS; ++v) _mm512_mask_storeu_ps(blk.g_x[b] + k + 16 * v, in[v], gv[b][v]);
  }
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, "hc_split_backward: ", name,
              " must be a contiguous float32 ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_split_backward(
    const at::Tensor& x, const at::Tensor& fn, const at::Tensor& gains, const at::Tensor& mix,
    const at::Tensor& inv_rms, const at::Tensor& s_pre, const at::Tensor& g_u, const at::Tensor& g_z_rest,
    const c10::optional<at::Tensor>& g_stream, double eps) {
  TORCH_CHECK(x.dim() == 3, "hc_split_backward: x must be [N, n, H], got ", x.sizes());
  const int64_t N = x.size(0), n = x.size(1), H = x.size(2), K = n * H, M = fn.size(0);
  TORCH_CHECK(M >= n && M <= MAX_LOGITS, "hc_split_backward: fn has ", M, " rows; allowed n = ", n, " to ", MAX_LOGITS);
  check_float(x, "x", {N, n, H});
  check_float(fn, "fn", {M, K});
  check_float(gains, "gains", {M});
  check_float(mix, "mix", {M, N});
  check_float(inv_rms, "inv_rms", {N});
  check_float(s_pre, "s_pre", {n, N});
  check_float(g_u, "g_u", {N, H});
  check_float(g_z_rest, "g_z_rest", {M - n, N});
  if (g_stream) check_float(*g_stream, "g_stream", {N, n, H});
  const float e = static_cast<float>(eps);
  const float *xp = x.data_ptr<float>(), *gp = gains.data_ptr<float>();
  const float *mp = mix.data_ptr<float>(), *rp = inv_rms.data_ptr<float>(), *sp = s_pre.data_ptr<float>();
  const float *up = g_u.data_ptr<float>(), *zp = g_z_rest.data_ptr<float>();
  const float* ap = g_stream ? g_stream->data_ptr<float>() : nullptr;
  auto g_x = at::empty_like(x);
  auto g_z_pre = at::empty({n, N}, x.options());
  float *gxp = g_x.data_ptr<float>(), *gzp = g_z_pre.data_ptr<float>();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + BLOCK - 1) / BLOCK));
  const auto fn_padded = ctxlab_hc::padded_rows(fn);  // and g_fn's rows as far apart
  const int64_t ld = fn_padded.size(1);
  const float* w = fn_padded.data_ptr<float>();
  auto g_fn_parts = at::zeros({parts, M, ld}, x.options());  // one accumulator per part of the tokens
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zero_row(K, 0.f), scratch_row(K);
    for (int64_t part = begin; part < end; ++part) {
      float* g_fn = g_fn_parts.data_ptr<float>() + part * M * ld;
      for (int64_t t0 = N * part / parts, stop = N * (part + 1) / parts; t0 < stop; t0 += BLOCK) {
        Block blk;
        for (int64_t b = 0; b < BLOCK; ++b) {
          const int64_t t = t0 + b;
          if (t >= stop) {  // pad the block: a zero row whose g_x goes nowhere
            blk.x[b] = zero_row.data(), blk.g_x[b] = scratch_row.data();
            std::fill(blk.g_raw[b], blk.g_raw[b] + M, 0.f);
            continue;
          }
          const float *xt = xp + t * K, *gu = up + t * H, r = rp[t];
          float g_mix_dot = 0.f;  // Σ_m g_z[m] gains[m] mix[m]
          for (int64_t m = 0; m < M; ++m) {
            float g_z;
            if (m < n) {
              const float s = sp[m * N + t];
              g_z = gzp[m * N + t] = dot(xt + m * H, gu, H) * s * (1.f - s);
            } else {
              g_z = zp[(m - n) * N + t];
            }
            const float g_mix = g_z * gp[m];
            blk.g_raw[b][m] = g_mix * r;
            g_mix_dot += g_mix * mp[m * N + t];
          }
          const float c = -g_mix_dot * r * r / static_cast<float>(K);
          float* gx = blk.g_x[b] = gxp + t * K;
          blk.x[b] = xt;
          for (int64_t i = 0; i < n; ++i) {  // c · x + pre_i g_u (+ g_stream); accumulate() adds g_rawᵀ fn
            const float pre = sp[i * N + t] + e;
            for (int64_t h = 0; h < H; ++h) gx[i * H + h] = c * xt[i * H + h] + pre * gu[h];
          }
          if (ap)
            for (int64_t k = 0; k < K; ++k) gx[k] += ap[t * K + k];
        }
        accumulate(blk, w, M, K, ld, g_fn);
      }
    }
  });
  auto g_fn = (parts == 1 ? g_fn_parts[0] : g_fn_parts.sum(0)).narrow(1, 0, K).contiguous();
  return {g_x, g_fn, g_z_pre};
}

// One token of the merge's backward, 16 columns at a time: the n rows of x and of g in registers, the n² + n
// dot products accumulated as vectors and summed across lanes at the end.
template <int64_t n>
void merge_backward_token(const float* x, const float* y, const float* post, const float* comb, const float* g,
                          int64_t H, float* g_x, float* g_y, float* g_post, float* g_comb) {
  __m512 dot_y[n], dot_x[n * n];  // y · g_j, x_i · g_j
  for (int64_t j = 0; j < n; ++j) dot_y[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n * n; ++k) dot_x[k] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 in = lanes(H - h);
    __m512 xv[n], gv[n];
    for (int64_t i = 0; i < n; ++i) xv[i] = _mm512_maskz_loadu_ps(in, x + i * H + h), gv[i] = _mm512_maskz_loadu_ps(in, g + i * H + h);
    const __m512 yv = _mm512_maskz_loadu_ps(in, y + h);
    __m512 gy = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      dot_y[j] = _mm512_fmadd_ps(yv, gv[j], dot_y[j]);
      for (int64_t i = 0; i < n; ++i) dot_x[i * n + j] = _mm512_fmadd_ps(xv[i], gv[j], dot_x[i * n + j]);
      gy = _mm512_fmadd_ps(_mm512_set1_ps(post[j]), gv[j], gy);
    }
    _mm512_mask_storeu_ps(g_y + h, in, gy);
    for (int64_t i = 0; i < n; ++i) {
      __m512 gx = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) gx = _mm512_fmadd_ps(_mm512_set1_ps(comb[i * n + j]), gv[j], gx);
      _mm512_mask_storeu_ps(g_x + i * H + h, in, gx);
    }
  }
  for (int64_t j = 0; j < n; ++j) g_post[j] = _mm512_reduce_add_ps(dot_y[j]);
  for (int64_t k = 0; k < n * n; ++k) g_comb[k] = _mm512_reduce_add_ps(dot_x[k]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hc_merge_backward(const at::Tensor& x, const at::Tensor& y,
                                                                             const at::Tensor& post, const at::Tensor& comb,
                                                                             const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 3, "hc_merge_backward: x must be [N, n, H], got ", x.sizes());
  const int64_t N = x.size(0), n = x.size(1), H = x.size(2);
  for (const auto& [t, name, shape] : {std::make_tuple(&x, "x", std::vector<int64_t>{N, n, H}),
                                       std::make_tuple(&y, "y", std::vector<int64_t>{N, H}),
                                       std::make_tuple(&post, "post", std::vector<int64_t>{N, n}),
                                       std::make_tuple(&comb, "comb", std::vector<int64_t>{N, n, n}),
                                       std::make_tuple(&g, "g", std::vector<int64_t>{N, n, H})})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef(shape),
                "hc_merge_backward: ", name, " must be a contiguous float32 ", at::IntArrayRef(shape), ", got ",
                t->scalar_type(), " ", t->sizes());
  auto g_x = at::empty_like(x), g_y = at::empty_like(y), g_post = at::empty_like(post), g_comb = at::empty_like(comb);
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *pp = post.data_ptr<float>();
  const float *cp = comb.data_ptr<float>(), *gp = g.data_ptr<float>();
  float *gxp = g_x.data_ptr<float>(), *gyp = g_y.data_ptr<float>(), *gpp = g_post.data_ptr<float>();
  float* gcp = g_comb.data_ptr<float>();
  ctxlab_hc::with_streams(n, [&](auto streams) {
    constexpr int64_t S = decltype(streams)::value;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        merge_backward_token<S>(xp + t * S * H, yp + t * H, pp + t * S, cp + t * S * S, gp + t * S * H, H,
                                gxp + t * S * H, gyp + t * H, gpp + t * S, gcp + t * S * S);
    });
  });
  return {g_x, g_y, g_post, g_comb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ctxlab, m) {
  m.def("hc_split_backward(Tensor x, Tensor fn, Tensor gains, Tensor mix, Tensor inv_rms, Tensor s_pre, "
        "Tensor g_u, Tensor g_z_rest, Tensor? g_stream, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("hc_merge_backward(Tensor x, Tensor y, Tensor post, Tensor comb, Tensor g) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) {
  m.impl("hc_split_backward", &hc_split_backward);
  m.impl("hc_merge_backward", &hc_merge_backward);
}
