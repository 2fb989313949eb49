// Row-exact fp32 matmul for a few rows (declared in small_gemm.h).
//
// Why not PyTorch's linear: MKL picks its kernel by the number of rows (a matrix-vector product for one row, other
// kernels for 2, 3 and the rows left over from blocks of 4), and each sums in its own order, so a token's output
// changes in the last bits with the size of the batch it is in. Speculative decoding needs a verify step (a token
// and its draft tokens, a few rows) to reproduce a one-row decode step bit for bit, or greedy output would drift.
// MKL is also slow here between 2 and 16 rows, where the work is still bound by reading the weights once.
//
// Every output y[m, n] is summed the same way: one vector accumulator of kWidth lanes, lane l adding x[m, k]·W[n, k]
// for k ≡ l (mod kWidth) in increasing k, one fused multiply-add each; then the lanes added in a fixed tree; then the
// K mod kWidth last products one by one; then the bias. Which rows share a tile, how wide the tile is and which
// thread computes it change only what runs next to what, never this order. (kWidth and the multiply-add differ
// between ISA builds: results are exact within one build.)
//
// Tiles: the input rows are taken in blocks of kRowBlock (which then stay in L2) and split into groups of at most 4;
// each task takes a tile of NT consecutive rows of W and runs every group of the block over it: W streams from memory
// once per block, stays in L1 between the groups, and each vector of W loaded serves every row of a group. NT is
// picked for the largest group so that the accumulators, the W vectors and one x vector fill the register file; for
// one row, 8 rows of W give the 8 independent multiply-add chains that hide their latency.

#include "small_gemm.h"
#include "check.h"

#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>

namespace tokenmill {
namespace {

#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64)));
#elif defined(__AVX__)
typedef float vec __attribute__((vector_size(32)));
#else
typedef float vec __attribute__((vector_size(16)));
#endif
constexpr int kWidth = sizeof(vec) / sizeof(float);
constexpr int64_t kRowBlock = 64;

inline vec load_vec(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// a·b + c as one fused instruction where the ISA level has FMA (-ffp-contract=off would not fuse it); without FMA,
// a product and a sum, the same in every tile of that build.
inline vec fmadd(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return (vec)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);  // 4 lanes: NEON's register width
#else
  return a * b + c;
#endif
}

inline float sum_lanes(vec v) {
  float lanes[kWidth];
  std::memcpy(lanes, &v, sizeof(v));
  for (int width = kWidth / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// y[i, j] for MT rows of x and NT rows of W (see the header comment for the order of the sums).
// `ahead`: NT rows of W to request into cache meanwhile, one 64-byte line per row every 16 floats of k.
template <int MT, int NT>
inline void tile(const float* x, const float* w, int64_t k_len, const float* bias, float* y, int64_t y_stride,
                 const float* ahead) {
  vec acc[MT][NT] = {};
  const int64_t body = k_len - k_len % kWidth;
  for (int64_t k = 0; k < body; k += kWidth) {
    if (ahead != nullptr && k % 16 == 0)
      for (int j = 0; j < NT; ++j) __builtin_prefetch(ahead + j * k_len + k);
    vec wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = load_vec(w + j * k_len + k);
    for (int i = 0; i < MT; ++i) {
      const vec xv = load_vec(x + i * k_len + k);
      for (int j = 0; j < NT; ++j) acc[i][j] = fmadd(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      float sum = sum_lanes(acc[i][j]);
      for (int64_t k = body; k < k_len; ++k) sum += x[i * k_len + k] * w[j * k_len + k];
      if (bias) sum += bias[j];
      y[i * y_stride + j] = sum;
    }
}

// Tile widths (rows of W) per group size: accumulators (MT · NT), NT vectors of W and one of x within the vector
// registers (32 with AVX-512, 16 otherwise).
#if defined(__AVX512F__)
constexpr int kTileWidth[5] = {0, 8, 12, 6, 6};
#else
constexpr int kTileWidth[5] = {0, 8, 6, 4, 3};
#endif

template <int NT>
void tiles_of(const float* x, int64_t rows, int64_t groups, int64_t k_len, const float* w, int64_t n_len,
              const float* bias, float* y) {
  const int64_t tiles = (n_len + NT - 1) / NT;
  parallel_rows(tiles, NT * k_len * rows, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * NT, cols = std::min<int64_t>(NT, n_len - n);
      const float* wt = w + n * k_len;
      const float* bt = bias ? bias + n : nullptr;
      // W is requested two tiles ahead of its use, by every group (the first one's requests are misses, the later
      // ones' mostly hits): the requests then run through the whole time spent on this tile, not only its first
      // group's share.
      const float* ahead = n + 3 * NT <= n_len ? wt + 2 * NT * k_len : nullptr;
      for_row_groups(rows, groups, [&](auto group_rows, int64_t m) {
        constexpr int MT = decltype(group_rows)::value;
        const float* xg = x + m * k_len;
        float* yg = y + m * n_len + n;
        if (cols == NT) {
          tile<MT, NT>(xg, wt, k_len, bt, yg, n_len, ahead);
        } else {
          for (int64_t j = 0; j < cols; ++j)
            tile<MT, 1>(xg, wt + j * k_len, k_len, bt ? bt + j : nullptr, yg + j, n_len, nullptr);
        }
      });
    }
  });
}

void block_gemm(const float* x, int64_t rows, int64_t k_len, const float* w, int64_t n_len, const float* bias,
                float* y) {
  // Groups of 3 and 4 rows load about as many vectors per multiply-add, 1 and 2 more: rows are spread evenly over
  // the fewest groups of at most 4 (9 rows: 3 + 3 + 3, not 4 + 4 + 1). All groups run over the same tile of W, as
  // wide as the largest group allows, which then stays in L1 between them.
  const int64_t groups = (rows + 3) / 4, largest = (rows + groups - 1) / groups;
  switch (kTileWidth[largest]) {
    case 12: return tiles_of<12>(x, rows, groups, k_len, w, n_len, bias, y);
    case 8: return tiles_of<8>(x, rows, groups, k_len, w, n_len, bias, y);
    case 6: return tiles_of<6>(x, rows, groups, k_len, w, n_len, bias, y);
    case 4: return tiles_of<4>(x, rows, groups, k_len, w, n_len, bias, y);
    default: return tiles_of<3>(x, rows, groups, k_len, w, n_len, bias, y);
  }
}

// Many rows (`batch_invariant` prefill chunks): blocks of kRowBlock, each against all of W.
void small_gemm(const float* x, int64_t rows, int64_t k_len, const float* w, int64_t n_len, const float* bias,
                float* y) {
  for (int64_t first = 0; first < rows; first += kRowBlock)
    block_gemm(x + first * k_len, std::min(kRowBlock, rows - first), k_len, w, n_len, bias, y + first * n_len);
}

}  // namespace

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TM_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
           "linear_rows: x must be [rows, K] and weight [N, K]");
  TM_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "linear_rows is for float32");
  TM_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_rows runs on CPU tensors");
  TM_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear_rows needs contiguous x and weight");
  const int64_t rows = x.size(0), k_len = x.size(1), n_len = weight.size(0);
  if (bias) {
    TM_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                 bias->size(0) == n_len,
             "linear_rows: bias must be a contiguous float32 [N]");
  }
  at::Tensor y = at::empty({rows, n_len}, x.options());
  if (rows > 0 && n_len > 0)
    small_gemm(x.data_ptr<float>(), rows, k_len, weight.data_ptr<float>(), n_len,
               bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

}  // namespace tokenmill
