// Quantized KV blocks (tokenmill/kv/quant.py is the format's reference and its description): int8 per token; int4 and
// int2 as KIVI has them, keys per channel over a block's tokens and values per token. A sequence's open block (the
// one still filling) lives in full precision in its residual slot; a block is quantized once, when it fills.
//
// Which copy a query reads depends only on where the query and the key are, never on how tokens were split into
// steps: a key in the query's own block is read in full precision, a key in an earlier block from its quantized
// block. So chunked prefill, a decode and a prefill give each token the same attention.
#pragma once

#include "simd.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <vector>

namespace tokenmill {

// The quantized cache of all layers, as Python allocates it (kv/quantized_cache.py).
struct QuantKV {
  int64_t bits, block_size;
  at::Tensor k_data, v_data;          // uint8 [layers, kv_heads, blocks, block_size * row_bytes]
  at::Tensor k_params, v_params;      // fp16 [layers, kv_heads, blocks, params per block]
  at::Tensor k_residual, v_residual;  // model dtype [layers, kv_heads, residual slots, block_size, head_dim]
};

// Shapes and dtypes of a QuantKV for a model of `dtype` with kv_heads heads of head_dim (TM_CHECK on mismatch).
void check_quant_kv(const QuantKV& kv, at::ScalarType dtype, int64_t kv_heads, int64_t head_dim);

// One layer of a QuantKV as raw pointers; T is the model dtype (the residual's).
template <typename T>
struct QuantLayer {
  int bits;
  int64_t block_size, head_dim, num_blocks, num_residual, row_bytes, k_params, v_params;
  uint8_t* k_data;
  uint8_t* v_data;
  at::Half* k_param;
  at::Half* v_param;
  T* k_res;
  T* v_res;

  uint8_t* data(bool keys, int64_t h, int64_t block) const {
    return (keys ? k_data : v_data) + (h * num_blocks + block) * block_size * row_bytes;
  }
  at::Half* params(bool keys, int64_t h, int64_t block) const {
    return keys ? k_param + (h * num_blocks + block) * k_params : v_param + (h * num_blocks + block) * v_params;
  }
  T* residual(bool keys, int64_t h, int64_t slot) const {
    return (keys ? k_res : v_res) + (h * num_residual + slot) * block_size * head_dim;
  }
};

template <typename T>
QuantLayer<T> quant_layer(const QuantKV& kv, int64_t layer) {
  const int64_t head_dim = kv.k_residual.size(4), block_size = kv.block_size;
  return QuantLayer<T>{static_cast<int>(kv.bits), block_size, head_dim, kv.k_data.size(2), kv.k_residual.size(2),
                       head_dim * kv.bits / 8, kv.k_params.size(3), kv.v_params.size(3),
                       kv.k_data.select(0, layer).data_ptr<uint8_t>(), kv.v_data.select(0, layer).data_ptr<uint8_t>(),
                       kv.k_params.select(0, layer).data_ptr<at::Half>(),
                       kv.v_params.select(0, layer).data_ptr<at::Half>(), kv.k_residual.select(0, layer).data_ptr<T>(),
                       kv.v_residual.select(0, layer).data_ptr<T>()};
}

// 16 bytes widened to 16 int32 lanes, unsigned or signed. __builtin_convertvector compiles this into byte-by-byte
// inserts; the ISA's own widening is one instruction (two on AVX2).
template <bool Signed>
inline i32x16 widen_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (i32x16)(Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i halves[2] = {Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes),
                             Signed ? _mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))
                                    : _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))};
  i32x16 out;
  std::memcpy(&out, halves, sizeof(out));
  return out;
#else
  i32x16 out;
  for (int i = 0; i < 16; ++i) out[i] = Signed ? static_cast<int32_t>(static_cast<int8_t>(p[i])) : p[i];
  return out;
#endif
}

