// GGUF block tiles for aarch64 NEON (Apple Silicon, Graviton, Ampere), both modes of gguf_matmul.cpp, on its packed
// layout (gguf_layout.h; described in gguf_matmul.cpp). Torch-free, so that tests/cpp/gguf_neon_test.cpp checks them
// under qemu-aarch64 without an aarch64 libtorch.
//
// Exact weights (`q4_tile`, `q8_tile`): like the AVX2 tiles, codes widen to fp32 (exact) and multiply the activations
// widened to fp32 (exact products), summed with FMAs; a row tile is four 4-lane vectors. vld2q splits a chunk's
// bytes 2r + e into its e = 0 and e = 1 halves, so each lane is a row and no horizontal sums are needed.
//
// int8 activations (`q4_tile_int8`, `q8_tile_int8`, with the dot-product extension): SDOT adds four int8 products
// per 32-bit lane. Two consecutive chunks (k-pairs 2q and 2q + 1) are zipped as 16-bit words so that lane r holds row
// r's codes for four consecutive k; one SDOT against the broadcast four activation codes adds row r's quad sum to lane
// r. Q4 nibbles (0..15) and Q8 codes are both signed bytes to SDOT. The integer sums are exact and the fp32 steps per
// block are gguf_matmul.cpp's `block_term` and minimum term in the same order (vmul, vadd: no fused operation), so the
// results are bit-identical to the AVX2, AVX-512 VNNI and portable int8 tiles.
#pragma once

#if defined(__aarch64__) && defined(__ARM_NEON)
#define TOKENMILL_GGUF_NEON 1
#include <arm_neon.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gguf_layout.h"

namespace tokenmill::gguf::neon {

// Four scales (or minimums) of a tile-block as fp32 lanes: the file's f16 bits (at::Half, __fp16) or fp32 (Q4_K).
template <typename S>
inline float32x4_t scales4(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return vld1q_f32(p);
  } else {
    static_assert(sizeof(S) == 2, "f16 scales");
    uint16_t bits[4];
    std::memcpy(bits, p, sizeof bits);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(bits)));
  }
}

// Rows 4g..4g+3 of the scales of part `part` of Q8 tile-block b: the stored f16 (or fp32) per block, or Q6_K's
// d · sc of that sub-block in fp32 (exact).
template <typename S>
inline float32x4_t part_scales4(const S* d, int64_t b, int, int g) {
  return scales4(d + b * kRows + 4 * g);
}
inline float32x4_t part_scales4(const Q6KTileScales& s, int64_t b, int part, int g) {
  int8_t sc[8] = {};
  std::memcpy(sc, s.sc(b, part) + 4 * g, 4);
  const float32x4_t scf = vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vld1_s8(sc)))));
  return vmulq_f32(scales4(reinterpret_cast<const uint16_t*>(s.d_bits(b)) + 4 * g), scf);
}

// Every vector of a tile's sums set to v.
template <int Tile, typename V>
inline void fill(V sums[][4], V v) {
  for (int i = 0; i < Tile; ++i)
    for (int g = 0; g < 4; ++g) sums[i][g] = v;
}

// The 16 codes of one k-offset (lane r: row r) widened to fp32, four rows per vector.
inline void widen(uint8x16_t codes, float32x4_t w[4]) {
  const uint16x8_t low = vmovl_u8(vget_low_u8(codes)), high = vmovl_high_u8(codes);
  w[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(low)));
  w[1] = vcvtq_f32_u32(vmovl_high_u16(low));
  w[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(high)));
  w[3] = vcvtq_f32_u32(vmovl_high_u16(high));
}

inline void widen(int8x16_t codes, float32x4_t w[4]) {
  const int16x8_t low = vmovl_s8(vget_low_s8(codes)), high = vmovl_high_s8(codes);
  w[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(low)));
  w[1] = vcvtq_f32_s32(vmovl_high_s16(low));
  w[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(high)));
  w[3] = vcvtq_f32_s32(vmovl_high_s16(high));
}

// dot[i][g] += w[g] · x_i[k] for the Tile activation rows (stride K).
template <int Tile>
inline void fma_codes(const float32x4_t w[4], const float* x, int64_t K, int64_t k, float32x4_t dot[][4]) {
  for (int i = 0; i < Tile; ++i) {
    const float32x4_t xs = vdupq_n_f32(x[i * K + k]);
    for (int g = 0; g < 4; ++g) dot[i][g] = vfmaq_f32(dot[i][g], w[g], xs);
  }
}

template <int Tile>
inline void store_tile(const float32x4_t acc[][4], float* out) {
  for (int i = 0; i < Tile; ++i)
    for (int g = 0; g < 4; ++g) vst1q_f32(out + i * kRows + 4 * g, acc[i][g]);
}

