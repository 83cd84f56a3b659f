// Selective scan on the CPU: the CPU kernels of the zoo_scan ops.
//
// Work is split over (batch x channel) in the forward and over (batch x group) in the backward, so
// that every gradient of a group-shared B/C is owned by exactly one task: no atomics, and the
// result does not depend on the thread count. The inner loops run over the state dimension on
// contiguous buffers so that the compiler vectorises them (cpu_vec.h: branch-free exp, one clone per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "scan_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vec.h"

namespace zoo_scan {
namespace {


// Everything a kernel needs, already converted: per-channel rows in the input dtype, weights and
// the (time-major) B/C in the accumulation dtype.
template <typename in_t, typename acc_t>
struct ScanArgs {
  int64_t batch, dim, L, N, groups;
  bool varB, varC, softplus, reverse;
  // optional visiting order: step s reads position index[s] of the L-long inputs and writes step s
  // of the Ls-long output (multi-direction scans over one map without reordered copies)
  int64_t Ls;
  const int64_t* index;
  const in_t* u;
  // elementwise terms precomputed by vectorised ATen ops before the sequential walk
  const acc_t* dt;    // softplus(delta + bias) (or delta + bias), (batch, dim, L)
  const acc_t* gate;  // forward: silu(z), or null
  const acc_t* sz;    // backward: sigmoid(z), or null
  const acc_t* dsp;   // backward: sigmoid(delta + bias) when softplus is applied, else null
  const in_t* z;      // may be null
  const acc_t* A;  // (dim, N)
  const acc_t* B;  // varB: (batch, G, L, N) time-major; else (dim, N)
  const acc_t* C;
  const acc_t* D;     // may be null
  const acc_t* bias;  // may be null
};

template <typename acc_t>
ZOO_INLINE const acc_t* state_row(const acc_t* M, bool var, int64_t b, int64_t g, int64_t d, int64_t t,
                              int64_t G, int64_t L, int64_t N) {
  return var ? M + ((b * G + g) * L + t) * N : M + d * N;
}

// Steps handled per batch of the three phases below (the backward also checkpoints the state here).
constexpr int64_t kChunk = 64;

// Per-task scratch for one chunk of steps: positions, steps, inputs, the decays exp(dt * A) and the
// inputs dt * u * B (step-major, N per step) and the states after each step.
template <typename acc_t>
struct ChunkBuffers {
  std::vector<int64_t> ts;
  std::vector<acc_t> dts, us, decay, drive, hs;
  explicit ChunkBuffers(int64_t N)
      : ts(kChunk), dts(kChunk), us(kChunk), decay(kChunk * N), drive(kChunk * N), hs(kChunk * N) {}
};

// Steps s0 .. s0 + len of channel (b, d), starting from state h (updated in place). Split in phases
// so that the sequential part is one multiply-add per state: (1) the elementwise terms of all steps,
// exp included, as long vectorisable loops (flat over the steps when N == 1), (2) the recurrence,
// storing every state in hs. The per-step overhead of a fused loop (short remainder loops, the
// reduction of y) dominated at small N.
template <typename in_t, typename acc_t, typename Pos>
ZOO_INLINE void chunk_states(const ScanArgs<in_t, acc_t>& a, const Pos& position, int64_t b, int64_t g, int64_t d,
                         int64_t row, int64_t s0, int64_t len, const acc_t* Al, acc_t* h, ChunkBuffers<acc_t>& w) {
  const int64_t N = a.N, L = a.L, G = a.groups;
  int64_t* ts = w.ts.data();
  acc_t *dts = w.dts.data(), *us = w.us.data(), *ea = w.decay.data(), *eb = w.drive.data(), *hs = w.hs.data();
  for (int64_t i = 0; i < len; ++i) {
    const int64_t t = position(s0 + i);
    ts[i] = t;
    dts[i] = a.dt[row + t];
    us[i] = static_cast<acc_t>(a.u[row + t]);
  }
  if (N == 1) {
    const acc_t A0 = Al[0];
    for (int64_t i = 0; i < len; ++i) eb[i] = *state_row(a.B, a.varB, b, g, d, ts[i], G, L, N);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      ea[i] = zoo_vec::exp(dts[i] * A0);
      eb[i] *= dts[i] * us[i];
    }
    acc_t h0 = h[0];
    for (int64_t i = 0; i < len; ++i) {
      h0 = ea[i] * h0 + eb[i];
      hs[i] = h0;
    }
    h[0] = h0;
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dt = dts[i], dtu = dt * us[i];
    const acc_t* Bt = state_row(a.B, a.varB, b, g, d, ts[i], G, L, N);
    acc_t* e = ea + i * N;
    acc_t* f = eb + i * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      e[n] = zoo_vec::exp(dt * Al[n]);
      f[n] = dtu * Bt[n];
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* e = ea + i * N;
    const acc_t* f = eb + i * N;
    acc_t* o = hs + i * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      h[n] = e[n] * h[n] + f[n];
      o[n] = h[n];
    }
  }
}

