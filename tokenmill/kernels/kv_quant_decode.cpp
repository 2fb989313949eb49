// Decode attention over a quantized cache without dequantizing its rows (declared in kv_quant.h).
//
// A key of an int4/int2 block has x_c = step_c · code_c + min_c per channel c, so its score is
// Σ_c q_c · x_c = Σ_c (q_c · step_c) · code_c + Σ_c q_c · min_c: the query is multiplied by the block's steps once,
// the minima give one number per block and query head, and each key costs one multiply-add per channel on its codes
// widened to fp32 (small integers, exact). int8 keys have one step per token, which multiplies the key's sum.
// Values have a step and minimum per token: Σ_t p_t · (step_t · code_t + min_t) = Σ_t (p_t · step_t) · code_t +
// Σ_t p_t · min_t, so a value row weighs its codes by p_t · step_t and the minima add one number per query head.
// Each block's codes are widened once into a tile that every query head of the group then reads from L1, so the
// heads' accumulators stay in registers although the group size is only known at run time. Dequantizing a row
// first (the prefill kernel's reader) costs a multiply-add and a rounding per channel and row on top of this, and a
// store and reload of the row. On AVX512-BF16 a bf16 model's int4/int2 codes are widened to bf16 instead (a table
// lookup of 32 codes per instruction) and multiplied by vdpbf16ps, with the folded query and weights rounded to
// bf16; value rows go in pairs, as the plain cache's bf16 kernel takes them. benchmarks/kv_quant.py --parts decode
// measures each format folded against dequantized (docs/benchmarks.md).

#include "kv_quant.h"

#include <atomic>
#include <cstdlib>
#include <string_view>

namespace tokenmill {
namespace {

std::atomic<bool> folded_decode{[] {
  const char* value = std::getenv("TOKENMILL_KV_QUANT_FOLDED");
  return value == nullptr || std::string_view(value) != "0";
}()};

// n <= 16 floats from p, the other lanes zero. (A memcpy of a variable size compiles to `rep movs`, whose start-up
// alone costs more than the 16-key pass it would serve.)
inline f32x16 load_part(const float* p, int64_t n) {
  if (n == 16) return load16(p);
  f32x16 v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

// v's first n <= 16 lanes into dst.
inline void store_part(float* dst, f32x16 v, int64_t n) {
  if (n == 16) {
    std::memcpy(dst, &v, sizeof(v));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = v[i];
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHaveDotBf16 = true;

// The bf16 bits of 0, 1, ..., 15 (the rest zero): vpermw turns 32 codes into bf16 values at once.
alignas(64) constexpr uint16_t kCodeBf16[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
                                                0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

inline __m512i code_table() { return _mm512_load_si512(kCodeBf16); }

// A key row's D codes as bf16 (exact: small integers), in channel order, into out[D].
template <int D, int BITS>
inline void bf16_key_row(const uint8_t* row, uint16_t* out, __m512i table) {
  constexpr int kPerByte = 8 / BITS, kRun = D / kPerByte;
  const __m512i mask = _mm512_set1_epi16((1 << BITS) - 1);
  if constexpr (kRun % 32 == 0) {
    for (int i = 0; i < kRun; i += 32) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
      for (int k = 0; k < kPerByte; ++k)
        _mm512_storeu_si512(out + k * kRun + i,
                            _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(bytes, BITS * k), mask), table));
    }
  } else {
    static_assert(kRun == 16, "runs of 16 or of a multiple of 32 channels");
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    for (int k = 0; k < kPerByte; ++k)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k * kRun),
                          _mm256_permutexvar_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, BITS * k),
                                                                    _mm512_castsi512_si256(mask)),
                                                   _mm512_castsi512_si256(table)));
  }
}

