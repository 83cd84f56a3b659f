// The scan steps of rows_scan.h written with AVX-512 intrinsics, for decaying scans: scan_run for 32 channels
// (two registers; Vim's mixer) and one step over blocks of 16 (MSVMamba's and VMamba's order scans).
//
// The portable step spends most of its issue slots on exp2: a round-to-integer by adding and subtracting a
// shifter, the clamp, and the exponent-field add. AVX-512 has the two instructions that replace them:
// vreduceps gives f = x - floor(x) and vscalefps gives p * 2^floor(x), exact for every x (0 or a denormal
// below 2^-126, where the portable exp2 clamps); with the polynomial on [0, 1] the step needs no x - f. The
// multiply-adds are the portable step's, in its order; 2^x differs from the portable one by its polynomials'
// rounding (both within 2.3e-7 relative). Two registers a state give the out-of-order core two independent exp
// chains. Measured on a 2-core Xeon (AVX-512), when 2^x still took x - round(x) and one subtraction more: 0.18 ns
// per state and lane against 0.28 for the portable step's x86-64-v4 clone at 16 lanes (docs/kernels.md).
//
// These functions carry their own target attribute, so the ISA-dispatched kernels call them (they are not
// inlined into the AVX2 and baseline clones) and must check zoo_vec::avx512_kernels() first.
#pragma once

#include "rows_scan.h"

#if ZOO_INTRINSICS
#include <immintrin.h>
#endif

namespace zoo_scan {

constexpr int64_t kAvx512Lanes = 32;

#if ZOO_INTRINSICS
// 2^f for f in [0, 1]: a degree-5 polynomial fitted for relative error (< 1.5e-7 evaluated in float32), highest
// power first. Over [0, 1] instead of the portable step's [-1/2, 1/2] (kExp2Poly, the same width and error), so
// that vscalefps, which scales by 2^floor(x), takes x itself and no x - f is computed.
constexpr float kExp2PolyUnit[6] = {1.8775727367028594e-3f, 8.989344350993633e-3f, 5.582631751894951e-2f,
                                    2.4015361070632935e-1f, 6.931530833244324e-1f, 9.999999403953552e-1f};

// 2^x for 16 lanes, x <= 0: f = x - floor(x), 2^f by the polynomial, times 2^floor(x)
ZOO_TARGET_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF);  // in [0, 1] (1 for a tiny negative x)
  const float* c = kExp2PolyUnit;
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, x);
}

// scan_run<kAvx512Lanes, true> (rows_scan.h), for a scan whose exponents dt * A are all <= 0
ZOO_TARGET_AVX512 inline void scan_run_avx512(const StepRows& r, int64_t steps, const float* __restrict dt,
                                             const float* __restrict Dd, const float* __restrict At,
                                             float* __restrict h, int64_t N, float* __restrict y) {
  constexpr int64_t V = 16;  // lanes per register
  const __m512 D0 = _mm512_loadu_ps(Dd), D1 = _mm512_loadu_ps(Dd + V);
  for (int64_t s = 0; s < steps; ++s) {
    const float* u = r.u + s * r.u_step;
    const float *Bt = r.B + s * r.bc_step, *Ct = r.C + s * r.bc_step;
    prefetch_run_rows(r, s, steps, kAvx512Lanes, N);
    const __m512 u0 = _mm512_loadu_ps(u), u1 = _mm512_loadu_ps(u + V);
    const __m512 d0 = _mm512_loadu_ps(dt + s * kAvx512Lanes), d1 = _mm512_loadu_ps(dt + s * kAvx512Lanes + V);
    const __m512 du0 = _mm512_mul_ps(d0, u0), du1 = _mm512_mul_ps(d1, u1);
    __m512 y0 = _mm512_mul_ps(D0, u0), y1 = _mm512_mul_ps(D1, u1);
    for (int64_t n = 0; n < N; ++n) {
      const __m512 bn = _mm512_set1_ps(Bt[n]), cn = _mm512_set1_ps(Ct[n]);
      float* hn = h + n * kAvx512Lanes;
      const float* an = At + n * kAvx512Lanes;
      const __m512 e0 = exp2_avx512(_mm512_mul_ps(d0, _mm512_loadu_ps(an)));
      const __m512 e1 = exp2_avx512(_mm512_mul_ps(d1, _mm512_loadu_ps(an + V)));
      const __m512 h0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(hn), _mm512_mul_ps(du0, bn));
      const __m512 h1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(hn + V), _mm512_mul_ps(du1, bn));
      _mm512_storeu_ps(hn, h0);
      _mm512_storeu_ps(hn + V, h1);
      y0 = _mm512_fmadd_ps(h0, cn, y0);
      y1 = _mm512_fmadd_ps(h1, cn, y1);
    }
    _mm512_storeu_ps(y + s * kAvx512Lanes, y0);
    _mm512_storeu_ps(y + s * kAvx512Lanes + V, y1);
  }
}

// One step of a decaying scan over `lanes` (a multiple of 16) channels in blocks of 16, the block layout of
// rows_cpu.cpp (block j's At and h start at j * N, state-major inside): scan_step_dt<16, true, States> for
// each block. States > 0 fixes N (d_state 1: MSVMamba, VMamba).
template <int64_t States = 0>
ZOO_TARGET_AVX512 inline void scan_step_blocks_avx512(const float* __restrict u, const float* __restrict dt,
                                                     const float* __restrict Dd, const float* __restrict At,
                                                     float* __restrict h, const float* __restrict Bt,
                                                     const float* __restrict Ct, int64_t N, int64_t lanes,
                                                     float* __restrict y) {
  constexpr int64_t V = 16;
  if constexpr (States > 0) N = States;
  for (int64_t j = 0; j < lanes; j += V) {
    const __m512 uv = _mm512_loadu_ps(u + j), dv = _mm512_loadu_ps(dt + j);
    const __m512 du = _mm512_mul_ps(dv, uv);
    __m512 yv = _mm512_mul_ps(_mm512_loadu_ps(Dd + j), uv);
    const float* an = At + j * N;
    float* hn = h + j * N;
    for (int64_t n = 0; n < N; ++n) {
      const __m512 e = exp2_avx512(_mm512_mul_ps(dv, _mm512_loadu_ps(an + n * V)));
      const __m512 hv = _mm512_fmadd_ps(e, _mm512_loadu_ps(hn + n * V), _mm512_mul_ps(du, _mm512_set1_ps(Bt[n])));
      _mm512_storeu_ps(hn + n * V, hv);
      yv = _mm512_fmadd_ps(hv, _mm512_set1_ps(Ct[n]), yv);
    }
    _mm512_storeu_ps(y + j, yv);
  }
}
#endif

}  // namespace zoo_scan
