// Attention over the paged KV cache for one step's flat batch (declared in attention.h).
//
// Decodes (one new token per sequence) are bound by reading the cache: each sequence's keys and values are read once
// per KV head, in place, with the query heads sharing that KV head scored in the same pass.
// Verify steps of speculative decoding (a few new tokens per sequence) must give each token exactly what a decode of
// it would: their kernel runs the decode's arithmetic for every row, reading the keys once for all the rows.
// Prefill chunks (many new tokens per sequence) are bound by arithmetic instead: every key is used by every later
// query. Their kernel widens the sequence's keys once into 16-key column blocks (key index across the 16 fp32 lanes),
// so a query scores 16 keys with one multiply and one add per head dimension and no horizontal sums, and keeps many
// independent accumulators in flight (8 query rows per pass over a key block; 24 output vectors per pass over the
// values). benchmarks/attention.py measures both kernels against the eager path and each other (docs/benchmarks.md).
//
// Rounding follows the eager path (tokenmill/attention/eager.py): the scaled query, the scores, the probabilities
// and the output are rounded to the model dtype; sums accumulate in fp32.

#include "attention.h"
#include "check.h"

#include "kv_quant.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <atomic>
#include <numeric>
#include <type_traits>
#include <vector>

namespace tokenmill {
namespace {

// Calls fn(position, row) for the first `count` rows of one KV head of one sequence, block by block as its block
// table names them (no per-position division).
// Blocks lie anywhere in the cache, so the hardware prefetcher cannot guess the next one, and a block is used in less
// time than a DRAM round trip: rows are requested about kPrefetchBytes ahead of their use, row o of block b + ahead
// while row o of block b is used, which keeps a steady number of loads in flight. Measured on benchmarks/attention.py's
// 256 decodes × 300 keys, both builds called alternately: ≈ 10% faster than fetching whole blocks four ahead at each
// block's start; 8 KiB ahead did best at block sizes 16, 32 and 64.
constexpr int64_t kPrefetchBytes = 8192;

template <typename T>
inline int64_t prefetch_blocks(int64_t block_size, int64_t head_dim) {
  return std::max<int64_t>(1, kPrefetchBytes / (block_size * head_dim * static_cast<int64_t>(sizeof(T))));
}

template <typename T, typename F>
inline void for_each_cached_row(const T* head_cache, const int64_t* table, int64_t block_size, int64_t head_dim,
                                int64_t count, const F& fn) {
  const int64_t blocks = (count + block_size - 1) / block_size, ahead = prefetch_blocks<T>(block_size, head_dim);
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < std::min(blocks, ahead); ++b)  // the first blocks at once: nothing else is in flight yet
    prefetch_bytes(head_cache + table[b] * block_size * head_dim, block_size * row_bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    // Rows past `count` in the last block may be fetched too: they are cache memory all the same.
    const T* later = b + ahead < blocks ? head_cache + table[b + ahead] * block_size * head_dim : nullptr;
    const T* block = head_cache + table[b] * block_size * head_dim;
    const int64_t start = b * block_size, in_block = std::min(block_size, count - start);
    for (int64_t o = 0; o < in_block; ++o) {
      if (later) prefetch_bytes(later + o * head_dim, row_bytes);
      fn(start + o, block + o * head_dim);
    }
  }
}

// A KV head's cached rows as a plain cache holds them: in place, through the block table.
template <typename T>
struct PlainRows {
  const T* head;
  const int64_t* table;
  int64_t block_size;

  template <int D, typename F>
  void for_each(int64_t count, const F& fn) const {
    for_each_cached_row(head, table, block_size, D, count, fn);
  }

  template <int D, typename F>
  void range(int64_t begin, int64_t end, const F& fn) const {
    for_each_cached_row(head, table, block_size, D, end, [&](int64_t t, const T* row) {
      if (t >= begin) fn(t, row);
    });
  }
};

constexpr int64_t kMaxGroup = kMaxQueryGroup;  // query heads per KV head (paged_attention checks)
// Sequences of 2 to kMultiRowMax new tokens (speculative verify steps) take attend_rows; longer ones attend_chunk.
constexpr int64_t kMultiRowMax = 16;
// attend_rows scores up to this many (row, query head) pairs per pass over a sequence's keys: a verify step of 16
// rows for a group of 3 (the default model) in one pass.
constexpr int64_t kPassPairs = 48;
static_assert(kPassPairs >= kMaxGroup, "a runtime-sized group must fit the pass arrays");

// Scores of the group's queries (q [group, D], scaled) against the first `cached` keys of one KV head:
// scores[g * len + t], rounded to the model dtype.
template <typename T, int D, int G, typename Rows>
void score_keys(const float* q, const Rows& keys, int64_t group, int64_t cached, int64_t len, float* scores) {
  if constexpr (G > 0) group = G;
  constexpr int kChunks = D / 16;
  keys.template for_each<D>(cached, [&](int64_t t, const auto* k) {
    f32x16 key[kChunks];
    for (int c = 0; c < kChunks; ++c) key[c] = load16(k + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      f32x16 acc = load16(q + g * D) * key[0];
      for (int c = 1; c < kChunks; ++c) acc = fma16(load16(q + g * D + 16 * c), key[c], acc);
      scores[g * len + t] = rounded<T>(hsum(acc));
    }
  });
}

// acc[g * D / 16 + c] += Σ_t probs[g * len + t] · value row t, chunk c, over the first `cached` values.
template <int D, int G, typename Rows>
void weigh_values(const float* probs, const Rows& values, int64_t group, int64_t cached, int64_t len, f32x16* acc) {
  if constexpr (G > 0) group = G;
  constexpr int kChunks = D / 16;
  values.template for_each<D>(cached, [&](int64_t t, const auto* v) {
    f32x16 value[kChunks];
    for (int c = 0; c < kChunks; ++c) value[c] = load16(v + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const float p = probs[g * len + t];
      for (int c = 0; c < kChunks; ++c) acc[g * kChunks + c] = fma16(splat16(p), value[c], acc[g * kChunks + c]);
    }
  });
}

// weigh_values for `rows` consecutive rows of one sequence, pairs p = j · group + g, in one pass over the values:
// row j has base + j cached values and takes exactly the multiply-adds weigh_values would give it, in the same
// order. Values past a row's own count are skipped, not weighted by zero: a zero weight adds nothing to a finite
// sum, but 0 · inf is NaN, and skipping saves the work.
template <typename T, int D>
void weigh_values_rows(const float* probs, const T* v_head, const int64_t* table, int64_t block_size, int64_t group,
                       int64_t rows, int64_t base, int64_t len, f32x16* acc) {
  constexpr int kChunks = D / 16;
  const int64_t pairs = rows * group;
  for_each_cached_row(v_head, table, block_size, D, base + rows - 1, [&](int64_t t, const T* v) {
    f32x16 value[kChunks];
    for (int c = 0; c < kChunks; ++c) value[c] = load16(v + 16 * c);
    // Rows holding value t: base + j > t.
    for (int64_t p = std::max<int64_t>(0, t - base + 1) * group; p < pairs; ++p) {
      const float w = probs[p * len + t];
      for (int c = 0; c < kChunks; ++c) acc[p * kChunks + c] = fma16(splat16(w), value[c], acc[p * kChunks + c]);
    }
  });
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHaveDotBf16 = true;

// bf16 on CPUs with AVX512-BF16: `vdpbf16ps` multiplies bf16 pairs exactly and adds them into fp32 lanes, so keys and
// values are used as stored (no widening) and one instruction covers 32 products. The query and the probabilities
// are bf16 values already (rounded as the eager path rounds them), so their conversion is exact.

template <int D, int G>
void score_keys_bf16(const float* q, const c10::BFloat16* k_head, const int64_t* table, int64_t block_size,
                     int64_t group, int64_t cached, int64_t len, float* scores) {
  if constexpr (G > 0) group = G;
  constexpr int kParts = D / 32;  // 32 bf16 per 512-bit load
  constexpr int64_t kCapacity = G > 0 ? G : kPassPairs;  // G = 0: a decode's group or attend_rows' pairs
  __m512bh query[kCapacity][kParts];
  for (int64_t g = 0; g < group; ++g)
    for (int m = 0; m < kParts; ++m)
      query[g][m] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + g * D + 32 * m + 16), _mm512_loadu_ps(q + g * D + 32 * m));
  // Each key's 16 partial sums per query head wait here until 16 keys can be summed together.
  f32x16 partial[kCapacity][16];
  auto flush = [&](int64_t first, int64_t count) {
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = count; i < 16; ++i) partial[g][i] = f32x16{};
      const f32x16 sums = round16<c10::BFloat16>(row_sums(partial[g]));
      std::memcpy(scores + g * len + first, &sums, count * sizeof(float));
    }
  };
  for_each_cached_row(k_head, table, block_size, D, cached, [&](int64_t t, const c10::BFloat16* k) {
    __m512i key[kParts];
    for (int m = 0; m < kParts; ++m) key[m] = _mm512_loadu_si512(k + 32 * m);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), query[g][0], (__m512bh)key[0]);
      for (int m = 1; m < kParts; ++m) acc = _mm512_dpbf16_ps(acc, query[g][m], (__m512bh)key[m]);
      partial[g][t & 15] = (f32x16)acc;
    }
    if ((t & 15) == 15) flush(t - 15, 16);
  });
  if (cached & 15) flush(cached & ~int64_t{15}, cached & 15);
}

