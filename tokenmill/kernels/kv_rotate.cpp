// A streaming window's key shift in place (kv/streaming.py): after an eviction every key of the window's blocks, in
// every layer and KV head, turns back by the same RoPE angle. The PyTorch path gathers the blocks, widens them, builds
// the rotated halves as temporaries and scatters them back; here each row is read and written once.
//
// Arithmetic: each element in fp32 as the PyTorch path computes it, one rounding per operation (built with
// -ffp-contract=off): first' = first·cos − second·sin and second' = second·cos + first·sin, rounded once into the cache
// dtype. The result is bit-identical to KVCache.rotate_keys' PyTorch path.

#include "kv_rotate.h"
#include "check.h"

#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace tokenmill {
namespace {

template <typename T>
void rotate_rows(T* k, const int64_t* blocks, int64_t count, int64_t lanes, int64_t slots, int64_t block_size,
                 int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  at::parallel_for(0, lanes * count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t lane = unit / count, block = blocks[unit % count];
      T* rows = k + (lane * slots + block * block_size) * dim;
      for (int64_t r = 0; r < block_size; ++r) {
        T* row = rows + r * dim;
        for (int64_t j = 0; j < half; ++j) {
          const float first = to_f(row[j]), second = to_f(row[j + half]);
          const float a = first * cos[j], b = second * sin[j], c = second * cos[j], d = first * sin[j];
          row[j] = store<T>(a - b);
          row[j + half] = store<T>(c + d);
        }
      }
    }
  });
}

}  // namespace

void rotate_key_blocks(const at::Tensor& k_cache, const at::Tensor& blocks, const at::Tensor& cos, const at::Tensor& sin,
                       int64_t block_size) {
  TM_CHECK(k_cache.device().is_cpu() && k_cache.dim() == 4 && k_cache.is_contiguous() &&
               (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
           "rotate_key_blocks takes a contiguous fp32 or bf16 CPU cache [layers, kv_heads, slots, head_dim]");
  const int64_t layers = k_cache.size(0), heads = k_cache.size(1), slots = k_cache.size(2), dim = k_cache.size(3);
  TM_CHECK(dim % 2 == 0 && block_size > 0 && slots % block_size == 0, "head_dim must be even and slots whole blocks");
  TM_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 1 && blocks.is_contiguous(),
           "blocks must be a contiguous int64 vector");
  TM_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
               sin.is_contiguous() && cos.numel() == dim / 2 && sin.numel() == dim / 2,
           "cos and sin must be contiguous fp32 vectors of head_dim / 2");
  const int64_t* ids = blocks.data_ptr<int64_t>();
  const int64_t count = blocks.numel(), num_blocks = slots / block_size;
  for (int64_t i = 0; i < count; ++i) TM_CHECK(ids[i] >= 0 && ids[i] < num_blocks, "block id out of range");
  if (k_cache.scalar_type() == at::kFloat)
    rotate_rows(k_cache.data_ptr<float>(), ids, count, layers * heads, slots, block_size, dim, cos.data_ptr<float>(),
                sin.data_ptr<float>());
  else
    rotate_rows(k_cache.data_ptr<c10::BFloat16>(), ids, count, layers * heads, slots, block_size, dim,
                cos.data_ptr<float>(), sin.data_ptr<float>());
}

}  // namespace tokenmill