// Channels begin .. end of the flattened (batch, dim); a plain function (not the parallel_for
// lambda) so that it gets the per-ISA clones.
template <typename in_t, typename acc_t>
ZOO_CPU_DISPATCH void forward_range(const ScanArgs<in_t, acc_t>& a, in_t* out, acc_t* last, int64_t begin,
                                    int64_t end) {
  const int64_t L = a.L, Ls = a.Ls, N = a.N, dg = a.dim / a.groups;
  auto position = [&](int64_t s) { return a.index ? a.index[s] : (a.reverse ? L - 1 - s : s); };
  {
    std::vector<acc_t> h(N), Al(N);
    ChunkBuffers<acc_t> w(N);
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / a.dim, d = bd % a.dim, g = d / dg;
      const int64_t row = bd * L;
      std::fill(h.begin(), h.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) Al[n] = a.A[d * N + n];
      const acc_t Dd = a.D ? a.D[d] : acc_t(0);
      for (int64_t s0 = 0; s0 < Ls; s0 += kChunk) {
        const int64_t len = std::min(kChunk, Ls - s0);
        chunk_states(a, position, b, g, d, row, s0, len, Al.data(), h.data(), w);
        // (3) outputs: independent dot products, no longer on the recurrence's critical path
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = w.ts[i];
          const acc_t* Ct = state_row(a.C, a.varC, b, g, d, t, a.groups, L, N);
          const acc_t* hp = w.hs.data() + i * N;
          acc_t y = 0;
#pragma omp simd reduction(+ : y)
          for (int64_t n = 0; n < N; ++n) y += hp[n] * Ct[n];
          y += Dd * w.us[i];
          if (a.gate) y *= a.gate[row + t];
          out[a.index ? bd * Ls + s0 + i : row + t] = static_cast<in_t>(y);
        }
      }
      std::copy(h.begin(), h.end(), last + bd * N);
    }
  }
}

template <typename in_t, typename acc_t>
void forward_cpu(const ScanArgs<in_t, acc_t>& a, in_t* out, acc_t* last) {
  at::parallel_for(0, a.batch * a.dim, zoo_vec::grain_for(a.Ls * a.N),
                   [&](int64_t begin, int64_t end) { forward_range(a, out, last, begin, end); });
}

// Gradients. Outputs that are shared across tasks are written as per-batch partials (summed by the
// caller in a fixed order), the group-shared B/C gradients by the single task owning (batch, group).
template <typename in_t, typename acc_t>
struct GradOut {
  in_t* du;
  in_t* ddelta;
  in_t* dz;           // may be null
  acc_t* dA_part;     // (batch, dim, N)
  acc_t* dB;          // varB: (batch, G, L, N) time-major; else partial (batch, dim, N)
  acc_t* dC;
  acc_t* dD_part;     // (batch, dim) or null
  acc_t* dbias_part;  // (batch, dim) or null
  acc_t* du_acc;      // with a visiting order, positions can repeat: du / ddelta accumulate here
  acc_t* ddelta_acc;
};