// Probabilities p[0, count) as bf16 pairs, one 32-bit word (p_t low, p_t+1 high) per even t, zero-padded: each
// value-row pair of weigh_values_bf16 then takes its weights with one broadcast. The probabilities are bf16 values
// already, so converting them is exact (denormals become zero, as vdpbf16ps would read them anyway).
inline void pack_pairs(const float* probs, int64_t count, uint32_t* pairs) {
  auto first = [](int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1); };
  for (int64_t t = 0; t < count; t += 32) {
    const __m512 low = _mm512_maskz_loadu_ps(first(count - t), probs + t);
    const __m512 high = _mm512_maskz_loadu_ps(first(count - t - 16), probs + t + 16);
    _mm512_storeu_si512(pairs + t / 2, (__m512i)_mm512_cvtne2ps_pbh(high, low));
  }
}

// Value rows `first` and `second` (nullptr: a zero row) interleaved, (first[d], second[d]) per lane, so that one
// vdpbf16ps adds p_t·v_t[d] + p_t+1·v_t+1[d] for 16 dimensions: out[c] holds dimensions 16c to 16c + 15.
template <int D>
inline void interleave_value_rows(const c10::BFloat16* first, const c10::BFloat16* second, __m512i* out) {
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int m = 0; m < D / 32; ++m) {
    const __m512i a = _mm512_loadu_si512(first + 32 * m);
    const __m512i b = second ? _mm512_loadu_si512(second + 32 * m) : _mm512_setzero_si512();
    out[2 * m] = _mm512_permutex2var_epi16(a, low, b);
    out[2 * m + 1] = _mm512_permutex2var_epi16(a, high, b);
  }
}

// prob_pairs: the group's probabilities as pack_pairs lays them out, head g's from prob_pairs + g * pair_stride.
template <int D, int G>
void weigh_values_bf16(const uint32_t* prob_pairs, int64_t pair_stride, const c10::BFloat16* v_head,
                       const int64_t* table, int64_t block_size, int64_t group, int64_t cached, f32x16* acc_out) {
  if constexpr (G > 0) group = G;
  constexpr int kChunks = D / 16;
  __m512 acc[kMaxGroup * kChunks];
  for (int64_t i = 0; i < group * kChunks; ++i) acc[i] = _mm512_setzero_ps();
  auto add_pair = [&](int64_t t, const c10::BFloat16* first, const c10::BFloat16* second) {
    __m512i pairs[kChunks];
    interleave_value_rows<D>(first, second, pairs);
    for (int64_t g = 0; g < group; ++g) {
      const __m512bh weights = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(prob_pairs[g * pair_stride + t / 2]));
      for (int c = 0; c < kChunks; ++c)
        acc[g * kChunks + c] = _mm512_dpbf16_ps(acc[g * kChunks + c], (__m512bh)pairs[c], weights);
    }
  };
  const c10::BFloat16* waiting = nullptr;
  for_each_cached_row(v_head, table, block_size, D, cached, [&](int64_t t, const c10::BFloat16* v) {
    if (waiting == nullptr) {
      waiting = v;
    } else {
      add_pair(t - 1, waiting, v);
      waiting = nullptr;
    }
  });
  if (waiting != nullptr) add_pair(cached - 1, waiting, nullptr);
  for (int64_t i = 0; i < group * kChunks; ++i) acc_out[i] = (f32x16)acc[i];
}

