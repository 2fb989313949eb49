// Quantizing KV blocks as they fill and keeping each sequence's open block in full precision (declared in
// kv_quant.h). Every rounding here is the reference's (tokenmill/kv/quant.py): fp32 arithmetic, parameters rounded
// to fp16 before the codes are computed against them, codes rounded half to even.

#include "kv_quant.h"
#include "check.h"

#include <cmath>
#include <vector>

namespace tokenmill {
namespace {

inline uint8_t pack_int8(float code) { return static_cast<uint8_t>(static_cast<int8_t>(code)); }

// codes [B][D] (one row per token) into the block's bytes, row by row.
void pack_block(const float* codes, int bits, int64_t block_size, int64_t dim, int64_t row_bytes, uint8_t* block) {
  for (int64_t o = 0; o < block_size; ++o) {
    const float* c = codes + o * dim;
    uint8_t* row = block + o * row_bytes;
    if (bits == 8) {
      for (int64_t d = 0; d < dim; ++d) row[d] = pack_int8(c[d]);
    } else {
      const int64_t stride = row_bytes;  // dim / 2 or dim / 4 channels apart share a byte
      for (int64_t i = 0; i < row_bytes; ++i) {
        uint32_t byte = 0;
        for (int k = 0; k < 8 / bits; ++k) byte |= static_cast<uint32_t>(c[k * stride + i]) << (bits * k);
        row[i] = static_cast<uint8_t>(byte);
      }
    }
  }
}

// (scale, min) for values spanning [lo, hi] in 2^bits - 1 steps, each rounded to fp16.
inline void asymmetric_params(float lo, float hi, int bits, at::Half* scale, at::Half* minimum) {
  *scale = at::Half((hi - lo) / static_cast<float>((1 << bits) - 1));
  *minimum = at::Half(lo);
}

inline float asymmetric_code(float x, float scale, float minimum, int bits) {
  if (!(scale > 0.f)) return 0.f;
  return std::clamp(std::nearbyint((x - minimum) / scale), 0.f, static_cast<float>((1 << bits) - 1));
}

inline float symmetric_code(float x, float scale) {
  if (!(scale > 0.f)) return 0.f;
  return std::clamp(std::nearbyint(x / scale), -127.f, 127.f);
}

}  // namespace

void check_quant_kv(const QuantKV& kv, at::ScalarType dtype, int64_t kv_heads, int64_t head_dim) {
  TM_CHECK(kv.bits == 8 || kv.bits == 4 || kv.bits == 2, "quantized KV has 8, 4 or 2 bits, not ", kv.bits);
  const int64_t layers = kv.k_data.size(0), blocks = kv.k_data.size(2), bs = kv.block_size;
  const int64_t row_bytes = head_dim * kv.bits / 8;
  const int64_t k_params = kv.bits == 8 ? bs : 2 * head_dim, v_params = kv.bits == 8 ? bs : 2 * bs;
  for (const at::Tensor* t : {&kv.k_data, &kv.v_data})
    TM_CHECK(t->scalar_type() == at::kByte && t->is_contiguous() &&
                 t->sizes() == at::IntArrayRef({layers, kv_heads, blocks, bs * row_bytes}),
             "quantized KV data must be contiguous uint8 [layers, kv_heads, blocks, block_size * row bytes]");
  TM_CHECK(kv.k_params.scalar_type() == at::kHalf && kv.v_params.scalar_type() == at::kHalf &&
               kv.k_params.is_contiguous() && kv.v_params.is_contiguous() &&
               kv.k_params.sizes() == at::IntArrayRef({layers, kv_heads, blocks, k_params}) &&
               kv.v_params.sizes() == at::IntArrayRef({layers, kv_heads, blocks, v_params}),
           "quantized KV parameters must be contiguous fp16 [layers, kv_heads, blocks, parameters per block]");
  const int64_t slots = kv.k_residual.size(2);
  for (const at::Tensor* t : {&kv.k_residual, &kv.v_residual})
    TM_CHECK(t->scalar_type() == dtype && t->is_contiguous() &&
                 t->sizes() == at::IntArrayRef({layers, kv_heads, slots, bs, head_dim}),
             "residual slots must be contiguous [layers, kv_heads, slots, block_size, head_dim] in the model dtype");
}

template <typename T>
void quantize_block(const QuantLayer<T>& q, bool keys, const T* const* rows, uint8_t* block, at::Half* params) {
  const int64_t bs = q.block_size, dim = q.head_dim;
  std::vector<float> codes(bs * dim);
  if (q.bits == 8) {  // per token, symmetric
    for (int64_t o = 0; o < bs; ++o) {
      float top = 0.f;
      for (int64_t d = 0; d < dim; ++d) top = std::max(top, std::fabs(to_f(rows[o][d])));
      params[o] = at::Half(top / 127.f);
      const float scale = static_cast<float>(params[o]);
      for (int64_t d = 0; d < dim; ++d) codes[o * dim + d] = symmetric_code(to_f(rows[o][d]), scale);
    }
  } else if (keys) {  // per channel over the block's tokens: KIVI's answer to keys' outlier channels
    for (int64_t d = 0; d < dim; ++d) {
      float lo = to_f(rows[0][d]), hi = lo;
      for (int64_t o = 1; o < bs; ++o) lo = std::min(lo, to_f(rows[o][d])), hi = std::max(hi, to_f(rows[o][d]));
      asymmetric_params(lo, hi, q.bits, params + d, params + dim + d);
      const float scale = static_cast<float>(params[d]), minimum = static_cast<float>(params[dim + d]);
      for (int64_t o = 0; o < bs; ++o) codes[o * dim + d] = asymmetric_code(to_f(rows[o][d]), scale, minimum, q.bits);
    }
  } else {  // values per token
    for (int64_t o = 0; o < bs; ++o) {
      float lo = to_f(rows[o][0]), hi = lo;
      for (int64_t d = 1; d < dim; ++d) lo = std::min(lo, to_f(rows[o][d])), hi = std::max(hi, to_f(rows[o][d]));
      asymmetric_params(lo, hi, q.bits, params + 2 * o, params + 2 * o + 1);
      const float scale = static_cast<float>(params[2 * o]), minimum = static_cast<float>(params[2 * o + 1]);
      for (int64_t d = 0; d < dim; ++d) codes[o * dim + d] = asymmetric_code(to_f(rows[o][d]), scale, minimum, q.bits);
    }
  }
  pack_block(codes.data(), q.bits, bs, dim, q.row_bytes, block);
}

template <typename T>
void quantize_filled_blocks(const QuantLayer<T>& q, const T* k, const T* v, int64_t k_stride, int64_t v_stride,
                            int64_t kv_heads, int64_t num_seqs, const int64_t* query_starts, const int64_t* tables,
                            int64_t max_blocks, const int64_t* context_lens, const int64_t* residual_slots) {
  const int64_t bs = q.block_size, dim = q.head_dim;
  parallel_rows(num_seqs * kv_heads, bs * dim, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kv_heads, h = task % kv_heads, row0 = query_starts[s];
      const int64_t ctx = context_lens[s], first = ctx - (query_starts[s + 1] - row0);
      for (int64_t block = first / bs; (block + 1) * bs <= ctx; ++block) {
        for (const bool keys : {true, false}) {
          const T* fresh = keys ? k + row0 * k_stride + h * dim : v + row0 * v_stride + h * dim;
          const int64_t stride = keys ? k_stride : v_stride;
          const T* residual = q.residual(keys, h, residual_slots[s]);
          for (int64_t o = 0; o < bs; ++o) {
            const int64_t t = block * bs + o;
            rows[o] = t < first ? residual + o * dim : fresh + (t - first) * stride;
          }
          const int64_t id = tables[s * max_blocks + block];
          quantize_block(q, keys, rows.data(), q.data(keys, h, id), q.params(keys, h, id));
        }
      }
    }
  });
}

