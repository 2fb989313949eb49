// The NEON GGUF tiles (tokenmill/kernels/gguf_neon.h) against references, as a program without torch, so that it runs
// under qemu-aarch64 (tests/test_aarch64_build.py builds it statically with Debian's aarch64 cross compiler).
//
// Exact-weights tiles: within 1e-5 of Σ|terms| of a float64 reference (fp32 sums with FMAs over at most 256 inputs).
// int8-activation tiles: bit for bit the portable formula of gguf_matmul.cpp (exact integer sums per block, then
// acc + float(Σ) · (d · dx) and acc + m · xs in fp32), which the x86 int8 tiles also match bit for bit.
// Prints one line per failure and exits non-zero on any.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "tokenmill/kernels/gguf_neon.h"
#include "tokenmill/kernels/gguf_quantize.h"

#if !defined(TOKENMILL_GGUF_NEON)
#error "build for aarch64 with NEON"
#endif

using namespace tokenmill::gguf;

namespace {

std::mt19937 rng(1234);
int failures = 0;

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// Row r's code for input k in a tile's packed blocks (the layout of gguf_matmul.cpp).
int q4_code(const std::vector<uint8_t>& w, int64_t r, int64_t k) {
  const int64_t b = k / kBlock, kk = k % kBlock, c = (kk % 16) / 2, e = kk % 2;
  const uint8_t byte = w[b * kQ4TileBlockBytes + 32 * c + 2 * r + e];
  return kk < 16 ? (byte & 0x0F) : (byte >> 4);
}

int q8_code(const std::vector<int8_t>& w, int64_t r, int64_t k) {
  const int64_t b = k / kBlock, kk = k % kBlock;
  return w[b * kQ8TileBlockBytes + 32 * (kk / 2) + 2 * r + kk % 2];
}

template <typename S>
std::vector<S> scales(int64_t blocks, float lo, float hi) {
  std::vector<S> s(blocks * kRows);
  for (auto& v : s) v = static_cast<S>(uniform(lo, hi));
  return s;
}

// A tile's Q8 scales: one f16 per block, or Q6_K's f16 d per super-block and int8 sc per 16 weights in the layout of
// gguf_layout.h; scale(b, part, r) is the value the tiles must use (d · sc for Q6_K, exact in float).
struct Q8Scales {
  std::vector<__fp16> d;
  std::vector<uint8_t> q6k;
  bool is_q6k = false;

