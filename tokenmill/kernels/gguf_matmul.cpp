// Matmuls over the GGUF file's own Q4 (Q4_0, Q4_1, Q4_K) and 8-bit-code (Q8_0, Q5_0, Q6_K) blocks, with the file's
// exact weights.
//
// Why our own kernel: PyTorch's int4 weight-only kernel takes bf16 scales and zeros, so running the file's Q4_1 codes
// through it rounds every block's f16 scale and minimum to 8 significant bits, and its int8 kernel has one scale per
// row where Q8_0 has one per 32 weights. Here each weight is the file's d · q + m with d and m the stored f16 values.
//
// Arithmetic: activations are bf16 and the codes are small integers, which bf16 holds exactly, so AVX512-BF16 dot
// products give exact x · q products summed in fp32. Without AVX512-BF16, AVX2 + FMA (or NEON on aarch64,
// gguf_neon.h) widens codes and activations to fp32 (the products are still exact) and sums with FMAs; other CPUs run
// a portable loop with the same arithmetic.
// The three paths sum in different orders, so they agree to fp32 rounding, not bit for bit. Each 32-weight block's
// sum is scaled by its d in fp32 and a Q4 block adds m · Σx. Within a path every output element goes through the same
// sequence of operations whatever the batch size or the thread count, so results are batch invariant.
//
// Layout (made by tokenmill/model/linear.py): weight rows in tiles of 16, and within a tile and a block, the codes of
// the 16 rows for k-pairs (2j, 2j + 1) side by side, so one dot-product instruction advances 16 output rows by two
// inputs and the accumulator lanes are the outputs themselves (no horizontal sums, one vector store per 16 outputs).
// A Q4 tile-block is 8 chunks of 32 bytes: byte 2r + e of chunk c holds row r's code for k = 2c + e in its low nibble
// and for k = 16 + 2c + e in its high one; the nibbles index a 16-entry bf16 table (vpermw). A Q8 tile-block is 16
// chunks of 32 int8 codes, byte 2r + e of chunk j for k = 2j + e. Scales (and Q4 minimums) are [tiles, blocks, 16],
// f16 as the file stores them, or fp32 for Q4_K (a sub-block's d · sc is exact in fp32 only). Q6_K's sub-blocks of
// 16 give a Q8 tile-block two scales, one for chunks 0-7 and one for chunks 8-15, each d · sc formed in fp32 from
// the super-block's f16 d and the sub-block's int8 sc as stored (gguf_layout.h: 8.56 bits per weight in all).
//
// int8 activations (the second mode, `int8_activations`): each row of activations is rounded per block of 32 to int8
// codes with an fp32 scale (amax / 127), as llama.cpp does for its Q8 dot products, so the weights stay the file's
// while the products become integer dot products (AVX2 vpmaddubsw / vpmaddwd on 8 rows per vector; AVX-512 VNNI's
// fused vpdpbusd (Q4: four products per lane) or vpdpwssd (Q8: two) on a whole 16-row tile per vector; NEON's SDOT,
// four products per lane, on 4 rows per vector), several times fewer instructions than widening every code to fp32.
// The integer sums are exact; each block adds float(Σ q·c) · (d · dx) and, for Q4, m · dx · Σc. Every path (AVX-512,
// AVX2, NEON, the portable loop) performs the same fp32 operations in the same order, so they agree bit for bit, and
// the mode is batch invariant like the other. The result is the exact product of the file's weights with the
// rounded activations; its effect on quality is measured (benchmarks/cpu_decode.py, docs/benchmarks.md). The rounding
// itself (gguf_quantize.h) runs in vectors where the level has them, and across threads for many rows, with the
// portable loop's bits.
//
// Speed: one decode token reads each weight once, so with one activation row the unpacking has to keep up with
// memory; with many rows each unpacked chunk is reused by up to kActTile of them, and a group of kTileGroup row tiles
// stays in cache while all activation tiles pass over it.

#include "gguf_matmul.h"
#include "check.h"

#include "gguf_layout.h"
#include "gguf_quantize.h"
#include "gguf_neon.h"  // TOKENMILL_GGUF_NEON and TOKENMILL_GGUF_INT8_NEON on aarch64

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The instruction set the tiles below are built for: AVX512-BF16 dot products, AVX2 + FMA, NEON (gguf_neon.h), or
// portable C++.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TOKENMILL_GGUF_AVX512BF16 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TOKENMILL_GGUF_AVX2 1
#endif
// The int8-activation tiles need integer dot products only: 16-lane tiles on VNNI's fused vpdpwssd where the level
// has it (avx512bf16, avx512vnni), 8-lane AVX2 tiles from avx2 up. Without VNNI a 16-lane tile needs a vpmaddwd and
// a vpaddd per dot product, on the two ports Intel cores keep for 512-bit work, and measured slower than the AVX2
// tiles at few rows (benchmarks/gguf_tiles.py, docs/benchmarks.md), so the avx512 level keeps the AVX2 ones.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TOKENMILL_GGUF_INT8_AVX512 1
#elif defined(__AVX2__) && defined(__F16C__)
#define TOKENMILL_GGUF_INT8_AVX2 1
#endif

