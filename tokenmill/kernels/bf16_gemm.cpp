// Row-exact bf16 matmul on a packed weight (declared in bf16_gemm.h).
//
// Why: oneDNN's bf16 linear splits the inner dimension differently at some row counts (on the dev CPUs: the MLP's
// down projection from 96 rows on), and with AMX it picks other kernels again, so a token's output changes in the
// last bit with the size of its step; in bf16 one such bit is often enough to change a greedy token later. A
// speculative verify step must reproduce the decode step it replaces, and `batch_invariant` wants every row of every
// step, prefill chunks included, to round as it would alone.
//
// Layout: W [N, K] is stored as blocks of 16 outputs, and within a block by pairs of k: packed[b][p][j][h] =
// W[16 b + j][2 p + h] (N padded to a multiple of 16 and K to an even count with zeros). One 64-byte vector then
// holds pair p of 16 outputs, and each output is a lane of the accumulator: no horizontal sums at the end.
//
// Order: output y[m, n] is lane n mod 16 of one accumulator, which adds pair p's two products for p = 0, 1, ... in
// turn (AVX512-BF16: one `vdpbf16ps` per pair; elsewhere both products widened to fp32, the odd k's first, then the
// even k's, as that instruction's definition orders them); then the bias; then one rounding to the output type. Which
// rows share a tile, how many blocks a tile has, which block of rows it is in and which thread computes it change only
// what runs next to what, never this order, so every row is the bits it would be alone. (Builds of other ISA levels
// may differ in the last bit, e.g. in how denormals are treated: results are exact within one build.)
//
// Tiles: rows are taken in blocks of kRowBlock (which then stay in cache) and split into groups of at most kMaxGroup
// (8 with AVX512-BF16, 4 elsewhere); each task takes a tile of NB consecutive output blocks and runs every group of the
// row block over it. Each W vector loaded serves every row of a group; NB is picked for the largest group so that the
// accumulators (rows × NB), the W vectors and one x broadcast fill the register file. A second group re-reads the
// tile from cache (or from memory, where a tile of a long K outgrows L2), so a verify step's 5–8 rows are one group.

#include "bf16_gemm.h"
#include "check.h"

#include "simd.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/constant_pad_nd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace tokenmill {
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kBlock = 16;     // outputs per packed block: the lanes of one accumulator
constexpr int64_t kRowBlock = 64;  // rows of x that share one pass over W

