// Host simulation of the L-parallel kernels' decomposition (scan_cuda_lpar.cu), running the same
// chunk algebra (scan_chunk.h) lane by lane: `tpr` lanes per row in warps of `warp` lanes, each lane
// a run of R consecutive steps, a chunk of tpr * R steps per block iteration, and segments of
// `seg_chunks` chunks for the two-pass scheme. Used by tests/test_scan_chunk.py through ctypes
// (plain C ABI, no torch headers, so it builds in a second). Rows are independent (batch x channel);
// the caller expands B/C to per-row (rows, N, L) and does D, z, softplus and the group sums.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "scan_chunk.h"

namespace {

using zoo_scan::chunk::Pair;
using P = Pair<double>;
namespace ch = zoo_scan::chunk;

struct Shape {
  int rows, L, N, tpr, warp, seg_chunks;
  int chunk(int R) const { return tpr * R; }
};

// Inclusive scan over the lanes of one row, as the device does it: Hillis-Steele inside each warp
// (offsets 1, 2, 4, ...), then each lane folds the totals of the warps before its own.
std::vector<P> block_inclusive_scan(std::vector<P> lanes, int warp) {
  const int n = (int)lanes.size();
  for (int w0 = 0; w0 < n; w0 += warp) {
    const int wn = std::min(warp, n - w0);
    for (int offset = 1; offset < warp; offset <<= 1) {
      std::vector<P> prev(lanes.begin() + w0, lanes.begin() + w0 + wn);
      for (int l = 0; l < wn; ++l) {
        const bool has = l >= offset;
        lanes[w0 + l] = ch::scan_step(has ? prev[l - offset] : ch::identity<double>(), prev[l], has);
      }
    }
  }
  std::vector<P> totals;
  for (int w0 = 0; w0 < n; w0 += warp) totals.push_back(lanes[std::min(n, w0 + warp) - 1]);
  for (int l = 0; l < n; ++l) {
    const int w = l / warp;
    lanes[l] = ch::combine(ch::fold(totals.data(), w, ch::identity<double>()), lanes[l]);
  }
  return lanes;
}

// exclusive prefix of each lane and the row total, in walk order; `reverse` walks the lanes from the
// last (the adjoint), as the device does by scanning over the mirrored lane index
void lane_prefixes(const std::vector<P>& pairs, int warp, bool reverse, std::vector<P>& excl, P& total) {
  const int n = (int)pairs.size();
  std::vector<P> walk(n);
  for (int l = 0; l < n; ++l) walk[l] = pairs[reverse ? n - 1 - l : l];
  std::vector<P> inc = block_inclusive_scan(walk, warp);
  excl.assign(n, ch::identity<double>());
  for (int l = 0; l < n; ++l) excl[reverse ? n - 1 - l : l] = l == 0 ? ch::identity<double>() : inc[l - 1];
  total = inc[n - 1];
}

template <int R>
struct RunInputs {
  double a[R], b[R], c[R], dt[R], u[R], Bv[R];
};

// loads lane `lane`'s run of chunk starting at t0 for state n (zero-filled past L, dt = 0 there)
template <int R>
RunInputs<R> load_run(const Shape& s, int row, int n, long t0, int lane, const double* dt, const double* u,
                      const double* A, const double* B, const double* C) {
  RunInputs<R> in;
  const double An = A[(long)row * s.N + n];
  for (int i = 0; i < R; ++i) {
    const long t = t0 + (long)lane * R + i;
    const bool ok = t < s.L;
    const long bi = ((long)row * s.N + n) * s.L + t;
    in.dt[i] = ok ? dt[(long)row * s.L + t] : 0.0;
    in.u[i] = ok ? u[(long)row * s.L + t] : 0.0;
    in.Bv[i] = ok ? B[bi] : 0.0;
    in.c[i] = ok ? C[bi] : 0.0;
    in.a[i] = std::exp(in.dt[i] * An);
    in.b[i] = in.dt[i] * in.u[i] * in.Bv[i];
  }
  return in;
}

template <int R>
P chunk_total(const Shape& s, int row, int n, long t0, const double* dt, const double* u, const double* A,
              const double* B, const double* C) {
  std::vector<P> pairs(s.tpr), excl;
  for (int lane = 0; lane < s.tpr; ++lane) {
    auto in = load_run<R>(s, row, n, t0, lane, dt, u, A, B, C);
    pairs[lane] = ch::run_pair<double, R>(in.a, in.b);
  }
  P total;
  lane_prefixes(pairs, s.warp, false, excl, total);
  return total;
}

template <int R>
void forward(const Shape& s, const double* dt, const double* u, const double* A, const double* B, const double* C,
             double* y, double* last, double* ckpt) {
  const long chunk = s.chunk(R), nchunks = (s.L + chunk - 1) / chunk;
  const long nseg = (nchunks + s.seg_chunks - 1) / s.seg_chunks;
  for (int row = 0; row < s.rows; ++row) {
    for (long t = 0; t < s.L; ++t) y[(long)row * s.L + t] = 0.0;
    for (int n = 0; n < s.N; ++n) {
      // pass 1: every segment's Pair from zero (independent of the others: parallel on the device)
      std::vector<P> seg(nseg, ch::identity<double>());
      for (long sg = 0; sg < nseg; ++sg)
        for (long c = sg * s.seg_chunks; c < std::min(nchunks, (sg + 1) * s.seg_chunks); ++c)
          seg[sg] = ch::combine(seg[sg], chunk_total<R>(s, row, n, c * chunk, dt, u, A, B, C));
      // pass 2: each segment replays from the state the segments before it leave
      double h_end = 0.0;
      for (long sg = 0; sg < nseg; ++sg) {
        double carry = ch::apply(ch::fold(seg.data(), (int)sg, ch::identity<double>()), 0.0);
        for (long c = sg * s.seg_chunks; c < std::min(nchunks, (sg + 1) * s.seg_chunks); ++c) {
          ckpt[((long)row * nchunks + c) * s.N + n] = carry;
          std::vector<RunInputs<R>> ins;
          std::vector<P> pairs(s.tpr), excl;
          for (int lane = 0; lane < s.tpr; ++lane) {
            ins.push_back(load_run<R>(s, row, n, c * chunk, lane, dt, u, A, B, C));
            pairs[lane] = ch::run_pair<double, R>(ins[lane].a, ins[lane].b);
          }
          P total;
          lane_prefixes(pairs, s.warp, false, excl, total);
          for (int lane = 0; lane < s.tpr; ++lane) {
            double yr[R] = {}, hs[R];
            ch::replay<double, R>(ch::apply(excl[lane], carry), ins[lane].a, ins[lane].b, ins[lane].c, yr, hs);
            for (int i = 0; i < R; ++i) {
              const long t = c * chunk + (long)lane * R + i;
              if (t < s.L) y[(long)row * s.L + t] += yr[i];
            }
          }
          carry = ch::apply(total, carry);
        }
        h_end = carry;
      }
      last[(long)row * s.N + n] = h_end;
    }
  }
}

template <int R>
P adjoint_chunk_pairs(const Shape& s, int row, int n, long t0, const double* dt, const double* u, const double* A,
                      const double* B, const double* C, const double* dy, std::vector<P>& excl,
                      std::vector<RunInputs<R>>& ins, std::vector<std::vector<double>>& g) {
  std::vector<P> pairs(s.tpr);
  ins.clear();
  g.assign(s.tpr, std::vector<double>(R));
  for (int lane = 0; lane < s.tpr; ++lane) {
    ins.push_back(load_run<R>(s, row, n, t0, lane, dt, u, A, B, C));
    double gr[R];
    for (int i = 0; i < R; ++i) {
      const long t = t0 + (long)lane * R + i;
      gr[i] = t < s.L ? ins[lane].c[i] * dy[(long)row * s.L + t] : 0.0;
      g[lane][i] = gr[i];
    }
    pairs[lane] = ch::adjoint_run_pair<double, R>(ins[lane].a, gr);
  }
  P total;
  lane_prefixes(pairs, s.warp, true, excl, total);
  return total;
}

template <int R>
void backward(const Shape& s, const double* dt, const double* u, const double* A, const double* B, const double* C,
              const double* dy, const double* dlast, const double* ckpt, double* du, double* ddt, double* dA,
              double* dB, double* dC) {
  const long chunk = s.chunk(R), nchunks = (s.L + chunk - 1) / chunk;
  const long nseg = (nchunks + s.seg_chunks - 1) / s.seg_chunks;
  for (int row = 0; row < s.rows; ++row) {
    for (long t = 0; t < s.L; ++t) du[(long)row * s.L + t] = ddt[(long)row * s.L + t] = 0.0;
    for (int n = 0; n < s.N; ++n) {
      std::vector<P> excl;
      std::vector<RunInputs<R>> ins;
      std::vector<std::vector<double>> g;
      // adjoint pass 1: each segment's Pair (no forward state needed), in reverse walk order
      std::vector<P> seg(nseg, ch::identity<double>());
      for (long sg = 0; sg < nseg; ++sg)
        for (long c = std::min(nchunks, (sg + 1) * s.seg_chunks) - 1; c >= sg * s.seg_chunks; --c)
          seg[sg] = ch::combine(seg[sg], adjoint_chunk_pairs<R>(s, row, n, c * chunk, dt, u, A, B, C, dy, excl, ins, g));
      const double r_last = dlast ? dlast[(long)row * s.N + n] : 0.0;
      double dA_acc = 0.0;
      for (long sg = nseg - 1; sg >= 0; --sg) {
        P later = ch::identity<double>();
        for (long k = nseg - 1; k > sg; --k) later = ch::combine(later, seg[k]);
        double r_carry = ch::apply(later, r_last);
        for (long c = std::min(nchunks, (sg + 1) * s.seg_chunks) - 1; c >= sg * s.seg_chunks; --c) {
          const long t0 = c * chunk;
          // forward states of the chunk from its checkpoint
          std::vector<P> fpairs(s.tpr), fexcl;
          P ftotal;
          P atotal = adjoint_chunk_pairs<R>(s, row, n, t0, dt, u, A, B, C, dy, excl, ins, g);
          for (int lane = 0; lane < s.tpr; ++lane) fpairs[lane] = ch::run_pair<double, R>(ins[lane].a, ins[lane].b);
          lane_prefixes(fpairs, s.warp, false, fexcl, ftotal);
          const double h_chunk = ckpt[((long)row * nchunks + c) * s.N + n];
          for (int lane = 0; lane < s.tpr; ++lane) {
            const RunInputs<R>& in = ins[lane];
            double yr[R] = {}, hs[R], gr[R], dyr[R];
            const double h0 = ch::apply(fexcl[lane], h_chunk);
            ch::replay<double, R>(h0, in.a, in.b, in.c, yr, hs);
            for (int i = 0; i < R; ++i) {
              const long t = t0 + (long)lane * R + i;
              gr[i] = g[lane][i];
              dyr[i] = t < s.L ? dy[(long)row * s.L + t] : 0.0;
            }
            ch::RunGrads<double, R> out = {};
            const double r_next = ch::apply(excl[lane], r_carry);
            ch::adjoint_replay<double, R>(r_next, h0, hs, in.a, gr, dyr, in.dt, in.u, in.Bv,
                                          A[(long)row * s.N + n], out);
            dA_acc += out.dA;
            for (int i = 0; i < R; ++i) {
              const long t = t0 + (long)lane * R + i;
              if (t >= s.L) continue;
              du[(long)row * s.L + t] += out.du[i];
              ddt[(long)row * s.L + t] += out.ddt[i];
              dB[((long)row * s.N + n) * s.L + t] = out.dB[i];
              dC[((long)row * s.N + n) * s.L + t] = out.dC[i];
            }
          }
          r_carry = ch::apply(atotal, r_carry);
        }
      }
      dA[(long)row * s.N + n] = dA_acc;
    }
  }
}

template <typename F>
int with_run(int R, F f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); return 0;
    case 3: f(std::integral_constant<int, 3>{}); return 0;
    case 4: f(std::integral_constant<int, 4>{}); return 0;
    case 8: f(std::integral_constant<int, 8>{}); return 0;
    default: return 1;  // run lengths the tests use; the device uses 4 and 8
  }
}

}  // namespace

