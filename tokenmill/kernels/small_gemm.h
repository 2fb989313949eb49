// A row-exact fp32 matmul for the few rows of decode and verification steps (small_gemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace tokenmill {

// Batches of at most this many rows take linear_rows instead of PyTorch's linear (cpu_step.cpp, FloatLinear.logits),
// so that every row of a step this small (decodes, speculative verify steps of a few sequences) rounds exactly as it
// would alone. Up to here it is as fast as MKL or faster on every layer of the default model with the weights coming
// from memory, as a step's do (benchmarks/small_gemm.py); with a small layer's weights already in cache, MKL catches
// up around here.
constexpr int64_t kSmallRows = 32;

// y = x Wᵀ (+ bias) for x [M, K], W [N, K] and bias [N], all fp32 and contiguous: y [M, N] fp32. Row m of y depends
// on x[m], W and bias only, bit for bit: every output is summed in the same order whatever M and the row's position.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace tokenmill