template <typename T>
void store_open_rows(const QuantLayer<T>& q, const T* k, const T* v, int64_t k_stride, int64_t v_stride,
                     int64_t kv_heads, int64_t num_seqs, const int64_t* query_starts, const int64_t* context_lens,
                     const int64_t* residual_slots) {
  const int64_t bs = q.block_size, dim = q.head_dim;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t ctx = context_lens[s], row0 = query_starts[s], first = ctx - (query_starts[s + 1] - row0);
    for (int64_t t = std::max(first, ctx / bs * bs); t < ctx; ++t)  // nothing when the last block is full
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t r = row0 + t - first;
        std::copy(k + r * k_stride + h * dim, k + r * k_stride + (h + 1) * dim,
                  q.residual(true, h, residual_slots[s]) + (t % bs) * dim);
        std::copy(v + r * v_stride + h * dim, v + r * v_stride + (h + 1) * dim,
                  q.residual(false, h, residual_slots[s]) + (t % bs) * dim);
      }
  }
}

#define TOKENMILL_INSTANTIATE(T)                                                                                      \
  template void quantize_block<T>(const QuantLayer<T>&, bool, const T* const*, uint8_t*, at::Half*);                 \
  template void quantize_filled_blocks<T>(const QuantLayer<T>&, const T*, const T*, int64_t, int64_t, int64_t,        \
                                          int64_t, const int64_t*, const int64_t*, int64_t, const int64_t*,           \
                                          const int64_t*);                                                            \
  template void store_open_rows<T>(const QuantLayer<T>&, const T*, const T*, int64_t, int64_t, int64_t, int64_t,      \
                                   const int64_t*, const int64_t*, const int64_t*);
TOKENMILL_INSTANTIATE(float)
TOKENMILL_INSTANTIATE(c10::BFloat16)
#undef TOKENMILL_INSTANTIATE

}  // namespace tokenmill