// (batch, group) pairs begin .. end of the flattened (batch, G)
template <typename in_t, typename acc_t>
ZOO_CPU_DISPATCH void backward_range(const ScanArgs<in_t, acc_t>& a, const in_t* dout, const acc_t* dlast,
                                     const GradOut<in_t, acc_t>& o, int64_t begin, int64_t end) {
  const int64_t L = a.L, Ls = a.Ls, N = a.N, G = a.groups, dg = a.dim / G;
  const int64_t chunk = kChunk;
  const int64_t nchunks = (Ls + chunk - 1) / chunk;
  auto position = [&](int64_t s) { return a.index ? a.index[s] : (a.reverse ? L - 1 - s : s); };
  {
    std::vector<acc_t> ckpt(nchunks * N), carry(N), Al(N), dA(N), dBf(N), dCf(N), h(N);
    ChunkBuffers<acc_t> w(N);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      for (int64_t d = g * dg; d < (g + 1) * dg; ++d) {
        const int64_t bd = b * a.dim + d, row = bd * L;
        for (int64_t n = 0; n < N; ++n) Al[n] = a.A[d * N + n];
        const acc_t Dd = a.D ? a.D[d] : acc_t(0);
        // pass 1: the state entering each chunk (logical time order)
        std::fill(h.begin(), h.end(), acc_t(0));
        for (int64_t c = 0; c < nchunks; ++c) {
          std::copy(h.begin(), h.end(), ckpt.begin() + c * N);
          chunk_states(a, position, b, g, d, row, c * chunk, std::min(chunk, Ls - c * chunk), Al.data(), h.data(), w);
        }
        // pass 2: chunks in reverse; recompute the chunk's states (and keep its decays), then run the
        // adjoint recurrence
        for (int64_t n = 0; n < N; ++n) carry[n] = dlast ? dlast[bd * N + n] : acc_t(0);
        std::fill(dA.begin(), dA.end(), acc_t(0));
        std::fill(dBf.begin(), dBf.end(), acc_t(0));
        std::fill(dCf.begin(), dCf.end(), acc_t(0));
        acc_t dD = 0, dbias = 0;
        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t s0 = c * chunk, len = std::min(chunk, Ls - s0);
          const acc_t* h0 = ckpt.data() + c * N;
          std::copy(h0, h0 + N, h.begin());
          chunk_states(a, position, b, g, d, row, s0, len, Al.data(), h.data(), w);
          const acc_t* hs = w.hs.data();
          const acc_t* dts = w.dts.data();
          for (int64_t i = len - 1; i >= 0; --i) {
            const int64_t s = s0 + i, t = w.ts[i];
            const acc_t dt = dts[i], uu = w.us[i];
            const acc_t* decays = w.decay.data() + i * N;
            const acc_t* Bt = state_row(a.B, a.varB, b, g, d, t, G, L, N);
            const acc_t* Ct = state_row(a.C, a.varC, b, g, d, t, G, L, N);
            const acc_t* cur = hs + i * N;
            const acc_t* prev = i ? hs + (i - 1) * N : h0;
            acc_t dy = static_cast<acc_t>(dout[a.index ? bd * Ls + s : row + t]);
            if (a.z) {
              acc_t y = Dd * uu;
              for (int64_t n = 0; n < N; ++n) y += cur[n] * Ct[n];
              const acc_t zz = static_cast<acc_t>(a.z[row + t]), sz = a.sz[row + t];
              o.dz[row + t] = static_cast<in_t>(dy * y * sz * (acc_t(1) + zz * (acc_t(1) - sz)));
              dy *= zz * sz;
            }
            acc_t ddt = 0, duu = dy * Dd;
            acc_t* dBt = a.varB ? o.dB + ((b * G + g) * L + t) * N : dBf.data();
            acc_t* dCt = a.varC ? o.dC + ((b * G + g) * L + t) * N : dCf.data();
            acc_t* cp = carry.data();
            acc_t* dAp = dA.data();
#pragma omp simd reduction(+ : ddt, duu)
            for (int64_t n = 0; n < N; ++n) {
              const acc_t gn = cp[n] + Ct[n] * dy;
              const acc_t decay = decays[n];
              const acc_t dgate = gn * prev[n] * decay;  // d(loss)/d(dt * A)
              dCt[n] += dy * cur[n];
              dBt[n] += gn * dt * uu;
              dAp[n] += dgate * dt;
              ddt += dgate * Al[n] + gn * Bt[n] * uu;
              duu += gn * dt * Bt[n];
              cp[n] = decay * gn;
            }
            dD += dy * uu;
            if (a.dsp) ddt *= a.dsp[row + t];
            dbias += ddt;
            if (a.index) {
              o.du_acc[row + t] += duu;
              o.ddelta_acc[row + t] += ddt;
            } else {
              o.du[row + t] = static_cast<in_t>(duu);
              o.ddelta[row + t] = static_cast<in_t>(ddt);
            }
          }
        }
        std::copy(dA.begin(), dA.end(), o.dA_part + bd * N);
        if (!a.varB) std::copy(dBf.begin(), dBf.end(), o.dB + bd * N);
        if (!a.varC) std::copy(dCf.begin(), dCf.end(), o.dC + bd * N);
        if (o.dD_part) o.dD_part[bd] = dD;
        if (o.dbias_part) o.dbias_part[bd] = dbias;
      }
    }
  }
}