extern "C" {

// returns 0 on success, 1 for an unsupported run length R, 2 for a bad decomposition
int zoo_chunk_fwd(int rows, int L, int N, int tpr, int warp, int R, int seg_chunks, const double* dt, const double* u,
                  const double* A, const double* B, const double* C, double* y, double* last, double* ckpt) {
  if (tpr < 1 || warp < 1 || seg_chunks < 1 || L < 1) return 2;
  Shape s{rows, L, N, tpr, warp, seg_chunks};
  return with_run(R, [&](auto r) { forward<decltype(r)::value>(s, dt, u, A, B, C, y, last, ckpt); });
}

int zoo_chunk_bwd(int rows, int L, int N, int tpr, int warp, int R, int seg_chunks, const double* dt, const double* u,
                  const double* A, const double* B, const double* C, const double* dy, const double* dlast,
                  const double* ckpt, double* du, double* ddt, double* dA, double* dB, double* dC) {
  if (tpr < 1 || warp < 1 || seg_chunks < 1 || L < 1) return 2;
  Shape s{rows, L, N, tpr, warp, seg_chunks};
  return with_run(R, [&](auto r) {
    backward<decltype(r)::value>(s, dt, u, A, B, C, dy, dlast, ckpt, du, ddt, dA, dB, dC);
  });
}
}