// weigh_values_bf16 for `rows` consecutive rows of one sequence (pairs p = j · group + g, row j holding base + j
// cached values; its probabilities packed with that count) in one pass over the values. Row j takes the value pairs
// weigh_values_bf16 would give it, in the same order: (t, t + 1) while both are its own, then, where its count is
// odd, its last value paired with a zero row; none past its count (vdpbf16ps flushes a denormal sum to a signed
// zero, which a zero-weighted later value, 0 · v = +0 for positive v, could turn from -0 to +0).
template <int D>
void weigh_values_rows_bf16(const uint32_t* prob_pairs, int64_t pair_stride, const c10::BFloat16* v_head,
                            const int64_t* table, int64_t block_size, int64_t group, int64_t rows, int64_t base,
                            f32x16* acc_out) {
  constexpr int kChunks = D / 16;
  const int64_t pairs = rows * group;
  __m512 acc[kPassPairs * kChunks];
  for (int64_t i = 0; i < pairs * kChunks; ++i) acc[i] = _mm512_setzero_ps();
  auto weigh = [&](int64_t t, const __m512i* pair_rows, int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const __m512bh weights = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(prob_pairs[p * pair_stride + t / 2]));
      for (int c = 0; c < kChunks; ++c)
        acc[p * kChunks + c] = _mm512_dpbf16_ps(acc[p * kChunks + c], (__m512bh)pair_rows[c], weights);
    }
  };
  auto add_pair = [&](int64_t t, const c10::BFloat16* first, const c10::BFloat16* second) {
    const int64_t both = std::max<int64_t>(0, t + 2 - base);  // first row whose count reaches t + 2
    const int64_t odd = t + 1 - base;                         // the row whose count is t + 1, if any
    __m512i pair_rows[kChunks];
    if (both < rows) {
      interleave_value_rows<D>(first, second, pair_rows);
      weigh(t, pair_rows, both * group, pairs);
    }
    if (odd >= 0 && odd < rows) {
      if (second != nullptr || both >= rows) interleave_value_rows<D>(first, nullptr, pair_rows);
      weigh(t, pair_rows, odd * group, (odd + 1) * group);
    }
  };
  const c10::BFloat16* waiting = nullptr;
  const int64_t count = base + rows - 1;
  for_each_cached_row(v_head, table, block_size, D, count, [&](int64_t t, const c10::BFloat16* v) {
    if (waiting == nullptr) {
      waiting = v;
    } else {
      add_pair(t - 1, waiting, v);
      waiting = nullptr;
    }
  });
  if (waiting != nullptr) add_pair(count - 1, waiting, nullptr);
  for (int64_t i = 0; i < pairs * kChunks; ++i) acc_out[i] = (f32x16)acc[i];
}
#else
constexpr bool kHaveDotBf16 = false;

// Declared only: without AVX512-BF16 the generic loops above run instead and these are never instantiated.
template <int D, int G>
void score_keys_bf16(const float* q, const c10::BFloat16* k_head, const int64_t* table, int64_t block_size,
                     int64_t group, int64_t cached, int64_t len, float* scores);
inline void pack_pairs(const float* probs, int64_t count, uint32_t* pairs);
template <int D, int G>
void weigh_values_bf16(const uint32_t* prob_pairs, int64_t pair_stride, const c10::BFloat16* v_head,
                       const int64_t* table, int64_t block_size, int64_t group, int64_t cached, f32x16* acc_out);
template <int D>
void weigh_values_rows_bf16(const uint32_t* prob_pairs, int64_t pair_stride, const c10::BFloat16* v_head,
                            const int64_t* table, int64_t block_size, int64_t group, int64_t rows, int64_t base,
                            f32x16* acc_out);
#endif

// One sequence, one KV head and the `group` query heads sharing it, for head size D: q [group, D] already scaled;
// `cached` keys before the new one, whose rows are own_k/own_v. Writes out [group, D]. scores and prob_pairs are
// working memory for group · (cached + 1) floats and group · (cached + 32) / 2 words.
// G > 0 fixes `group` at compile time (G = 0: any group), which unrolls the loops over the group's heads and keeps
// their accumulators in registers; with a runtime count they live in memory, a store and a reload around every
// multiply-add. Both builds called alternately on 256 decodes × 200 keys: 0.87× the time with each sequence's blocks
// consecutive, 0.93× with them scattered (where memory latency dominates).
template <typename T, int D, int G, typename Rows>
void attend_kv_head(const float* q, const Rows& k_rows, const Rows& v_rows, int64_t group, int64_t cached,
                    const float* own_k, const float* own_v, float* scores, uint32_t* prob_pairs, T* out) {
  if constexpr (G > 0) group = G;
  constexpr int kChunks = D / 16;
  constexpr bool kDotBf16 =
      kHaveDotBf16 && std::is_same_v<T, c10::BFloat16> && std::is_same_v<Rows, PlainRows<c10::BFloat16>>;
  const int64_t len = cached + 1;
  if constexpr (kDotBf16)
    score_keys_bf16<D, G>(q, k_rows.head, k_rows.table, k_rows.block_size, group, cached, len, scores);
  else
    score_keys<T, D, G>(q, k_rows, group, cached, len, scores);
  score_own_and_softmax<T, D>(q, own_k, group, len, scores);
  f32x16 acc[kMaxGroup * kChunks] = {};
  if constexpr (kDotBf16) {
    const int64_t pair_stride = (cached + 32) / 2;
    for (int64_t g = 0; g < group; ++g) pack_pairs(scores + g * len, cached, prob_pairs + g * pair_stride);
    weigh_values_bf16<D, G>(prob_pairs, pair_stride, v_rows.head, v_rows.table, v_rows.block_size, group, cached,
                            acc);
  } else
    weigh_values<D, G>(scores, v_rows, group, cached, len, acc);
  store_with_own<T, D>(acc, scores, len, own_v, group, out);
}

// Per-thread working memory, grown on demand and reused across tasks.
struct Scratch {
  std::vector<float> query, scores, own_k, own_v, keys_t, values, k_tile, v_tile, folded;
  std::vector<uint32_t> prob_pairs;
};

