// A streaming window's key shift, in place (kv_rotate.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace tokenmill {

// Rotates, in place, the keys of whole blocks of k_cache [layers, kv_heads, slots, head_dim] (fp32 or bf16, slot = block ·
// block_size + offset) in every layer and head by one RoPE angle in the half-split layout: with cos and sin the
// angle's terms for the first half's dims (fp32 [head_dim / 2]), first' = first·cos − second·sin and second' =
// second·cos + first·sin, in fp32, rounded once into the cache dtype. blocks: int64 [n], distinct block ids.
void rotate_key_blocks(const at::Tensor& k_cache, const at::Tensor& blocks, const at::Tensor& cos, const at::Tensor& sin,
                       int64_t block_size);

}  // namespace tokenmill
