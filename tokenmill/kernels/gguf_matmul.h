// Matmuls over GGUF block formats with the file's exact weights (gguf_matmul.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace tokenmill {

// The instruction set the block tiles were compiled for: "avx512bf16", "avx2" or "scalar".
const char* gguf_isa();
// The instruction set of the int8-activation tiles: "avx512vnni", "avx2" or "scalar".
const char* gguf_int8_isa();
// Block matmuls with at most `rows` activation rows prefetch their weights (16 by default; 0 turns prefetching off).
// Sets it when rows >= 0 and returns the setting.
int64_t gguf_prefetch_rows(int64_t rows = -1);

// y = x Wᵀ for x [M, K] bf16 and W [N, K] in 4-bit blocks of 32, W[n, 32b + j] = d · q + m with the block's d and m,
// repacked by row tiles (layout in gguf_matmul.cpp): packed [ceil(N / 16), K / 32 · 256] uint8, d and m
// [ceil(N / 16), K / 32, 16] float16 (Q4_0/Q4_1: the file's values) or float32 (Q4_K's sub-block products). Returns
// [M, N] in bf16, or fp32 (the sums before rounding) when asked.
// `int8_activations`: x is first rounded per block of 32 to int8 codes with an fp32 scale (llama.cpp's Q8 scheme) and
// the products are integer dot products (gguf_matmul.cpp).
at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m,
                     int64_t N, bool fp32_output, bool int8_activations = false);

// The same for 8-bit codes (Q8_0; Q5_0 as q - 16; Q6_K as q - 32), W[n, k] = s · q: packed [ceil(N / 16), K / 32 · 512]
// int8; d either [ceil(N / 16), K / 32, 16] float16, one scale s per 32 weights (Q8_0, Q5_0), or Q6_K's
// [ceil(N / 16), K / 256, 288] uint8, per super-block the rows' f16 d and per 16 weights their int8 sc, s = d · sc
// (gguf_layout.h).
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, int64_t N,
                     bool fp32_output, bool int8_activations = false);

}  // namespace tokenmill