namespace tokenmill {
namespace {

using gguf::kBlock;
using gguf::kQ4TileBlockBytes;
using gguf::kQ8TileBlockBytes;
using gguf::kRows;
constexpr int64_t kTileGroup = 4;          // row tiles kept in cache while every activation tile passes over them
constexpr int kActTile = 6;                // activation rows sharing one unpacked chunk (registers: 2 chains each)
// Calls with at most this many activation rows prefetch the weights (gguf_layout.h, kPrefetchAhead); with more the
// tiles are bound by their arithmetic, and prefetching measured slower there (the AVX2 int8 LM head at 32-64 rows).
// gguf_prefetch_rows() changes it (0: off), for A/B runs.
std::atomic<int64_t> prefetch_rows{16};
constexpr int64_t kSerialWork = 1 << 18;   // multiply-adds below which waking the thread pool costs more than it saves
using gguf::kQ8Pairs;
using gguf::kScaleGroups;
using gguf::prefetch_ahead;
using gguf::Q6KTileScales;
using gguf::bf16_bits_to_float;

// The 8-lane AVX2 tiles and the NEON tiles (both modes) pass over an unpacked chunk with this many activation rows at
// a time: the vector registers (16 on AVX2, 32 on NEON) hold their sums beside the codes.
constexpr int kRowGroup = 3;

// Runs kernel(integral_constant<int, n>, first_row) over act_rows in groups of at most kRowGroup.
template <typename Kernel>
void in_row_groups(int act_rows, const Kernel& kernel) {
  static_assert(kRowGroup == 3, "in_row_groups lists every group size up to kRowGroup");
  for (int i = 0; i < act_rows; i += kRowGroup) {
    switch (std::min(kRowGroup, act_rows - i)) {
      case 1: kernel(std::integral_constant<int, 1>{}, i); break;
      case 2: kernel(std::integral_constant<int, 2>{}, i); break;
      default: kernel(std::integral_constant<int, 3>{}, i); break;
    }
  }
}

// Calls kernel(std::integral_constant<int, tile>) so the tile size is a compile-time constant.
template <typename Kernel>
void with_tile(int tile, const Kernel& kernel) {
  static_assert(kActTile == 6, "with_tile lists every tile size up to kActTile");
  switch (tile) {
    case 1: kernel(std::integral_constant<int, 1>{}); break;
    case 2: kernel(std::integral_constant<int, 2>{}); break;
    case 3: kernel(std::integral_constant<int, 3>{}); break;
    case 4: kernel(std::integral_constant<int, 4>{}); break;
    case 5: kernel(std::integral_constant<int, 5>{}); break;
    default: kernel(std::integral_constant<int, 6>{}); break;
  }
}

#if defined(__AVX512F__)
// Sixteen f16 scales (or minimums) of a tile-block as fp32 lanes.
inline __m512 widen_scales(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 widen_scales(const float* p) { return _mm512_loadu_ps(p); }
#endif
#if defined(__AVX2__) && defined(__F16C__)
// Eight f16 scales (or minimums) of a tile-block as fp32 lanes.
inline __m256 half_scales(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 half_scales(const float* p) { return _mm256_loadu_ps(p); }
#endif

// The scales of part `part` of a Q8 tile-block b (rows as lanes): the stored f16 per block (Q8_0, Q5_0), or Q6_K's
// d · sc of that sub-block, the same fp32 values on every path (the products are exact).
#if defined(__AVX512F__)
inline __m512 part_scales(const at::Half* d, int64_t b, int) { return widen_scales(d + b * kRows); }
inline __m512 part_scales(const Q6KTileScales& s, int64_t b, int part) {
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc(b, part)));
  return _mm512_mul_ps(widen_scales(reinterpret_cast<const at::Half*>(s.d_bits(b))),
                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
}
#endif
#if defined(__AVX2__) && defined(__F16C__)
// Rows 8h..8h+7 of them.
inline __m256 part_scales8(const at::Half* d, int64_t b, int, int h) { return half_scales(d + b * kRows + 8 * h); }
inline __m256 part_scales8(const Q6KTileScales& s, int64_t b, int part, int h) {
  const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.sc(b, part) + 8 * h));
  return _mm256_mul_ps(half_scales(reinterpret_cast<const at::Half*>(s.d_bits(b)) + 8 * h),
                       _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
}
#endif
// Row r's.
inline float part_scale(const at::Half* d, int64_t b, int, int64_t r) { return static_cast<float>(d[b * kRows + r]); }
inline float part_scale(const Q6KTileScales& s, int64_t b, int part, int64_t r) {
  at::Half d;
  std::memcpy(&d, s.d_bits(b) + 2 * r, sizeof d);
  return static_cast<float>(d) * static_cast<float>(s.sc(b, part)[r]);
}

// Runs fn(first_tile, end_tile) over row tiles, split across torch's thread pool when the matmul is large enough.
template <typename F>
void over_row_tiles(int64_t tiles, int64_t work, const F& fn) {
  if (work < kSerialWork) {
    fn(0, tiles);
    return;
  }
  at::parallel_for(0, tiles, 1, fn);
}

// y[:, rows of tiles [begin, end)]: tile_kernel(tile, i0, act_rows, prefetch, out) fills out[act_rows][16] in fp32;
// `prefetch` is set on the weights' first pass (i0 == 0) of a call with at most prefetch_rows activation rows.
template <typename Out, typename TileKernel>
void tiled(int64_t M, int64_t N, int64_t begin, int64_t end, Out* y, const TileKernel& tile_kernel) {
  const bool stream = M <= prefetch_rows.load(std::memory_order_relaxed);
  float out[kActTile * kRows];
  for (int64_t g = begin; g < end; g += kTileGroup) {
    const int64_t g_end = std::min(end, g + kTileGroup);
    for (int64_t i0 = 0; i0 < M; i0 += kActTile) {
      const int act_rows = static_cast<int>(std::min<int64_t>(kActTile, M - i0));
      for (int64_t t = g; t < g_end; ++t) {
        tile_kernel(t, i0, act_rows, stream && i0 == 0, out);
        const int64_t n0 = t * kRows, valid = std::min(kRows, N - n0);
        for (int i = 0; i < act_rows; ++i)
          for (int64_t r = 0; r < valid; ++r) y[(i0 + i) * N + n0 + r] = Out(out[i * kRows + r]);
      }
    }
  }
}

#if defined(TOKENMILL_GGUF_AVX512BF16)

// bf16 bit patterns of 0..15, indexed by a word's low 5 bits (16..31 repeat them).
inline __m512i code_table() {
  alignas(64) uint16_t bits[32];
  for (int i = 0; i < 32; ++i) {
    const float value = static_cast<float>(i % 16);
    uint32_t wide;
    std::memcpy(&wide, &value, sizeof wide);
    bits[i] = static_cast<uint16_t>(wide >> 16);  // exact: at most 4 significant bits
  }
  return _mm512_load_si512(bits);
}

inline __m512bh pair_of(const uint16_t* x, int64_t k) {
  int32_t both;
  std::memcpy(&both, x + k, sizeof both);
  return (__m512bh)_mm512_set1_epi32(both);
}

// One Q4 row tile against Tile activation rows (x: stride K; sums: each block's Σx, stride blocks).
template <int Tile, typename S>
void q4_tile(const uint8_t* w, const S* d, const S* m, int64_t blocks, const uint16_t* x, int64_t K,
             const float* sums, float* out, bool prefetch) {
  const __m512i table = code_table(), low_nibble = _mm512_set1_epi16(0x0F);
  __m512 acc[Tile];
  for (int i = 0; i < Tile; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    // Two dot-product chains per activation row (low and high nibbles) halve the latency each block waits on.
    __m512 low[Tile], high[Tile];
    for (int i = 0; i < Tile; ++i) low[i] = high[i] = _mm512_setzero_ps();
    const uint8_t* chunk = w + b * kQ4TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(chunk);
    for (int64_t c = 0; c < 8; ++c) {
      const __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * c)));
      const __m512bh w_low = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(codes, low_nibble), table);
      const __m512bh w_high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table);
      for (int i = 0; i < Tile; ++i) {
        const uint16_t* xb = x + i * K + b * kBlock;
        low[i] = _mm512_dpbf16_ps(low[i], pair_of(xb, 2 * c), w_low);
        high[i] = _mm512_dpbf16_ps(high[i], pair_of(xb, 16 + 2 * c), w_high);
      }
    }
    const __m512 scale = widen_scales(d + b * kRows), minimum = widen_scales(m + b * kRows);
    for (int i = 0; i < Tile; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_add_ps(low[i], high[i]), scale, acc[i]);
      acc[i] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(sums[i * blocks + b]), acc[i]);
    }
  }
  for (int i = 0; i < Tile; ++i) _mm512_storeu_ps(out + i * kRows, acc[i]);
}