// Value rows a and b's codes as bf16 pairs: for each run of 16 channels c, 32 bf16 (a[c], b[c]) in channel order,
// so that one vdpbf16ps adds w_a · a[c] + w_b · b[c] to each of 16 channels. out[2 · D].
template <int D, int BITS>
inline void bf16_value_pair(const uint8_t* a, const uint8_t* b, uint16_t* out, __m512i table) {
  constexpr int kPerByte = 8 / BITS, kRun = D / kPerByte;
  static_assert(kRun % 16 == 0, "each byte's runs of channels must fill whole 16-channel vectors");
  const __m512i mask = _mm512_set1_epi16((1 << BITS) - 1);
  for (int i = 0; i < kRun; i += 16) {
    const __m128i ra = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    const __m128i rb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(ra, rb), _mm_unpacklo_epi8(ra, rb)));
    for (int k = 0; k < kPerByte; ++k)
      _mm512_storeu_si512(out + 2 * (k * kRun + i),
                          _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(bytes, BITS * k), mask), table));
  }
}
#else
constexpr bool kHaveDotBf16 = false;
#endif

template <typename T, int D, int BITS>
struct FoldedDecode {
  static constexpr int kChunks = D / 16;
  static constexpr bool kPerChannel = BITS != 8;  // int4/int2 keys: a step and a minimum per channel and block
  // bf16 models on CPUs with AVX512-BF16: int4/int2 codes widened to bf16 and multiplied by vdpbf16ps (32 products
  // per instruction), against the folded query and weights rounded to bf16. int8 codes do not fit vpermw's table.
  static constexpr bool kBf16 = kHaveDotBf16 && std::is_same_v<T, c10::BFloat16> && BITS != 8;
  static constexpr int64_t kAhead = 4;  // blocks requested ahead of use (they lie anywhere in the cache)

  const QuantRows<T>& k_rows;  // the table, head and fp_from are the same in both
  const QuantRows<T>& v_rows;
  const QuantLayer<T>& q;
  int64_t group, cached, len, blocks, bs, row_bytes;
  float* tile;    // one block's codes widened: fp32 [bs][D], or bf16 (keys [bs][D], values [bs / 2][2 · D])
  float* params;  // one block's parameters widened: per channel step[D], min[D]; per token step[bs], min[bs]

  FoldedDecode(const QuantRows<T>& k, const QuantRows<T>& v, int64_t group_, int64_t cached_,
               std::vector<float>& work)
      : k_rows(k), v_rows(v), q(*k.q), group(group_), cached(cached_), len(cached_ + 1),
        blocks(k.fp_from / k.q->block_size), bs(k.q->block_size), row_bytes(D * BITS / 8) {
    const int64_t tile_size = (bs + 1) * D;  // fp32 rows, or bf16 pairs with an odd row padded
    const int64_t params_size = 2 * D + 2 * (bs + 16);  // per channel, or per token read 16 at a time
    if (work.size() < static_cast<size_t>(tile_size + params_size)) work.resize(tile_size + params_size);
    tile = work.data();
    params = tile + tile_size;
  }

  // Block i's parameters into `params`, the blocks kAhead on requested; returns its codes.
  const uint8_t* load_block(bool keys, int64_t i) {
    const int64_t* table = k_rows.table;
    const int64_t head = k_rows.head, id = table[i], param_count = keys ? q.k_params : q.v_params;
    for (int64_t next = i + (i == 0 ? 1 : kAhead); next <= std::min(i + kAhead, blocks - 1); ++next) {
      prefetch_bytes(q.data(keys, head, table[next]), bs * row_bytes);
      prefetch_bytes(q.params(keys, head, table[next]), param_count * 2);
    }
    const at::Half* stored = q.params(keys, head, id);
    if ((keys && kPerChannel) || BITS == 8) {  // step[D], min[D] per channel; or one step per token
      widen_half(stored, params, param_count);
    } else {  // (step, min) per token, interleaved: split into step[bs] and min[bs] (at params + bs + 16)
      float* pairs = params + 2 * D;
      widen_half(stored, pairs, 2 * bs);
      for (int64_t o = 0; o < bs; ++o) params[o] = pairs[2 * o], params[bs + 16 + o] = pairs[2 * o + 1];
    }
    return q.data(keys, head, id);
  }

