// scan_run for 32 channels (two AVX-512 registers) written with intrinsics, for decaying scans (rows_scan.h).
//
// The portable step spends most of its issue slots on exp2: a round-to-integer by adding and subtracting a
// shifter, the clamp, and the exponent-field add. AVX-512 has the two instructions that replace them:
// vreduceps gives f = x - round(x) and vscalefps gives p * 2^k, exact for every k (0 or a denormal below
// 2^-126, where the portable exp2 clamps). The polynomial and the multiply-adds are the portable step's, in
// its order, so the outputs equal it wherever 2^x is a normal float. Two registers a state give the
// out-of-order core two independent exp chains. Measured on a 2-core Xeon (AVX-512): 0.18 ns per state and
// lane against 0.28 for the portable step's x86-64-v4 clone at 16 lanes (docs/kernels.md).
//
// These functions carry their own target attribute, so the ISA-dispatched kernels call them (they are not
// inlined into the AVX2 and baseline clones) and must check avx512_runs() first.
#pragma once

#include "rows_scan.h"

#if ZOO_CPU_DISPATCH_ENABLED
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#define ZOO_AVX512_RUNS 1
#define ZOO_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define ZOO_AVX512_RUNS 0
#endif

namespace zoo_scan {

constexpr int64_t kAvx512Lanes = 32;
constexpr int64_t kRunPrefetch = 2;  // steps ahead that scan_run_avx512 fetches its rows

// Whether the kernels use the AVX-512 runs: the CPU has x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) and the
// environment does not set ZOO_CPU_AVX512=0 (the switch that times or checks the portable path on such a CPU).
// Read once per process.
inline bool avx512_runs() {
#if ZOO_AVX512_RUNS
  static const bool on = [] {
    __builtin_cpu_init();
    const char* env = std::getenv("ZOO_CPU_AVX512");
    return __builtin_cpu_supports("x86-64-v4") && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return on;
#else
  return false;
#endif
}

#if ZOO_AVX512_RUNS
// 2^x for 16 lanes, x <= 0
ZOO_TARGET_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT);  // x - round(x), in [-1/2, 1/2]
  const float* c = zoo_vec::kExp2Poly;
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, _mm512_sub_ps(x, f));
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
    if (s + kRunPrefetch < steps) {  // the next rows, whose loads otherwise start each step with a stall
      zoo_vec::prefetch_span(u + kRunPrefetch * r.u_step, kAvx512Lanes * sizeof(float));
      zoo_vec::prefetch_span(Bt + kRunPrefetch * r.bc_step, N * sizeof(float));
      zoo_vec::prefetch_span(Ct + kRunPrefetch * r.bc_step, N * sizeof(float));
    }
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
#endif

}  // namespace zoo_scan
