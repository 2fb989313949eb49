// One decode step of a Llama-family model (one new token per sequence) as a single C++ call.
//
// Why: a single-stream decode step of the 135M default model does ~2 ms of weight-bound matmuls but, driven op by op
// from Python, spent ~5 ms more in ~2,500 small operators (norms, RoPE, KV writes, gathers, softmax, SwiGLU) and their
// dispatch. Here the layer loop runs in C++: the matmuls are PyTorch's own kernels (dense, int8 and int4 weight-only)
// or the GGUF block kernel (gguf_matmul.cpp), and the small operators are fused loops — RMSNorm, RoPE rotating q and k in place, the KV write, attention reading
// each sequence's blocks where they lie (no gather copy), SwiGLU, residual adds.
//
// Rounding follows the eager path (tokenmill/model/llama.py, attention.py) at every point where it rounds to the
// model dtype: RMSNorm normalises in fp32 and rounds before the weight multiply, RoPE rounds each product and the sum,
// attention rounds the scaled query, scores, probabilities and the two parts of its output (cached keys, own key),
// SwiGLU rounds silu before the multiply. Sums still accumulate in another order than PyTorch's kernels, so bf16
// results can differ in the last bit; fp32 ones differ by float rounding only.
// Built with -ffp-contract=off so that fp32 products and sums are not fused into FMAs the eager path does not use.

#include <torch/extension.h>

#include "gguf_matmul.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

enum class WeightKind : int64_t { Float = 0, Int8 = 1, Int4 = 2, GgufQ4 = 3, GgufQ8 = 4 };

// A linear layer in one of the weight formats of tokenmill/model/linear.py.
struct LinearWeights {
  WeightKind kind;
  at::Tensor weight;        // Float: [N, K]; Int8: qweight [N, K]; Int4: the int4pack-packed codes; GgufQ4: nibbles;
                            // GgufQ8: codes [N, K]
  at::Tensor scales;        // Int8: [N]; Int4: scales_and_zeros [K / group, N, 2]; Gguf: d [N, K / 32]; Float: unused
  at::Tensor minimums;      // GgufQ4: m [N, K / 32]; others: unused
  std::optional<at::Tensor> bias;
  int64_t group_size;
  int64_t out_features;

  at::Tensor apply(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case WeightKind::Float:
        return at::linear(x, weight, bias);
      case WeightKind::Int8:
        y = at::_weight_int8pack_mm(x, weight, scales);
        break;
      case WeightKind::Int4:
        y = at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scales);
        break;
      case WeightKind::GgufQ4:
        y = tokenmill::q4_matmul(x, weight, scales, minimums, out_features, false);
        break;
      case WeightKind::GgufQ8:
        y = tokenmill::q8_matmul(x, weight, scales, out_features, false);
        break;
    }
    return bias ? y + *bias : y;
  }
};

struct LayerWeights {
  LinearWeights qkv, o, gate_up, down;
  at::Tensor attn_norm, ffn_norm;
};

// Conversions between the model dtype T and fp32 arithmetic, spelled out on bf16's bits (bf16 is the high half of an
// fp32) because the compiler does not vectorize c10::BFloat16's own conversions, which branch on NaN.
inline float to_f(float v) { return v; }

inline float to_f(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest even at bf16's precision; exact for every finite value and infinities (inputs here are finite).
inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// store<T>(v): v rounded into the model dtype; rounded<T>(v): the same value back as fp32 (what the eager path
// computes with after an operator's output is rounded to the model dtype).
template <typename T>
inline T store(float v);

template <>
inline float store<float>(float v) { return v; }

template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) { return c10::BFloat16(bf16_bits(v), c10::BFloat16::from_bits()); }

template <typename T>
inline float rounded(float v) { return to_f(store<T>(v)); }

// A row of the cache widened to fp32.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

