// The scan step of rows_scan.h written with AVX2 intrinsics, for decaying scans: scan_run for 16 channels (two
// registers; Vim's mixer). MSVMamba's and VMamba's order scans (d_state 1, a call per step) keep the portable
// step: this one, called per step outside the clone, measured 1.13-1.16 of their time.
//
// Runs whose exponents all lie above -126 (exponents_bounded; Bounded = true) take 2^(dt * A) from
// exp2_product_avx2: the product feeds the shifter add and the reduction as two multiply-adds, with no clamp,
// 9% off the scan's time (A/B on Vim-Ti @512 and Vim-S, AVX2 build on an Intel Xeon). Other runs clamp the
// rounded product and take k from vroundps. Both use the portable step's polynomial (kExp2Poly, in its order)
// and exponent-field add; the bounded 2^x rounds f once, not twice, so it may differ in its last bit. Before
// the fused reduction, on a 2-core EPYC (Zen 3) over a long run of Vim-Ti steps: 0.28 ns per state and lane
// bounded, 0.30 clamped, against 0.32 for the portable step's AVX2 clone.
//
// These functions carry their own target attribute, so the ISA-dispatched kernels call them (they are not
// inlined into the baseline clone) and must check zoo_vec::avx2_kernels() first.
#pragma once

#include "rows_scan.h"

#if ZOO_INTRINSICS
#include <immintrin.h>
#endif

namespace zoo_scan {

constexpr int64_t kAvx2Lanes = 16;  // two registers a state: two independent exp chains

#if ZOO_INTRINSICS
// 2^(k + f) from f in [-1/2, 1/2] and k in the low bits of k_bits: kExp2Poly in its order, then k << 23 added
// into the exponent field (as zoo_vec::times_pow2; higher bits of k_bits shift out)
ZOO_TARGET_AVX2 inline __m256 exp2_reduced_avx2(__m256 f, __m256i k_bits) {
  const float* c = zoo_vec::kExp2Poly;
  __m256 p = _mm256_set1_ps(c[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(k_bits, 23)));
}

// 2^x for x <= 0, equal to zoo_vec::exp2_nonpositive
ZOO_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExp2Floor), x);  // this operand order keeps a NaN
  const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return exp2_reduced_avx2(_mm256_sub_ps(x, k), _mm256_cvtps_epi32(k));
}

// The largest of n time scales (0 if none is larger), n a multiple of 8; a NaN is skipped (its lanes come out NaN
// either way). Written out because GCC left an `omp simd` max reduction scalar: one serial max chain over the
// run, 12% of Vim-Ti's scan (A/B 0.88).
ZOO_TARGET_AVX2 inline float max_time_scale_avx2(const float* __restrict dt, int64_t n) {
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // two chains; vmaxps returns its second operand when either is a NaN
    m0 = _mm256_max_ps(_mm256_loadu_ps(dt + i), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(dt + i + 8), m1);
  }
  if (i < n) m0 = _mm256_max_ps(_mm256_loadu_ps(dt + i), m0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  return *std::max_element(lanes, lanes + 8);
}

// 2^(d * a) for products in [-126, 0]: the product goes into the shifter add and the reduction by two
// multiply-adds (k = round(d * a) in t's low mantissa bits, f = d * a - k rounded once), which saves
// exp2_avx2's multiply, vroundps (two uops on Intel cores) and vcvtps2dq. f is the exact product's remainder,
// not the rounded product's, so 2^x may differ from exp2_avx2's in its last bit.
ZOO_TARGET_AVX2 inline __m256 exp2_product_avx2(__m256 d, __m256 a) {
  const __m256 shifter = _mm256_set1_ps(zoo_vec::kShifter);
  const __m256 t = _mm256_fmadd_ps(d, a, shifter);
  const __m256 f = _mm256_fmsub_ps(d, a, _mm256_sub_ps(t, shifter));
  return exp2_reduced_avx2(f, _mm256_castps_si256(t));
}

// one state of one 8-lane register: h = 2^(dt * At) * h + du * b, y += h * c
template <bool Bounded>
ZOO_TARGET_AVX2 inline void state_avx2(__m256 d, __m256 du, const float* at, float* hp, __m256 b, __m256 c,
                                       __m256& y) {
  const __m256 e = Bounded ? exp2_product_avx2(d, _mm256_loadu_ps(at))
                           : exp2_avx2(_mm256_mul_ps(d, _mm256_loadu_ps(at)));
  const __m256 hv = _mm256_fmadd_ps(e, _mm256_loadu_ps(hp), _mm256_mul_ps(du, b));
  _mm256_storeu_ps(hp, hv);
  y = _mm256_fmadd_ps(hv, c, y);
}

// scan_run<kAvx2Lanes, true> (rows_scan.h), for a scan whose exponents dt * A are all <= 0
template <bool Bounded>
ZOO_TARGET_AVX2 inline void scan_run_avx2(const StepRows& r, int64_t steps, const float* __restrict dt,
                                         const float* __restrict Dd, const float* __restrict At,
                                         float* __restrict h, int64_t N, float* __restrict y) {
  constexpr int64_t V = 8;
  const __m256 D0 = _mm256_loadu_ps(Dd), D1 = _mm256_loadu_ps(Dd + V);
  for (int64_t s = 0; s < steps; ++s) {
    const float* u = r.u + s * r.u_step;
    const float *Bt = r.B + s * r.bc_step, *Ct = r.C + s * r.bc_step;
    prefetch_run_rows(r, s, steps, kAvx2Lanes, N);
    const __m256 u0 = _mm256_loadu_ps(u), u1 = _mm256_loadu_ps(u + V);
    const __m256 d0 = _mm256_loadu_ps(dt + s * kAvx2Lanes), d1 = _mm256_loadu_ps(dt + s * kAvx2Lanes + V);
    const __m256 du0 = _mm256_mul_ps(d0, u0), du1 = _mm256_mul_ps(d1, u1);
    __m256 y0 = _mm256_mul_ps(D0, u0), y1 = _mm256_mul_ps(D1, u1);
    for (int64_t n = 0; n < N; ++n) {
      const __m256 bn = _mm256_broadcast_ss(Bt + n), cn = _mm256_broadcast_ss(Ct + n);
      state_avx2<Bounded>(d0, du0, At + n * kAvx2Lanes, h + n * kAvx2Lanes, bn, cn, y0);
      state_avx2<Bounded>(d1, du1, At + n * kAvx2Lanes + V, h + n * kAvx2Lanes + V, bn, cn, y1);
    }
    _mm256_storeu_ps(y + s * kAvx2Lanes, y0);
    _mm256_storeu_ps(y + s * kAvx2Lanes + V, y1);
  }
}

#endif

}  // namespace zoo_scan
