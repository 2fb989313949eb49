// Small fp32 SIMD helpers shared by the CPU kernels: conversions and rounding between the model dtype (fp32 or bf16)
// and fp32 arithmetic, 16-lane vector loads and stores, exp, reductions and the thread-pool helper.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace tokenmill {

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

// v in every lane, as one broadcast. (`f32x16{} + v` would cost an add, since 0 + -0 is +0; a lane-by-lane loop
// compiles to 16 masked broadcasts.)
inline f32x16 splat16(float v) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_set1_ps(v);
#else
  return v - f32x16{};  // x - 0 is x for every x, so this folds into the broadcast
#endif
}

// a·b + c per lane, as one fused multiply-add where the CPU has one. The kernels are built with -ffp-contract=off so
// that the elementwise operators round exactly as the eager path does; dot products and exp, whose summation order or
// approximation differ from PyTorch's anyway, ask for the fused instruction here (half the instructions).
inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  // Two 8-lane halves (AVX2 + FMA: Intel since Haswell, AMD since Zen); the copies stay in registers.
  __m256 a8[2], b8[2], c8[2];
  std::memcpy(a8, &a, sizeof(a));
  std::memcpy(b8, &b, sizeof(b));
  std::memcpy(c8, &c, sizeof(c));
  const __m256 r8[2] = {_mm256_fmadd_ps(a8[0], b8[0], c8[0]), _mm256_fmadd_ps(a8[1], b8[1], c8[1])};
  f32x16 r;
  std::memcpy(&r, r8, sizeof(r));
  return r;
#elif defined(__aarch64__) && defined(__ARM_NEON)
  // Four 4-lane quarters: FMA is part of aarch64's base NEON.
  float32x4_t a4[4], b4[4], c4[4];
  std::memcpy(a4, &a, sizeof(a));
  std::memcpy(b4, &b, sizeof(b));
  std::memcpy(c4, &c, sizeof(c));
  for (int q = 0; q < 4; ++q) c4[q] = vfmaq_f32(c4[q], a4[q], b4[q]);
  f32x16 r;
  std::memcpy(&r, c4, sizeof(r));
  return r;
#else
  return a * b + c;
#endif
}