// 16 fp32 lanes as a GCC/Clang vector type: one AVX-512 register here, two AVX2 or four SSE registers elsewhere.
// The loops below are written on it because the compiler vectorized neither the bf16 rounding nor attention's short
// dot products (64-element rows followed by a horizontal sum) on its own: they ran as scalar code.
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline float hsum(f32x16 v) {
  f32x8 low, high;
  std::memcpy(&low, &v, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
  const f32x8 half = low + high;
  return ((half[0] + half[4]) + (half[2] + half[6])) + ((half[1] + half[5]) + (half[3] + half[7]));
}

// Round-to-nearest-even at the model dtype's precision on 16 lanes, bit for bit what rounded<T> does per lane.
template <typename T>
inline f32x16 round16(f32x16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    u32x16 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    f32x16 out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
}

// 16 lanes rounded into the model dtype and stored, as store<T> per lane.
template <typename T>
inline void store16(T* dst, f32x16 v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, &v, sizeof(v));
  } else {
    u32x16 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const u16x16 high = __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, u16x16);
    std::memcpy(dst, &high, sizeof(high));
  }
}

// exp(x) for x <= 88.7 on 16 lanes by range reduction and a degree-6 polynomial (Cephes' coefficients; ~1 ulp):
// unlike std::exp it has no branches or errno. Underflows to ~1e-38 rather than 0 below -87.3.
inline f32x16 exp16(f32x16 x) {
  const f32x16 zero = {};
  x = x < zero - 87.3f ? zero - 87.3f : x;
  const f32x16 scaled = x * 1.44269504088896341f;
  const i32x16 n = __builtin_convertvector(scaled + (scaled >= zero ? zero + 0.5f : zero - 0.5f), i32x16);
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  f32x16 p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The same exp for one value (loop tails), so that a value gets the same result whichever loop it falls in.
inline float exp_approx(float x) { return exp16(f32x16{} + x)[0]; }

// Reductions keep 16 independent lanes, which the compiler turns into SIMD (it may not reorder a single chain of
// float adds), and fold them pairwise at the end.
constexpr int kLanes = 16;

inline float fold(float* lanes) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

inline float sum(const float* a, int64_t n) {
  float lanes[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j];
  float total = fold(lanes);
  for (; i < n; ++i) total += a[i];
  return total;
}

inline float max_of(const float* a, int64_t n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = std::max(lanes[j], a[i + j]);
  float top = lanes[0];
  for (int j = 1; j < kLanes; ++j) top = std::max(top, lanes[j]);
  for (; i < n; ++i) top = std::max(top, a[i]);
  return top;
}

// Runs fn(begin, end) over [0, n) on torch's thread pool when the work is large enough to repay waking it.
template <typename F>
void parallel_rows(int64_t n, int64_t work_per_row, const F& fn) {
  constexpr int64_t kSerialWork = 1 << 16;
  if (n * work_per_row < kSerialWork) {
    fn(0, n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, n, grain, fn);
}

// weight * rms_norm(x in fp32) rounded to the model dtype, as llama.py's rms_norm.
template <typename T>
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty_like(x);
  const T* xs = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* ys = out.data_ptr<T>();
  parallel_rows(rows, dim, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xs + r * dim;
      T* yr = ys + r * dim;
      // 16 independent partial sums, added up lane by lane at the end.
      f32x16 partial = {};
      int64_t i = 0;
      for (; i + 16 <= dim; i += 16) {
        const f32x16 v = load16(xr + i);
        partial += v * v;
      }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += partial[j];
      for (; i < dim; ++i) sum += to_f(xr[i]) * to_f(xr[i]);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      int64_t k = 0;
      for (; k + 16 <= dim; k += 16) store16(yr + k, load16(w + k) * round16<T>(load16(xr + k) * inv));
      for (; k < dim; ++k) yr[k] = store<T>(to_f(w[k]) * rounded<T>(to_f(xr[k]) * inv));
    }
  });
  return out;
}