// One Q8 row tile against Tile activation rows, one scale per 32 / Groups weights (Groups 2: Q6_K's sub-blocks of
// 16, kQ8Pairs<2> chunks each). Codes widen to fp32 and pack to bf16 (exact for -128..127).
template <int Tile, typename Scales>
void q8_tile(const int8_t* w, const Scales& d, int64_t blocks, const uint16_t* x, int64_t K, float* out,
             bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  __m512 acc[Tile];
  for (int i = 0; i < Tile; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* chunk = w + b * kQ8TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(chunk);
    for (int part = 0; part < Groups; ++part) {
      __m512 even[Tile], odd[Tile];
      for (int i = 0; i < Tile; ++i) even[i] = odd[i] = _mm512_setzero_ps();
      for (int64_t j = part * kQ8Pairs<Groups>; j < (part + 1) * kQ8Pairs<Groups>; ++j) {
        const __m128i* p = reinterpret_cast<const __m128i*>(chunk + 32 * j);
        const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
        const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
        const __m512bh codes = _mm512_cvtne2ps_pbh(second, first);
        for (int i = 0; i < Tile; ++i) {
          __m512& chain = (j % 2 == 0) ? even[i] : odd[i];
          chain = _mm512_dpbf16_ps(chain, pair_of(x + i * K + b * kBlock, 2 * j), codes);
        }
      }
      const __m512 scale = part_scales(d, b, part);
      for (int i = 0; i < Tile; ++i) acc[i] = _mm512_fmadd_ps(_mm512_add_ps(even[i], odd[i]), scale, acc[i]);
    }
  }
  for (int i = 0; i < Tile; ++i) _mm512_storeu_ps(out + i * kRows, acc[i]);
}

#elif defined(TOKENMILL_GGUF_AVX2)

// AVX2 + FMA: no bf16 dot products, so codes widen to fp32 (exact) and multiply the activations widened to fp32
// (exact products: at most 8 + 8 significant bits), summed in fp32 with FMAs. A row tile is two 8-lane vectors.

// Bytes of a chunk are (row r, e) at 2r + e: this puts each 128-bit lane's 8 rows of e = 0 before its 8 of e = 1.
inline __m256i split_pairs(__m256i bytes) {
  const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm256_shuffle_epi8(bytes, order);
}

// w[e][h]: rows 8h..8h+7 of the codes for k-offset e, from split_pairs output; Signed picks int8 or unsigned codes.
template <bool Signed>
inline void widen_split(__m256i split, __m256 w[2][2]) {
  const __m128i lanes[2] = {_mm256_castsi256_si128(split), _mm256_extracti128_si256(split, 1)};
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 2; ++e) {
      const __m128i eight = e == 0 ? lanes[h] : _mm_srli_si128(lanes[h], 8);
      w[e][h] = _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight));
    }
}

// dot[i][h] += w[e][h] · x_i[k + e] for both e.
template <int Tile>
inline void fma_pair(const __m256 w[2][2], const float* x, int64_t K, int64_t k, __m256 dot[][2]) {
  for (int e = 0; e < 2; ++e)
    for (int i = 0; i < Tile; ++i) {
      const __m256 xs = _mm256_broadcast_ss(x + i * K + k + e);
      dot[i][0] = _mm256_fmadd_ps(w[e][0], xs, dot[i][0]);
      dot[i][1] = _mm256_fmadd_ps(w[e][1], xs, dot[i][1]);
    }
}

// One Q4 row tile against Tile activation rows (x: fp32, stride K; sums: each block's Σx, stride blocks).
template <int Tile, typename S>
void q4_tile_avx2(const uint8_t* w, const S* d, const S* m, int64_t blocks, const float* x, int64_t K,
                  const float* sums, float* out, bool prefetch) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[Tile][2];
  for (int i = 0; i < Tile; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 dot[Tile][2];
    for (int i = 0; i < Tile; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_ps();
    const uint8_t* chunk = w + b * kQ4TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(chunk);
    const float* xb = x + b * kBlock;
    for (int64_t c = 0; c < 8; ++c) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * c));
      __m256 wk[2][2];
      widen_split<false>(split_pairs(_mm256_and_si256(bytes, low_nibble)), wk);
      fma_pair<Tile>(wk, xb, K, 2 * c, dot);
      widen_split<false>(split_pairs(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble)), wk);
      fma_pair<Tile>(wk, xb, K, 16 + 2 * c, dot);
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 scale = half_scales(d + b * kRows + 8 * h), minimum = half_scales(m + b * kRows + 8 * h);
      for (int i = 0; i < Tile; ++i) {
        acc[i][h] = _mm256_fmadd_ps(dot[i][h], scale, acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(sums[i * blocks + b]), acc[i][h]);
      }
    }
  }
  for (int i = 0; i < Tile; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + i * kRows + 8 * h, acc[i][h]);
}