// n fp16 parameters widened to fp32 (F16C where the build has it: x86-64-v3 and up).
inline void widen_half(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Row codes widened to fp32 (exact: small integers), 16 channels at a time: int8 as signed values; int4 and int2
// unsigned, byte i holding channels i, i + D/2 (int4) or i, i + D/4, i + D/2, i + 3D/4 (int2) from its low bits up,
// so each unpacks into contiguous runs.
template <int D, int BITS>
inline void unpack_codes(const uint8_t* row, float* codes) {
  if constexpr (BITS == 8) {
    for (int c = 0; c < D; c += 16) {
      const f32x16 wide = __builtin_convertvector(widen_bytes<true>(row + c), f32x16);
      std::memcpy(codes + c, &wide, sizeof(wide));
    }
  } else {
    constexpr int kPerByte = 8 / BITS, kRun = D / kPerByte;
    static_assert(kRun % 16 == 0, "each byte's runs of channels must fill whole 16-lane vectors");
    for (int i = 0; i < kRun; i += 16) {
      const i32x16 bytes = widen_bytes<false>(row + i);
      for (int k = 0; k < kPerByte; ++k) {
        const f32x16 wide = __builtin_convertvector((bytes >> (BITS * k)) & ((1 << BITS) - 1), f32x16);
        std::memcpy(codes + k * kRun + i, &wide, sizeof(wide));
      }
    }
  }
}

// One stored row dequantized and rounded to the model dtype, x = code · scale + min (int8: code · scale), with
// scale and min per channel (`scale`, `minimum`: D each; int4/int2 keys) or per token (one each, splat).
template <typename T, int D, int BITS>
inline void dequantize_row(const uint8_t* row, const float* scale, const float* minimum, bool per_channel,
                           float* out) {
  alignas(64) float codes[D];
  unpack_codes<D, BITS>(row, codes);
  for (int c = 0; c < D; c += 16) {
    const f32x16 s = per_channel ? load16(scale + c) : splat16(*scale);
    f32x16 x = load16(codes + c) * s;
    if constexpr (BITS != 8) x = x + (per_channel ? load16(minimum + c) : splat16(*minimum));
    const f32x16 y = round16<T>(x);
    std::memcpy(out + c, &y, sizeof(y));
  }
}

// A KV head's rows in a quantized cache, as one query sees them: entries before `fp_from` (the start of
// the query's own block) dequantized a row at a time into `tile`, the others in full precision, from the sequence's
// residual slot (entries written by earlier steps) or from this step's rows (entries from `first_new` on).
template <typename T>
struct QuantRows {
  const QuantLayer<T>* q;
  bool keys;
  int64_t head;
  const int64_t* table;
  int64_t fp_from, first_new;
  const T* residual;
  const T* fresh;  // this step's row for entry first_new, then every `fresh_stride` elements
  int64_t fresh_stride;
  float* tile;  // 3 · D + 2 · block_size floats: one row and a block's parameters

  template <int D, typename F>
  void for_each(int64_t count, const F& fn) const {
    range<D>(0, count, fn);
  }

  template <int D, typename F>
  void range(int64_t begin, int64_t end, const F& fn) const {
    if (q->bits == 8)
      quantized<D, 8>(begin, std::min(end, fp_from), fn);
    else if (q->bits == 4)
      quantized<D, 4>(begin, std::min(end, fp_from), fn);
    else
      quantized<D, 2>(begin, std::min(end, fp_from), fn);
    for (int64_t t = std::max(begin, fp_from); t < end; ++t) fn(t, full<D>(t));
  }

  // Entry t >= fp_from, in full precision: from the residual slot, or this step's rows.
  template <int D>
  const T* full(int64_t t) const {
    return t < first_new ? residual + (t % q->block_size) * D : fresh + (t - first_new) * fresh_stride;
  }

  // Entries [begin, end) of quantized blocks, block by block: the block's fp16 parameters widened once.
  template <int D, int BITS, typename F>
  void quantized(int64_t begin, int64_t end, const F& fn) const {
    const int64_t bs = q->block_size, row_bytes = D * BITS / 8;
    const bool per_channel = keys && BITS != 8;
    float* row = tile;
    float* params = tile + D;  // per channel: scale[D], min[D]; per token: (scale, min) per row
    // Blocks lie anywhere (see for_each_cached_row): the ones `kAhead` on are requested while this one is used.
    constexpr int64_t kAhead = 4;
    const int64_t last_block = (end - 1) / bs, param_bytes = (per_channel ? 2 * D : 2 * bs) * 2;
    for (int64_t t = begin; t < end;) {
      const int64_t block = t / bs, first = t - block * bs, stop = std::min(end, (block + 1) * bs);
      const uint8_t* data = q->data(keys, head, table[block]);
      const at::Half* stored = q->params(keys, head, table[block]);
      for (int64_t next = block + (t == begin ? 1 : kAhead); next <= std::min(block + kAhead, last_block); ++next) {
        prefetch_bytes(q->data(keys, head, table[next]), bs * row_bytes);
        prefetch_bytes(q->params(keys, head, table[next]), param_bytes);
      }
      if (per_channel) {
        widen_half(stored, params, 2 * D);
      } else {
        const int64_t per_row = BITS == 8 ? 1 : 2;
        widen_half(stored + first * per_row, params + first * per_row, (stop - block * bs - first) * per_row);
      }
      for (int64_t o = first; t < stop; ++t, ++o) {
        if (per_channel)
          dequantize_row<T, D, BITS>(data + o * row_bytes, params, params + D, true, row);
        else if constexpr (BITS == 8)
          dequantize_row<T, D, BITS>(data + o * row_bytes, params + o, nullptr, false, row);
        else
          dequantize_row<T, D, BITS>(data + o * row_bytes, params + 2 * o, params + 2 * o + 1, false, row);
        fn(t, static_cast<const float*>(row));
      }
    }
  }
};

constexpr int64_t kMaxQueryGroup = 16;  // query heads per KV head (paged attention checks)

// One decode row's attention for one KV head and the `group` query heads sharing it, with each block's quantization
// folded into the query and the probabilities instead of dequantizing its rows (kv_quant_decode.cpp): query [group,
// D] scaled and rounded as the eager path has it, `cached` entries before the row's own (own_k, own_v). Writes out
// [group, D]; scores (group · (cached + 1) floats) holds the probabilities on return, as the decode kernel leaves
// them. Scores and probabilities are rounded to the model dtype as the dequantizing path rounds them; the difference
// is the summation: Σ (q · step) · code + Σ q · min in place of Σ q · (code · step + min), each row never rounded
// (and, for a bf16 model's int4/int2 on AVX512-BF16, the folded query and weights rounded to bf16 for vdpbf16ps).
// keys and values: the head's rows as the row reads them (their tiles unused).
template <typename T>
void attend_decode_folded(const QuantRows<T>& keys, const QuantRows<T>& values, const float* query, int64_t group,
                          int64_t head_dim, int64_t cached, const float* own_k, const float* own_v, float* scores,
                          std::vector<float>& work, T* out);

// Whether decode rows over a quantized cache take attend_decode_folded (the default) or dequantize each row first, as
// the prefill kernel reads them: `on` 1 or 0 sets it (A/B runs; TOKENMILL_KV_QUANT_FOLDED=0 at start-up), -1 reads.
bool kv_quant_folded(int64_t on = -1);

// Whether a decode row over a cache of `bits` takes attend_decode_folded in this build (the switch above, and the
// formats the build folds profitably).
bool folds_decode(int64_t bits);

// Quantize one full block of one KV head (rows[o] points at token o's D values) into its codes and parameters.
template <typename T>
void quantize_block(const QuantLayer<T>& q, bool keys, const T* const* rows, uint8_t* block, at::Half* params);

// Before a layer's attention: every block that this step fills is quantized from its residual rows (tokens written
// by earlier steps) and the step's rows. k/v [rows, kv_heads, D] strided by row; sequences as paged_attention's.
template <typename T>
void quantize_filled_blocks(const QuantLayer<T>& q, const T* k, const T* v, int64_t k_stride, int64_t v_stride,
                            int64_t kv_heads, int64_t num_seqs, const int64_t* query_starts, const int64_t* tables,
                            int64_t max_blocks, const int64_t* context_lens, const int64_t* residual_slots);

// After a layer's attention: the step's rows in each sequence's open block go to its residual slot.
template <typename T>
void store_open_rows(const QuantLayer<T>& q, const T* k, const T* v, int64_t k_stride, int64_t v_stride,
                     int64_t kv_heads, int64_t num_seqs, const int64_t* query_starts, const int64_t* context_lens,
                     const int64_t* residual_slots);

}  // namespace tokenmill