  float scale(int64_t b, int part, int64_t r) const {
    if (!is_q6k) return float(d[b * kRows + r]);
    const uint8_t* super = q6k.data() + (b / kQ6KBlocks) * kQ6KScaleBytes;
    __fp16 dd;
    std::memcpy(&dd, super + 2 * r, 2);
    const auto sc = static_cast<int8_t>(super[2 * kRows + ((b % kQ6KBlocks) * 2 + part) * kRows + r]);
    return float(dd) * float(sc);
  }
};

Q8Scales q8_scales(int64_t blocks, bool q6k) {
  Q8Scales s;
  s.is_q6k = q6k;
  if (!q6k) {
    s.d = scales<__fp16>(blocks, 0.001f, 0.05f);
    return s;
  }
  s.q6k.resize(blocks / kQ6KBlocks * kQ6KScaleBytes);
  for (int64_t super = 0; super < blocks / kQ6KBlocks; ++super) {
    uint8_t* p = s.q6k.data() + super * kQ6KScaleBytes;
    for (int64_t r = 0; r < kRows; ++r) {
      const __fp16 d = static_cast<__fp16>(uniform(0.0001f, 0.0004f));
      std::memcpy(p + 2 * r, &d, 2);
    }
    for (int64_t j = 2 * kRows; j < kQ6KScaleBytes; ++j) p[j] = static_cast<uint8_t>(rng());
  }
  return s;
}

void expect_close(const char* what, int tile, int64_t blocks, const float* out, const std::vector<double>& ref,
                  const std::vector<double>& magnitude) {
  for (size_t j = 0; j < ref.size(); ++j)
    if (!(std::fabs(out[j] - ref[j]) <= 1e-5 * magnitude[j] + 1e-30)) {
      std::printf("FAIL %s tile=%d blocks=%lld out[%zu]=%.9g ref=%.9g\n", what, tile, (long long)blocks, j, out[j],
                  ref[j]);
      ++failures;
      return;
    }
}

void expect_bits(const char* what, int tile, int64_t blocks, const float* out, const std::vector<float>& ref) {
  for (size_t j = 0; j < ref.size(); ++j)
    if (std::memcmp(&out[j], &ref[j], sizeof(float)) != 0) {
      std::printf("FAIL %s tile=%d blocks=%lld out[%zu]=%.9g expected bits of %.9g\n", what, tile, (long long)blocks,
                  j, out[j], ref[j]);
      ++failures;
      return;
    }
}

template <int Tile, typename S>
void exact_q4(int64_t blocks) {
  const int64_t K = blocks * kBlock;
  std::vector<uint8_t> w(blocks * kQ4TileBlockBytes);
  for (auto& v : w) v = static_cast<uint8_t>(rng());
  const auto d = scales<S>(blocks, 0.001f, 0.05f), m = scales<S>(blocks, -0.4f, 0.0f);
  std::vector<float> x(Tile * K), sums(Tile * blocks);
  for (auto& v : x) v = uniform(-2.0f, 2.0f);
  std::vector<double> ref(Tile * kRows), magnitude(Tile * kRows);
  for (int i = 0; i < Tile; ++i) {
    for (int64_t b = 0; b < blocks; ++b) {
      double total = 0.0;
      for (int64_t k = 0; k < kBlock; ++k) total += x[i * K + b * kBlock + k];
      sums[i * blocks + b] = static_cast<float>(total);
    }
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        double dot = 0.0, absdot = 0.0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) {
          dot += double(x[i * K + k]) * q4_code(w, r, k);
          absdot += std::fabs(double(x[i * K + k])) * q4_code(w, r, k);
        }
        const double db = float(d[b * kRows + r]), mb = float(m[b * kRows + r]), sb = sums[i * blocks + b];
        ref[i * kRows + r] += db * dot + mb * sb;
        magnitude[i * kRows + r] += std::fabs(db) * absdot + std::fabs(mb * sb);
      }
  }
  float out[Tile * kRows];
  neon::q4_tile<Tile>(w.data(), d.data(), m.data(), blocks, x.data(), K, sums.data(), out, true);
  expect_close(sizeof(S) == 4 ? "q4_tile (fp32 scales)" : "q4_tile", Tile, blocks, out, ref, magnitude);
}

// Q6K: two scales per block of 32 (Q6_K's sub-blocks of 16), part g of a block for its k in [16g, 16g + 16).
template <int Tile, bool Q6K>
void exact_q8(int64_t blocks) {
  constexpr int Groups = Q6K ? 2 : 1;
  const int64_t K = blocks * kBlock, span = kBlock / Groups;
  std::vector<int8_t> w(blocks * kQ8TileBlockBytes);
  for (auto& v : w) v = static_cast<int8_t>(rng());
  const Q8Scales d = q8_scales(blocks, Q6K);
  std::vector<float> x(Tile * K);
  for (auto& v : x) v = uniform(-2.0f, 2.0f);
  std::vector<double> ref(Tile * kRows), magnitude(Tile * kRows);
  for (int i = 0; i < Tile; ++i)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t g = 0; g < blocks * Groups; ++g) {
        double dot = 0.0, absdot = 0.0;
        for (int64_t k = g * span; k < (g + 1) * span; ++k) {
          dot += double(x[i * K + k]) * q8_code(w, r, k);
          absdot += std::fabs(double(x[i * K + k]) * q8_code(w, r, k));
        }
        const double scale = d.scale(g / Groups, static_cast<int>(g % Groups), r);
        ref[i * kRows + r] += scale * dot;
        magnitude[i * kRows + r] += std::fabs(scale) * absdot;
      }
  float out[Tile * kRows];
  if constexpr (Q6K)
    neon::q8_tile<Tile>(w.data(), Q6KTileScales{d.q6k.data()}, blocks, x.data(), K, out, true);
  else
    neon::q8_tile<Tile>(w.data(), d.d.data(), blocks, x.data(), K, out, true);
  expect_close(Q6K ? "q8_tile (Q6_K scales)" : "q8_tile", Tile, blocks, out, ref, magnitude);
}