// exp(x) on 16 lanes by range reduction and a degree-6 polynomial (Cephes' coefficients; ~1 ulp): unlike std::exp it
// has no branches or errno. x is clamped to [-87.3, 88.3] (2^±126 scales stay normal), so it never overflows (the
// largest result is ~2e38) and underflows to ~1e-38, not 0.
inline f32x16 exp16(f32x16 x) {
  const f32x16 zero = {};
  x = x < zero - 87.3f ? zero - 87.3f : x;
  x = x > zero + 88.3f ? zero + 88.3f : x;
  const f32x16 scaled = x * 1.44269504088896341f;
  const i32x16 n = __builtin_convertvector(scaled + (scaled >= zero ? zero + 0.5f : zero - 0.5f), i32x16);
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = fma16(nf, zero - 0.693359375f, x);
  r = fma16(nf, zero + 2.12194440e-4f, r);
  f32x16 p = zero + 1.9875691500e-4f;
  p = fma16(p, r, zero + 1.3981999507e-3f);
  p = fma16(p, r, zero + 8.3334519073e-3f);
  p = fma16(p, r, zero + 4.1665795894e-2f);
  p = fma16(p, r, zero + 1.6666665459e-1f);
  p = fma16(p, r, zero + 5.0000001201e-1f);
  p = fma16(p, r * r, r) + 1.f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / x on 16 lanes for x >= 1: a 14-bit estimate and one Newton step (~1 ulp) where AVX-512 has the estimate,
// instead of a division (several times slower).
inline f32x16 reciprocal16(f32x16 x) {
#if defined(__AVX512F__)
  const f32x16 one = splat16(1.f);
  const f32x16 r = (f32x16)_mm512_rcp14_ps((__m512)x);
  return fma16(r, fma16(f32x16{} - x, r, one), r);
#else
  return 1.f / x;
#endif
}

// The same exp and reciprocal for one value (loop tails), so that a value gets the same result whichever loop it
// falls in.
inline float exp_approx(float x) { return exp16(splat16(x))[0]; }
inline float reciprocal_approx(float x) { return reciprocal16(splat16(x))[0]; }

// Reductions keep 16 independent lanes, which the compiler turns into SIMD (it may not reorder a single chain of
// float adds), and fold them pairwise at the end.
constexpr int kLanes = 16;

inline float fold(float* lanes) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
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

// fn(std::integral_constant<int, size>{}, first) for a runtime size in [N, Max] (Max for anything larger).
template <int N, int Max, typename F>
void with_group_size(int64_t size, int64_t first, const F& fn) {
  if constexpr (N < Max) {
    if (size != N) return with_group_size<N + 1, Max>(size, first, fn);
  }
  fn(std::integral_constant<int, N>{}, first);
}

// Runs fn(std::integral_constant<int, size>{}, first_row) for `rows` rows split into `groups` consecutive groups of at
// most MaxGroup whose sizes differ by at most one, so that a tile kernel gets its row count as a compile-time constant.
template <int MaxGroup = 4, typename F>
void for_row_groups(int64_t rows, int64_t groups, const F& fn) {
  int64_t first = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = rows / groups + (g < rows % groups ? 1 : 0);
    with_group_size<1, MaxGroup>(size, first, fn);
    first += size;
  }
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

// Scores → probabilities in place, rounded to the model dtype as the eager path's softmax output is.
template <typename T>
inline void softmax_inplace(float* s, int64_t len) {
  const float top = max_of(s, len);
  // exp and its sum in one pass: 16 lane sums folded pairwise, then the tail.
  f32x16 lanes = {};
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) {
    const f32x16 e = exp16(load16(s + t) - top);
    lanes += e;
    std::memcpy(s + t, &e, sizeof(e));
  }
  float partial[16];
  std::memcpy(partial, &lanes, sizeof(partial));
  float total = fold(partial);
  for (; t < len; ++t) total += s[t] = exp_approx(s[t] - top);
  const float inv = 1.f / total;
  for (t = 0; t < len - len % 16; t += 16) {
    const f32x16 p = round16<T>(load16(s + t) * inv);
    std::memcpy(s + t, &p, sizeof(p));
  }
  for (; t < len; ++t) s[t] = rounded<T>(s[t] * inv);
}

// A decode row's own key, scored as the eager step does (an elementwise product, then a sum), into the last of each
// query head's `len` scores (q [group, D] scaled), then each head's softmax.
template <typename T, int D>
inline void score_own_and_softmax(const float* q, const float* own_k, int64_t group, int64_t len, float* scores) {
  for (int64_t g = 0; g < group; ++g) {
    float own = 0.f;
    for (int d = 0; d < D; ++d) own += rounded<T>(q[g * D + d] * own_k[d]);
    scores[g * len + len - 1] = rounded<T>(own);
  }
  for (int64_t g = 0; g < group; ++g) softmax_inplace<T>(scores + g * len, len);
}

// out [group, D]: each head's weighted cached values (acc, D / 16 vectors per head) rounded, plus its own value
// weighted by its probability (the last of its `len`), rounded, as the eager step adds the two.
template <typename T, int D>
inline void store_with_own(const f32x16* acc, const float* probs, int64_t len, const float* own_v, int64_t group,
                           T* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float p_own = probs[g * len + len - 1];
    for (int c = 0; c < D / 16; ++c)
      store16(out + g * D + 16 * c, round16<T>(acc[g * (D / 16) + c]) + round16<T>(p_own * load16(own_v + 16 * c)));
  }
}

// v[i] → lane i of the result holds the sum of v[i]'s 16 lanes: a halving tree of two-source shuffles (45
// instructions for 16 sums, where 16 separate horizontal sums take over 100).
inline f32x16 row_sums(f32x16* v) {
  for (int i = 0; i < 8; ++i)
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  for (int i = 0; i < 4; ++i)
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Requests `bytes` from `start` into the cache, one request per 64-byte line.
inline void prefetch_bytes(const void* start, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(static_cast<const char*>(start) + line);
}
}  // namespace tokenmill