// Half-split RoPE on the first `heads` heads of each row of qkv, in place: x·cos + roll(x, D/2)·[-sin, sin], each
// product and the sum rounded. head_dim is a multiple of 32 (DecodeStep checks), so each half is whole 16-lane chunks.
template <typename T>
void rope_inplace(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& signed_sin,
                  int64_t heads, int64_t head_dim) {
  const int64_t rows = qkv.size(0), stride = qkv.size(1), half = head_dim / 2;
  T* data = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const T* cos_table = cos.data_ptr<T>();
  const T* sin_table = signed_sin.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos_table + pos[r] * head_dim;
    const T* s = sin_table + pos[r] * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* x = data + r * stride + h * head_dim;
      for (int64_t d = 0; d < half; d += 16) {
        const f32x16 low = load16(x + d), high = load16(x + half + d);
        const f32x16 new_low = round16<T>(low * load16(c + d)) + round16<T>(high * load16(s + d));
        const f32x16 new_high = round16<T>(high * load16(c + half + d)) + round16<T>(low * load16(s + half + d));
        store16(x + d, new_low);
        store16(x + half + d, new_high);
      }
    }
  }
}

// Stores each row's new key and value heads at its slot of this layer's head-major cache [kv_heads, slots, D].
template <typename T>
void write_kv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
              int64_t q_size, int64_t kv_heads, int64_t head_dim) {
  const int64_t rows = qkv.size(0), stride = qkv.size(1), num_slots = k_cache.size(1);
  const T* data = qkv.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* k = data + r * stride + q_size;
    const T* v = k + kv_heads * head_dim;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at_slot = (h * num_slots + slot[r]) * head_dim;
      std::copy(k + h * head_dim, k + (h + 1) * head_dim, kc + at_slot);
      std::copy(v + h * head_dim, v + (h + 1) * head_dim, vc + at_slot);
    }
  }
}

// Calls fn(position, row) for the first `count` rows of one KV head of one sequence, block by block as its block
// table names them (no per-position division).
// Blocks lie anywhere in the cache, so the hardware prefetcher cannot guess the next one, and one block (2-4 KiB) is
// used in less time than a DRAM round trip: rows are requested kPrefetchBlocks blocks ahead of their use (measured:
// attention was stalled on these loads with no or one block of look-ahead).
constexpr int64_t kPrefetchBlocks = 4;

template <typename T>
inline void prefetch_block(const T* head_cache, const int64_t* table, int64_t b, int64_t block_size,
                           int64_t head_dim) {
  const char* rows = reinterpret_cast<const char*>(head_cache + table[b] * block_size * head_dim);
  const int64_t bytes = block_size * head_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(rows + line);
}

template <typename T, typename F>
inline void for_each_cached_row(const T* head_cache, const int64_t* table, int64_t block_size, int64_t head_dim,
                                int64_t count, const F& fn) {
  const int64_t blocks = (count + block_size - 1) / block_size;
  for (int64_t b = 1; b < std::min(blocks, kPrefetchBlocks); ++b)
    prefetch_block(head_cache, table, b, block_size, head_dim);
  for (int64_t b = 0; b < blocks; ++b) {
    if (b + kPrefetchBlocks < blocks) prefetch_block(head_cache, table, b + kPrefetchBlocks, block_size, head_dim);
    const T* block = head_cache + table[b] * block_size * head_dim;
    const int64_t start = b * block_size, in_block = std::min(block_size, count - start);
    for (int64_t o = 0; o < in_block; ++o) fn(start + o, block + o * head_dim);
  }
}

// Scores → probabilities in place, rounded to the model dtype as the eager path's softmax output is.
template <typename T>
inline void softmax_inplace(float* s, int64_t len) {
  const float top = max_of(s, len);
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) {
    const f32x16 e = exp16(load16(s + t) - top);
    std::memcpy(s + t, &e, sizeof(e));
  }
  for (; t < len; ++t) s[t] = exp_approx(s[t] - top);
  const float inv = 1.f / sum(s, len);
  for (t = 0; t < len - len % 16; t += 16) {
    const f32x16 p = round16<T>(load16(s + t) * inv);
    std::memcpy(s + t, &p, sizeof(p));
  }
  for (; t < len; ++t) s[t] = rounded<T>(s[t] * inv);
}

