// Rounding one block of 32 bf16 activations to int8 codes for the GGUF tiles' int8 mode (gguf_matmul.cpp), in
// vectors where the build has them. torch-free, like gguf_layout.h.
//
// The rule, the same bits on every path: amax = the largest |x| of the block that is not NaN (0 if none);
// inv = 127 / amax (0 when amax is 0); each code is x · inv clamped to [-127, 127] and rounded to nearest (the
// current rounding mode: ties to even), a NaN product giving 0; scale = amax / 127 and sum = scale · Σ codes. Every
// step is an exact or correctly rounded operation on one element, and max and integer sums do not depend on their
// order, so the vector paths give the scalar loop's bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace tokenmill::gguf {

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

// Where the codes of one block go: its 32 codes, its scale and scale · Σ codes, and Σ codes per group of
// 32 / groups weights (added to `totals`, which the caller zeroes).
struct Int8Block {
  int8_t* codes;
  float* scale;
  float* sum;
  int32_t* totals;
  int groups;
};

// The multiplier that takes the block's largest |x| to 127.
inline float code_step(float amax) { return amax > 0.0f ? 127.0f / amax : 0.0f; }

// A block's scale, scale · Σ codes and group totals, from its amax and the Σ codes of its two halves of 16.
inline void finish_block(const Int8Block& out, float amax, int32_t low, int32_t high) {
  if (out.groups == 2) {
    out.totals[0] += low;
    out.totals[1] += high;
  } else {
    out.totals[0] += low + high;
  }
  *out.scale = amax / 127.0f;
  *out.sum = *out.scale * static_cast<float>(low + high);
}

// The rule in plain C++: the other paths' reference (and the tests').
inline void quantize_block_portable(const uint16_t* x, const Int8Block& out) {
  float amax = 0.0f;
  for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(bf16_bits_to_float(x[k])));  // NaN: skipped
  const float inv = code_step(amax);
  int32_t halves[2] = {0, 0};
  for (int k = 0; k < 32; ++k) {
    float v = bf16_bits_to_float(x[k]) * inv;
    v = v == v ? std::min(127.0f, std::max(-127.0f, v)) : 0.0f;  // a NaN or inf row must not overflow the codes
    const auto code = static_cast<int8_t>(std::nearbyint(v));
    out.codes[k] = code;
    halves[k / 16] += code;
  }
  finish_block(out, amax, halves[0], halves[1]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

inline __m512 bf16x16_to_float(const uint16_t* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

inline void quantize_block(const uint16_t* x, const Int8Block& out) {
  const __m512 halves[2] = {bf16x16_to_float(x), bf16x16_to_float(x + 16)};
  __m512 amax = _mm512_setzero_ps();
  for (const __m512& h : halves) {
    const __m512 a = _mm512_abs_ps(h);
    amax = _mm512_max_ps(amax, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a));  // NaN lanes: 0
  }
  const float top = _mm512_reduce_max_ps(amax);
  const __m512 inv = _mm512_set1_ps(code_step(top));
  int32_t sums[2];
  for (int h = 0; h < 2; ++h) {
    const __m512 v = _mm512_mul_ps(halves[h], inv);
    const __m512 clamped = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    // vcvtps2dq rounds in the current mode, as nearbyint does; NaN products become 0.
    const __m512i codes = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), clamped);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.codes + 16 * h), _mm512_cvtepi32_epi8(codes));
    sums[h] = _mm512_reduce_add_epi32(codes);
  }
  finish_block(out, top, sums[0], sums[1]);
}

#elif defined(__AVX2__)

inline __m256 bf16x8_to_float(const uint16_t* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}

inline int32_t lanes_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

inline void quantize_block(const uint16_t* x, const Int8Block& out) {
  __m256 parts[4], amax = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int p = 0; p < 4; ++p) {
    parts[p] = bf16x8_to_float(x + 8 * p);
    const __m256 a = _mm256_andnot_ps(sign, parts[p]);
    amax = _mm256_max_ps(amax, _mm256_and_ps(a, _mm256_cmp_ps(a, a, _CMP_ORD_Q)));  // NaN lanes: 0
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inv = _mm256_set1_ps(code_step(top));
  __m256i codes[4];
  for (int p = 0; p < 4; ++p) {
    const __m256 v = _mm256_mul_ps(parts[p], inv);
    const __m256 clamped = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    // vcvtps2dq rounds in the current mode, as nearbyint does; NaN products become 0.
    codes[p] = _mm256_and_si256(_mm256_cvtps_epi32(clamped), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
  }
  // Packing works within 128-bit lanes; the permute puts the four groups of 8 back in order.
  const __m256i bytes =
      _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.codes),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  finish_block(out, top, lanes_sum(_mm256_add_epi32(codes[0], codes[1])),
               lanes_sum(_mm256_add_epi32(codes[2], codes[3])));
}

#elif defined(__aarch64__) && defined(__ARM_NEON)

inline float32x4_t bf16x4_to_float(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

// vmaxq/vminq propagate NaN, so NaN lanes are masked by hand; vcvtnq rounds to nearest even, nearbyint's default.
inline void quantize_block(const uint16_t* x, const Int8Block& out) {
  float32x4_t parts[8], amax = vdupq_n_f32(0.0f);
  for (int p = 0; p < 8; ++p) {
    parts[p] = bf16x4_to_float(x + 4 * p);
    const float32x4_t a = vabsq_f32(parts[p]);
    amax = vmaxq_f32(amax, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(a), vceqq_f32(a, a))));
  }
  const float top = vmaxvq_f32(amax);
  const float32x4_t inv = vdupq_n_f32(code_step(top));
  int32x4_t codes[8];
  for (int p = 0; p < 8; ++p) {
    const float32x4_t v = vmulq_f32(parts[p], inv);
    const float32x4_t clamped = vminq_f32(vmaxq_f32(v, vdupq_n_f32(-127.0f)), vdupq_n_f32(127.0f));
    codes[p] = vandq_s32(vcvtnq_s32_f32(clamped), vreinterpretq_s32_u32(vceqq_f32(v, v)));
  }
  for (int p = 0; p < 8; p += 2) {
    const int16x8_t pair = vcombine_s16(vmovn_s32(codes[p]), vmovn_s32(codes[p + 1]));
    vst1_s8(out.codes + 4 * p, vmovn_s16(pair));
  }
  finish_block(out, top, vaddvq_s32(vaddq_s32(vaddq_s32(codes[0], codes[1]), vaddq_s32(codes[2], codes[3]))),
               vaddvq_s32(vaddq_s32(vaddq_s32(codes[4], codes[5]), vaddq_s32(codes[6], codes[7]))));
}

#else

inline void quantize_block(const uint16_t* x, const Int8Block& out) { quantize_block_portable(x, out); }

#endif

}  // namespace tokenmill::gguf