template <typename T>
T* grow(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// Everything the kernels read, as raw pointers and strides.
template <typename T>
struct Batch {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_stride, k_stride, v_stride;
  const T* k_cache;
  const T* v_cache;
  int64_t num_slots;
  const int64_t* query_starts;
  const int64_t* block_tables;
  int64_t max_blocks;
  int64_t head_tables;  // 1: block_tables is [S, kv_heads, max_blocks], a table per KV head (per-head H2O); 0: [S, ...]
  const int64_t* context_lens;
  int64_t block_size, num_heads, kv_heads, group;
  float scale;
  T* out;
  const QuantLayer<T>* quant;      // a quantized cache (k_cache and v_cache unused), or nullptr
  const int64_t* residual_slots;  // with `quant`: each sequence's residual slot
  float* mass;                    // H2O's side output [S, kv_heads, mass_entries], or nullptr
  int64_t mass_entries;
  bool exact_rows;                // every row as a one-token decode computes it: never the chunk kernel
  const int64_t* visible;         // per row: the entries it sees besides its own (-1: all before it), or nullptr

  // How many of sequence s's entries row j sees besides its own: all before it, unless a token tree says fewer.
  int64_t cached(int64_t s, int64_t j) const {
    const int64_t row = query_starts[s] + j, before = context_lens[s] - (query_starts[s + 1] - query_starts[s]) + j;
    return visible != nullptr && visible[row] >= 0 ? visible[row] : before;
  }

  // Sequence s's block table as KV head h reads it.
  const int64_t* table(int64_t s, int64_t h) const {
    return block_tables + (head_tables ? s * kv_heads + h : s) * max_blocks;
  }
};

// H2O's side output: the probability mass each of sequence s's entries received from `rows` rows of probabilities
// (row i, `stride` apart, over its first len(i) entries), summed over the rows into mass[s][h]. Each (s, h) is one
// task's alone, so no two threads add to the same entry.
template <typename T, typename Len>
void add_mass(const Batch<T>& b, int64_t s, int64_t h, const float* probs, int64_t stride, int64_t rows,
              const Len& len) {
  if (b.mass == nullptr) return;
  float* dst = b.mass + (s * b.kv_heads + h) * b.mass_entries;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = probs + r * stride;
    for (int64_t t = 0, n = len(r); t < n; ++t) dst[t] += row[t];
  }
}

// Sequence s's rows of KV head h as a query at entry `position` reads them (PlainRows or QuantRows), passed to fn.
template <typename T, int D, typename F>
void with_rows(const Batch<T>& b, int64_t s, int64_t h, int64_t position, Scratch& scratch, const F& fn) {
  const int64_t* table = b.table(s, h);
  if (b.quant == nullptr) {
    fn(PlainRows<T>{b.k_cache + h * b.num_slots * D, table, b.block_size},
       PlainRows<T>{b.v_cache + h * b.num_slots * D, table, b.block_size});
    return;
  }
  const int64_t row0 = b.query_starts[s], first_new = b.context_lens[s] - (b.query_starts[s + 1] - row0);
  const int64_t fp_from = position / b.block_size * b.block_size, slot = b.residual_slots[s];
  fn(QuantRows<T>{b.quant, true, h, table, fp_from, first_new, b.quant->residual(true, h, slot),
                  b.k + row0 * b.k_stride + h * D, b.k_stride, grow(scratch.k_tile, 3 * D + 2 * b.block_size)},
     QuantRows<T>{b.quant, false, h, table, fp_from, first_new, b.quant->residual(false, h, slot),
                  b.v + row0 * b.v_stride + h * D, b.v_stride, grow(scratch.v_tile, 3 * D + 2 * b.block_size)});
}

// Row r's query heads that share KV head h, scaled by 1/sqrt(D) and rounded to the model dtype as the eager path
// does: [group, D] fp32 into dst.
template <typename T, int D>
void scaled_queries(const Batch<T>& b, int64_t r, int64_t h, float* dst) {
  const T* q_heads = b.q + r * b.q_stride + h * b.group * D;
  for (int64_t i = 0; i < b.group * D; i += 16) {
    const f32x16 scaled = round16<T>(load16(q_heads + i) * b.scale);
    std::memcpy(dst + i, &scaled, sizeof(scaled));
  }
}

// One query row j of sequence s attended as a decode at its entry, for KV head h: the cache entries before it
// (the sequence's earlier rows of this step included; a token tree's row: the first b.cached of them) as its cached
// keys, its own key and value from k/v.
template <typename T, int D>
void attend_decode(const Batch<T>& b, int64_t s, int64_t h, int64_t j, Scratch& scratch) {
  const int64_t row0 = b.query_starts[s], r = row0 + j, group = b.group;
  const int64_t cached = b.cached(s, j), len = cached + 1;
  float* query = grow(scratch.query, group * D);
  scaled_queries<T, D>(b, r, h, query);
  float* own_k = grow(scratch.own_k, D);
  float* own_v = grow(scratch.own_v, D);
  widen(b.k + r * b.k_stride + h * D, own_k, D);
  widen(b.v + r * b.v_stride + h * D, own_v, D);
  with_rows<T, D>(b, s, h, cached, scratch, [&](const auto& k_rows, const auto& v_rows) {
    auto attend = [&](auto fixed_group) {
      attend_kv_head<T, D, decltype(fixed_group)::value>(
          query, k_rows, v_rows, group, cached, own_k, own_v, grow(scratch.scores, group * len),
          grow(scratch.prob_pairs, group * ((len + 31) / 2)), b.out + (r * b.num_heads + h * group) * D);
    };
    // Quantized rows: folded (kv_quant_decode.cpp), or dequantized by the runtime-group kernel only. Unpacking rows
    // dominates there, and every fixed group would compile the three formats' readers again (the build's time, paid
    // on every machine's first run).
    if constexpr (!std::is_same_v<std::decay_t<decltype(k_rows)>, PlainRows<T>>) {
      if (folds_decode(b.quant->bits))
        attend_decode_folded<T>(k_rows, v_rows, query, group, D, cached, own_k, own_v,
                                grow(scratch.scores, group * len), scratch.folded,
                                b.out + (r * b.num_heads + h * group) * D);
      else
        attend(std::integral_constant<int, 0>{});
    } else {
      // The group sizes of common models (SmolLM2: 3, Llama 3 8B and Mistral 7B: 4, Qwen2 0.5B: 7, ...).
      switch (group) {
        case 1: attend(std::integral_constant<int, 1>{}); break;
        case 2: attend(std::integral_constant<int, 2>{}); break;
        case 3: attend(std::integral_constant<int, 3>{}); break;
        case 4: attend(std::integral_constant<int, 4>{}); break;
        case 6: attend(std::integral_constant<int, 6>{}); break;
        case 7: attend(std::integral_constant<int, 7>{}); break;
        case 8: attend(std::integral_constant<int, 8>{}); break;
        default: attend(std::integral_constant<int, 0>{});
      }
    }
  });
  add_mass(b, s, h, scratch.scores.data(), len, group, [&](int64_t) { return len; });
}