#if defined(TOKENMILL_GGUF_INT8_NEON)
// Random int8 activation codes in [-127, 127] with their per-block scales dx and dx · Σ codes.
struct Int8Acts {
  std::vector<int8_t> codes;
  std::vector<float> dx, xs;
};

Int8Acts int8_acts(int tile, int64_t blocks) {
  Int8Acts a{std::vector<int8_t>(tile * blocks * kBlock), std::vector<float>(tile * blocks),
             std::vector<float>(tile * blocks)};
  for (auto& v : a.codes) v = static_cast<int8_t>(std::uniform_int_distribution<int>(-127, 127)(rng));
  for (int64_t rb = 0; rb < tile * blocks; ++rb) {
    int32_t total = 0;
    for (int64_t k = 0; k < kBlock; ++k) total += a.codes[rb * kBlock + k];
    a.dx[rb] = uniform(0.001f, 0.03f);
    a.xs[rb] = a.dx[rb] * static_cast<float>(total);
  }
  return a;
}

template <int Tile>
void int8_q4(int64_t blocks) {
  const int64_t K = blocks * kBlock;
  std::vector<uint8_t> w(blocks * kQ4TileBlockBytes);
  for (auto& v : w) v = static_cast<uint8_t>(rng());
  const auto d = scales<__fp16>(blocks, 0.001f, 0.05f), m = scales<__fp16>(blocks, -0.4f, 0.0f);
  const Int8Acts a = int8_acts(Tile, blocks);
  std::vector<float> ref(Tile * kRows);
  for (int i = 0; i < Tile; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) dot += q4_code(w, r, k) * a.codes[i * K + k];
        acc = acc + static_cast<float>(dot) * (float(d[b * kRows + r]) * a.dx[i * blocks + b]);
        acc = acc + float(m[b * kRows + r]) * a.xs[i * blocks + b];
      }
      ref[i * kRows + r] = acc;
    }
  float out[Tile * kRows];
  neon::q4_tile_int8<Tile>(w.data(), d.data(), m.data(), blocks, a.codes.data(), K, a.dx.data(), a.xs.data(), out,
                           true);
  expect_bits("q4_tile_int8", Tile, blocks, out, ref);
}

template <int Tile, bool Q6K>
void int8_q8(int64_t blocks) {
  constexpr int Groups = Q6K ? 2 : 1;
  const int64_t K = blocks * kBlock, span = kBlock / Groups;
  std::vector<int8_t> w(blocks * kQ8TileBlockBytes);
  for (auto& v : w) v = static_cast<int8_t>(rng());
  w[0] = -128;  // the extreme code: Q8_0 files hold -127..127, SDOT takes -128 too
  const Q8Scales d = q8_scales(blocks, Q6K);
  const Int8Acts a = int8_acts(Tile, blocks);
  std::vector<float> ref(Tile * kRows);
  for (int i = 0; i < Tile; ++i)
    for (int64_t r = 0; r < kRows; ++r) {
      float acc = 0.0f;
      for (int64_t g = 0; g < blocks * Groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * span; k < (g + 1) * span; ++k) dot += q8_code(w, r, k) * a.codes[i * K + k];
        const float scale = d.scale(g / Groups, static_cast<int>(g % Groups), r);
        acc = acc + static_cast<float>(dot) * (scale * a.dx[i * blocks + g / Groups]);
      }
      ref[i * kRows + r] = acc;
    }
  float out[Tile * kRows];
  if constexpr (Q6K)
    neon::q8_tile_int8<Tile>(w.data(), Q6KTileScales{d.q6k.data()}, blocks, a.codes.data(), K, a.dx.data(), out, true);
  else
    neon::q8_tile_int8<Tile>(w.data(), d.d.data(), blocks, a.codes.data(), K, a.dx.data(), out, true);
  expect_bits(Q6K ? "q8_tile_int8 (Q6_K scales)" : "q8_tile_int8", Tile, blocks, out, ref);
}
#endif

