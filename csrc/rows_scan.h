// One step of the selective scan for W channels in the vector lanes, in the (batch, L, dim) row
// layout: the inner loop of every row-layout CPU kernel (mixer_cpu.cpp, rows_cpu.cpp).
//
// Two compile-time flags shape the hot loop: Softplus (dt = softplus(delta + bias), else delta + bias) and
// Decaying (the op has checked dt >= 0 and A <= 0, so every exponent dt * A is <= 0 and exp2 needs only its
// lower clamp). decaying_scan() is that check, made once per op call.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_vec.h"

namespace zoo_scan {

// whether the scan's exponents dt * A are all <= 0: dt >= 0 (softplus) and A <= 0 (A = -exp(A_log), as every
// model builds it; a NaN in A fails the test). max_A: the largest value of the op's A.
inline bool decaying_scan(bool softplus, float max_A) { return softplus && max_A <= 0.0f; }

// time scales are computed for this many steps at a time, in a pass of their own before those steps' state
// updates: softplus is a long dependent chain, and inside the step it stalled the start of every state loop
constexpr int64_t kDtSteps = 16;

template <bool Decaying>
ZOO_INLINE float decay(float exponent) {
  return Decaying ? zoo_vec::exp2_nonpositive(exponent) : zoo_vec::exp2(exponent);
}

// Per state n: h_n = exp(dt * A_n) * h_n + dt * u * B_n, and y = D * u + sum_n h_n * C_n. u, dt: the
// step's W channels; At: A_n * log2(e), h: N x W (state-major; see load_scaled_A); Bt, Ct: the step's N
// values (shared by the lanes); y: W outputs, accumulated in registers and stored once. States > 0 fixes N at
// compile time (MSVMamba's and VMamba's d_state 1, where the state loop's own overhead is most of the step).
template <int64_t W, bool Decaying, int64_t States = 0>
ZOO_INLINE void scan_step_dt(const float* __restrict up, const float* __restrict dt, const float* __restrict Dd,
                             const float* __restrict At, float* __restrict h, const float* __restrict Bt,
                             const float* __restrict Ct, int64_t N, float* __restrict y_out) {
  if constexpr (States > 0) N = States;
  float dtu[W], y[W];
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
      const float hj = decay<Decaying>(dt[j] * an[j]) * hn[j] + dtu[j] * bn;
      hn[j] = hj;
      y[j] += hj * cn;
    }
  }
  for (int64_t j = 0; j < W; ++j) y_out[j] = y[j];
}

// Where a run of consecutive scan steps reads: step 0's u row (channel 0 of the lanes) and B / C rows, and how
// far each moves per step (negative for a reverse scan).
struct StepRows {
  const float* u;
  int64_t u_step;
  const float *B, *C;
  int64_t bc_step;
};

// Fetches the rows (lanes of u, N of B and C) of step s + kRunPrefetch of a run of `steps`: the hand-written runs
// walk u at a stride of a whole token row, which the hardware prefetchers do not follow, and otherwise start each
// step with a load stall (A/B 0.97 on the AVX2 run).
constexpr int64_t kRunPrefetch = 2;
ZOO_INLINE void prefetch_run_rows(const StepRows& r, int64_t s, int64_t steps, int64_t lanes, int64_t N) {
  if (s + kRunPrefetch >= steps) return;
  const int64_t t = s + kRunPrefetch;
  zoo_vec::prefetch_span(r.u + t * r.u_step, lanes * int64_t(sizeof(float)));
  zoo_vec::prefetch_span(r.B + t * r.bc_step, N * int64_t(sizeof(float)));
  zoo_vec::prefetch_span(r.C + t * r.bc_step, N * int64_t(sizeof(float)));
}

// The most negative exponent 2^x takes before its clamp (a normal float: exp2_clamped's exponent-field add).
constexpr float kExp2Floor = -126.0f;

// the smallest of At's n values (At = A * log2(e), <= 0 in a decaying scan)
ZOO_INLINE float min_scaled_A(const float* __restrict At, int64_t n) {
  float m = 0.0f;
#pragma omp simd reduction(min : m)
  for (int64_t i = 0; i < n; ++i) m = std::min(m, At[i]);
  return m;
}

// whether every exponent dt * At of a run lies at or above kExp2Floor, so that 2^x needs no clamp: the run's
// largest time scale times min_At (min_scaled_A). Float rounding is monotone, so the bound holds for the products
// as computed.
ZOO_INLINE bool exponents_bounded(float max_dt, float min_At) { return max_dt * min_At >= kExp2Floor; }