// A few new tokens of one sequence (a speculative verify step: the last token and its draft tokens) for KV head h.
// Row j of the q_len rows is computed bit for bit as attend_decode computes a one-token sequence at its position:
// the first ctx - q_len + j cache entries (the earlier rows' keys included, stored before attention runs) as its
// cached keys, its own key and value from k/v. But the sequence's keys and values are read once per pass for all
// its rows, as a decode reads them once for its group: the (row, query head) pairs are scored together as one large
// group over the keys the last row sees, each pair's scores past its own count left unused. Only the first `spine`
// rows (a token tree's chain; all rows otherwise).
template <typename T, int D>
void attend_rows(const Batch<T>& b, int64_t s, int64_t h, int64_t spine, Scratch& scratch) {
  constexpr int kChunks = D / 16;
  constexpr bool kDotBf16 = kHaveDotBf16 && std::is_same_v<T, c10::BFloat16>;
  const int64_t row0 = b.query_starts[s], q_len = b.query_starts[s + 1] - row0, group = b.group;
  const int64_t* table = b.table(s, h);
  const T* k_head = b.k_cache + h * b.num_slots * D;
  const T* v_head = b.v_cache + h * b.num_slots * D;
  const int64_t rows_per_pass = std::max<int64_t>(1, kPassPairs / group);
  for (int64_t j0 = 0; j0 < spine; j0 += rows_per_pass) {
    const int64_t rows = std::min(rows_per_pass, spine - j0), pairs = rows * group;
    // The pass's row jj (sequence row j0 + jj) has base + jj cached keys; `keys` is the last row's count.
    const int64_t base = b.context_lens[s] - q_len + j0, keys = base + rows - 1, len = keys + 1;
    float* query = grow(scratch.query, pairs * D);
    float* own_k = grow(scratch.own_k, rows * D);
    float* own_v = grow(scratch.own_v, rows * D);
    for (int64_t jj = 0; jj < rows; ++jj) {
      const int64_t r = row0 + j0 + jj;
      scaled_queries<T, D>(b, r, h, query + jj * group * D);
      widen(b.k + r * b.k_stride + h * D, own_k + jj * D, D);
      widen(b.v + r * b.v_stride + h * D, own_v + jj * D, D);
    }
    float* scores = grow(scratch.scores, pairs * len);
    if constexpr (kDotBf16)
      score_keys_bf16<D, 0>(query, k_head, table, b.block_size, pairs, keys, len, scores);
    else
      score_keys<T, D, 0>(query, PlainRows<T>{k_head, table, b.block_size}, pairs, keys, len, scores);
    // Each pair's own key at its count (overwriting the score of the next row's key), as attend_kv_head scores it,
    // and its softmax over its own keys only.
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t cached = base + p / group;
      const float* q = query + p * D;
      const float* k = own_k + (p / group) * D;
      float own = 0.f;
      for (int d = 0; d < D; ++d) own += rounded<T>(q[d] * k[d]);
      scores[p * len + cached] = rounded<T>(own);
      softmax_inplace<T>(scores + p * len, cached + 1);
    }
    add_mass(b, s, h, scores, len, pairs, [&](int64_t p) { return base + p / group + 1; });
    f32x16 acc[kPassPairs * kChunks];
    std::fill(acc, acc + pairs * kChunks, f32x16{});
    if constexpr (kDotBf16) {
      const int64_t pair_stride = (keys + 32) / 2;
      uint32_t* prob_pairs = grow(scratch.prob_pairs, pairs * pair_stride);
      for (int64_t p = 0; p < pairs; ++p) pack_pairs(scores + p * len, base + p / group, prob_pairs + p * pair_stride);
      weigh_values_rows_bf16<D>(prob_pairs, pair_stride, v_head, table, b.block_size, group, rows, base, acc);
    } else {
      weigh_values_rows<T, D>(scores, v_head, table, b.block_size, group, rows, base, len, acc);
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t jj = p / group;
      const float p_own = scores[p * len + base + jj];
      T* out = b.out + ((row0 + j0 + jj) * b.num_heads + h * group + p % group) * D;
      for (int c = 0; c < kChunks; ++c)
        store16(out + 16 * c, round16<T>(acc[p * kChunks + c]) + round16<T>(p_own * load16(own_v + jj * D + 16 * c)));
    }
  }
}

constexpr int64_t kTileTokens = 16;  // queries of one chunk scored together against each key block
constexpr int64_t kScoreRows = 8;    // query rows per pass over a key block (8 accumulators)
constexpr int64_t kRowPad = 24;      // query rows padded to a multiple of 8 and of the value pass's 6 or 3 rows

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define TOKENMILL_NARROW_CHUNK_PASSES 1
// AVX2 builds run the fp32 chunk passes below on native 8-lane registers. Written on 16-lane values, arrays of
// accumulators did not stay in AVX2's 16 registers and the passes ran at a fifth of the eager path's speed
// (benchmarks/attention.py, its chunk cases). Each score and output element takes the same fused multiply-adds in the same
// order as on 16 lanes, so the results are bit for bit the same.
constexpr int64_t kScoreRows8 = 12;  // accumulators of the score pass (12 of the 16 ymm registers)
constexpr int64_t kValueRows8 = 6;   // rows of the value pass, each 16 lanes of the head dimension wide (12 ymm)

// scores[r][16 kb + k] = Σ_d query[r][d] · key k of block kb, d ascending, for rows [0, padded_rows).
template <int D>
void score_rows8(const float* query, const float* keys_t, int64_t padded_rows, int64_t tile_blocks,
                 int64_t padded_keys, float* scores) {
  for (int64_t r0 = 0; r0 < padded_rows; r0 += kScoreRows8)
    for (int64_t kb = 0; kb < tile_blocks; ++kb)
      for (int half = 0; half < 2; ++half) {
        const float* column = keys_t + kb * 16 * D + 8 * half;
        __m256 acc[kScoreRows8];
        for (int64_t i = 0; i < kScoreRows8; ++i) acc[i] = _mm256_setzero_ps();
        for (int d = 0; d < D; ++d) {
          const __m256 key = _mm256_loadu_ps(column + d * 16);
          for (int64_t i = 0; i < kScoreRows8; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(query + (r0 + i) * D + d), key, acc[i]);
        }
        for (int64_t i = 0; i < kScoreRows8; ++i)
          _mm256_storeu_ps(scores + (r0 + i) * padded_keys + kb * 16 + 8 * half, acc[i]);
      }
}

