// Vectorisable elementwise maths and runtime ISA dispatch shared by the CPU kernels.
//
// The functions are branch-free scalar code that GCC/Clang vectorise inside `#pragma omp simd`
// loops; the kernels that call them are marked ZOO_CPU_DISPATCH, which compiles one clone per ISA
// level (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the baseline) and picks one when the
// library is loaded (an ifunc resolver reading cpuid). The library is therefore the same on every
// x86-64 machine: no -march=native, nothing host-specific in the build or its cache key.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define ZOO_CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define ZOO_CPU_DISPATCH_ENABLED 1
#else
#define ZOO_CPU_DISPATCH
#define ZOO_CPU_DISPATCH_ENABLED 0
#endif

// callees of dispatched kernels must be inlined into each clone, or they run as baseline code
#if defined(__GNUC__)
#define ZOO_INLINE inline __attribute__((always_inline))
#else
#define ZOO_INLINE inline
#endif

namespace zoo_vec {

// exp for float: Cody-Waite range reduction to |r| <= ln2/2 and a degree-6 Taylor polynomial
// (relative error < 2.5e-7, about 1 ulp). Inputs are clamped to [-87, 88], so no inf/denormal paths.
ZOO_INLINE float exp(float x) {
  // the clamp works on the bit pattern: integer min vectorises to one instruction, while GCC turns
  // float compares here into several selects. As signed ints, floats above 88 are the larger; as
  // unsigned ints, negative floats below -87 are (their magnitude bits are larger).
  int32_t xi;
  std::memcpy(&xi, &x, sizeof(xi));
  xi = std::min(xi, int32_t(0x42b00000));                                    // 88.0f
  const uint32_t xu = std::min(static_cast<uint32_t>(xi), uint32_t(0xc2ae0000));  // -87.0f
  std::memcpy(&x, &xu, sizeof(x));
  // k = round(x / ln2) with the 1.5 * 2^23 shifter, whose low mantissa bits then hold k
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t bits = (tb - 0x4b400000 + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
ZOO_INLINE double exp(double x) { return std::exp(x); }

constexpr float kLog2e = 1.44269504088896341f;

// 2^x, x clamped to [-126, 127]: k = round(x), f = x - k in [-1/2, 1/2], 2^f by a degree-5 polynomial
// fitted for relative error (< 2.3e-7 evaluated in float32, as exp above). The row-layout scans call it for
// exp(dt * A) with log2(e) folded into A once per channel, which saves exp's two-step range reduction
// and a polynomial term on the hottest line of Vim's scan.
ZOO_INLINE float exp2(float x) {
  x = std::min(std::max(x, -126.0f), 127.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: t's low mantissa bits hold round(x)
  const float t = x + shifter;
  const float f = x - (t - shifter);
  float p = 1.3276735699402353e-3f;
  p = p * f + 9.675638928525701e-3f;
  p = p * f + 5.550713257439724e-2f;
  p = p * f + 2.402211764460156e-1f;
  p = p * f + 6.93146966368772e-1f;
  p = p * f + 1.0000000721537872f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t bits = (tb - 0x4b400000 + 127) << 23;  // 2^round(x)
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// natural log for finite x > 0: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then the atanh series
// log(m) = 2 (s + s^3/3 + ... + s^9/9), s = (m - 1) / (m + 1), |s| <= 0.172 (error < 1e-8 relative).
ZOO_INLINE float log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x007fffff) | 0x3f800000;  // mantissa in [1, 2)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + static_cast<float>(e) * 0.693147180559945309f;
}

// log(1 + e) for e >= 0, accurate for tiny e too: log(w) * e / (w - 1) with w = 1 + e rounded
ZOO_INLINE float log1p_nonneg(float e) {
  const float w = 1.0f + e;
  const float d = w - 1.0f;
  return d == 0.0f ? e : log(w) * (e / d);
}

// softplus(x) = log(1 + exp(x)) written as max(x, 0) + log1p(exp(-|x|)), which neither overflows
// nor loses the small values; equals torch's softplus (threshold 20) to float rounding.
ZOO_INLINE float softplus(float x) { return std::max(x, 0.0f) + log1p_nonneg(exp(-std::fabs(x))); }

ZOO_INLINE float silu(float x) { return x / (1.0f + exp(-x)); }

// at::parallel_for grain for items of `work_per_item` inner steps each: a call with fewer than ~2^16
// steps per task runs on the calling thread, so small calls never wake (and, on a busy machine, wait
// for) the OpenMP team
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_item));
}

}  // namespace zoo_vec