// wreg: pair p of 16 outputs' weights as loaded; xreg: pair p of one row of x, in every lane, as the multiply-add
// takes it.
#if defined(__AVX512BF16__)
using wreg = __m512bh;
using xreg = __m512bh;
inline wreg load_pairs(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline xreg splat_pair(const bf16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}
inline f32x16 madd(f32x16 acc, xreg x, wreg w) { return (f32x16)_mm512_dpbf16_ps((__m512)acc, x, w); }
#else
using wreg = u32x16;  // 16 pairs of bf16, the even k in the low half of each 32-bit lane
struct xreg {
  f32x16 odd, even;  // x[2p + 1] and x[2p] widened, once per row and pair rather than once per block
};
inline wreg load_pairs(const bf16* p) {
  wreg v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f32x16 high_as_f32(wreg v) {
  const wreg bits = v & 0xFFFF0000u;
  f32x16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline xreg splat_pair(const bf16* x) {
  return {splat16(to_f(x[1])), splat16(to_f(x[0]))};
}
// A product of two bf16 values is exact in fp32, so fused or not each step rounds once, at its sum.
inline f32x16 madd(f32x16 acc, const xreg& x, wreg w) {
  acc = fma16(x.odd, high_as_f32(w), acc);
  return fma16(x.even, high_as_f32(w << 16), acc);
}
#endif

// Outputs [first, first + 16) of one row (those below n_len): the block's sums, plus the bias, rounded once to Out.
template <typename Out>
inline void store_block(f32x16 v, const bf16* bias, int64_t first, int64_t n_len, Out* y_row) {
  const int64_t cols = std::min<int64_t>(kBlock, n_len - first);
  if (bias) {
    bf16 lanes[kBlock] = {};
    std::memcpy(lanes, bias + first, cols * sizeof(bf16));
    v = v + load16(lanes);
  }
  if (cols == kBlock) {
    store16(y_row + first, v);
  } else {
    Out lanes[kBlock];
    store16(lanes, v);
    std::memcpy(y_row + first, lanes, cols * sizeof(Out));
  }
}

// y rows [0, MT) and outputs [n, n + 16 · NB) from x rows of `k_len` (stride `x_stride`) and NB packed blocks.
template <typename Out, int MT, int NB>
inline void tile(const bf16* x, int64_t x_stride, int64_t pairs, const bf16* wp, const bf16* bias, int64_t n,
                 int64_t n_len, Out* y, int64_t y_stride) {
  f32x16 acc[MT][NB] = {};
  const int64_t block_stride = pairs * 2 * kBlock;
  for (int64_t p = 0; p < pairs; ++p) {
    wreg w[NB];
    for (int b = 0; b < NB; ++b) w[b] = load_pairs(wp + b * block_stride + p * 2 * kBlock);
    for (int i = 0; i < MT; ++i) {
      const xreg xv = splat_pair(x + i * x_stride + 2 * p);
      for (int b = 0; b < NB; ++b) acc[i][b] = madd(acc[i][b], xv, w[b]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < MT; ++i) store_block(acc[i][b], bias, n + b * kBlock, n_len, y + i * y_stride);
}

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
#define TOKENMILL_BF16_NARROW 1
// AVX2 builds: the multiply-adds of `tile` on native 8-lane registers, each block of 16 outputs as two halves. On
// 16-lane values the accumulators, W and x did not fit AVX2's 16 registers and spilled on every multiply-add. x
// comes widened to fp32 once per row block and is broadcast from memory. Each output takes the same fused
// multiply-adds in the same order as the bf16 `tile`, so the bits are those of the 16-lane code.
template <typename Out, int MT, int NB>
inline void tile(const float* xw, int64_t xw_stride, int64_t pairs, const bf16* wp, const bf16* bias, int64_t n,
                 int64_t n_len, Out* y, int64_t y_stride) {
  __m256 acc[MT][2 * NB];
  for (int i = 0; i < MT; ++i)
    for (int h = 0; h < 2 * NB; ++h) acc[i][h] = _mm256_setzero_ps();
  const int64_t block_stride = pairs * 2 * kBlock;
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
    for (int h = 0; h < 2 * NB; ++h) {
      // Pair p of outputs 8 (h mod 2) to 8 (h mod 2) + 7 of block h / 2: the odd k in the high half of each lane.
      const __m256i w = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(wp + (h / 2) * block_stride + p * 2 * kBlock + (h % 2) * kBlock));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      for (int i = 0; i < MT; ++i) {
        acc[i][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(xw + i * xw_stride + 2 * p + 1), odd, acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(xw + i * xw_stride + 2 * p), even, acc[i][h]);
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < MT; ++i) {
      f32x16 v;
      std::memcpy(&v, &acc[i][2 * b], sizeof(v));  // the two halves are adjacent
      store_block(v, bias, n + b * kBlock, n_len, y + i * y_stride);
    }
}

// Blocks per tile by the largest row group: rows × 2 NB accumulators and a block half's two W vectors in 16 ymm.
constexpr int kMaxGroup = 4;
constexpr int kTileBlocks[5] = {0, 4, 2, 2, 1};
#else
#if defined(__AVX512BF16__)
// Output blocks per tile by the largest row group: rows × NB accumulators, NB W vectors and one x broadcast within
// AVX-512's 32 vector registers. Groups of up to 8 rows: each W vector loaded then serves up to 8 rows.
constexpr int kMaxGroup = 8;
constexpr int kTileBlocks[9] = {0, 8, 8, 6, 6, 5, 4, 3, 3};
#else
// Elsewhere a 16-lane vector takes two or four registers and some spill: groups of at most 4 rows.
constexpr int kMaxGroup = 4;
constexpr int kTileBlocks[5] = {0, 8, 8, 6, 6};
#endif
#endif

// The largest row group whose tiles have NB blocks.
constexpr int rows_for_blocks(int nb) {
  int rows = 0;
  for (int m = 1; m < static_cast<int>(sizeof(kTileBlocks) / sizeof(kTileBlocks[0])); ++m)
    if (kTileBlocks[m] >= nb) rows = m;
  return rows;
}

// The largest row group this process uses: kMaxGroup, or fewer with TOKENMILL_BF16_ROW_GROUP=N (1 to kMaxGroup), the
// switch that A/B benchmarks of the grouping use. Read once.
int max_group() {
  static const int group = [] {
    const char* value = std::getenv("TOKENMILL_BF16_ROW_GROUP");
    const int n = value ? std::atoi(value) : kMaxGroup;
    return n >= 1 && n <= kMaxGroup ? n : kMaxGroup;
  }();
  return group;
}

// x: the row block as bf16, or widened to fp32 for the AVX2 tiles.
template <typename Out, int NB, typename In>
void block_tiles(const In* x, int64_t rows, int64_t groups, int64_t k_len, const bf16* packed, int64_t pairs,
                 const bf16* bias, int64_t n_len, Out* y) {
  const int64_t blocks = (n_len + kBlock - 1) / kBlock, tiles = (blocks + NB - 1) / NB;
  const int64_t block_elems = pairs * 2 * kBlock;
  parallel_rows(tiles, NB * kBlock * pairs * 2 * rows, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first_block = t * NB, count = std::min<int64_t>(NB, blocks - first_block);
      for_row_groups<kMaxGroup>(rows, groups, [&](auto group_rows, int64_t m) {
        constexpr int MT = decltype(group_rows)::value;
        const In* xg = x + m * k_len;
        Out* yg = y + m * n_len;
        auto run = [&](auto blocks, int64_t b) {
          tile<Out, MT, decltype(blocks)::value>(xg, k_len, pairs, packed + b * block_elems, bias, b * kBlock, n_len,
                                                 yg, n_len);
        };
        // Only groups no larger than the one NB was picked for get a tile of NB blocks (no other is ever run:
        // instantiating them would only spill registers and slow the build).
        if constexpr (MT <= rows_for_blocks(NB)) {
          if (count == NB) return run(std::integral_constant<int, NB>{}, first_block);
        }
        for (int64_t b = first_block; b < first_block + count; ++b) run(std::integral_constant<int, 1>{}, b);
      });
    }
  });
}

template <typename Out>
void packed_gemm(const bf16* x, int64_t rows, int64_t k_len, const bf16* packed, int64_t pairs, const bf16* bias,
                 int64_t n_len, Out* y) {
  const int64_t group = max_group();
  for (int64_t first = 0; first < rows; first += kRowBlock) {
    const int64_t block_rows = std::min(kRowBlock, rows - first);
    // Rows spread evenly over the fewest groups of at most `group` (4: 9 rows as 3 + 3 + 3, not 4 + 4 + 1).
    const int64_t groups = (block_rows + group - 1) / group, largest = (block_rows + groups - 1) / groups;
    const bf16* xb = x + first * k_len;
    Out* yb = y + first * n_len;
#ifdef TOKENMILL_BF16_NARROW
    std::vector<float> widened(block_rows * k_len);
    for (int64_t i = 0; i < block_rows * k_len; ++i) widened[i] = to_f(xb[i]);
    const float* xin = widened.data();
#else
    const bf16* xin = xb;
#endif
    switch (kTileBlocks[largest]) {
#ifdef TOKENMILL_BF16_NARROW
      case 4: block_tiles<Out, 4>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
      case 2: block_tiles<Out, 2>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
      default: block_tiles<Out, 1>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
#else
      case 8: block_tiles<Out, 8>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
#if defined(__AVX512BF16__)
      case 6: block_tiles<Out, 6>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
      case 5: block_tiles<Out, 5>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
      case 4: block_tiles<Out, 4>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
      default: block_tiles<Out, 3>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
#else
      default: block_tiles<Out, 6>(xin, block_rows, groups, k_len, packed, pairs, bias, n_len, yb); break;
#endif
#endif
    }
  }
}

}  // namespace

at::Tensor pack_bf16(const at::Tensor& weight) {
  TM_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
           "pack_bf16: weight must be a CPU bfloat16 [N, K]");
  const int64_t n_len = weight.size(0), k_len = weight.size(1);
  const int64_t blocks = (n_len + kBlock - 1) / kBlock, pairs = (k_len + 1) / 2;
  // [N, K] zero-padded to [16 · blocks, 2 · pairs], then [blocks, 16, pairs, 2] -> [blocks, pairs, 16, 2].
  const at::Tensor padded = at::constant_pad_nd(weight, {0, 2 * pairs - k_len, 0, blocks * kBlock - n_len});
  return padded.view({blocks, kBlock, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features, bool fp32_out) {
  TM_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
           "linear_packed: x must be a CPU bfloat16 [rows, K]");
  TM_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.size(2) == kBlock &&
               packed.size(3) == 2 && packed.is_contiguous(),
           "linear_packed: packed must come from pack_bf16");
  const int64_t rows = x.size(0), k_len = x.size(1), pairs = packed.size(1);
  TM_CHECK(pairs == (k_len + 1) / 2 && out_features <= packed.size(0) * kBlock &&
               out_features > (packed.size(0) - 1) * kBlock,
           "linear_packed: x's K or out_features does not match the packed weight");
  if (bias) {
    TM_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->dim() == 1 &&
                 bias->size(0) == out_features,
             "linear_packed: bias must be a contiguous bfloat16 [N]");
  }
  at::Tensor y = at::empty({rows, out_features}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  if (rows == 0 || out_features == 0) return y;
  at::Tensor xs = x.contiguous();
  if (k_len % 2) xs = at::constant_pad_nd(xs, {0, 1});  // the zero pair partner adds nothing
  const bf16* b = bias ? bias->data_ptr<bf16>() : nullptr;
  if (fp32_out)
    packed_gemm<float>(xs.data_ptr<bf16>(), rows, xs.size(1), packed.data_ptr<bf16>(), pairs, b, out_features,
                       y.data_ptr<float>());
  else
    packed_gemm<bf16>(xs.data_ptr<bf16>(), rows, xs.size(1), packed.data_ptr<bf16>(), pairs, b, out_features,
                      y.data_ptr<bf16>());
  return y;
}

}  // namespace tokenmill