// out(r)[d] = Σ_t probs[r][t] · values[t][d], t ascending over [0, keys(r0)), for kValueRows8 rows from r0.
template <int D, typename Out>
void weigh_rows8(const float* probs, const float* values, int64_t r0, int64_t rows, int64_t keys,
                 int64_t padded_keys, const Out& out) {
  for (int c = 0; c < D; c += 16) {
    __m256 acc[kValueRows8][2];
    for (int64_t i = 0; i < kValueRows8; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < keys; ++t) {
      const __m256 low = _mm256_loadu_ps(values + t * D + c), high = _mm256_loadu_ps(values + t * D + c + 8);
      for (int64_t i = 0; i < kValueRows8; ++i) {
        const __m256 p = _mm256_broadcast_ss(probs + (r0 + i) * padded_keys + t);
        acc[i][0] = _mm256_fmadd_ps(p, low, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(p, high, acc[i][1]);
      }
    }
    for (int64_t i = 0; i < kValueRows8 && r0 + i < rows; ++i) {
      float* dst = out(r0 + i) + c;
      _mm256_storeu_ps(dst, acc[i][0]);
      _mm256_storeu_ps(dst + 8, acc[i][1]);
    }
  }
}
#endif
static_assert(kRowPad % 12 == 0 && kRowPad % 6 == 0, "padded rows must split into the 8-lane passes");

// One prefill chunk (sequence s, q_len > 1 new tokens) for KV head h: causal attention of its queries over the keys
// up to each one's position.
template <typename T, int D>
void attend_chunk(const Batch<T>& b, int64_t s, int64_t h, Scratch& scratch) {
  constexpr int kChunks = D / 16;
  constexpr int64_t kValueRows = 24 / kChunks;  // rows per pass over the values: 24 accumulators
  const int64_t row0 = b.query_starts[s], q_len = b.query_starts[s + 1] - row0, ctx = b.context_lens[s];
  const int64_t first_pos = ctx - q_len, group = b.group;
  const int64_t key_blocks = (ctx + 15) / 16, padded_keys = key_blocks * 16;
  const int64_t* table = b.table(s, h);

  // Keys transposed into [block of 16][D][16] and values widened to [ctx][D], fp32, once for all the chunk's tiles,
  // as a query at entry `position` reads them.
  float* keys_t = grow(scratch.keys_t, padded_keys * D);
  float* values = grow(scratch.values, ctx * D);
  std::fill(keys_t + (key_blocks - 1) * 16 * D, keys_t + key_blocks * 16 * D, 0.f);
  auto widen_entries = [&](int64_t position, int64_t begin, int64_t end) {
    with_rows<T, D>(b, s, h, position, scratch, [&](const auto& k_rows, const auto& v_rows) {
      k_rows.template range<D>(begin, end, [&](int64_t t, const auto* key) {
        float* column = keys_t + (t / 16) * 16 * D + t % 16;
        for (int d = 0; d < D; ++d) column[d * 16] = to_f(key[d]);
      });
      v_rows.template range<D>(begin, end, [&](int64_t t, const auto* value) { widen(value, values + t * D, D); });
    });
  };
  widen_entries(first_pos, 0, ctx);
  // A quantized cache: a tile's queries share one block (the one they read in full precision); the entries of the
  // blocks before it that this chunk filled are widened again from their quantized copy as the tiles pass them.
  const int64_t bs = b.block_size;
  int64_t fp_from = first_pos / bs * bs;

  const int64_t max_rows = (kTileTokens * group + kRowPad - 1) / kRowPad * kRowPad;
  float* query = grow(scratch.query, max_rows * D);
  float* scores = grow(scratch.scores, max_rows * padded_keys);
  for (int64_t j0 = 0, tokens = 0; j0 < q_len; j0 += tokens) {
    tokens = std::min(kTileTokens, q_len - j0);
    if (b.quant != nullptr) {
      tokens = std::min(tokens, bs - (first_pos + j0) % bs);
      const int64_t own = (first_pos + j0) / bs * bs;
      if (own > fp_from) widen_entries(own, fp_from, own);
      fp_from = own;
    }
    const int64_t rows = tokens * group;
    const int64_t padded_rows = (rows + kRowPad - 1) / kRowPad * kRowPad;
    const int64_t tile_keys = first_pos + j0 + tokens;  // keys the tile's last query sees
    const int64_t tile_blocks = (tile_keys + 15) / 16;
    // Row jj * group + g: token j0 + jj, query head h * group + g.
    for (int64_t jj = 0; jj < tokens; ++jj) scaled_queries<T, D>(b, row0 + j0 + jj, h, query + jj * group * D);
    std::fill(query + rows * D, query + padded_rows * D, 0.f);

#ifdef TOKENMILL_NARROW_CHUNK_PASSES
    constexpr bool narrow = std::is_same_v<T, float>;
    if constexpr (narrow) score_rows8<D>(query, keys_t, padded_rows, tile_blocks, padded_keys, scores);
#else
    constexpr bool narrow = false;
#endif
    for (int64_t r0 = 0; r0 < padded_rows && !narrow; r0 += kScoreRows) {
      for (int64_t kb = 0; kb < tile_blocks; ++kb) {
        const float* column = keys_t + kb * 16 * D;
        f32x16 acc[kScoreRows] = {};
        for (int d = 0; d < D; ++d) {
          const f32x16 key = load16(column + d * 16);
          for (int64_t i = 0; i < kScoreRows; ++i) acc[i] = fma16(splat16(query[(r0 + i) * D + d]), key, acc[i]);
        }
        for (int64_t i = 0; i < kScoreRows; ++i) {
          const f32x16 rounded_scores = round16<T>(acc[i]);
          std::memcpy(scores + (r0 + i) * padded_keys + kb * 16, &rounded_scores, sizeof(rounded_scores));
        }
      }
    }
    // Causal softmax per row; keys past a row's position (and padded rows) get probability 0 for the value pass.
    for (int64_t r = 0; r < padded_rows; ++r) {
      float* row = scores + r * padded_keys;
      const int64_t len = r < rows ? first_pos + j0 + r / group + 1 : 0;
      if (len > 0) softmax_inplace<T>(row, len);
      std::fill(row + len, row + tile_blocks * 16, 0.f);
    }
    add_mass(b, s, h, scores, padded_keys, rows, [&](int64_t r) { return first_pos + j0 + r / group + 1; });

#ifdef TOKENMILL_NARROW_CHUNK_PASSES
    if constexpr (narrow) {
      for (int64_t r0 = 0; r0 < rows; r0 += kValueRows8) {
        const int64_t last_row = std::min(r0 + kValueRows8, rows) - 1;
        weigh_rows8<D>(scores, values, r0, rows, first_pos + j0 + last_row / group + 1, padded_keys,
                       [&](int64_t r) {
                         return b.out + ((row0 + j0 + r / group) * b.num_heads + h * group + r % group) * D;
                       });
      }
      continue;
    }
#endif
    for (int64_t r0 = 0; r0 < padded_rows; r0 += kValueRows) {
      if (r0 >= rows) break;
      const int64_t last_row = std::min(r0 + kValueRows, rows) - 1;
      const int64_t keys = first_pos + j0 + last_row / group + 1;
      f32x16 acc[kValueRows][kChunks] = {};
      for (int64_t t = 0; t < keys; ++t) {
        f32x16 value[kChunks];
        for (int c = 0; c < kChunks; ++c) value[c] = load16(values + t * D + 16 * c);
        for (int64_t i = 0; i < kValueRows; ++i) {
          const float p = scores[(r0 + i) * padded_keys + t];
          for (int c = 0; c < kChunks; ++c) acc[i][c] = fma16(splat16(p), value[c], acc[i][c]);
        }
      }
      for (int64_t i = 0; i < kValueRows && r0 + i < rows; ++i) {
        const int64_t token = j0 + (r0 + i) / group, head = h * group + (r0 + i) % group;
        T* out = b.out + ((row0 + token) * b.num_heads + head) * D;
        for (int c = 0; c < kChunks; ++c) store16(out + 16 * c, acc[i][c]);
      }
    }
  }
}

// Runs fn(task, scratch) for every task on torch's threads, each thread taking the next unstarted one (largest
// first): chunk tasks differ in cost by orders of magnitude, which a static split would leave unbalanced.
template <typename F>
void run_tasks(const std::vector<int64_t>& cost, const F& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return cost[a] > cost[c]; });
  const int64_t total = std::accumulate(cost.begin(), cost.end(), int64_t{0});
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  constexpr int64_t kSerialWork = 1 << 16;  // below this, waking the pool costs more than it saves
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(order[i], scratch);
  };
  if (threads <= 1 || total < kSerialWork)
    work(0, n);
  else
    at::parallel_for(0, threads, 1, work);
}