// One Q8 row tile against Tile activation rows, one scale per 32 / Groups weights.
template <int Tile, typename Scales>
void q8_tile_avx2(const int8_t* w, const Scales& d, int64_t blocks, const float* x, int64_t K, float* out,
                  bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  __m256 acc[Tile][2];
  for (int i = 0; i < Tile; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* chunk = w + b * kQ8TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(chunk);
    for (int part = 0; part < Groups; ++part) {
      __m256 dot[Tile][2];
      for (int i = 0; i < Tile; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_ps();
      for (int64_t j = part * kQ8Pairs<Groups>; j < (part + 1) * kQ8Pairs<Groups>; ++j) {
        __m256 wk[2][2];
        widen_split<true>(split_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * j))), wk);
        fma_pair<Tile>(wk, x + b * kBlock, K, 2 * j, dot);
      }
      for (int h = 0; h < 2; ++h) {
        const __m256 scale = part_scales8(d, b, part, h);
        for (int i = 0; i < Tile; ++i) acc[i][h] = _mm256_fmadd_ps(dot[i][h], scale, acc[i][h]);
      }
    }
  }
  for (int i = 0; i < Tile; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + i * kRows + 8 * h, acc[i][h]);
}

#elif !defined(TOKENMILL_GGUF_NEON)

// Portable fallback with the same arithmetic (per-block fp32 sums scaled by d), without the vector instructions.
template <typename S>
void q4_tile_scalar(const uint8_t* w, const S* d, const S* m, int64_t blocks, const uint16_t* x,
                    int64_t K, const float* sums, int act_rows, float* out) {
  for (int i = 0; i < act_rows; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        float dot = 0.0f;
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t e = 0; e < 2; ++e) {
            const uint8_t byte = w[b * kQ4TileBlockBytes + 32 * c + 2 * r + e];
            dot += bf16_bits_to_float(x[i * K + b * kBlock + 2 * c + e]) * static_cast<float>(byte & 0x0F);
            dot += bf16_bits_to_float(x[i * K + b * kBlock + 16 + 2 * c + e]) * static_cast<float>(byte >> 4);
          }
        acc += dot * static_cast<float>(d[b * kRows + r]) + static_cast<float>(m[b * kRows + r]) * sums[i * blocks + b];
      }
      out[i * kRows + r] = acc;
    }
}

template <typename Scales>
void q8_tile_scalar(const int8_t* w, const Scales& d, int64_t blocks, const uint16_t* x, int64_t K, int act_rows,
                    float* out) {
  constexpr int Groups = kScaleGroups<Scales>;
  constexpr int64_t span = kBlock / Groups;
  for (int i = 0; i < act_rows; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b)
        for (int part = 0; part < Groups; ++part) {
          float dot = 0.0f;
          for (int64_t k = part * span; k < (part + 1) * span; ++k)
            dot += bf16_bits_to_float(x[i * K + b * kBlock + k]) *
                   static_cast<float>(w[b * kQ8TileBlockBytes + 32 * (k / 2) + 2 * r + k % 2]);
          acc += dot * part_scale(d, b, part, r);
        }
      out[i * kRows + r] = acc;
    }
}

#endif

// ---- int8 activations ----

// Activations rounded per block of 32: codes in [-127, 127] (stride K), and per row and block the scale dx and
// dx · Σ codes (stride blocks). `wide` holds the codes as int16 too, for the Q8 tiles' 16-bit products.
struct Int8Rows {
  std::vector<int8_t> codes;
  std::vector<int16_t> wide;
  std::vector<float> scales, sums;
  std::vector<int32_t> totals;  // per row, block and scale group (`groups` per block) Σ codes: vpdpbusd's offset
};

// Blocks of activations rounded (or summed) per task of torch's thread pool: a prefill's rows in parallel, a decode
// row's blocks on one thread.
constexpr int64_t kQuantizeGrain = 512;

Int8Rows quantize_rows(const uint16_t* x, int64_t rows, int64_t blocks, bool with_wide, int groups = 1) {
  Int8Rows q;
  const int64_t n = rows * blocks;
  q.codes.resize(n * kBlock);
  q.scales.resize(n);
  q.sums.resize(n);
  q.totals.assign(n * groups, 0);
  at::parallel_for(0, n, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb)
      gguf::quantize_block(x + rb * kBlock, {q.codes.data() + rb * kBlock, &q.scales[rb], &q.sums[rb],
                                             q.totals.data() + rb * groups, groups});
  });
  if (with_wide) q.wide.assign(q.codes.begin(), q.codes.end());
  return q;
}

// Which tiles take the codes widened to int16: the 8-lane Q8 tile (vpmaddwd of signed codes) only.
#if defined(TOKENMILL_GGUF_INT8_AVX2)
constexpr bool kWideQ8 = true;
#else
constexpr bool kWideQ8 = false;
#endif

// The rows of one tile-block's result, in the same fp32 operations on every path: acc += float(Σ) · (d · dx), then
// acc += m · (dx · Σ codes) for Q4.
inline float block_term(float acc, int32_t dot, float d, float dx) {
  return acc + static_cast<float>(dot) * (d * dx);
}

#if defined(TOKENMILL_GGUF_INT8_AVX512)

inline int32_t pair32(const int16_t* x) {
  int32_t both;
  std::memcpy(&both, x, sizeof both);
  return both;
}

// 32-bit lane r += row r's pair of 16-bit codes times the activation pair in every lane (exact in int32).
inline __m512i add_pairs(__m512i acc, __m512i codes, const int16_t* x) {
  return _mm512_dpwssd_epi32(acc, codes, _mm512_set1_epi32(pair32(x)));
}

// Few activation rows leave few independent dot-product chains: split each over two so the adds' latency overlaps.
template <int Tile>
constexpr int kInt8Chains = Tile <= 3 ? 2 : 1;

// acc[i] gets one block (or part) of the 16 rows: chains[.][i] its exact integer sums, `scale` its weight scales;
// m (Q4 only) adds m · dx · Σ codes.
template <int Tile, int Chains, typename S>
inline void add_block16(const __m512i chains[][Tile], __m512 scale, const S* m, const float* dx,
                        const float* xs, int64_t blocks, int64_t b, __m512 acc[]) {
  for (int i = 0; i < Tile; ++i) {
    __m512i dot = chains[0][i];
    for (int c = 1; c < Chains; ++c) dot = _mm512_add_epi32(dot, chains[c][i]);
    const __m512 block_scale = _mm512_mul_ps(scale, _mm512_set1_ps(dx[i * blocks + b]));
    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_cvtepi32_ps(dot), block_scale));
    if (m != nullptr)
      acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(widen_scales(m), _mm512_set1_ps(xs[i * blocks + b])));
  }
}

// 32-bit lane r += row r's four unsigned codes (bytes 4r..4r+3) times the four activation codes, summed (exact in
// int32: vpdpbusd does not saturate).
inline __m512i add_quads(__m512i acc, __m512i codes, const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(four));
}