// One sequence, one KV head and the `group` query heads sharing it, for head size D: q [group, D] already scaled;
// `cached` keys before the new one, whose rows are own_k/own_v. Writes out [group, D].
template <typename T, int D>
void attend_kv_head(const float* q, const T* k_head, const T* v_head, const int64_t* table, int64_t block_size,
                    int64_t group, int64_t cached, const float* own_k, const float* own_v, float* scores, T* out) {
  constexpr int kChunks = D / 16;
  const int64_t len = cached + 1;
  // The value rows are needed right after the key pass: start fetching their first blocks now.
  for (int64_t b = 0; b < std::min((cached + block_size - 1) / block_size, kPrefetchBlocks); ++b)
    prefetch_block(v_head, table, b, block_size, D);
  for_each_cached_row(k_head, table, block_size, D, cached, [&](int64_t t, const T* k) {
    f32x16 key[kChunks];
    for (int c = 0; c < kChunks; ++c) key[c] = load16(k + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      f32x16 acc = load16(q + g * D) * key[0];
      for (int c = 1; c < kChunks; ++c) acc += load16(q + g * D + 16 * c) * key[c];
      scores[g * len + t] = rounded<T>(hsum(acc));
    }
  });
  // The new token's own key, scored as the eager step does: an elementwise product, then a sum.
  for (int64_t g = 0; g < group; ++g) {
    float own = 0.f;
    for (int d = 0; d < D; ++d) own += rounded<T>(q[g * D + d] * own_k[d]);
    scores[g * len + cached] = rounded<T>(own);
  }
  for (int64_t g = 0; g < group; ++g) softmax_inplace<T>(scores + g * len, len);
  for (int64_t g = 0; g < group; ++g) {
    const float* p = scores + g * len;
    f32x16 acc[kChunks] = {};
    for_each_cached_row(v_head, table, block_size, D, cached, [&](int64_t t, const T* v) {
      for (int c = 0; c < kChunks; ++c) acc[c] += p[t] * load16(v + 16 * c);
    });
    for (int c = 0; c < kChunks; ++c)
      store16(out + g * D + 16 * c, round16<T>(acc[c]) + round16<T>(p[cached] * load16(own_v + 16 * c)));
  }
}

// Attention of each row's new token over its sequence's cached keys and itself, reading the blocks its block table
// names where they lie (no gather copy). GQA: the query heads sharing a KV head are scored in one pass over the keys.
// q [B, H, D], k/v [B, Hkv, D] (the new token's own; rows may be strided, heads contiguous); caches [Hkv, slots, D].
template <typename T>
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size) {
  const int64_t rows = q.size(0), num_heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1), num_slots = k_cache.size(1);
  at::Tensor out = at::empty({rows, num_heads, head_dim}, q.options());
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  T* out_all = out.data_ptr<T>();
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const int64_t longest = *std::max_element(ctx, ctx + rows);

  auto run = [&](auto head_size) {
    constexpr int D = decltype(head_size)::value;
    parallel_rows(rows * kv_heads, longest * D * group, [&](int64_t begin, int64_t end) {
      std::vector<float> query(group * D), scores(group * longest), own_k(D), own_v(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / kv_heads, h = task % kv_heads;
        const T* q_heads = q.data_ptr<T>() + r * q.stride(0) + h * group * D;
        for (int64_t i = 0; i < group * D; i += 16) {
          const f32x16 scaled = round16<T>(load16(q_heads + i) * scale);
          std::memcpy(query.data() + i, &scaled, sizeof(scaled));
        }
        widen(k.data_ptr<T>() + r * k.stride(0) + h * D, own_k.data(), D);
        widen(v.data_ptr<T>() + r * v.stride(0) + h * D, own_v.data(), D);
        attend_kv_head<T, D>(query.data(), kc + h * num_slots * D, vc + h * num_slots * D,
                             block_tables.data_ptr<int64_t>() + r * max_blocks, block_size, group, ctx[r] - 1,
                             own_k.data(), own_v.data(), scores.data(), out_all + (r * num_heads + h * group) * D);
      }
    });
  };
  if (head_dim == 64)
    run(std::integral_constant<int, 64>());
  else
    run(std::integral_constant<int, 128>());
  return out;
}

