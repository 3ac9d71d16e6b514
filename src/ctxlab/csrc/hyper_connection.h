// What mHC's connection kernels share (hyper_connection.cpp: the split and merge; hyper_connection_backward.cpp:
// their gradients).
#pragma once

#include "simd.h"
#include "sinkhorn.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace ctxlab_hc {

using ctxlab_simd::lanes;
using ctxlab_simd::load16;
using ctxlab_simd::store16;

constexpr int64_t MAX_STREAMS = ctxlab_native::SINKHORN_MAX_STREAMS;          // n: comb goes through Sinkhorn
constexpr int64_t MAX_LOGITS = 2 * MAX_STREAMS + MAX_STREAMS * MAX_STREAMS;  // M = 2n + n²
constexpr int64_t TOKENS = 4;       // tokens per block: each row of fn is loaded once for all of them
constexpr int64_t ROWS = 6;         // rows of fn per register tile of hc_split's projection (4 tokens x 6 rows)

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

}  // namespace ctxlab_hc