// Chunks c and c + 1 (64 bytes) with their 16-bit words interleaved (word 2r: chunk c's row r, word 2r + 1: chunk
// c + 1's), so 32-bit lane r holds row r's codes for four consecutive k.
inline __m512i quad_codes(const void* chunks) {
  alignas(64) static constexpr uint16_t kQuads[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kQuads), _mm512_loadu_si512(chunks));
}

// One Q4 row tile against Tile rows of int8 activation codes, two chunks at a time as quad_codes lays them out: one
// vpdpbusd adds 64 products (twice vpdpwssd's, with no widening). The low nibbles hold k = 2c..2c + 3, the high ones
// k = 16 + 2c..; the integer sums are those of every other path.
template <int Tile, typename S>
void q4_tile_int8(const uint8_t* w, const S* d, const S* m, int64_t blocks, const int8_t* xq, int64_t K,
                  const float* dx, const float* xs, float* out, bool prefetch) {
  constexpr int Chains = kInt8Chains<Tile>;
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[Tile];
  for (int i = 0; i < Tile; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i chains[2 * Chains][Tile];
    for (auto& chain : chains)
      for (int i = 0; i < Tile; ++i) chain[i] = _mm512_setzero_si512();
    const uint8_t* chunk = w + b * kQ4TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(chunk);
    for (int64_t c = 0; c < 8; c += 2) {
      const __m512i both = quad_codes(chunk + 32 * c);
      const __m512i low = _mm512_and_si512(both, low_nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(both, 4), low_nibble);
      const int chain = 2 * static_cast<int>((c / 2) % Chains);
      for (int i = 0; i < Tile; ++i) {
        const int8_t* xb = xq + i * K + b * kBlock;
        chains[chain][i] = add_quads(chains[chain][i], low, xb + 2 * c);
        chains[chain + 1][i] = add_quads(chains[chain + 1][i], high, xb + 16 + 2 * c);
      }
    }
    add_block16<Tile, 2 * Chains>(chains, widen_scales(d + b * kRows), m + b * kRows, dx, xs, blocks, b, acc);
  }
  for (int i = 0; i < Tile; ++i) _mm512_storeu_ps(out + i * kRows, acc[i]);
}

// One Q8 row tile against Tile rows of int8 activation codes, four products per lane as for Q4: the signed codes
// flipped to unsigned ones 128 higher (c ^ 0x80 = c + 128), whose vpdpbusd sums exceed the true ones by exactly
// 128 · Σ x over the block, subtracted before the block is scaled.
// Groups scales per block as in q8_tile; `totals` holds Σx per row, block and group.
template <int Tile, typename Scales>
void q8_tile_int8(const int8_t* w, const Scales& d, int64_t blocks, const int8_t* xq, int64_t K, const float* dx,
                  const int32_t* totals, float* out, bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  constexpr int Chains = kInt8Chains<Tile>;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[Tile];
  for (int i = 0; i < Tile; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* chunk = w + b * kQ8TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(chunk);
    for (int part = 0; part < Groups; ++part) {
      __m512i chains[Chains][Tile];
      for (auto& chain : chains)
        for (int i = 0; i < Tile; ++i) chain[i] = _mm512_setzero_si512();
      for (int64_t j = part * kQ8Pairs<Groups>; j < (part + 1) * kQ8Pairs<Groups>; j += 2) {
        const __m512i codes = _mm512_xor_si512(quad_codes(chunk + 32 * j), flip);
        const int chain = static_cast<int>((j / 2) % Chains);
        for (int i = 0; i < Tile; ++i)
          chains[chain][i] = add_quads(chains[chain][i], codes, xq + i * K + b * kBlock + 2 * j);
      }
      for (int i = 0; i < Tile; ++i)
        chains[0][i] = _mm512_sub_epi32(chains[0][i],
                                        _mm512_set1_epi32(128 * totals[(i * blocks + b) * Groups + part]));
      add_block16<Tile, Chains>(chains, part_scales(d, b, part), static_cast<const at::Half*>(nullptr), dx, nullptr,
                                blocks, b, acc);
    }
  }
  for (int i = 0; i < Tile; ++i) _mm512_storeu_ps(out + i * kRows, acc[i]);
}

#elif defined(TOKENMILL_GGUF_INT8_AVX2)

inline int16_t pair16(const int8_t* x) {
  int16_t both;
  std::memcpy(&both, x, sizeof both);
  return both;
}

inline int32_t pair32(const int16_t* x) {
  int32_t both;
  std::memcpy(&both, x, sizeof both);
  return both;
}

// acc[i][h] (rows 8h..8h+7) gets one block (or part): dot[i][h] its exact integer sums, scale[h] its weight scales.
template <int Tile, typename S>
inline void add_block(const __m256i dot[][2], const __m256 scale[2], const S* m, const float* dx, const float* xs,
                      int64_t blocks, int64_t b, __m256 acc[][2]) {
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < Tile; ++i) {
      const __m256 term = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[i][h]),
                                        _mm256_mul_ps(scale[h], _mm256_set1_ps(dx[i * blocks + b])));
      acc[i][h] = _mm256_add_ps(acc[i][h], term);
      if (m != nullptr)
        acc[i][h] = _mm256_add_ps(acc[i][h], _mm256_mul_ps(half_scales(m + 8 * h), _mm256_set1_ps(xs[i * blocks + b])));
    }
  }
}