void check_decode_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& context_lens) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2),
                "q, k and v must be [tokens, heads, head_dim] with contiguous heads");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "decode attention is built for head sizes 64 and 128");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [kv_heads, slots, head_dim]");
  for (const at::Tensor* t : {&k_cache, &v_cache, &k, &v})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v and the caches must share one dtype");
  for (const at::Tensor* t : {&block_tables, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0), "one table per token");
}

// The attention alone, for the general forward's decode group (its new K/V already written to the cache).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t block_size) {
  check_decode_attention_inputs(q, k, v, k_cache, v_cache, block_tables, context_lens);
  if (q.scalar_type() == at::kFloat)
    return paged_decode_attention<float>(q, k, v, k_cache, v_cache, block_tables, context_lens, block_size);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode attention supports float32 and bfloat16");
  return paged_decode_attention<c10::BFloat16>(q, k, v, k_cache, v_cache, block_tables, context_lens, block_size);
}

// silu(gate) · up for gate_up = [gate | up] per row; silu rounded to the model dtype first, as F.silu would.
template <typename T>
at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const T* gu = gate_up.data_ptr<T>();
  T* ys = out.data_ptr<T>();
  parallel_rows(rows, width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gu + r * 2 * width;
      const T* up = gate + width;
      T* y = ys + r * width;
      int64_t i = 0;
      for (; i + 16 <= width; i += 16) {
        const f32x16 g = load16(gate + i);
        store16(y + i, round16<T>(g / (1.f + exp16(-g))) * load16(up + i));
      }
      for (; i < width; ++i) {
        const float g = to_f(gate[i]);
        y[i] = store<T>(rounded<T>(g / (1.f + exp_approx(-g))) * to_f(up[i]));
      }
    }
  });
  return out;
}

// x += y, rounding to the model dtype as `x + y` would.
template <typename T>
void add_inplace(at::Tensor& x, const at::Tensor& y) {
  T* xs = x.data_ptr<T>();
  const T* ys = y.data_ptr<T>();
  const int64_t n = x.numel();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(xs + i, load16(xs + i) + load16(ys + i));
  for (; i < n; ++i) xs[i] = store<T>(to_f(xs[i]) + to_f(ys[i]));
}

class DecodeStep {
 public:
  DecodeStep(std::vector<LayerWeights> layers, at::Tensor final_norm, at::Tensor rope_cos, at::Tensor rope_signed_sin,
             double eps, int64_t num_heads, int64_t kv_heads, int64_t head_dim)
      : layers_(std::move(layers)), final_norm_(std::move(final_norm)), cos_(std::move(rope_cos)),
        sin_(std::move(rope_signed_sin)), eps_(eps), num_heads_(num_heads), kv_heads_(kv_heads),
        head_dim_(head_dim) {
    TORCH_CHECK(num_heads % kv_heads == 0, "num_heads must be a multiple of kv_heads");
    TORCH_CHECK(head_dim == 64 || head_dim == 128, "the fused decode step is built for head sizes 64 and 128");
  }