// `steps` steps of scan_step_dt: step s takes its time scales from dt + s * W and writes its W outputs to y + s * W
template <int64_t W, bool Decaying, int64_t States = 0>
ZOO_INLINE void scan_run(const StepRows& r, int64_t steps, const float* __restrict dt, const float* __restrict Dd,
                         const float* __restrict At, float* __restrict h, int64_t N, float* __restrict y) {
  for (int64_t s = 0; s < steps; ++s) {
    scan_step_dt<W, Decaying, States>(r.u + s * r.u_step, dt + s * W, Dd, At, h, r.B + s * r.bc_step,
                                      r.C + s * r.bc_step, N, y + s * W);
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

// dt = softplus(bias + sum_r dlow[r] * Wt[r]) for W lanes: dt_proj folded into the scan. dlow: the token's R
// low-rank values (shared by the lanes); Wt: R x W, the lanes' dt_proj weights (see load_dt_weight). The sums
// run in rank order, four ranks per pass over raw: raw lives in memory, and one rank a pass made the whole sum
// a chain of store-to-load round trips (a lane loop with the rank loop inside it is not vectorised).
template <int64_t W, bool Softplus>
ZOO_INLINE void step_dt_lowrank(const float* __restrict dlow, int64_t R, const float* __restrict Wt,
                                const float* __restrict bias, float* __restrict dt) {
  float raw[W];
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) raw[j] = bias[j];
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const float d0 = dlow[r], d1 = dlow[r + 1], d2 = dlow[r + 2], d3 = dlow[r + 3];
    const float* __restrict w = Wt + r * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      float v = raw[j];
      v += d0 * w[j];
      v += d1 * w[W + j];
      v += d2 * w[2 * W + j];
      v += d3 * w[3 * W + j];
      raw[j] = v;
    }
  }
  for (; r < R; ++r) {
    const float d = dlow[r];
    const float* __restrict w = Wt + r * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) raw[j] += d * w[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) dt[j] = Softplus ? zoo_vec::softplus(raw[j]) : raw[j];
}

using zoo_vec::Vec8;
constexpr int64_t kVec8Lanes = zoo_vec::kVecLanes<Vec8>;

// Where the items of lowrank_sums read and write: item i's R low-rank values at dlow + i * dlow_step, its weights
// (R x 8V, rank-major) at Wt + i * wt_step, its bias at bias + i * bias_step and its sums at raw + i * raw_step.
// Vim's mixer sums consecutive steps of one channel block (the weights shared); MSVMamba's and VMamba's scans
// sum one step's channel blocks (the low-rank values shared).
struct LowRankItems {
  const float* dlow;
  int64_t dlow_step;
  const float* Wt;
  int64_t wt_step;
  const float* bias;
  int64_t bias_step;
  float* raw;
  int64_t raw_step;
};

// step_dt_lowrank's sums bias + sum_r dlow[r] * Wt[r] (before softplus) for S items of V eight-lane vectors at
// once. The S * V sums advance together, one rank at a time, in rank order: the same multiply-adds in the same
// order as step_dt_lowrank, whose single sum is a chain of R dependent multiply-adds that left the FMA units
// idle for most of their latency.
template <int64_t V, int64_t S>
ZOO_INLINE void lowrank_sums(const LowRankItems& it, int64_t R) {
  constexpr int64_t W = V * kVec8Lanes;
  Vec8 acc[S][V];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t v = 0; v < V; ++v) acc[s][v] = zoo_vec::vload<Vec8>(it.bias + s * it.bias_step + v * kVec8Lanes);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t s = 0; s < S; ++s) {
      const float d = it.dlow[s * it.dlow_step + r];
      const float* w = it.Wt + s * it.wt_step + r * W;
      for (int64_t v = 0; v < V; ++v) acc[s][v] += d * zoo_vec::vload<Vec8>(w + v * kVec8Lanes);
    }
  }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t v = 0; v < V; ++v) zoo_vec::vstore(it.raw + s * it.raw_step + v * kVec8Lanes, acc[s][v]);
}

// lowrank_sums over `items` items, eight vectors in flight (S * V = 8), then the remainder one item at a time
template <int64_t V>
ZOO_INLINE void lowrank_sums_all(LowRankItems it, int64_t items, int64_t R) {
  constexpr int64_t S = V >= 8 ? 1 : 8 / V;
  int64_t i = 0;
  for (; i + S <= items; i += S) {
    lowrank_sums<V, S>(it, R);
    it.dlow += S * it.dlow_step, it.Wt += S * it.wt_step, it.bias += S * it.bias_step, it.raw += S * it.raw_step;
  }
  for (; i < items; ++i) {
    lowrank_sums<V, 1>(it, R);
    it.dlow += it.dlow_step, it.Wt += it.wt_step, it.bias += it.bias_step, it.raw += it.raw_step;
  }
}

// softplus in place over n values (or nothing): a pass of its own after the sums, its elements all independent
template <bool Softplus>
ZOO_INLINE void softplus_in_place(float* __restrict x, int64_t n) {
  if constexpr (Softplus) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = zoo_vec::softplus(x[i]);
  }
}

// the time scales of `steps` consecutive steps (at most kDtSteps) of W lanes into dt (steps x W), dt_proj folded
// in: step s reads its R low-rank values at dlow + s * dlow_step (negative for a reverse scan). Equal to
// step_dt_lowrank per step; W a multiple of 8.
template <int64_t W, bool Softplus>
ZOO_INLINE void dt_run_lowrank(const float* dlow, int64_t dlow_step, int64_t steps, int64_t R, const float* Wt,
                               const float* bias, float* dt) {
  static_assert(W % kVec8Lanes == 0, "dt_run_lowrank takes whole 8-lane vectors");
  lowrank_sums_all<W / kVec8Lanes>({dlow, dlow_step, Wt, 0, bias, 0, dt, W}, steps, R);
  softplus_in_place<Softplus>(dt, steps * W);
}

// dt_proj's weight row of channel c (R values) as step_dt_lowrank reads it: Wt[r * W + lane] = w_row[r]
ZOO_INLINE void load_dt_weight(const float* w_row, int64_t R, int64_t W, int64_t lane, float* Wt) {
  for (int64_t r = 0; r < R; ++r) Wt[r * W + lane] = w_row[r];
}

}  // namespace zoo_scan