// One Q4 row tile against Tile rows of int8 activations. vpmaddubsw multiplies the unsigned codes by the signed
// activation pair of their k (byte 2r + e of a chunk is row r, k-offset e), giving row r's pair sum in 16-bit lane r;
// eight chunks of one nibble half sum to at most 8 · 2 · 15 · 127 < 2^15, so each half sums in 16 bits and widens once.
template <int Tile, typename S>
void q4_tile_int8(const uint8_t* w, const S* d, const S* m, int64_t blocks, const int8_t* xq, int64_t K,
                  const float* dx, const float* xs, float* out, bool prefetch) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[Tile][2];
  for (int i = 0; i < Tile; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i low[Tile], high[Tile];
    for (int i = 0; i < Tile; ++i) low[i] = high[i] = _mm256_setzero_si256();
    const uint8_t* chunk = w + b * kQ4TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(chunk);
    for (int64_t c = 0; c < 8; ++c) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * c));
      const __m256i codes_low = _mm256_and_si256(bytes, low_nibble);
      const __m256i codes_high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble);
      for (int i = 0; i < Tile; ++i) {
        const int8_t* xb = xq + i * K + b * kBlock;
        low[i] = _mm256_add_epi16(low[i], _mm256_maddubs_epi16(codes_low, _mm256_set1_epi16(pair16(xb + 2 * c))));
        high[i] = _mm256_add_epi16(high[i],
                                   _mm256_maddubs_epi16(codes_high, _mm256_set1_epi16(pair16(xb + 16 + 2 * c))));
      }
    }
    __m256i dot[Tile][2];
    for (int i = 0; i < Tile; ++i)
      for (int h = 0; h < 2; ++h) {
        const __m128i lo = h == 0 ? _mm256_castsi256_si128(low[i]) : _mm256_extracti128_si256(low[i], 1);
        const __m128i hi = h == 0 ? _mm256_castsi256_si128(high[i]) : _mm256_extracti128_si256(high[i], 1);
        dot[i][h] = _mm256_add_epi32(_mm256_cvtepi16_epi32(lo), _mm256_cvtepi16_epi32(hi));
      }
    const __m256 scale[2] = {half_scales(d + b * kRows), half_scales(d + b * kRows + 8)};
    add_block<Tile>(dot, scale, m + b * kRows, dx, xs, blocks, b, acc);
  }
  for (int i = 0; i < Tile; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + i * kRows + 8 * h, acc[i][h]);
}

// One Q8 row tile against Tile rows of int8 activations (as int16). The signed codes widen to 16 bits, 8 rows per
// half; vpmaddwd against the activation pair of their k gives each row's pair sum in 32-bit lane r.
template <int Tile, typename Scales>
void q8_tile_int8(const int8_t* w, const Scales& d, int64_t blocks, const int16_t* xw, int64_t K, const float* dx,
                  float* out, bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  __m256 acc[Tile][2];
  for (int i = 0; i < Tile; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* chunk = w + b * kQ8TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(chunk);
    for (int part = 0; part < Groups; ++part) {
      __m256i dot[Tile][2];
      for (int i = 0; i < Tile; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
      for (int64_t j = part * kQ8Pairs<Groups>; j < (part + 1) * kQ8Pairs<Groups>; ++j) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * j));
        const __m256i rows_low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes));
        const __m256i rows_high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1));
        for (int i = 0; i < Tile; ++i) {
          const __m256i xp = _mm256_set1_epi32(pair32(xw + i * K + b * kBlock + 2 * j));
          dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(rows_low, xp));
          dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(rows_high, xp));
        }
      }
      const __m256 scale[2] = {part_scales8(d, b, part, 0), part_scales8(d, b, part, 1)};
      add_block<Tile>(dot, scale, static_cast<const at::Half*>(nullptr), dx, nullptr, blocks, b, acc);
    }
  }
  for (int i = 0; i < Tile; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + i * kRows + 8 * h, acc[i][h]);
}

#elif !defined(TOKENMILL_GGUF_INT8_NEON)

// Portable loops with the AVX2 tiles' exact integer sums and fp32 operations (bit-identical results).
template <typename S>
void q4_tile_int8_scalar(const uint8_t* w, const S* d, const S* m, int64_t blocks, const int8_t* xq,
                         int64_t K, const float* dx, const float* xs, int act_rows, float* out) {
  for (int i = 0; i < act_rows; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t e = 0; e < 2; ++e) {
            const uint8_t byte = w[b * kQ4TileBlockBytes + 32 * c + 2 * r + e];
            dot += (byte & 0x0F) * xq[i * K + b * kBlock + 2 * c + e] + (byte >> 4) * xq[i * K + b * kBlock + 16 + 2 * c + e];
          }
        acc = block_term(acc, dot, static_cast<float>(d[b * kRows + r]), dx[i * blocks + b]);
        acc = acc + static_cast<float>(m[b * kRows + r]) * xs[i * blocks + b];
      }
      out[i * kRows + r] = acc;
    }
}

template <typename Scales>
void q8_tile_int8_scalar(const int8_t* w, const Scales& d, int64_t blocks, const int8_t* xq, int64_t K,
                         const float* dx, int act_rows, float* out) {
  constexpr int Groups = kScaleGroups<Scales>;
  constexpr int64_t span = kBlock / Groups;
  for (int i = 0; i < act_rows; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b)
        for (int part = 0; part < Groups; ++part) {
          int32_t dot = 0;
          for (int64_t k = part * span; k < (part + 1) * span; ++k)
            dot += w[b * kQ8TileBlockBytes + 32 * (k / 2) + 2 * r + k % 2] * xq[i * K + b * kBlock + k];
          acc = block_term(acc, dot, part_scale(d, b, part, r), dx[i * blocks + b]);
        }
      out[i * kRows + r] = acc;
    }
}

#endif

const uint16_t* activations(const at::Tensor& x, int64_t K) {
  TM_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
           "GGUF block matmuls take contiguous [tokens, in_features] bf16 CPU activations");
  TM_CHECK(x.size(1) == K, "activations have ", x.size(1), " features, the weight ", K);
  return reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
}

// The activations widened to fp32, for the AVX2 and NEON tiles (empty where they are not used).
std::vector<float> widened(const uint16_t* x, int64_t n) {
#if defined(TOKENMILL_GGUF_AVX2) || defined(TOKENMILL_GGUF_NEON)
  std::vector<float> out(n);
  at::parallel_for(0, n, kQuantizeGrain * kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = bf16_bits_to_float(x[i]);
  });
  return out;
#else
  (void)x;
  (void)n;
  return {};
#endif
}

// Σx over each block of 32 activations, in fp32 (for the Q4 minimums).
void block_sums(const uint16_t* x, int64_t blocks, float* sums) {
  at::parallel_for(0, blocks, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float total = 0.0f;
      for (int64_t k = 0; k < kBlock; ++k) total += bf16_bits_to_float(x[b * kBlock + k]);
      sums[b] = total;
    }
  });
}

void check_codes(const at::Tensor& packed, at::ScalarType type, int64_t tile_block_bytes, int64_t blocks, int64_t N,
                 const char* what) {
  const int64_t tiles = packed.size(0);
  TM_CHECK(packed.scalar_type() == type && packed.is_contiguous() && packed.dim() == 2 &&
               packed.size(1) == blocks * tile_block_bytes && N > (tiles - 1) * kRows && N <= tiles * kRows,
           what, " must be contiguous [ceil(N / 16), blocks * ", tile_block_bytes, "] of ", type);
}