// One Q4 row tile against Tile activation rows (x: fp32, stride K; sums: each block's Σx, stride blocks).
template <int Tile, typename S>
void q4_tile(const uint8_t* w, const S* d, const S* m, int64_t blocks, const float* x, int64_t K, const float* sums,
             float* out, bool prefetch) {
  const uint8x16_t low_nibble = vdupq_n_u8(0x0F);
  float32x4_t acc[Tile][4];
  fill<Tile>(acc, vdupq_n_f32(0.0f));
  for (int64_t b = 0; b < blocks; ++b) {
    float32x4_t dot[Tile][4];
    fill<Tile>(dot, vdupq_n_f32(0.0f));
    const uint8_t* chunk = w + b * kQ4TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(chunk);
    const float* xb = x + b * kBlock;
    for (int64_t c = 0; c < 8; ++c) {
      const uint8x16x2_t halves = vld2q_u8(chunk + 32 * c);  // val[e]: byte 2r + e of the chunk in lane r
      for (int e = 0; e < 2; ++e) {
        float32x4_t codes[4];
        widen(vandq_u8(halves.val[e], low_nibble), codes);
        fma_codes<Tile>(codes, xb, K, 2 * c + e, dot);
        widen(vshrq_n_u8(halves.val[e], 4), codes);
        fma_codes<Tile>(codes, xb, K, 16 + 2 * c + e, dot);
      }
    }
    for (int g = 0; g < 4; ++g) {
      const float32x4_t scale = scales4(d + b * kRows + 4 * g), minimum = scales4(m + b * kRows + 4 * g);
      for (int i = 0; i < Tile; ++i) {
        acc[i][g] = vfmaq_f32(acc[i][g], dot[i][g], scale);
        acc[i][g] = vfmaq_f32(acc[i][g], minimum, vdupq_n_f32(sums[i * blocks + b]));
      }
    }
  }
  store_tile<Tile>(acc, out);
}

// One Q8 row tile against Tile activation rows: one scale per 32 / Groups weights (Groups 2: Q6_K's 16).
template <int Tile, typename Scales>
void q8_tile(const int8_t* w, const Scales& d, int64_t blocks, const float* x, int64_t K, float* out,
             bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  float32x4_t acc[Tile][4];
  fill<Tile>(acc, vdupq_n_f32(0.0f));
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* chunk = w + b * kQ8TileBlockBytes;
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(chunk);
    for (int part = 0; part < Groups; ++part) {
      float32x4_t dot[Tile][4];
      fill<Tile>(dot, vdupq_n_f32(0.0f));
      for (int64_t j = part * kQ8Pairs<Groups>; j < (part + 1) * kQ8Pairs<Groups>; ++j) {
        const int8x16x2_t halves = vld2q_s8(chunk + 32 * j);
        for (int e = 0; e < 2; ++e) {
          float32x4_t codes[4];
          widen(halves.val[e], codes);
          fma_codes<Tile>(codes, x + b * kBlock, K, 2 * j + e, dot);
        }
      }
      for (int g = 0; g < 4; ++g) {
        const float32x4_t scale = part_scales4(d, b, part, g);
        for (int i = 0; i < Tile; ++i) acc[i][g] = vfmaq_f32(acc[i][g], dot[i][g], scale);
      }
    }
  }
  store_tile<Tile>(acc, out);
}

#if defined(__ARM_FEATURE_DOTPROD)
#define TOKENMILL_GGUF_INT8_NEON 1

// Chunks 2q and 2q + 1 of a tile-block (64 bytes from p) as four vectors of 4 rows × 4 consecutive k: 32-bit lane l
// of quads[g] is row 4g + l's codes for k-pairs 2q and 2q + 1.
inline void zip_quads(const uint8_t* p, uint8x16_t quads[4]) {
  const uint16x8_t first_low = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
  const uint16x8_t first_high = vld1q_u16(reinterpret_cast<const uint16_t*>(p + 16));
  const uint16x8_t second_low = vld1q_u16(reinterpret_cast<const uint16_t*>(p + 32));
  const uint16x8_t second_high = vld1q_u16(reinterpret_cast<const uint16_t*>(p + 48));
  quads[0] = vreinterpretq_u8_u16(vzip1q_u16(first_low, second_low));
  quads[1] = vreinterpretq_u8_u16(vzip2q_u16(first_low, second_low));
  quads[2] = vreinterpretq_u8_u16(vzip1q_u16(first_high, second_high));
  quads[3] = vreinterpretq_u8_u16(vzip2q_u16(first_high, second_high));
}

// Four activation codes broadcast to every 32-bit lane.
inline int8x16_t quad_of(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return vreinterpretq_s8_s32(vdupq_n_s32(four));
}