  // x: [B, hidden] embeddings of the new tokens. k_cache/v_cache: [layers, kv_heads, slots, D], written at `slots`.
  // context_lens counts each sequence's keys including the new token. Returns the final-norm hidden states.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor k_cache,
                     at::Tensor v_cache, int64_t block_size) const {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a [tokens, hidden] CPU tensor");
    TORCH_CHECK(k_cache.size(0) == static_cast<int64_t>(layers_.size()), "cache has the wrong number of layers");
    for (const at::Tensor* t : {&positions, &slots, &block_tables, &context_lens})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
    if (x.scalar_type() == at::kFloat)
      return run<float>(x, positions, slots, block_tables, context_lens, k_cache, v_cache, block_size);
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "the fused decode step supports float32 and bfloat16");
    return run<c10::BFloat16>(x, positions, slots, block_tables, context_lens, k_cache, v_cache, block_size);
  }

 private:
  template <typename T>
  at::Tensor run(const at::Tensor& embeddings, const at::Tensor& positions, const at::Tensor& slots,
                 const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& k_cache,
                 at::Tensor& v_cache, int64_t block_size) const {
    at::Tensor x = embeddings.contiguous().clone();  // the residual stream, updated in place
    const int64_t q_size = num_heads_ * head_dim_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerWeights& layer = layers_[i];
      at::Tensor k_layer = k_cache.select(0, i), v_layer = v_cache.select(0, i);
      at::Tensor qkv = layer.qkv.apply(rms_norm<T>(x, layer.attn_norm, eps_)).contiguous();
      rope_inplace<T>(qkv, positions, cos_, sin_, num_heads_ + kv_heads_, head_dim_);
      write_kv<T>(qkv, k_layer, v_layer, slots, q_size, kv_heads_, head_dim_);
      const int64_t rows = qkv.size(0), kv_size = kv_heads_ * head_dim_;
      at::Tensor attn = paged_decode_attention<T>(
          qkv.narrow(1, 0, q_size).view({rows, num_heads_, head_dim_}),
          qkv.narrow(1, q_size, kv_size).view({rows, kv_heads_, head_dim_}),
          qkv.narrow(1, q_size + kv_size, kv_size).view({rows, kv_heads_, head_dim_}), k_layer, v_layer,
          block_tables, context_lens, block_size);
      add_inplace<T>(x, layer.o.apply(attn.view({rows, q_size})).contiguous());
      at::Tensor gate_up = layer.gate_up.apply(rms_norm<T>(x, layer.ffn_norm, eps_)).contiguous();
      add_inplace<T>(x, layer.down.apply(silu_mul<T>(gate_up)).contiguous());
    }
    return rms_norm<T>(x, final_norm_, eps_);
  }

  std::vector<LayerWeights> layers_;
  at::Tensor final_norm_, cos_, sin_;
  double eps_;
  int64_t num_heads_, kv_heads_, head_dim_;
};

LinearWeights make_linear(int64_t kind, at::Tensor weight, at::Tensor scales, at::Tensor minimums,
                          std::optional<at::Tensor> bias, int64_t group_size, int64_t out_features) {
  TORCH_CHECK(kind >= 0 && kind <= 4, "unknown weight kind ", kind);
  return LinearWeights{static_cast<WeightKind>(kind), std::move(weight), std::move(scales), std::move(minimums),
                       std::move(bias), group_size, out_features};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokenmill's fused CPU decode step";
  py::class_<LinearWeights>(m, "LinearWeights");
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("block_size"),
        py::call_guard<py::gil_scoped_release>());
  m.def("make_linear", &make_linear, py::arg("kind"), py::arg("weight"), py::arg("scales"), py::arg("minimums"),
        py::arg("bias"), py::arg("group_size"), py::arg("out_features"));
  m.def("q4_matmul", &tokenmill::q4_matmul, py::arg("x"), py::arg("packed"), py::arg("d"), py::arg("m"),
        py::arg("out_features"), py::arg("fp32_output") = false, py::call_guard<py::gil_scoped_release>());
  m.def("q8_matmul", &tokenmill::q8_matmul, py::arg("x"), py::arg("packed"), py::arg("d"), py::arg("out_features"),
        py::arg("fp32_output") = false, py::call_guard<py::gil_scoped_release>());
  py::class_<LayerWeights>(m, "LayerWeights")
      .def(py::init<LinearWeights, LinearWeights, LinearWeights, LinearWeights, at::Tensor, at::Tensor>(),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"),
           py::arg("ffn_norm"));
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<std::vector<LayerWeights>, at::Tensor, at::Tensor, at::Tensor, double, int64_t, int64_t,
                    int64_t>())
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>());
}
