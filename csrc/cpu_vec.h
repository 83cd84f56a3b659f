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
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define ZOO_CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define ZOO_CPU_DISPATCH_ENABLED 1
#else
#define ZOO_CPU_DISPATCH
#define ZOO_CPU_DISPATCH_ENABLED 0
#endif

// Hand-written AVX-512 and AVX2 code (intrinsics, or vector types wider than AVX2's) lives in functions of these
// targets, outside the clones; the dispatched kernels call it where avx512_kernels() / avx2_kernels() say so.
#if ZOO_CPU_DISPATCH_ENABLED
#define ZOO_INTRINSICS 1
#define ZOO_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define ZOO_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define ZOO_INTRINSICS 0
#define ZOO_TARGET_AVX512
#define ZOO_TARGET_AVX2
#endif

// callees of dispatched kernels must be inlined into each clone, or they run as baseline code
#if defined(__GNUC__)
#define ZOO_INLINE inline __attribute__((always_inline))
#else
#define ZOO_INLINE inline
#endif

namespace zoo_vec {

// The clamps below compare bit patterns, not floats: integer min is one vector instruction, while GCC
// turns a float min/max pair feeding a polynomial into compares and blends on the result. As signed
// ints, positive floats order as the floats do (and every negative one is below them); as unsigned
// ints, negative floats order by magnitude (and every non-negative one is below them).
ZOO_INLINE float clamp_below(float x, uint32_t lo_bits) {  // x >= lo, a negative bound
  uint32_t xu;
  std::memcpy(&xu, &x, sizeof(xu));
  xu = std::min(xu, lo_bits);
  std::memcpy(&x, &xu, sizeof(x));
  return x;
}
ZOO_INLINE float clamp_bits(float x, int32_t hi_bits, uint32_t lo_bits) {  // lo <= x <= hi
  int32_t xi;
  std::memcpy(&xi, &x, sizeof(xi));
  xi = std::min(xi, hi_bits);  // x <= hi (a positive bound)
  std::memcpy(&x, &xi, sizeof(x));
  return clamp_below(x, lo_bits);
}

// c_0 x^n + c_1 x^(n-1) + ... + c_n by Horner's rule, the coefficients highest power first: one multiply-add
// a term, in this order, so a fitted polynomial's error bound holds as stated
ZOO_INLINE float horner(float, float p) { return p; }
template <typename... C>
ZOO_INLINE float horner(float x, float p, float c, C... rest) {
  return horner(x, p * x + c, rest...);
}

// p * 2^k for p in [1/2, 2) and k = round(...) held in the low mantissa bits of t = value + 1.5 * 2^23:
// an integer add of k << 23 into p's exponent field (the callers' clamps keep the result a normal float).
// t's bits are 0x4b400000 + k and 0x4b400000 << 23 wraps to 0 in 32 bits, so the shift alone leaves k << 23.
ZOO_INLINE float times_pow2(float p, float t) {
  uint32_t tb, pb;
  std::memcpy(&tb, &t, sizeof(tb));
  std::memcpy(&pb, &p, sizeof(pb));
  pb += tb << 23;
  std::memcpy(&p, &pb, sizeof(p));
  return p;
}

constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits

// e^r for |r| <= ln2 / 2: a degree-5 polynomial fitted for relative error (< 2.1e-7 evaluated in float32; a
// degree-6 Taylor one costs a multiply-add more for the same error)
ZOO_INLINE float exp_reduced(float r) {
  return horner(r, 8.29746201634407e-3f, 4.1915178298950195e-2f, 1.6667576134204865e-1f, 4.9998897314071655e-1f,
                9.999997019767761e-1f, 1.0000001192092896f);
}

// e^x = 2^k e^r for x already clamped: Cody-Waite reduction (k ln2 in two parts, exact without FMA hardware)
ZOO_INLINE float exp_clamped(float x) {
  const float t = x * 1.44269504088896341f + kShifter;
  const float k = t - kShifter;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-06f;
  return times_pow2(exp_reduced(r), t);
}

// exp for float (relative error < 2.3e-7, about 1 ulp). Inputs are clamped to [-87, 88], so no inf/denormal
// paths.
ZOO_INLINE float exp(float x) { return exp_clamped(clamp_bits(x, int32_t(0x42b00000), uint32_t(0xc2ae0000))); }

// exp clamped below only (at -87): exact as exp for every x <= 88, one integer min cheaper (and no compare and
// blend); for arguments that are <= 0 by construction (softplus's exp(-|x|), erfc's tail)
ZOO_INLINE float exp_nonpositive(float x) { return exp_clamped(clamp_below(x, uint32_t(0xc2ae0000))); }  // >= -87
ZOO_INLINE double exp(double x) { return std::exp(x); }

constexpr float kLog2e = 1.44269504088896341f;

// 2^f for f in [-1/2, 1/2]: a degree-5 polynomial fitted for relative error (< 2.3e-7 evaluated in float32),
// highest power first (the AVX-512 step fits 2^f on [0, 1] instead: kExp2PolyUnit, rows_scan_avx512.h)
constexpr float kExp2Poly[6] = {1.3276735699402353e-3f, 9.675638928525701e-3f, 5.550713257439724e-2f,
                                2.402211764460156e-1f,  6.93146966368772e-1f,  1.0000000721537872f};
ZOO_INLINE float exp2_reduced(float f) {
  const float* c = kExp2Poly;
  return horner(f, c[0], c[1], c[2], c[3], c[4], c[5]);
}

// 2^x for x already clamped: k = round(x), f = x - k, 2^k by times_pow2, 2^f by exp2_reduced
ZOO_INLINE float exp2_clamped(float x) {
  const float t = x + kShifter;
  return times_pow2(exp2_reduced(x - (t - kShifter)), t);
}

// 2^x, x clamped to [-126, 127] (error as exp above). The row-layout scans call it for exp(dt * A) with log2(e)
// folded into A once per channel, which saves exp's two-step range reduction and a polynomial term on the
// hottest line of Vim's scan.
ZOO_INLINE float exp2(float x) { return exp2_clamped(clamp_bits(x, int32_t(0x42fe0000), uint32_t(0xc2fc0000))); }

// exp2 for x <= 0 (a decay: dt >= 0 times A <= 0), clamped below only: one integer min instead of two, and no
// compare-and-blend that GCC emits for the upper bound. Exact as exp2 for every x <= 127.
ZOO_INLINE float exp2_nonpositive(float x) { return exp2_clamped(clamp_below(x, uint32_t(0xc2fc0000))); }  // >= -126

// log(1 + e) for e in [0, 1] as e * q(e), q a degree-8 fit of log1p(e) / e for relative error (< 2.3e-7
// evaluated in float32): no division and no exponent split, and tiny e keep their relative accuracy
ZOO_INLINE float log1p_unit(float e) {
  return e * horner(e, 5.229491274803877e-3f, -2.9490191489458084e-2f, 7.819728553295135e-2f, -1.366039514541626e-1f,
                    1.9104421138763428e-1f, -2.484249472618103e-1f, 3.331902027130127e-1f, -4.999948740005493e-1f,
                    9.999999403953552e-1f);
}

// softplus(x) = log(1 + exp(x)) written as max(x, 0) + log1p(exp(-|x|)), which neither overflows
// nor loses the small values; equals torch's softplus (threshold 20) to float rounding.
ZOO_INLINE float softplus(float x) { return std::max(x, 0.0f) + log1p_unit(exp_nonpositive(-std::fabs(x))); }

// silu(x) = x / (1 + e^-x) with e^-x as 2^(-x log2(e)): exp's two-step range reduction and a polynomial term
// fewer; the product's rounding adds up to |x| * 6e-8 to e^-x's relative error, which the quotient damps by
// e^-x / (1 + e^-x)
ZOO_INLINE float silu(float x) { return x / (1.0f + exp2(x * -kLog2e)); }

// erfc(z) for z >= 0 as t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2), P a degree-9 fit (relative error < 1e-6 for
// z < 4, growing with z^2's rounding beyond: erfc(4) = 1.5e-8). 0 from z = 9 (erfc(9) = 4.1e-37), with z capped
// there first: past it the product is denormal, which costs a microcode assist (~150 cycles) on x86, and
// random-init models feed GELU such values in bulk.
constexpr float kErfcZero = 9.0f;
ZOO_INLINE float erfc_nonneg(float z) {
  const float zc = std::min(z, kErfcZero);
  const float t = 1.0f / (1.0f + 0.5f * zc);
  const float p = horner(t, 0.1381460428237915f, -0.6437131762504578f, 1.0690253973007202f, -0.5790688991546631f,
                         -0.17752012610435486f, 0.05306508019566536f, 0.016953041777014732f, 0.39033734798431396f,
                         0.9982022047042847f, -1.265426754951477f);
  return z < kErfcZero ? t * exp_nonpositive(p - zc * zc) : 0.0f;
}

// exact (erf) GELU, x * Phi(x), with the normal tail 0.5 * erfc(|x| / sqrt 2) taken on the side where it is
// small, so neither side cancels
ZOO_INLINE float gelu(float x) {
  const float tail = 0.5f * erfc_nonneg(std::fabs(x) * 0.70710678118654752f);
  return x * (x < 0.0f ? tail : 1.0f - tail);
}

// Whether the environment allows the hand-written paths: it does unless it sets ZOO_CPU_INTRINSICS=0, the one
// switch that sends every kernel to its portable code (to time or check it). Read once per process.
inline bool intrinsics_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("ZOO_CPU_INTRINSICS");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return allowed;
}

