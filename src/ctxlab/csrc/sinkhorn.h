// ctxlab::sinkhorn's projection as a C++ function, for kernels that compute mixing logits themselves
// (hyper_connection.cpp). Defined in sinkhorn.cpp.
#pragma once

#include <ATen/ATen.h>

namespace ctxlab_native {

constexpr int64_t SINKHORN_MAX_STREAMS = 8;  // n (mHC uses 4): a block's n·n matrix lives in registers / on the stack

// logits [n, n, N] (contiguous float32, tokens last) -> the doubly stochastic matrices into out [N, n, n],
// token-major (the layout of a connection's comb), with no tensor made or dispatched (see sinkhorn.cpp).
void sinkhorn_token_major(const float* logits, int64_t n, int64_t N, int64_t iters, double eps, float* out);

}  // namespace ctxlab_native