template <typename in_t, typename acc_t>
void backward_cpu(const ScanArgs<in_t, acc_t>& a, const in_t* dout, const acc_t* dlast,
                  const GradOut<in_t, acc_t>& o) {
  at::parallel_for(0, a.batch * a.groups, zoo_vec::grain_for(3 * (a.dim / a.groups) * a.Ls * a.N),
                   [&](int64_t begin, int64_t end) { backward_range(a, dout, dlast, o, begin, end); });
}

// ---- tensor-level wrappers ----

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// time-major (batch, G, L, N) copy of a variable B/C (a 3-D one is one group), or the fixed (dim, N)
// matrix, in acc dtype
at::Tensor state_operand(const at::Tensor& M, at::ScalarType acc) {
  if (M.dim() == 3) return M.to(acc).unsqueeze(1).transpose(2, 3).contiguous();
  if (M.dim() == 4) return M.to(acc).transpose(2, 3).contiguous();
  return M.to(acc).contiguous();
}

#define ZOO_DISPATCH_IN_TYPES(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                \
                                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

ZOO_CPU_DISPATCH void softplus_range(const float* x, float* y, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) y[i] = zoo_vec::softplus(x[i]);
}

// the scan's step: softplus(delta + bias) (vectorised for fp32; ATen's softplus is a scalar loop
// there) or delta + bias as it is
at::Tensor delta_step(const at::Tensor& raw, bool softplus) {
  if (!softplus) return raw.contiguous();
  if (raw.scalar_type() != at::kFloat) return at::softplus(raw).contiguous();
  const at::Tensor x = raw.contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), zoo_vec::grain_for(64),
                   [&](int64_t begin, int64_t end) { softplus_range(xp, yp, begin, end); });
  return y;
}

// Checked inputs, converted and contiguous. dt: the step after bias/softplus; raw: before softplus.
struct Prepared {
  at::Tensor u, dt, raw, z, A, B, C, D, bias;
  bool has_z, has_D, has_bias, varB, varC, softplus;
  checks::ScanDims dims;
  at::ScalarType acc;
};

Prepared prepare(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                 bool delta_softplus) {
  Prepared p;
  p.dims = checks::check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(u.device().is_cpu(), op, ": the CPU kernel got u on ", u.device());
  p.acc = acc_type(u.scalar_type());
  p.u = u.contiguous();
  p.raw = delta.to(p.acc);
  p.has_z = z.has_value();
  p.z = p.has_z ? z->to(u.scalar_type()).contiguous() : at::Tensor();
  p.A = A.to(p.acc).contiguous();
  p.varB = B.dim() > 2;
  p.varC = C.dim() > 2;
  p.B = state_operand(B, p.acc);
  p.C = state_operand(C, p.acc);
  p.has_D = D.has_value();
  p.D = p.has_D ? D->to(p.acc).contiguous() : at::Tensor();
  p.has_bias = delta_bias.has_value();
  p.bias = p.has_bias ? delta_bias->to(p.acc).contiguous() : at::Tensor();
  if (p.has_bias) p.raw = p.raw + p.bias.unsqueeze(-1);
  p.softplus = delta_softplus;
  p.dt = delta_step(p.raw, delta_softplus);
  return p;
}

template <typename in_t, typename acc_t>
ScanArgs<in_t, acc_t> make_args(const Prepared& p, bool reverse) {
  ScanArgs<in_t, acc_t> a;
  a.batch = p.dims.batch;
  a.dim = p.dims.dim;
  a.L = p.dims.L;
  a.N = p.dims.N;
  a.groups = p.dims.groups;
  a.varB = p.varB;
  a.varC = p.varC;
  a.softplus = p.softplus;
  a.reverse = reverse;
  a.u = p.u.data_ptr<in_t>();
  a.dt = p.dt.data_ptr<acc_t>();
  a.Ls = a.L;
  a.index = nullptr;
  a.gate = a.sz = a.dsp = nullptr;
  a.z = p.has_z ? p.z.data_ptr<in_t>() : nullptr;
  a.A = p.A.data_ptr<acc_t>();
  a.B = p.B.data_ptr<acc_t>();
  a.C = p.C.data_ptr<acc_t>();
  a.D = p.has_D ? p.D.data_ptr<acc_t>() : nullptr;
  a.bias = p.has_bias ? p.bias.data_ptr<acc_t>() : nullptr;
  return a;
}