// Scales are the file's f16 values, or fp32 where `fp32_allowed` (Q4_K's sub-block products are exact only there).
void check_scales(const at::Tensor& s, int64_t tiles, int64_t blocks, const char* what, bool fp32_allowed = false) {
  const bool dtype_ok = s.scalar_type() == at::kHalf || (fp32_allowed && s.scalar_type() == at::kFloat);
  TM_CHECK(dtype_ok && s.is_contiguous() && s.dim() == 3 && s.size(0) == tiles && s.size(1) == blocks &&
               s.size(2) == kRows,
           what, " must be contiguous float16", fp32_allowed ? " or float32" : "", " [tiles, blocks, 16]");
}

// y = x Wᵀ [M, N] in bf16 or fp32, filled tile by tile (on torch's thread pool when the matmul is large enough).
template <typename TileKernel>
at::Tensor write_tiles(const at::Tensor& x, int64_t N, int64_t tiles, bool fp32, const TileKernel& tile_kernel) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  over_row_tiles(tiles, M * N * x.size(1), [&](int64_t begin, int64_t end) {
    if (fp32)
      tiled(M, N, begin, end, y.data_ptr<float>(), tile_kernel);
    else
      tiled(M, N, begin, end, y.data_ptr<c10::BFloat16>(), tile_kernel);
  });
  return y;
}

}  // namespace

const char* gguf_int8_isa() {
#if defined(TOKENMILL_GGUF_INT8_AVX512)
  return "avx512vnni";
#elif defined(TOKENMILL_GGUF_INT8_AVX2)
  return "avx2";
#elif defined(TOKENMILL_GGUF_INT8_NEON)
  return "neon_dotprod";
#else
  return "scalar";
#endif
}

int64_t gguf_prefetch_rows(int64_t rows) {
  if (rows >= 0) prefetch_rows.store(rows, std::memory_order_relaxed);
  return prefetch_rows.load(std::memory_order_relaxed);
}

const char* gguf_isa() {
#if defined(TOKENMILL_GGUF_AVX512BF16)
  return "avx512bf16";
#elif defined(TOKENMILL_GGUF_AVX2)
  return "avx2";
#elif defined(TOKENMILL_GGUF_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

namespace {

// q4_matmul for f16 (Q4_0/Q4_1) or fp32 (Q4_K) scales and minimums.
template <typename S>
at::Tensor q4_matmul_typed(const at::Tensor& x, const uint8_t* w, const S* ds, const S* ms, int64_t N, int64_t tiles,
                           int64_t blocks, bool fp32_output, bool int8_activations) {
  const int64_t K = blocks * kBlock;
  const uint16_t* xs = activations(x, K);
  if (int8_activations) {
    const Int8Rows q = quantize_rows(xs, x.size(0), blocks, false);  // every Q4 tile takes the int8 codes
    return write_tiles(x, N, tiles, fp32_output,
                       [&](int64_t t, int64_t i0, int act_rows, [[maybe_unused]] bool prefetch, float* out) {
      const uint8_t* wt = w + t * blocks * kQ4TileBlockBytes;
      const S *dt = ds + t * blocks * kRows, *mt = ms + t * blocks * kRows;
      const float *dx = q.scales.data() + i0 * blocks, *sums = q.sums.data() + i0 * blocks;
#if defined(TOKENMILL_GGUF_INT8_AVX512)
      with_tile(act_rows, [&](auto tile) {
        q4_tile_int8<decltype(tile)::value>(wt, dt, mt, blocks, q.codes.data() + i0 * K, K, dx, sums, out, prefetch);
      });
#elif defined(TOKENMILL_GGUF_INT8_AVX2)
      in_row_groups(act_rows, [&](auto tile, int i) {
        q4_tile_int8<decltype(tile)::value>(wt, dt, mt, blocks, q.codes.data() + (i0 + i) * K, K, dx + i * blocks,
                                            sums + i * blocks, out + i * kRows, prefetch && i == 0);
      });
#elif defined(TOKENMILL_GGUF_INT8_NEON)
      in_row_groups(act_rows, [&](auto tile, int i) {
        gguf::neon::q4_tile_int8<decltype(tile)::value>(wt, dt, mt, blocks, q.codes.data() + (i0 + i) * K, K,
                                                        dx + i * blocks, sums + i * blocks, out + i * kRows,
                                                        prefetch && i == 0);
      });
#else
      q4_tile_int8_scalar(wt, dt, mt, blocks, q.codes.data() + i0 * K, K, dx, sums, act_rows, out);
#endif
    });
  }
  std::vector<float> sums(x.size(0) * blocks);
  block_sums(xs, x.size(0) * blocks, sums.data());
  const std::vector<float> xf = widened(xs, x.numel());
  return write_tiles(x, N, tiles, fp32_output,
                     [&](int64_t t, int64_t i0, int act_rows, [[maybe_unused]] bool prefetch, float* out) {
    const uint8_t* wt = w + t * blocks * kQ4TileBlockBytes;
    const S *dt = ds + t * blocks * kRows, *mt = ms + t * blocks * kRows;
#if defined(TOKENMILL_GGUF_AVX512BF16)
    with_tile(act_rows, [&](auto tile) {
      q4_tile<decltype(tile)::value>(wt, dt, mt, blocks, xs + i0 * K, K, sums.data() + i0 * blocks, out, prefetch);
    });
#elif defined(TOKENMILL_GGUF_AVX2)
    in_row_groups(act_rows, [&](auto tile, int i) {
      q4_tile_avx2<decltype(tile)::value>(wt, dt, mt, blocks, xf.data() + (i0 + i) * K, K,
                                          sums.data() + (i0 + i) * blocks, out + i * kRows, prefetch && i == 0);
    });
#elif defined(TOKENMILL_GGUF_NEON)
    in_row_groups(act_rows, [&](auto tile, int i) {
      gguf::neon::q4_tile<decltype(tile)::value>(wt, dt, mt, blocks, xf.data() + (i0 + i) * K, K,
                                                 sums.data() + (i0 + i) * blocks, out + i * kRows, prefetch && i == 0);
    });
#else
    q4_tile_scalar(wt, dt, mt, blocks, xs + i0 * K, K, sums.data() + i0 * blocks, act_rows, out);
#endif
  });
}

}  // namespace

at::Tensor q4_matmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m,
                     int64_t N, bool fp32_output, bool int8_activations) {
  RECORD_FUNCTION("tokenmill::q4_matmul", std::vector<c10::IValue>());  // named in torch profiler tables
  const int64_t tiles = packed.size(0), blocks = d.size(1);
  check_codes(packed, at::kByte, kQ4TileBlockBytes, blocks, N, "Q4 codes");
  check_scales(d, tiles, blocks, "Q4 scales", true);
  check_scales(m, tiles, blocks, "Q4 minimums", true);
  TM_CHECK(d.scalar_type() == m.scalar_type(), "Q4 scales and minimums must have one dtype");
  const at::Tensor x = x_in.contiguous();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  if (d.scalar_type() == at::kFloat)
    return q4_matmul_typed(x, w, d.data_ptr<float>(), m.data_ptr<float>(), N, tiles, blocks, fp32_output,
                           int8_activations);
  return q4_matmul_typed(x, w, d.data_ptr<at::Half>(), m.data_ptr<at::Half>(), N, tiles, blocks, fp32_output,
                         int8_activations);
}