  // Query head g times the block's steps (int4/int2; int8: the query itself) into folded[kChunks], and what the
  // minima add to each of its scores.
  float fold_query(const float* qg, f32x16* folded) const {
    f32x16 bias = {};
    for (int c = 0; c < kChunks; ++c) {
      if constexpr (kPerChannel) {
        folded[c] = load16(qg + 16 * c) * load16(params + 16 * c);
        bias = fma16(load16(qg + 16 * c), load16(params + D + 16 * c), bias);
      } else {
        folded[c] = load16(qg + 16 * c);
      }
    }
    return kPerChannel ? hsum(bias) : 0.f;
  }

  // 16 keys' partial sums (lanes of each still to be added), the last rows' zero, into scores rounded.
  void finish_scores(f32x16* partial, int64_t o0, int64_t n, float offset, float* dst) const {
#if defined(__AVX512F__)
    for (int64_t r = n; r < 16; ++r) partial[r] = f32x16{};
    f32x16 sums = row_sums(partial);
#else
    // Narrower registers: the tree's 16-lane shuffles cross register halves; a sum per key costs less there.
    f32x16 sums = {};
    for (int64_t r = 0; r < n; ++r) sums[r] = hsum(partial[r]);
#endif
    sums = kPerChannel ? sums + offset : sums * load_part(params + o0, n);
    store_part(dst + o0, round16<T>(sums), n);
  }

