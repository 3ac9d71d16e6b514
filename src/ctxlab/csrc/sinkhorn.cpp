// Sinkhorn-Knopp projection of mHC's residual-mixing logits, one small matrix per token, forward and backward,
// for x86 CPUs with AVX512.
//
//   logits [n, n, N] float32, tokens last (token stride 1) -> comb [n, n, N] float32, doubly stochastic per token
//
// The arithmetic of HF `DeepseekV4HyperConnection` (and ctxlab's reference, ctxlab/nn/residual.py):
// m = softmax over each row + eps, then one column normalisation and `iters - 1` (row, column) pairs, each
// `m / (Σ m + eps)`. In PyTorch every one of those ~40 steps is a kernel over all N tokens (a dispatch, a
// parallel loop and its barrier); here 16 tokens at a time, one per float32 lane, run all their steps with
// the n·n matrix in registers / L1, blocks of tokens split across torch's thread pool. A step multiplies by
// the n reciprocals of its sums (one rounding more than dividing: within 1 ulp).
//
// The backward recomputes the steps (nothing but the logits is kept from the forward) and applies each
// step's vector-Jacobian product in reverse: for m' = m / d with d = Σ_axis m + eps,
// ∂L/∂m = (g - Σ_axis(g ⊙ m')) / d; for the row softmax p, ∂L/∂z = p ⊙ (g - Σ_row(g ⊙ p)).
// ctxlab/nn/mhc_fused.py holds the same two functions in PyTorch (the oracle of tests/test_mhc_native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"
#include "sinkhorn.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using ctxlab_simd::exp_ps;

constexpr int64_t MAX_STREAMS = ctxlab_native::SINKHORN_MAX_STREAMS;
constexpr int64_t LANES = 16;       // tokens per block, one per float32 lane
constexpr int64_t GRAIN = 4;        // blocks per task of the thread pool

// The axis each normalisation sums over: 0 = over rows i (column sums), 1 = over columns j (row sums).
inline int step_axis(int64_t step) { return step % 2 == 0 ? 0 : 1; }

inline int64_t step_count(int64_t iters) { return 1 + 2 * std::max<int64_t>(iters - 1, 0); }

// The logits of 16 tokens (t, t + 1, ...; masked lanes read 0) -> p = softmax over each row, row-major n·n.
void row_softmax(const float* z, int64_t si, int64_t sj, int64_t n, int64_t t, __mmask16 lanes, __m512* p) {
  for (int64_t i = 0; i < n; ++i) {
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) top = _mm512_max_ps(top, p[i * n + j] = _mm512_maskz_loadu_ps(lanes, z + i * si + j * sj + t));
    for (int64_t j = 0; j < n; ++j) total = _mm512_add_ps(total, p[i * n + j] = exp_ps(_mm512_sub_ps(p[i * n + j], top)));
    for (int64_t j = 0; j < n; ++j) p[i * n + j] = _mm512_div_ps(p[i * n + j], total);
  }
}

// m <- m / (Σ_axis m + eps) in place; the reciprocals of the n divisors go to r.
void normalise(__m512* m, int64_t n, int axis, __m512 eps, __m512* r) {
  for (int64_t k = 0; k < n; ++k) {
    __m512 total = eps;
    for (int64_t l = 0; l < n; ++l) total = _mm512_add_ps(total, axis == 0 ? m[l * n + k] : m[k * n + l]);
    r[k] = _mm512_div_ps(_mm512_set1_ps(1.f), total);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) m[i * n + j] = _mm512_mul_ps(m[i * n + j], r[axis == 0 ? j : i]);
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == t.size(1), "sinkhorn: ", name, " must be [n, n, N], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sinkhorn: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "sinkhorn: ", name, " must have tokens last (stride 1), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= MAX_STREAMS, "sinkhorn: n = ", t.size(0), " streams, at most ", MAX_STREAMS);
}

inline __mmask16 lanes_from(int64_t t, int64_t N) {
  return N - t >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - t)) - 1);
}

// The doubly stochastic matrices m [n·n] (one token per lane) of the tokens t.. (the lanes set) of logits z.
void project_block(const float* z, int64_t si, int64_t sj, int64_t n, int64_t t, __mmask16 lanes, int64_t iters,
                   __m512 e, __m512* m) {
  __m512 r[MAX_STREAMS];
  row_softmax(z, si, sj, n, t, lanes, m);
  for (int64_t k = 0; k < n * n; ++k) m[k] = _mm512_add_ps(m[k], e);
  for (int64_t step = 0; step < step_count(iters); ++step) normalise(m, n, step_axis(step), e, r);
}