// Forward of the plain (index undefined) and indexed scans: (out over the Ls steps, last state).
std::tuple<at::Tensor, at::Tensor> run_forward(const Prepared& p, const at::Tensor& idx, bool reverse) {
  const auto& d = p.dims;
  const int64_t Ls = idx.defined() ? idx.numel() : d.L;
  auto out = at::empty({d.batch, d.dim, Ls}, p.u.options());
  auto last = at::empty({d.batch, d.dim, d.N}, p.u.options().dtype(p.acc));
  at::Tensor gate = p.has_z ? at::silu(p.z.to(p.acc)).contiguous() : at::Tensor();
  ZOO_DISPATCH_IN_TYPES(p.u.scalar_type(), "zoo_scan_fwd_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    auto a = make_args<in_t, acc_t>(p, reverse);
    a.gate = p.has_z ? gate.data_ptr<acc_t>() : nullptr;
    if (idx.defined()) {
      a.Ls = Ls;
      a.index = idx.data_ptr<int64_t>();
    }
    forward_cpu<in_t, acc_t>(a, out.data_ptr<in_t>(), last.data_ptr<acc_t>());
  });
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor> scan_fwd_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                const at::Tensor& B, const at::Tensor& C,
                                                const std::optional<at::Tensor>& D,
                                                const std::optional<at::Tensor>& z,
                                                const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                                bool reverse) {
  Prepared p = prepare("zoo_scan.scan_fwd", u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  return run_forward(p, at::Tensor(), reverse);
}

// Weight gradients of the plain and indexed backward: per-batch partials (summed here in a fixed
// order), and the group-shared B/C gradients owned by one task each.
struct WeightGrads {
  at::Tensor dA_part, dB, dC, dD_part, dbias_part;

  explicit WeightGrads(const Prepared& p) {
    const auto& d = p.dims;
    auto f = p.u.options().dtype(p.acc);
    dA_part = at::empty({d.batch, d.dim, d.N}, f);
    dB = p.varB ? at::zeros({d.batch, d.groups, d.L, d.N}, f) : at::empty({d.batch, d.dim, d.N}, f);
    dC = p.varC ? at::zeros({d.batch, d.groups, d.L, d.N}, f) : at::empty({d.batch, d.dim, d.N}, f);
    if (p.has_D) dD_part = at::empty({d.batch, d.dim}, f);
    if (p.has_bias) dbias_part = at::empty({d.batch, d.dim}, f);
  }

  template <typename in_t, typename acc_t>
  void attach(GradOut<in_t, acc_t>& o) const {
    o.dA_part = dA_part.data_ptr<acc_t>();
    o.dB = dB.data_ptr<acc_t>();
    o.dC = dC.data_ptr<acc_t>();
    o.dD_part = dD_part.defined() ? dD_part.data_ptr<acc_t>() : nullptr;
    o.dbias_part = dbias_part.defined() ? dbias_part.data_ptr<acc_t>() : nullptr;
  }

  // time-major (batch, G, L, N) back to the caller's B/C layout (3-D or 4-D), or the fixed sum
  static at::Tensor state_grad(const at::Tensor& g, bool var, const at::Tensor& M) {
    if (!var) return g.sum(0).to(M.scalar_type());
    return g.transpose(2, 3).reshape(M.sizes()).to(M.scalar_type()).contiguous();
  }

  // (dA, dB, dC, dD, ddelta_bias) in the shapes and dtypes of the inputs; empty for absent ones
  std::vector<at::Tensor> finish(const Prepared& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& delta_bias) const {
    auto empty = at::empty({0}, dA_part.options());
    return {dA_part.sum(0).to(A.scalar_type()), state_grad(dB, p.varB, B), state_grad(dC, p.varC, C),
            D ? dD_part.sum(0).to(D->scalar_type()) : empty,
            delta_bias ? dbias_part.sum(0).to(delta_bias->scalar_type()) : empty};
  }
};

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor>;

GradTuple scan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlast, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool reverse) {
  const char* op = "zoo_scan.scan_bwd";
  Prepared p = prepare(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  checks::check_grad_inputs(op, dout, dlast, p.dims, p.dims.L, u.device());
  at::Tensor dsp = delta_softplus ? at::sigmoid(p.raw).contiguous() : at::Tensor();
  at::Tensor sz = p.has_z ? at::sigmoid(p.z.to(p.acc)).contiguous() : at::Tensor();
  auto dout_c = dout.to(u.scalar_type()).contiguous();
  at::Tensor dlast_c;
  if (dlast) dlast_c = dlast->to(p.acc).contiguous();
  auto du = at::empty_like(p.u), ddelta = at::empty_like(p.u);  // in u's dtype, like the CUDA op
  auto dz = p.has_z ? at::empty_like(p.u) : at::empty({0}, u.options());
  WeightGrads wg(p);
  ZOO_DISPATCH_IN_TYPES(u.scalar_type(), "zoo_scan_bwd_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    auto a = make_args<in_t, acc_t>(p, reverse);
    a.dsp = delta_softplus ? dsp.data_ptr<acc_t>() : nullptr;
    a.sz = p.has_z ? sz.data_ptr<acc_t>() : nullptr;
    GradOut<in_t, acc_t> o{};
    o.du = du.data_ptr<in_t>();
    o.ddelta = ddelta.data_ptr<in_t>();
    o.dz = p.has_z ? dz.data_ptr<in_t>() : nullptr;
    wg.attach(o);
    backward_cpu<in_t, acc_t>(a, dout_c.data_ptr<in_t>(), dlast ? dlast_c.data_ptr<acc_t>() : nullptr, o);
  });
  auto w = wg.finish(p, A, B, C, D, delta_bias);
  return {du, ddelta, w[0], w[1], w[2], w[3], p.has_z ? dz : at::empty({0}, w[0].options()), w[4]};
}

