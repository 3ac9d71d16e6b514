// ctxlab::sinkhorn's projection as a C++ function, for kernels that compute mixing logits themselves
// (hyper_connection.cpp). Defined in sinkhorn.cpp.
#pragma once

#include <ATen/ATen.h>

namespace ctxlab_native {

// logits [n, n, N] float32, tokens last -> the doubly stochastic matrices [n, n, N] (see sinkhorn.cpp).
at::Tensor sinkhorn_projection(const at::Tensor& logits, int64_t iters, double eps);

}  // namespace ctxlab_native