at::Tensor sinkhorn(const at::Tensor& logits, int64_t iters, double eps) {
  check(logits, "logits");
  const int64_t n = logits.size(0), N = logits.size(2), si = logits.stride(0), sj = logits.stride(1);
  const __m512 e = _mm512_set1_ps(static_cast<float>(eps));
  auto out = at::empty({n, n, N}, logits.options());
  const float* z = logits.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + LANES - 1) / LANES, GRAIN, [&](int64_t begin, int64_t end) {
    __m512 m[MAX_STREAMS * MAX_STREAMS];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t = block * LANES;
      const __mmask16 lanes = lanes_from(t, N);
      project_block(z, si, sj, n, t, lanes, iters, e, m);
      for (int64_t k = 0; k < n * n; ++k) _mm512_mask_storeu_ps(o + k * N + t, lanes, m[k]);
    }
  });
  return out;
}

at::Tensor sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  check(logits, "logits");
  check(grad, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes(), "sinkhorn_backward: grad ", grad.sizes(), " vs logits ", logits.sizes());
  const int64_t n = logits.size(0), N = logits.size(2), nn = n * n, steps = step_count(iters);
  const __m512 e = _mm512_set1_ps(static_cast<float>(eps));
  auto out = at::empty({n, n, N}, logits.options());
  const float *z = logits.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + LANES - 1) / LANES, GRAIN, [&](int64_t begin, int64_t end) {
    // per block: p, then every step's output m' [steps, n·n] and its divisors' reciprocals [steps, n]
    std::vector<__m512> ms(steps * nn), rs(steps * n);
    __m512 p[MAX_STREAMS * MAX_STREAMS], g[MAX_STREAMS * MAX_STREAMS], dot[MAX_STREAMS];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t = block * LANES;
      const __mmask16 lanes = lanes_from(t, N);
      row_softmax(z, logits.stride(0), logits.stride(1), n, t, lanes, p);
      const __m512* prev = p;
      for (int64_t step = 0; step < steps; ++step) {
        __m512* m = ms.data() + step * nn;
        for (int64_t k = 0; k < nn; ++k) m[k] = step == 0 ? _mm512_add_ps(prev[k], e) : prev[k];
        normalise(m, n, step_axis(step), e, rs.data() + step * n);
        prev = m;
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          g[i * n + j] = _mm512_maskz_loadu_ps(lanes, gp + i * grad.stride(0) + j * grad.stride(1) + t);
      for (int64_t step = steps - 1; step >= 0; --step) {  // g <- (g - Σ_axis(g ⊙ m')) / d
        const __m512 *m = ms.data() + step * nn, *r = rs.data() + step * n;
        const int axis = step_axis(step);
        for (int64_t k = 0; k < n; ++k) dot[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const int64_t k = axis == 0 ? j : i;
            dot[k] = _mm512_fmadd_ps(g[i * n + j], m[i * n + j], dot[k]);
          }
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const int64_t k = axis == 0 ? j : i;
            g[i * n + j] = _mm512_mul_ps(_mm512_sub_ps(g[i * n + j], dot[k]), r[k]);
          }
      }
      for (int64_t i = 0; i < n; ++i) {  // the row softmax: p ⊙ (g - Σ_row(g ⊙ p))
        __m512 row = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) row = _mm512_fmadd_ps(g[i * n + j], p[i * n + j], row);
        for (int64_t j = 0; j < n; ++j)
          _mm512_mask_storeu_ps(o + (i * n + j) * N + t, lanes, _mm512_mul_ps(p[i * n + j], _mm512_sub_ps(g[i * n + j], row)));
      }
    }
  });
  return out;
}

}  // namespace

void ctxlab_native::sinkhorn_token_major(const float* logits, int64_t n, int64_t N, int64_t iters, double eps,
                                         float* out) {
  const __m512 e = _mm512_set1_ps(static_cast<float>(eps));
  const int64_t nn = n * n;
  at::parallel_for(0, (N + LANES - 1) / LANES, GRAIN, [&](int64_t begin, int64_t end) {
    __m512 m[MAX_STREAMS * MAX_STREAMS];
    alignas(64) float lanes_of[MAX_STREAMS * MAX_STREAMS][LANES];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t = block * LANES;
      project_block(logits, n * N, N, n, t, lanes_from(t, N), iters, e, m);
      for (int64_t k = 0; k < nn; ++k) _mm512_store_ps(lanes_of[k], m[k]);
      for (int64_t b = 0; b < std::min(LANES, N - t); ++b)  // lane b is token t + b
        for (int64_t k = 0; k < nn; ++k) out[(t + b) * nn + k] = lanes_of[k][b];
    }
  });
}

TORCH_LIBRARY_FRAGMENT(ctxlab, m) {
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctxlab, CPU, m) {
  m.impl("sinkhorn", &sinkhorn);
  m.impl("sinkhorn_backward", &sinkhorn_backward);
}
