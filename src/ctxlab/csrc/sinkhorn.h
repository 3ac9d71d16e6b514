// ctxlab::sinkhorn's projection as a C++ function, for kernels that compute mixing logits themselves
// (hyper_connection.cpp). Defined in sinkhorn.cpp.
#pragma once

#include <ATen/ATen.h>

namespace ctxlab_native {

constexpr int64_t SINKHORN_MAX_STREAMS = 8;  // n (mHC uses 4): a block's n·n matrix lives in registers / on the stack

// logits [n, n, N] float32, tokens last -> the doubly stochastic matrices [n, n, N] (see sinkhorn.cpp).
at::Tensor sinkhorn_projection(const at::Tensor& logits, int64_t iters, double eps);

}  // namespace ctxlab_native