  void score_block(int64_t i, const float* query, float* scores) {
    const uint8_t* data = load_block(true, i);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if constexpr (kBf16) {
      uint16_t* keys = reinterpret_cast<uint16_t*>(tile);
      const __m512i table = code_table();
      for (int64_t o = 0; o < bs; ++o) bf16_key_row<D, BITS>(data + o * row_bytes, keys + o * D, table);
      for (int64_t g = 0; g < group; ++g) {
        f32x16 folded[kChunks];
        const float offset = fold_query(query + g * D, folded);
        __m512bh qb[D / 32];
        for (int m = 0; m < D / 32; ++m) qb[m] = _mm512_cvtne2ps_pbh((__m512)folded[2 * m + 1], (__m512)folded[2 * m]);
        for (int64_t o0 = 0; o0 < bs; o0 += 16) {
          const int64_t n = std::min<int64_t>(16, bs - o0);
          f32x16 partial[16];
          for (int64_t r = 0; r < n; ++r) {
            const uint16_t* key = keys + (o0 + r) * D;
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[0], (__m512bh)_mm512_loadu_si512(key));
            for (int m = 1; m < D / 32; ++m)
              acc = _mm512_dpbf16_ps(acc, qb[m], (__m512bh)_mm512_loadu_si512(key + 32 * m));
            partial[r] = (f32x16)acc;
          }
          finish_scores(partial, o0, n, offset, scores + g * len + i * bs);
        }
      }
      return;
    }
#endif
    for (int64_t o = 0; o < bs; ++o) unpack_codes<D, BITS>(data + o * row_bytes, tile + o * D);
    for (int64_t g = 0; g < group; ++g) {
      f32x16 folded[kChunks];
      const float offset = fold_query(query + g * D, folded);
      for (int64_t o0 = 0; o0 < bs; o0 += 16) {
        const int64_t n = std::min<int64_t>(16, bs - o0);
        f32x16 partial[16];
        for (int64_t r = 0; r < n; ++r) {
          const float* key = tile + (o0 + r) * D;
          f32x16 acc = folded[0] * load16(key);
          for (int c = 1; c < kChunks; ++c) acc = fma16(folded[c], load16(key + 16 * c), acc);
          partial[r] = acc;
        }
        finish_scores(partial, o0, n, offset, scores + g * len + i * bs);
      }
    }
  }

  // scores[g * len + t] for t < cached, rounded to the model dtype.
  void score(const float* query, float* scores) {
    for (int64_t i = 0; i < blocks; ++i) score_block(i, query, scores);
    for (int64_t t = blocks * bs; t < cached; ++t) {  // the row's own block, in full precision
      const T* key = k_rows.template full<D>(t);
      for (int64_t g = 0; g < group; ++g) {
        f32x16 acc = load16(query + g * D) * load16(key);
        for (int c = 1; c < kChunks; ++c) acc = fma16(load16(query + g * D + 16 * c), load16(key + 16 * c), acc);
        scores[g * len + t] = rounded<T>(hsum(acc));
      }
    }
  }

  // Block i's values weighed by probs (its bs probabilities per query head, len apart) into acc; what the values'
  // minima add, per head, into offset.
  void weigh_block(int64_t i, const float* probs, f32x16* acc, float* offset) {
    const uint8_t* data = load_block(false, i);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if constexpr (kBf16) {
      uint16_t* pairs = reinterpret_cast<uint16_t*>(tile);
      const __m512i table = code_table();
      alignas(64) static const uint8_t kZeroRow[64] = {};
      for (int64_t o = 0; o < bs; o += 2)
        bf16_value_pair<D, BITS>(data + o * row_bytes, o + 1 < bs ? data + (o + 1) * row_bytes : kZeroRow,
                                 pairs + o * D, table);
      for (int64_t g = 0; g < group; ++g) {
        const float* p = probs + g * len + i * bs;
        __m512 a[2][kChunks];  // even and odd pairs apart: one chain per chunk would wait on each result
        for (int c = 0; c < kChunks; ++c) a[0][c] = a[1][c] = _mm512_setzero_ps();
        f32x16 minima = {};
        for (int64_t o0 = 0; o0 < bs; o0 += 16) {
          const int64_t n = std::min<int64_t>(16, bs - o0);
          const f32x16 pw = load_part(p + o0, n);
          minima = fma16(pw, load_part(params + bs + 16 + o0, n), minima);
          alignas(32) uint32_t weights[8];  // (w_t, w_t+1) as bf16 pairs
          _mm256_store_si256(reinterpret_cast<__m256i*>(weights),
                             (__m256i)_mm512_cvtneps_pbh((__m512)(pw * load_part(params + o0, n))));
          for (int64_t j = 0; j < (n + 1) / 2; j += 2) {  // pairs j and j + 1 (none past the block's end)
            const uint16_t* pair = pairs + (o0 + 2 * j) * D;
            const bool second = 2 * j + 2 < n;
            const __m512bh w0 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(weights[j]));
            const __m512bh w1 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(second ? weights[j + 1] : 0));
            for (int c = 0; c < kChunks; ++c) {
              a[0][c] = _mm512_dpbf16_ps(a[0][c], (__m512bh)_mm512_loadu_si512(pair + 32 * c), w0);
              if (second) a[1][c] = _mm512_dpbf16_ps(a[1][c], (__m512bh)_mm512_loadu_si512(pair + 2 * D + 32 * c), w1);
            }
          }
        }
        for (int c = 0; c < kChunks; ++c) acc[g * kChunks + c] += (f32x16)a[0][c] + (f32x16)a[1][c];
        offset[g] += hsum(minima);
      }
      return;
    }