// Scan visiting the inputs in the order `index` (positions may repeat, e.g. several directions over
// one map); out[..., s] is step s. No reordered copy of u / delta / B / C is made.
std::tuple<at::Tensor, at::Tensor> scan_fwd_indexed_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                        const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& C, const std::optional<at::Tensor>& D,
                                                        const std::optional<at::Tensor>& delta_bias,
                                                        const at::Tensor& index, bool delta_softplus) {
  const char* op = "zoo_scan.scan_fwd_indexed";
  Prepared p = prepare(op, u, delta, A, B, C, D, std::nullopt, delta_bias, delta_softplus);
  return run_forward(p, checks::check_index(op, index, p.dims.L), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scan_bwd_indexed_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& delta_bias, const at::Tensor& index, bool delta_softplus) {
  const char* op = "zoo_scan.scan_bwd_indexed";
  Prepared p = prepare(op, u, delta, A, B, C, D, std::nullopt, delta_bias, delta_softplus);
  at::Tensor idx = checks::check_index(op, index, p.dims.L);
  const int64_t Ls = idx.numel();
  checks::check_grad_inputs(op, dout, std::nullopt, p.dims, Ls, u.device());
  at::Tensor dsp = delta_softplus ? at::sigmoid(p.raw).contiguous() : at::Tensor();
  auto dout_c = dout.to(u.scalar_type()).contiguous();
  auto fopt = u.options().dtype(p.acc);
  // positions can repeat: du / ddelta accumulate in the accumulation dtype
  auto du_acc = at::zeros(u.sizes(), fopt), ddelta_acc = at::zeros(u.sizes(), fopt);
  WeightGrads wg(p);
  ZOO_DISPATCH_IN_TYPES(u.scalar_type(), "zoo_scan_bwd_indexed_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    auto a = make_args<in_t, acc_t>(p, false);
    a.Ls = Ls;
    a.index = idx.data_ptr<int64_t>();
    a.dsp = delta_softplus ? dsp.data_ptr<acc_t>() : nullptr;
    GradOut<in_t, acc_t> o{};
    o.du_acc = du_acc.data_ptr<acc_t>();
    o.ddelta_acc = ddelta_acc.data_ptr<acc_t>();
    wg.attach(o);
    backward_cpu<in_t, acc_t>(a, dout_c.data_ptr<in_t>(), nullptr, o);
  });
  auto w = wg.finish(p, A, B, C, D, delta_bias);
  return {du_acc.to(u.scalar_type()), ddelta_acc.to(u.scalar_type()), w[0], w[1], w[2], w[3], w[4]};
}

}  // namespace

// The op schemas are defined in Python (zoo/ops/compiled.py) so that their fake implementations and
// autograd formulas exist whether or not this library could be built.
TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) {
  m.impl("scan_fwd", &scan_fwd_cpu);
  m.impl("scan_bwd", &scan_bwd_cpu);
  m.impl("scan_fwd_indexed", &scan_fwd_indexed_cpu);
  m.impl("scan_bwd_indexed", &scan_bwd_indexed_cpu);
}

}  // namespace zoo_scan
