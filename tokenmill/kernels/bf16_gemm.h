// A row-exact bf16 matmul on a weight packed for it (bf16_gemm.cpp): every row of y is the bits that row would be
// alone, at any row count.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace tokenmill {

// W [N, K] bf16 as blocks of 16 outputs by pairs of k: [ceil(N / 16), ceil(K / 2), 16, 2], zero-padded.
at::Tensor pack_bf16(const at::Tensor& weight);

// y = x Wᵀ (+ bias) for x [M, K] bf16, W packed by pack_bf16 and bias [N] bf16: y [M, N] bf16, or fp32 with
// `fp32_out` (the sums before their rounding). Row m of y depends on x[m], W and bias only, bit for bit.
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features, bool fp32_out = false);

}  // namespace tokenmill
