// One step of the selective scan for W channels in the vector lanes, in the (batch, L, dim) row
// layout: the inner loop of every row-layout CPU kernel (mixer_cpu.cpp, rows_cpu.cpp).
#pragma once

#include <cstdint>

#include "cpu_vec.h"

namespace zoo_scan {

// Per state n: h_n = exp(dt * A_n) * h_n + dt * u * B_n, and y = D * u + sum_n h_n * C_n. u, dt: the
// step's W channels; At: A_n * log2(e), h: N x W (state-major; see load_scaled_A); Bt, Ct: the step's N
// values (shared by the lanes); y: W outputs.
template <int64_t W>
ZOO_INLINE void scan_step_dt(const float* __restrict up, const float* __restrict dt, const float* __restrict Dd,
                             const float* __restrict At, float* __restrict h, const float* __restrict Bt,
                             const float* __restrict Ct, int64_t N, float* __restrict y) {
  float dtu[W];
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) {
    dtu[j] = dt[j] * up[j];
    y[j] = Dd[j] * up[j];
  }
  for (int64_t n = 0; n < N; ++n) {
    const float bn = Bt[n], cn = Ct[n];
    float* __restrict hn = h + n * W;
    const float* __restrict an = At + n * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const float hj = zoo_vec::exp2(dt[j] * an[j]) * hn[j] + dtu[j] * bn;
      hn[j] = hj;
      y[j] += hj * cn;
    }
  }
}

// A (its row of N states for channel c) as scan_step_dt reads it: At[n * W + lane] = A[c, n] * log2(e)
ZOO_INLINE void load_scaled_A(const float* A_row, int64_t N, int64_t W, int64_t lane, float* At) {
  for (int64_t n = 0; n < N; ++n) At[n * W + lane] = A_row[n] * zoo_vec::kLog2e;
}

// dt = softplus(delta + bias) (or delta + bias) for W channels: the step's time scale.
template <int64_t W, bool Softplus>
ZOO_INLINE void step_dt(const float* __restrict dp, const float* __restrict bias, float* __restrict dt) {
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) {
    const float raw = dp[j] + bias[j];
    dt[j] = Softplus ? zoo_vec::softplus(raw) : raw;
  }
}

// One step from the raw delta: step_dt, then scan_step_dt.
template <int64_t W, bool Softplus>
ZOO_INLINE void scan_step(const float* __restrict up, const float* __restrict dp, const float* __restrict bias,
                          const float* __restrict Dd, const float* __restrict At, float* __restrict h,
                          const float* __restrict Bt, const float* __restrict Ct, int64_t N,
                          float* __restrict y) {
  float dt[W];
  step_dt<W, Softplus>(dp, bias, dt);
  scan_step_dt<W>(up, dt, Dd, At, h, Bt, Ct, N, y);
}

}  // namespace zoo_scan