// A task of attend_batch: KV head h of sequence s, its rows [first, end).
struct Span {
  int64_t s, h, first, end;
};

template <typename T, int D>
void attend_batch(const Batch<T>& b, int64_t num_seqs) {
  // A long run of rows attended row-exact is split into spans, so that a single long prefill chunk keeps every
  // thread busy; not with H2O's mass, which each (s, h) task adds up alone.
  const int64_t span_rows = 4 * std::max<int64_t>(1, kPassPairs / b.group);
  std::vector<Span> spans;
  std::vector<int64_t> cost;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = b.query_starts[s + 1] - b.query_starts[s];
    const bool split = q_len > kMultiRowMax && b.exact_rows && b.mass == nullptr;
    for (int64_t h = 0; h < b.kv_heads; ++h)
      for (int64_t first = 0; first < q_len; first += split ? span_rows : q_len) {
        spans.push_back({s, h, first, split ? std::min(q_len, first + span_rows) : q_len});
        cost.push_back((spans.back().end - first) * b.context_lens[s] * b.group * D);
      }
  }
  run_tasks(
      cost,
      [&](int64_t task, Scratch& scratch) {
        const auto [s, h, first, end] = spans[task];
        const int64_t q_len = b.query_starts[s + 1] - b.query_starts[s];
        if (q_len == 1) {
          attend_decode<T, D>(b, s, h, 0, scratch);
        } else if ((q_len <= kMultiRowMax && b.quant != nullptr) || (q_len > kMultiRowMax && b.exact_rows)) {
          // Quantized: rows in different blocks read a key in different precisions, so no shared pass over the
          // keys. Exact rows past a short run: attend_rows' passes of many (row, head) pairs keep their scores and
          // accumulators in memory, not registers, and were slower there than a decode per row.
          for (int64_t j = first; j < end; ++j) attend_decode<T, D>(b, s, h, j, scratch);
        } else if (q_len <= kMultiRowMax) {
          // A token tree: its chain rows share passes over the keys, each leaf (seeing a shorter prefix) is a decode.
          int64_t spine = 0;
          while (spine < q_len && b.cached(s, spine) == b.context_lens[s] - q_len + spine) ++spine;
          attend_rows<T, D>(b, s, h, spine, scratch);
          for (int64_t j = spine; j < q_len; ++j) attend_decode<T, D>(b, s, h, j, scratch);
        } else {
          attend_chunk<T, D>(b, s, h, scratch);
        }
      });
}

template <typename T>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const T* k_cache, const T* v_cache,
                  int64_t num_slots, const at::Tensor& query_starts, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, int64_t block_size, const std::optional<at::Tensor>& mass,
                  bool exact_rows, const QuantLayer<T>* quant = nullptr, const int64_t* residual_slots = nullptr,
                  const int64_t* visible = nullptr) {
  const int64_t num_heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  at::Tensor out = at::empty({q.size(0), num_heads, head_dim}, q.options());
  const Batch<T> batch{q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), q.stride(0), k.stride(0), v.stride(0),
                       k_cache, v_cache, num_slots, query_starts.data_ptr<int64_t>(), block_tables.data_ptr<int64_t>(),
                       block_tables.size(-1), block_tables.dim() == 3, context_lens.data_ptr<int64_t>(), block_size,
                       num_heads, kv_heads,
                       num_heads / kv_heads, 1.f / std::sqrt(static_cast<float>(head_dim)), out.data_ptr<T>(), quant,
                       residual_slots, mass ? mass->data_ptr<float>() : nullptr, mass ? mass->size(2) : 0,
                       exact_rows, visible};
  if (head_dim == 64)
    attend_batch<T, 64>(batch, block_tables.size(0));
  else
    attend_batch<T, 128>(batch, block_tables.size(0));
  return out;
}

// Store the step's K/V into the quantized cache (blocks it fills quantized before attention, its rows of open
// blocks into the residual slots after: attention still reads the slots' earlier rows), attending in between.
template <typename T>
at::Tensor attend_quantized(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const QuantKV& kv,
                            int64_t layer, const at::Tensor& query_starts, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const at::Tensor& residual_slots,
                            const std::optional<at::Tensor>& mass, bool exact_rows, const int64_t* visible) {
  const QuantLayer<T> quant = quant_layer<T>(kv, layer);
  const int64_t num_seqs = block_tables.size(0), kv_heads = k.size(1);
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int64_t* slots = residual_slots.data_ptr<int64_t>();
  quantize_filled_blocks<T>(quant, k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0), v.stride(0), kv_heads, num_seqs,
                            starts, block_tables.data_ptr<int64_t>(), block_tables.size(1), ctx, slots);
  at::Tensor out = attend<T>(q, k, v, nullptr, nullptr, 0, query_starts, block_tables, context_lens, kv.block_size,
                             mass, exact_rows, &quant, slots, visible);
  store_open_rows<T>(quant, k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0), v.stride(0), kv_heads, num_seqs, starts,
                     ctx, slots);
  return out;
}

