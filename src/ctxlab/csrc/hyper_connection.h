// What mHC's connection kernels share (hyper_connection.cpp: the split and merge; hyper_connection_backward.cpp:
// their gradients).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ctxlab_hc {

constexpr int64_t TOKENS = 4;       // tokens per block: each row of fn is loaded once for all of them
constexpr int64_t MAX_LOGITS = 80;  // M = 2n + n² for n ≤ 8 (sinkhorn.cpp's MAX_STREAMS)
constexpr int64_t ROWS = 6;         // rows of fn per register tile of hc_split's projection (4 tokens x 6 rows)

// The lanes of a 16-float vector that hold columns, when `left` columns remain.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// fn [M, K] copied into rows `K + 16` floats apart, with zero rows appended up to a multiple of `rows_of`. A
// block touches a column chunk of many rows of fn at once; at a row length of a multiple of 4 KiB
// (n·H = 2048 floats) those chunks all fall in the same set of the 8-way L1 and evict each other, and one
// cache line of padding spreads them over the sets.
inline at::Tensor padded_rows(const at::Tensor& fn, int64_t rows_of = 1) {
  const int64_t M = fn.size(0), K = fn.size(1);
  auto out = at::zeros({(M + rows_of - 1) / rows_of * rows_of, K + 16}, fn.options());
  out.narrow(0, 0, M).narrow(1, 0, K).copy_(fn);
  return out;
}

}  // namespace ctxlab_hc