#endif
    for (int64_t o = 0; o < bs; ++o) unpack_codes<D, BITS>(data + o * row_bytes, tile + o * D);
    for (int64_t g = 0; g < group; ++g) {
      const float* p = probs + g * len + i * bs;
      f32x16 a[2][kChunks] = {};  // even and odd rows apart: one chain per chunk would wait on each result
      f32x16 minima = {};
      for (int64_t o0 = 0; o0 < bs; o0 += 16) {
        const int64_t n = std::min<int64_t>(16, bs - o0);
        const f32x16 pw = load_part(p + o0, n);
        const f32x16 weights = pw * load_part(params + o0, n);
        if constexpr (BITS != 8) minima = fma16(pw, load_part(params + bs + 16 + o0, n), minima);
        for (int64_t r = 0; r < n; r += 2) {  // n is 1 or even (block sizes are powers of two)
          const float* value = tile + (o0 + r) * D;
          const f32x16 w0 = splat16(weights[r]), w1 = splat16(n > 1 ? weights[r + 1] : 0.f);
          for (int c = 0; c < kChunks; ++c) {
            a[0][c] = fma16(w0, load16(value + 16 * c), a[0][c]);
            if (n > 1) a[1][c] = fma16(w1, load16(value + D + 16 * c), a[1][c]);
          }
        }
      }
      for (int c = 0; c < kChunks; ++c) acc[g * kChunks + c] += a[0][c] + a[1][c];
      if constexpr (BITS != 8) offset[g] += hsum(minima);
    }
  }

  // acc[g * kChunks + c] = Σ_t probs[g * len + t] · value t, chunk c, over t < cached.
  void weigh(const float* probs, f32x16* acc) {
    float offset[kMaxQueryGroup] = {};
    for (int64_t i = 0; i < blocks; ++i) weigh_block(i, probs, acc, offset);
    for (int64_t g = 0; g < group; ++g)
      for (int c = 0; c < kChunks; ++c) acc[g * kChunks + c] = acc[g * kChunks + c] + offset[g];
    for (int64_t t = blocks * bs; t < cached; ++t) {
      const T* value = v_rows.template full<D>(t);
      f32x16 row[kChunks];
      for (int c = 0; c < kChunks; ++c) row[c] = load16(value + 16 * c);
      for (int64_t g = 0; g < group; ++g) {
        const f32x16 w = splat16(probs[g * len + t]);
        for (int c = 0; c < kChunks; ++c) acc[g * kChunks + c] = fma16(w, row[c], acc[g * kChunks + c]);
      }
    }
  }

  void run(const float* query, const float* own_k, const float* own_v, float* scores, T* out) {
    score(query, scores);
    score_own_and_softmax<T, D>(query, own_k, group, len, scores);
    f32x16 acc[kMaxQueryGroup * kChunks] = {};
    weigh(scores, acc);
    store_with_own<T, D>(acc, scores, len, own_v, group, out);
  }
};

template <typename T, int D>
void attend_bits(const QuantRows<T>& keys, const QuantRows<T>& values, const float* query, int64_t group,
                 int64_t cached, const float* own_k, const float* own_v, float* scores, std::vector<float>& work,
                 T* out) {
  switch (keys.q->bits) {
    case 8: FoldedDecode<T, D, 8>(keys, values, group, cached, work).run(query, own_k, own_v, scores, out); break;
    case 4: FoldedDecode<T, D, 4>(keys, values, group, cached, work).run(query, own_k, own_v, scores, out); break;
    default: FoldedDecode<T, D, 2>(keys, values, group, cached, work).run(query, own_k, own_v, scores, out);
  }
}

}  // namespace

template <typename T>
void attend_decode_folded(const QuantRows<T>& keys, const QuantRows<T>& values, const float* query, int64_t group,
                          int64_t head_dim, int64_t cached, const float* own_k, const float* own_v, float* scores,
                          std::vector<float>& work, T* out) {
  if (head_dim == 64)
    attend_bits<T, 64>(keys, values, query, group, cached, own_k, own_v, scores, work, out);
  else
    attend_bits<T, 128>(keys, values, query, group, cached, own_k, own_v, scores, work, out);
}

bool kv_quant_folded(int64_t on) {
  if (on >= 0) folded_decode.store(on != 0, std::memory_order_relaxed);
  return folded_decode.load(std::memory_order_relaxed);
}

bool folds_decode(int64_t bits) {
#if defined(__AVX512F__)
  return kv_quant_folded();
#else
  // int8 rows folded measured slower than dequantized on 8-lane registers (docs/benchmarks.md, the quantized decode).
  return bits != 8 && kv_quant_folded();
#endif
}

#define TOKENMILL_INSTANTIATE(T)                                                                                      \
  template void attend_decode_folded<T>(const QuantRows<T>&, const QuantRows<T>&, const float*, int64_t, int64_t,     \
                                        int64_t, const float*, const float*, float*, std::vector<float>&, T*);
TOKENMILL_INSTANTIATE(float)
TOKENMILL_INSTANTIATE(c10::BFloat16)
#undef TOKENMILL_INSTANTIATE

}  // namespace tokenmill