// The checks both entry points make of the step's rows and sequences.
void check_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& query_starts,
                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                 const std::optional<at::Tensor>& mass) {
  for (const at::Tensor* t : {&q, &k, &v})
    TM_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2) && t->size(0) == q.size(0),
             "q, k and v must be [tokens, heads, head_dim] with contiguous heads");
  TM_CHECK(q.size(1) % k.size(1) == 0 && q.size(1) / k.size(1) <= kMaxGroup,
           "query heads must be a multiple of KV heads, at most ", kMaxGroup, " per KV head");
  TM_CHECK(q.size(2) == 64 || q.size(2) == 128, "paged attention is built for head sizes 64 and 128");
  for (const at::Tensor* t : {&k, &v})
    TM_CHECK(t->scalar_type() == q.scalar_type(), "q, k and v must share one dtype");
  TM_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
           "paged attention supports float32 and bfloat16");
  for (const at::Tensor* t : {&query_starts, &block_tables, &context_lens})
    TM_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
  const int64_t num_seqs = block_tables.size(0);
  TM_CHECK((block_tables.dim() == 2 || (block_tables.dim() == 3 && block_tables.size(1) == k.size(1))) &&
               context_lens.size(0) == num_seqs && query_starts.size(0) == num_seqs + 1,
           "one block table (or one per KV head) and context length per sequence, query_starts one longer");
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  TM_CHECK(starts[0] == 0 && starts[num_seqs] == q.size(0), "query_starts must span the batch's rows");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = starts[s + 1] - starts[s];
    TM_CHECK(q_len >= 1 && q_len <= ctx[s], "sequence ", s, " has ", q_len, " new tokens for ", ctx[s], " keys");
    TM_CHECK((ctx[s] + block_size - 1) / block_size <= block_tables.size(-1), "sequence ", s,
             "'s block table is too short for its keys");
  }
  if (mass) {
    TM_CHECK(mass->scalar_type() == at::kFloat && mass->is_contiguous() && mass->dim() == 3 &&
                 mass->size(0) == num_seqs && mass->size(1) == k.size(1),
             "attention_mass must be a contiguous float32 [sequences, kv_heads, entries] tensor");
    for (int64_t s = 0; s < num_seqs; ++s)
      TM_CHECK(ctx[s] <= mass->size(2), "attention_mass has ", mass->size(2), " entries, sequence ", s, " ",
               ctx[s]);
  }
}

// row_visible [T] int64: per row -1 (every entry before it) or how many of its sequence's first entries it sees
// instead, at most those before it; fewer only where the few-row or row-exact paths run (they honour it, the chunk
// kernel does not).
const int64_t* check_visible(const at::Tensor& row_visible, const at::Tensor& query_starts,
                             const at::Tensor& context_lens, bool exact_rows) {
  TM_CHECK(row_visible.scalar_type() == at::kLong && row_visible.is_contiguous() && row_visible.dim() == 1 &&
               row_visible.size(0) == query_starts.data_ptr<int64_t>()[query_starts.size(0) - 1],
           "row_visible must be contiguous int64, one per row");
  const int64_t* visible = row_visible.data_ptr<int64_t>();
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s + 1 < query_starts.size(0); ++s) {
    const int64_t q_len = starts[s + 1] - starts[s];
    for (int64_t j = 0; j < q_len; ++j) {
      const int64_t seen = visible[starts[s] + j], before = ctx[s] - q_len + j;
      TM_CHECK(seen == -1 || (seen >= 0 && seen <= before && (q_len <= kMultiRowMax || exact_rows)),
               "row ", j, " of sequence ", s, " cannot see ", seen, " entries (", before,
               " before it; fewer only in runs of at most ", kMultiRowMax, " rows)");
    }
  }
  return visible;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& query_starts, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, int64_t block_size,
                           const std::optional<at::Tensor>& attention_mass, bool exact_rows,
                           const std::optional<at::Tensor>& row_visible) {
  RECORD_FUNCTION("tokenmill::paged_attention", std::vector<c10::IValue>());  // named in torch profiler tables
  check_batch(q, k, v, query_starts, block_tables, context_lens, block_size, attention_mass);
  const int64_t* visible = row_visible ? check_visible(*row_visible, query_starts, context_lens, exact_rows) : nullptr;
  TM_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(),
           "caches must be contiguous [kv_heads, slots, head_dim]");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TM_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v and the caches must share one dtype");
  if (q.scalar_type() == at::kFloat)
    return attend<float>(q, k, v, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(1), query_starts,
                         block_tables, context_lens, block_size, attention_mass, exact_rows, nullptr, nullptr,
                         visible);
  return attend<c10::BFloat16>(q, k, v, k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
                               k_cache.size(1), query_starts, block_tables, context_lens, block_size, attention_mass,
                               exact_rows, nullptr, nullptr, visible);
}

at::Tensor paged_attention_quantized(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const QuantKV& kv, int64_t layer, const at::Tensor& query_starts,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     const at::Tensor& residual_slots,
                                     const std::optional<at::Tensor>& attention_mass, bool exact_rows,
                                     const std::optional<at::Tensor>& row_visible) {
  RECORD_FUNCTION("tokenmill::paged_attention_quantized", std::vector<c10::IValue>());
  check_batch(q, k, v, query_starts, block_tables, context_lens, kv.block_size, attention_mass);
  // A token tree's rows (few: drafts stay in the open block) are attended one row at a time, each over its count.
  const int64_t* visible = row_visible ? check_visible(*row_visible, query_starts, context_lens, exact_rows) : nullptr;
  TM_CHECK(block_tables.dim() == 2, "a quantized cache takes one block table per sequence");
  check_quant_kv(kv, q.scalar_type(), k.size(1), q.size(2));
  TM_CHECK(layer >= 0 && layer < kv.k_data.size(0), "no layer ", layer, " in the quantized cache");
  TM_CHECK(residual_slots.scalar_type() == at::kLong && residual_slots.is_contiguous() &&
               residual_slots.size(0) == block_tables.size(0),
           "one residual slot (int64) per sequence");
  const int64_t* slots = residual_slots.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < block_tables.size(0); ++s) {
    TM_CHECK(slots[s] >= 0 && slots[s] < kv.k_residual.size(2), "residual slot ", slots[s], " out of range");
    for (int64_t i = 0; i < (ctx[s] + kv.block_size - 1) / kv.block_size; ++i)
      TM_CHECK(tables[s * block_tables.size(1) + i] >= 0 && tables[s * block_tables.size(1) + i] < kv.k_data.size(2),
               "sequence ", s, " names a block outside the cache");
  }
  if (q.scalar_type() == at::kFloat)
    return attend_quantized<float>(q, k, v, kv, layer, query_starts, block_tables, context_lens, residual_slots,
                                   attention_mass, exact_rows, visible);
  return attend_quantized<c10::BFloat16>(q, k, v, kv, layer, query_starts, block_tables, context_lens,
                                         residual_slots, attention_mass, exact_rows, visible);
}

}  // namespace tokenmill