namespace {

// q8_matmul for one f16 scale per block (Q8_0, Q5_0: `tile_scales(t)` a pointer) or Q6_K's per-16 scales
// (`Q6KTileScales`).
template <typename TileScales>
at::Tensor q8_matmul_typed(const at::Tensor& x, const int8_t* w, const TileScales& tile_scales, int64_t N,
                           int64_t tiles, int64_t blocks, bool fp32_output, bool int8_activations) {
  const int64_t K = blocks * kBlock;
  const uint16_t* xs = activations(x, K);
  using Scales = decltype(tile_scales(0));
  constexpr int Groups = kScaleGroups<Scales>;
  if (int8_activations) {
    const Int8Rows q = quantize_rows(xs, x.size(0), blocks, kWideQ8, Groups);
    return write_tiles(x, N, tiles, fp32_output,
                       [&](int64_t t, int64_t i0, int act_rows, [[maybe_unused]] bool prefetch, float* out) {
      const int8_t* wt = w + t * blocks * kQ8TileBlockBytes;
      const Scales dt = tile_scales(t);
      const float* dx = q.scales.data() + i0 * blocks;
#if defined(TOKENMILL_GGUF_INT8_AVX512)
      with_tile(act_rows, [&](auto tile) {
        q8_tile_int8<decltype(tile)::value>(wt, dt, blocks, q.codes.data() + i0 * K, K, dx,
                                            q.totals.data() + i0 * blocks * Groups, out, prefetch);
      });
#elif defined(TOKENMILL_GGUF_INT8_AVX2)
      in_row_groups(act_rows, [&](auto tile, int i) {
        q8_tile_int8<decltype(tile)::value>(wt, dt, blocks, q.wide.data() + (i0 + i) * K, K, dx + i * blocks,
                                            out + i * kRows, prefetch && i == 0);
      });
#elif defined(TOKENMILL_GGUF_INT8_NEON)
      in_row_groups(act_rows, [&](auto tile, int i) {
        gguf::neon::q8_tile_int8<decltype(tile)::value>(wt, dt, blocks, q.codes.data() + (i0 + i) * K, K,
                                                        dx + i * blocks, out + i * kRows, prefetch && i == 0);
      });
#else
      q8_tile_int8_scalar(wt, dt, blocks, q.codes.data() + i0 * K, K, dx, act_rows, out);
#endif
    });
  }
  const std::vector<float> xf = widened(xs, x.numel());
  return write_tiles(x, N, tiles, fp32_output,
                     [&](int64_t t, int64_t i0, int act_rows, [[maybe_unused]] bool prefetch, float* out) {
    const int8_t* wt = w + t * blocks * kQ8TileBlockBytes;
    const Scales dt = tile_scales(t);
#if defined(TOKENMILL_GGUF_AVX512BF16)
    with_tile(act_rows, [&](auto tile) {
      q8_tile<decltype(tile)::value>(wt, dt, blocks, xs + i0 * K, K, out, prefetch);
    });
#elif defined(TOKENMILL_GGUF_AVX2)
    in_row_groups(act_rows, [&](auto tile, int i) {
      q8_tile_avx2<decltype(tile)::value>(wt, dt, blocks, xf.data() + (i0 + i) * K, K, out + i * kRows,
                                          prefetch && i == 0);
    });
#elif defined(TOKENMILL_GGUF_NEON)
    in_row_groups(act_rows, [&](auto tile, int i) {
      gguf::neon::q8_tile<decltype(tile)::value>(wt, dt, blocks, xf.data() + (i0 + i) * K, K, out + i * kRows,
                                                 prefetch && i == 0);
    });
#else
    q8_tile_scalar(wt, dt, blocks, xs + i0 * K, K, act_rows, out);
#endif
  });
}

}  // namespace

at::Tensor q8_matmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, int64_t N,
                     bool fp32_output, bool int8_activations) {
  RECORD_FUNCTION("tokenmill::q8_matmul", std::vector<c10::IValue>());
  TM_CHECK(packed.dim() == 2 && packed.size(1) % kQ8TileBlockBytes == 0,
           "Q8 codes must be [ceil(N / 16), blocks * ", kQ8TileBlockBytes, "]");
  const int64_t tiles = packed.size(0), blocks = packed.size(1) / kQ8TileBlockBytes;
  check_codes(packed, at::kChar, kQ8TileBlockBytes, blocks, N, "Q8 codes");
  const at::Tensor x = x_in.contiguous();
  const int8_t* w = packed.data_ptr<int8_t>();
  if (d.scalar_type() == at::kByte) {  // Q6_K: per tile and super-block, f16 d and int8 sc (gguf_layout.h)
    const int64_t supers = blocks / gguf::kQ6KBlocks;
    TM_CHECK(blocks % gguf::kQ6KBlocks == 0 && d.is_contiguous() && d.dim() == 3 && d.size(0) == tiles &&
                 d.size(1) == supers && d.size(2) == gguf::kQ6KScaleBytes,
             "Q6_K scales must be contiguous uint8 [tiles, K / 256, ", gguf::kQ6KScaleBytes, "]");
    const uint8_t* p = d.data_ptr<uint8_t>();
    return q8_matmul_typed(x, w, [&](int64_t t) { return Q6KTileScales{p + t * supers * gguf::kQ6KScaleBytes}; }, N,
                           tiles, blocks, fp32_output, int8_activations);
  }
  check_scales(d, tiles, blocks, "Q8 scales");
  const at::Half* ds = d.data_ptr<at::Half>();
  return q8_matmul_typed(x, w, [&](int64_t t) { return ds + t * blocks * kRows; }, N, tiles, blocks, fp32_output,
                         int8_activations);
}

}  // namespace tokenmill
