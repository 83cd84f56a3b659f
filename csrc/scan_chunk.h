// Chunk algebra of the L-parallel selective scan, shared by the CUDA kernels (scan_cuda_lpar.cu)
// and a host simulation of their thread/warp decomposition (scan_chunk_host.cpp, tests).
//
// A step of the recurrence h[t] = a[t] * h[t-1] + b[t] (a = exp(dt * A), b = dt * u * B) is the
// affine map h -> a h + b, a Pair. Runs of steps compose associatively (`combine`), so each thread
// folds its run of consecutive steps into one Pair, a warp/block scan of the Pairs gives every
// thread the map from the chunk's entering state to its run's entering state, and the state is
// carried across chunks (and across segments, the two-pass scheme) by applying totals.
//
// The backward's adjoint walks time backwards. With g[t] = C[t] * dy[t] (the direct gradient into
// h[t]) and r[t] = dL/dh[t-1] through step t, r[t] = a[t] * (g[t] + r[t+1]): again affine in
// r[t+1], with the Pair (a[t], a[t] g[t]) local to step t, so the same scan runs in reverse.
// Nothing here depends on the forward state, so the adjoint carries of segments can be computed
// in parallel before the states are replayed from the forward's chunk-boundary checkpoints.
#pragma once

#if defined(__CUDACC__)
#define ZOO_HD __host__ __device__ __forceinline__
#define ZOO_UNROLL _Pragma("unroll")
#else
#define ZOO_HD inline
#define ZOO_UNROLL
#endif

namespace zoo_scan {
namespace chunk {

// The map h -> a * h + b.
template <typename T>
struct Pair {
  T a, b;
};

template <typename T>
ZOO_HD Pair<T> identity() {
  return {T(1), T(0)};
}

// `first` then `second`, in the direction of the walk.
template <typename T>
ZOO_HD Pair<T> combine(Pair<T> first, Pair<T> second) {
  return {second.a * first.a, second.a * first.b + second.b};
}

template <typename T>
ZOO_HD T apply(Pair<T> p, T h) {
  return p.a * h + p.b;
}

// One Hillis-Steele step: `lower` is the inclusive value `offset` lanes earlier in walk order.
template <typename T>
ZOO_HD Pair<T> scan_step(Pair<T> lower, Pair<T> mine, bool has_lower) {
  return has_lower ? combine(lower, mine) : mine;
}

// `init` followed by p[0], ..., p[count - 1]: the totals of earlier warps or earlier segments.
template <typename T>
ZOO_HD Pair<T> fold(const Pair<T>* p, int count, Pair<T> init) {
  for (int i = 0; i < count; ++i) init = combine(init, p[i]);
  return init;
}

// Forward: a thread's run of R steps as one Pair. Steps past the sequence end carry dt = 0, so
// a = 1 and b = 0 (the identity) and no length is needed.
template <typename T, int R>
ZOO_HD Pair<T> run_pair(const T (&a)[R], const T (&b)[R]) {
  Pair<T> p = identity<T>();
ZOO_UNROLL
  for (int i = 0; i < R; ++i) p = combine(p, Pair<T>{a[i], b[i]});
  return p;
}

// Forward replay of a run from its true entering state: stores the states, adds <h, C> into y.
template <typename T, int R>
ZOO_HD T replay(T h, const T (&a)[R], const T (&b)[R], const T (&c)[R], T (&y)[R], T (&hs)[R]) {
ZOO_UNROLL
  for (int i = 0; i < R; ++i) {
    h = a[i] * h + b[i];
    hs[i] = h;
    y[i] += h * c[i];
  }
  return h;
}

// Adjoint: the run's Pair mapping r[run end + 1] to r[run start], folded from the last step down.
template <typename T, int R>
ZOO_HD Pair<T> adjoint_run_pair(const T (&a)[R], const T (&g)[R]) {
  Pair<T> p = identity<T>();
ZOO_UNROLL
  for (int i = R - 1; i >= 0; --i) p = combine(p, Pair<T>{a[i], a[i] * g[i]});
  return p;
}

// Gradient contributions of one state over one run (the caller sums them over states/channels).
template <typename T, int R>
struct RunGrads {
  T du[R], ddt[R], dB[R], dC[R];
  T dA;
};

// Walks a run backwards from r_next = r[run end + 1]. h0 is the state entering the run, hs the
// states after each step (from `replay`), dy the output gradient, A the state's decay rate, Bv the
// step's B, g = C * dy. Accumulates into `out` (du, ddt, dB, dC, dA). Returns r[run start].
template <typename T, int R>
ZOO_HD T adjoint_replay(T r_next, T h0, const T (&hs)[R], const T (&a)[R], const T (&g)[R], const T (&dy)[R],
                        const T (&dt)[R], const T (&u)[R], const T (&Bv)[R], T A, RunGrads<T, R>& out) {
ZOO_UNROLL
  for (int i = R - 1; i >= 0; --i) {
    const T q = g[i] + r_next;  // dL/dh[t]
    const T h_prev = i == 0 ? h0 : hs[i - 1];
    const T qdt = q * dt[i];
    out.du[i] += qdt * Bv[i];
    out.dB[i] += qdt * u[i];
    out.dC[i] += dy[i] * hs[i];
    const T dah = q * a[i] * h_prev;  // d/d(dt * A) of the decay term
    out.ddt[i] += dah * A + q * u[i] * Bv[i];
    out.dA += dah * dt[i];
    r_next = a[i] * q;
  }
  return r_next;
}

}  // namespace chunk
}  // namespace zoo_scan