template <int Tile>
void every_tile(int64_t blocks) {
  exact_q4<Tile, __fp16>(blocks);
  exact_q4<Tile, float>(blocks);
  exact_q8<Tile, false>(blocks);
  if (blocks % kQ6KBlocks == 0) exact_q8<Tile, true>(blocks);  // whole super-blocks of 256 weights
#if defined(TOKENMILL_GGUF_INT8_NEON)
  int8_q4<Tile>(blocks);
  int8_q8<Tile, false>(blocks);
  if (blocks % kQ6KBlocks == 0) int8_q8<Tile, true>(blocks);
#endif
}

// The activations' rounding (gguf_quantize.h): the NEON path against the portable rule, bit for bit, on random blocks
// of several magnitudes and on blocks of ties, NaN, inf and zeros, with one and two groups per block.
uint16_t bf16_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);  // the values below are bf16 exactly, or NaN/inf
}

void quantize_blocks() {
  std::vector<std::vector<float>> blocks;
  for (float magnitude : {1e-3f, 1.0f, 300.0f}) {
    for (int n = 0; n < 20; ++n) {
      std::vector<float> b(kBlock);
      for (auto& v : b) v = uniform(-magnitude, magnitude);
      blocks.push_back(b);
    }
  }
  std::vector<float> ties(kBlock, 0.0f);
  const float tie_values[] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 126.5f, -126.5f};
  std::memcpy(ties.data(), tie_values, sizeof tie_values);
  blocks.push_back(ties);
  blocks.push_back(std::vector<float>(kBlock, 0.0f));
  std::vector<float> special = blocks[25];
  special[3] = NAN;
  blocks.push_back(special);
  special[7] = INFINITY;
  blocks.push_back(special);
  for (const auto& values : blocks) {
    uint16_t x[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) x[k] = bf16_of(values[k]);
    for (int groups : {1, 2}) {
      int8_t codes[2][kBlock];
      float scale[2], sum[2];
      int32_t totals[2][2] = {{0, 0}, {0, 0}};
      quantize_block(x, {codes[0], &scale[0], &sum[0], totals[0], groups});
      quantize_block_portable(x, {codes[1], &scale[1], &sum[1], totals[1], groups});
      const bool same = std::memcmp(codes[0], codes[1], sizeof codes[0]) == 0 &&
                        std::memcmp(&scale[0], &scale[1], sizeof(float)) == 0 &&
                        std::memcmp(&sum[0], &sum[1], sizeof(float)) == 0 && totals[0][0] == totals[1][0] &&
                        totals[0][1] == totals[1][1];
      if (!same) {
        std::printf("FAIL quantize_block groups=%d first value %.9g\n", groups, values[0]);
        ++failures;
      }
    }
  }
}

}  // namespace

int main() {
  quantize_blocks();
  for (const int64_t blocks : {1, 2, 3, 8, 16}) {
    every_tile<1>(blocks);
    every_tile<2>(blocks);
    every_tile<3>(blocks);
  }
#if defined(TOKENMILL_GGUF_INT8_NEON)
  const char* int8 = "neon_dotprod";
#else
  const char* int8 = "none";
#endif
  std::printf("%s: exact-weights tiles neon, int8 tiles %s\n", failures ? "FAILED" : "OK", int8);
  return failures ? 1 : 0;
}