// whether the CPU has x86-64-v4 (AVX-512 F/BW/CD/DQ/VL; v4 = true) or x86-64-v3 (AVX2 + FMA), and the hand-written
// paths are compiled in and allowed (intrinsics_allowed)
inline bool intrinsics_for(bool v4) {
#if ZOO_INTRINSICS
  __builtin_cpu_init();
  return intrinsics_allowed() && (v4 ? __builtin_cpu_supports("x86-64-v4") : __builtin_cpu_supports("x86-64-v3"));
#else
  (void)v4;
  return false;
#endif
}

// whether the kernels take their hand-written AVX-512 paths
inline bool avx512_kernels() {
  static const bool on = intrinsics_for(true);
  return on;
}

// whether the kernels take their hand-written AVX2 paths; on an AVX-512 CPU they serve the work its AVX-512 paths
// leave to 16-lane blocks
inline bool avx2_kernels() {
  static const bool on = intrinsics_for(false);
  return on;
}

// Lanes as GCC vector-extension values, so one implementation serves every clone: Vec8 is one ymm register in the
// AVX2 and AVX-512 clones and two xmm ones in the baseline; Vec16 one zmm register in the AVX-512 clone. The AVX2
// clone lowers Vec16 badly (its loads and stores went through general registers, 2-3x the time of Vec8 code), so
// 16-lane code runs only where avx512_kernels() says so.
using Vec8 = float __attribute__((vector_size(32)));
using Vec16 = float __attribute__((vector_size(64)));
template <typename V>
constexpr int64_t kVecLanes = int64_t(sizeof(V) / sizeof(float));
template <typename V>
ZOO_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
ZOO_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Prefetches the cache lines of `bytes` bytes from p (for reading, or for writing): the scans walk tokens
// in orders the hardware prefetchers do not follow (a column of a row-major map is one row apart per step).
template <bool ForWrite = false>
ZOO_INLINE void prefetch_span(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, ForWrite ? 1 : 0, 3);
#else
  (void)p, (void)bytes;
#endif
}

// at::parallel_for grain for items of `work_per_item` inner steps each: a call with fewer than ~2^16
// steps per task runs on the calling thread, so small calls never wake (and, on a busy machine, wait
// for) the OpenMP team
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_item));
}

}  // namespace zoo_vec