// acc[i][g] gets one block (or part): dot[i][g] its exact integer sums, scale[g] its weight scales, as block_term and
// the minimum term do per lane.
template <int Tile, typename S>
inline void add_block(const int32x4_t dot[][4], const float32x4_t scale[4], const S* m, const float* dx,
                      const float* xs, int64_t blocks, int64_t b, float32x4_t acc[][4]) {
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < Tile; ++i) {
      const float32x4_t term =
          vmulq_f32(vcvtq_f32_s32(dot[i][g]), vmulq_f32(scale[g], vdupq_n_f32(dx[i * blocks + b])));
      acc[i][g] = vaddq_f32(acc[i][g], term);
      if (m != nullptr)
        acc[i][g] = vaddq_f32(acc[i][g], vmulq_f32(scales4(m + 4 * g), vdupq_n_f32(xs[i * blocks + b])));
    }
  }
}

// One Q4 row tile against Tile rows of int8 activations (xq: stride K; dx, xs: per row and block, stride blocks).
template <int Tile, typename S>
void q4_tile_int8(const uint8_t* w, const S* d, const S* m, int64_t blocks, const int8_t* xq, int64_t K,
                  const float* dx, const float* xs, float* out, bool prefetch) {
  const uint8x16_t low_nibble = vdupq_n_u8(0x0F);
  float32x4_t acc[Tile][4];
  fill<Tile>(acc, vdupq_n_f32(0.0f));
  for (int64_t b = 0; b < blocks; ++b) {
    if (prefetch) prefetch_ahead<kQ4TileBlockBytes>(w + b * kQ4TileBlockBytes);
    int32x4_t dot[Tile][4];
    fill<Tile>(dot, vdupq_n_s32(0));
    for (int64_t q = 0; q < 4; ++q) {
      uint8x16_t quads[4];
      zip_quads(w + b * kQ4TileBlockBytes + 64 * q, quads);
      for (int i = 0; i < Tile; ++i) {
        const int8_t* xb = xq + i * K + b * kBlock;
        const int8x16_t x_low = quad_of(xb + 4 * q), x_high = quad_of(xb + 16 + 4 * q);
        for (int g = 0; g < 4; ++g) {
          dot[i][g] = vdotq_s32(dot[i][g], vreinterpretq_s8_u8(vandq_u8(quads[g], low_nibble)), x_low);
          dot[i][g] = vdotq_s32(dot[i][g], vreinterpretq_s8_u8(vshrq_n_u8(quads[g], 4)), x_high);
        }
      }
    }
    float32x4_t scale[4];
    for (int g = 0; g < 4; ++g) scale[g] = scales4(d + b * kRows + 4 * g);
    add_block<Tile>(dot, scale, m + b * kRows, dx, xs, blocks, b, acc);
  }
  store_tile<Tile>(acc, out);
}

// One Q8 row tile against Tile rows of int8 activations, one scale per 32 / Groups weights.
template <int Tile, typename Scales>
void q8_tile_int8(const int8_t* w, const Scales& d, int64_t blocks, const int8_t* xq, int64_t K, const float* dx,
                  float* out, bool prefetch) {
  constexpr int Groups = kScaleGroups<Scales>;
  constexpr int64_t kQuads = kQ8Pairs<Groups> / 2;  // chunk pairs under one scale
  float32x4_t acc[Tile][4];
  fill<Tile>(acc, vdupq_n_f32(0.0f));
  for (int64_t b = 0; b < blocks; ++b) {
    if (prefetch) prefetch_ahead<kQ8TileBlockBytes>(w + b * kQ8TileBlockBytes);
    for (int part = 0; part < Groups; ++part) {
      int32x4_t dot[Tile][4];
      fill<Tile>(dot, vdupq_n_s32(0));
      for (int64_t q = part * kQuads; q < (part + 1) * kQuads; ++q) {
        uint8x16_t quads[4];
        zip_quads(reinterpret_cast<const uint8_t*>(w + b * kQ8TileBlockBytes + 64 * q), quads);
        for (int i = 0; i < Tile; ++i) {
          const int8x16_t xq4 = quad_of(xq + i * K + b * kBlock + 4 * q);
          for (int g = 0; g < 4; ++g) dot[i][g] = vdotq_s32(dot[i][g], vreinterpretq_s8_u8(quads[g]), xq4);
        }
      }
      float32x4_t scale[4];
      for (int g = 0; g < 4; ++g) scale[g] = part_scales4(d, b, part, g);
      add_block<Tile, float>(dot, scale, nullptr, dx, nullptr, blocks, b, acc);
    }
  }
  store_tile<Tile>(acc, out);
}

#endif  // __ARM_FEATURE_DOTPROD

}  // namespace tokenmill::gguf::neon

#endif  // __aarch64__ && __ARM_NEON
