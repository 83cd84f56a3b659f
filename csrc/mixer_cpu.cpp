// Vim's bidirectional ("bimamba v2") mixer on the CPU, in the (batch, L, dim) row layout that the
// linear layers produce, so no transposed copies are made:
//
//   bimamba_conv: both directions' depthwise conv (causal / anti-causal) + bias + SiLU in one pass
//                 over x, channels in the vector lanes;
//   bimamba_scan: per (batch, block of 16 channels, 32 on AVX-512), the forward scan then the reverse
//                 scan with softplus(delta + bias) (delta optionally from dt_proj's rank-R input, the projection
//                 done per step), exp(delta * A) vectorised over the lanes, the D skip, and
//                 scale * (y_fwd + y_rev) * silu(z) written once;
//   rms_norm:     the blocks' RMSNorm, one pass per row for the statistic and one for the output.
//
// The conv is an op of its own because its output also feeds x_proj (a matmul over all channels)
// between the two. The kernels are ZOO_CPU_DISPATCH (one clone per ISA, picked at load time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_vec.h"
#include "mixer_common.h"
#include "rows_scan.h"
#include "rows_scan_avx2.h"
#include "rows_scan_avx512.h"

namespace zoo_scan {
namespace {

// channels per block: one AVX-512 register, two AVX2 ones (independent chains for the pipelines)
constexpr int64_t kLanes = 16;
static_assert(kLanes == kAvx2Lanes, "the portable blocks are the AVX2 runs' width");

// ---- bimamba_conv ----

struct ConvArgs {
  int64_t batch, L, dim, K;
  const float* x;
  int64_t x_sb, x_st;  // batch / step strides of x (channel stride 1)
  const float* w;      // (2, K, dim): taps transposed so the channel loop is contiguous
  const float* bias;   // (2, dim)
  float* out;          // (2, batch, L, dim)
};

// one output row: silu(bias + sum_k w_k * x_k) with the K taps' input rows x_k all in range, the sum in
// registers in tap order (as the general path adds it); one pass over the row instead of K + 2
template <int64_t K>
ZOO_INLINE void conv_row_all_taps(const float* const* xs, const float* __restrict w, const float* __restrict bias,
                                  float* __restrict o, int64_t dim) {
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) {
    float acc = bias[c];
    for (int64_t k = 0; k < K; ++k) acc += w[k * dim + c] * xs[k][c];
    o[c] = zoo_vec::silu(acc);
  }
}

// rows (b, t) in [begin, end) of the flattened (batch, L); tap k of the forward direction reads
// step t - (K - 1) + k, of the reverse direction step t + (K - 1) - k (official weight layout)
ZOO_CPU_DISPATCH void conv_rows(const ConvArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kFastTaps = 4;  // Vim's d_conv
  const int64_t L = a.L, dim = a.dim, K = a.K;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / L, t = r % L;
    const float* xb = a.x + b * a.x_sb;
    for (int dir = 0; dir < 2; ++dir) {
      float* o = a.out + (dir * a.batch * L + r) * dim;
      const float* bias = a.bias + dir * dim;
      const float* w = a.w + dir * K * dim;
      const int64_t first = dir == 0 ? t - (K - 1) : t + (K - 1);  // the step tap 0 reads
      auto step_of = [&](int64_t k) { return dir == 0 ? first + k : first - k; };
      if (K == kFastTaps && first >= 0 && first < L) {
        const float* xs[kFastTaps];
        for (int64_t k = 0; k < kFastTaps; ++k) xs[k] = xb + step_of(k) * a.x_st;
        conv_row_all_taps<kFastTaps>(xs, w, bias, o, dim);
        continue;
      }
      std::copy(bias, bias + dim, o);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = step_of(k);
        if (s < 0 || s >= L) continue;
        const float* xs = xb + s * a.x_st;
        const float* wk = w + k * dim;
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) o[c] += wk[c] * xs[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) o[c] = zoo_vec::silu(o[c]);
    }
  }
}

at::Tensor bimamba_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_bimamba_conv_args(x, weight, bias);
  const at::Tensor xr = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor w = weight.transpose(1, 2).contiguous();
  const at::Tensor bc = bias.contiguous();
  auto out = at::empty({2, x.size(0), x.size(1), x.size(2)}, x.options());
  ConvArgs a{x.size(0), x.size(1), x.size(2), weight.size(2), xr.data_ptr<float>(), xr.stride(0), xr.stride(1),
             w.data_ptr<float>(), bc.data_ptr<float>(), out.data_ptr<float>()};
  at::parallel_for(0, a.batch * a.L, zoo_vec::grain_for(2 * a.dim * a.K),
                   [&](int64_t begin, int64_t end) { conv_rows(a, begin, end); });
  return out;
}

// ---- bimamba_scan ----

struct ScanRowsArgs {
  int64_t batch, L, dim, N, R;  // R: dt_proj's rank when it is folded in (dt_w), else 0
  bool softplus, decaying;      // decaying: see rows_scan.h
  bool wide;                    // blocks of kAvx512Lanes on AVX-512 (a decaying scan and zoo_vec::avx512_kernels())
  bool avx2;                    // blocks of kLanes by scan_run_avx2 (a decaying scan and zoo_vec::avx2_kernels())
  float scale;
  const float *u, *delta;  // u (2, batch, L, dim) contiguous; delta the same size, or (2, batch, L, R) with dt_w
  int64_t d_sd, d_sb, d_st;  // delta's direction / batch / step strides (channel stride 1)
  const float* dt_w;       // nullptr, or dt_proj's weight (2, dim, R): delta = low-rank delta @ dt_w^T
  const float* A;          // (2, dim, N)
  const float *B, *C;      // (2, batch, L, N), state stride 1
  int64_t bc_sd, bc_sb, bc_st;
  const float *D, *bias;  // (2, dim)
  const float* z;         // (batch, L, dim), channel stride 1
  int64_t z_sb, z_st;
  float* out;  // (batch, L, dim) contiguous
};

// per-thread buffers, for blocks of up to the task width (scan_block_width) of lanes: At (N x W), Wt (R x W),
// h (N x W), dt (kDtSteps x W), ybuf (L x W: the forward outputs), ys (kDtSteps x W: the reverse outputs of a run)
struct ScanBuffers {
  std::vector<float> At, Wt, h, dt, ybuf, ys;
};

// the time scales of steps s0 .. s0 + steps of direction dir into dt (steps x W): with dt_proj folded in, the run
// at once (dt_run_lowrank) where W is whole 8-lane vectors, else per step
template <int64_t W, bool Softplus>
ZOO_INLINE void fill_dt_steps(const ScanRowsArgs& a, int dir, int64_t b, int64_t c0, int64_t s0, int64_t steps,
                              const float* bias, const float* Wt, float* dt) {
  const int64_t t0 = dir == 0 ? s0 : a.L - 1 - s0, step = dir == 0 ? a.d_st : -a.d_st;
  const float* d0 = a.delta + dir * a.d_sd + b * a.d_sb + t0 * a.d_st;
  if constexpr (W % kVec8Lanes == 0) {
    if (a.dt_w != nullptr) return dt_run_lowrank<W, Softplus>(d0, step, steps, a.R, Wt, bias, dt);
  }
  for (int64_t s = 0; s < steps; ++s) {
    if (a.dt_w != nullptr)
      step_dt_lowrank<W, Softplus>(d0 + s * step, a.R, Wt, bias, dt + s * W);
    else
      step_dt<W, Softplus>(d0 + s * step + c0, bias, dt + s * W);
  }
}

// one run of scan steps: the hand-written AVX-512 (W = kAvx512Lanes) or AVX2 (W = kLanes) run where a.wide /
// a.avx2 say so, the AVX2 one without 2^x's clamp where the run's exponents allow it, else the portable run
template <int64_t W, bool Decaying>
ZOO_INLINE void scan_run_dispatch(const ScanRowsArgs& a, const StepRows& rows, int64_t steps, const float* dt,
                                  const float* Dd, const float* At, float* h, float* ys, float min_At) {
#if ZOO_INTRINSICS
  if constexpr (W == kAvx512Lanes && Decaying) return scan_run_avx512(rows, steps, dt, Dd, At, h, a.N, ys);
  if constexpr (W == kAvx2Lanes && Decaying) {
    if (a.avx2) {
      if (exponents_bounded(max_time_scale_avx2(dt, steps * W), min_At))
        return scan_run_avx2<true>(rows, steps, dt, Dd, At, h, a.N, ys);
      return scan_run_avx2<false>(rows, steps, dt, Dd, At, h, a.N, ys);
    }
  }
#endif
  scan_run<W, Decaying>(rows, steps, dt, Dd, At, h, a.N, ys);
}

// One direction over the W channels c0 .. c0 + W of batch b, in runs of kDtSteps steps. Forward: y (D skip
// included) goes to ybuf (L x W). Reverse: combined with ybuf, gated and written to out. W = kAvx512Lanes runs
// on AVX-512 (scan_blocks picks it only for decaying scans on such a CPU).
template <int64_t W, bool Softplus, bool Decaying>
ZOO_INLINE void scan_direction(const ScanRowsArgs& a, int dir, int64_t b, int64_t c0, ScanBuffers& buf) {
  const int64_t L = a.L, dim = a.dim, N = a.N;
  float *At = buf.At.data(), *Wt = buf.Wt.data(), *h = buf.h.data(), *dt = buf.dt.data(), *ybuf = buf.ybuf.data();
  float Dd[W], bias[W];
  for (int64_t j = 0; j < W; ++j) {
    const int64_t c = dir * dim + c0 + j;
    Dd[j] = a.D[c];
    bias[j] = a.bias[c];
    load_scaled_A(a.A + c * N, N, W, j, At);
    if (a.dt_w != nullptr) load_dt_weight(a.dt_w + c * a.R, a.R, W, j, Wt);
  }
  std::fill(h, h + N * W, 0.0f);
  const float min_At = min_scaled_A(At, N * W);
  const int64_t row0 = (dir * a.batch + b) * L, step = dir == 0 ? 1 : -1;
  const float* Bb = a.B + dir * a.bc_sd + b * a.bc_sb;
  const float* Cb = a.C + dir * a.bc_sd + b * a.bc_sb;
  for (int64_t s0 = 0; s0 < L; s0 += kDtSteps) {
    const int64_t steps = std::min(kDtSteps, L - s0), t0 = dir == 0 ? s0 : L - 1 - s0;
    fill_dt_steps<W, Softplus>(a, dir, b, c0, s0, steps, bias, Wt, dt);
    const StepRows rows{a.u + (row0 + t0) * dim + c0, step * dim, Bb + t0 * a.bc_st, Cb + t0 * a.bc_st,
                        step * a.bc_st};
    float* ys = dir == 0 ? ybuf + s0 * W : buf.ys.data();  // forward steps run in t order, so ybuf takes them
    if (dir == 1) {  // the gate's z rows and output rows of these steps, fetched while the scan runs
      for (int64_t s = 0; s < steps; ++s) {
        zoo_vec::prefetch_span(a.z + b * a.z_sb + (t0 - s) * a.z_st + c0, W * int64_t(sizeof(float)));
        zoo_vec::prefetch_span<true>(a.out + (b * L + t0 - s) * dim + c0, W * int64_t(sizeof(float)));
      }
    }
    scan_run_dispatch<W, Decaying>(a, rows, steps, dt, Dd, At, h, ys, min_At);
    if (dir == 0) continue;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = t0 - s;
      const float *__restrict yf = ybuf + t * W, *__restrict yr = ys + s * W;
      const float* __restrict zp = a.z + b * a.z_sb + t * a.z_st + c0;
      float* __restrict op = a.out + (b * L + t) * dim + c0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) op[j] = a.scale * (yf[j] + yr[j]) * zoo_vec::silu(zp[j]);
    }
  }
}

template <int64_t W>
ZOO_INLINE void scan_both(const ScanRowsArgs& a, int64_t b, int64_t c0, ScanBuffers& buf) {
  for (int dir = 0; dir < 2; ++dir) {
    if (a.decaying)
      scan_direction<W, true, true>(a, dir, b, c0, buf);
    else if (a.softplus)
      scan_direction<W, true, false>(a, dir, b, c0, buf);
    else
      scan_direction<W, false, false>(a, dir, b, c0, buf);
  }
}

// the channels per task: one AVX-512 run's where it is used, else one portable block's
ZOO_INLINE int64_t scan_block_width(const ScanRowsArgs& a) { return a.wide ? kAvx512Lanes : kLanes; }

// tasks [begin, end) of the flattened (batch, channel block); a block narrower than the task width (the
// dim % width channels left over) is scanned in portable blocks of kLanes, then one lane at a time
ZOO_CPU_DISPATCH void scan_blocks(const ScanRowsArgs& a, int64_t begin, int64_t end) {
  const int64_t width = scan_block_width(a), blocks = (a.dim + width - 1) / width;
  ScanBuffers buf{std::vector<float>(a.N * width), std::vector<float>(a.R * width),
                  std::vector<float>(a.N * width), std::vector<float>(kDtSteps * width),
                  std::vector<float>(a.L * width), std::vector<float>(kDtSteps * width)};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * width, stop = std::min(c0 + width, a.dim);
    if (a.wide && stop - c0 == kAvx512Lanes) {
      scan_both<kAvx512Lanes>(a, b, c0, buf);
      continue;
    }
    int64_t c = c0;
    for (; c + kLanes <= stop; c += kLanes) scan_both<kLanes>(a, b, c, buf);
    for (; c < stop; ++c) scan_both<1>(a, b, c, buf);
  }
}

at::Tensor bimamba_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                            const at::Tensor& z, bool delta_softplus, double scale,
                            const c10::optional<at::Tensor>& dt_weight) {
  check_bimamba_scan_args(u, delta, A, B, C, D, delta_bias, z, dt_weight);
  const at::Tensor uc = u.contiguous(), ds = unit_last(delta), Ac = A.contiguous(), Dc = D.contiguous();
  const at::Tensor bc = delta_bias.contiguous(), zs = unit_last(z);
  const at::Tensor dtw = dt_weight.has_value() ? dt_weight->contiguous() : at::Tensor();
  const auto [Bs, Cs] = with_shared_strides(B, C);
  const int64_t batch = u.size(1), L = u.size(2), dim = u.size(3), N = A.size(2);
  const int64_t R = dtw.defined() ? dtw.size(2) : 0;
  const bool decaying = decaying_scan(delta_softplus, Ac.max().item<float>());
  auto out = at::empty({batch, L, dim}, u.options());
  const bool wide = decaying && zoo_vec::avx512_kernels(), avx2 = decaying && zoo_vec::avx2_kernels();
  ScanRowsArgs a{batch, L, dim, N, R, delta_softplus, decaying, wide, avx2, static_cast<float>(scale),
                 uc.data_ptr<float>(), ds.data_ptr<float>(), ds.stride(0), ds.stride(1), ds.stride(2),
                 dtw.defined() ? dtw.data_ptr<float>() : nullptr, Ac.data_ptr<float>(), Bs.data_ptr<float>(),
                 Cs.data_ptr<float>(), Bs.stride(0), Bs.stride(1), Bs.stride(2), Dc.data_ptr<float>(),
                 bc.data_ptr<float>(), zs.data_ptr<float>(), zs.stride(0), zs.stride(1), out.data_ptr<float>()};
  const int64_t width = scan_block_width(a), blocks = (dim + width - 1) / width;
  at::parallel_for(0, batch * blocks, zoo_vec::grain_for(2 * L * N * width),
                   [&](int64_t begin, int64_t end) { scan_blocks(a, begin, end); });
  return out;
}

// ---- rms_norm ----

// rows [begin, end) of x (rows, dim): x * (1 / sqrt(mean(x^2) + eps)) * weight, one read of the row for the
// sum of squares (fp32, as the reference's pow(2).mean()) and one for the output
ZOO_CPU_DISPATCH void rms_norm_rows(const float* __restrict x, int64_t dim, const float* __restrict w, float eps,
                                    float* __restrict out, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict xr = x + r * dim;
    float* __restrict o = out + r * dim;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < dim; ++c) squares += xr[c] * xr[c];
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) o[c] = xr[c] * scale * w[c];
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "zoo_scan::rms_norm: x must have a last dimension >= 1, got ",
              x.sizes());
  check_float_on("rms_norm", x, "x", x.device());
  check_float_on("rms_norm", weight, "weight", x.device());
  check_shape("rms_norm", weight, "weight", {x.size(-1)}, "(x.size(-1),)");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  at::parallel_for(0, rows, zoo_vec::grain_for(2 * dim), [&](int64_t begin, int64_t end) {
    rms_norm_rows(xc.data_ptr<float>(), dim, wc.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<float>(),
                  begin, end);
  });
  return out;
}

// which clone of the dispatched kernels runs here: "avx512", "avx2" or "baseline"
std::string cpu_isa() {
#if ZOO_CPU_DISPATCH_ENABLED
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}

// the CPU's vendor, "intel", "amd" or "other": whose BLAS tuning torch's MKL gets (rows_projection)
std::string cpu_vendor() {
#if ZOO_CPU_DISPATCH_ENABLED
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

// the widest hand-written paths the kernels take here (cpu_vec.h): "avx512", "avx2" or "none"
std::string cpu_intrinsics() {
  if (zoo_vec::avx512_kernels()) return "avx512";
  return zoo_vec::avx2_kernels() ? "avx2" : "none";
}

// how many threads one at::parallel_for of these kernels runs on here, with torch's thread count as it is: 1
// when the library was built without OpenMP (at::parallel_for is an OpenMP loop compiled into the caller)
int64_t cpu_parallel_threads() {
  std::vector<char> seen(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, 64 * static_cast<int64_t>(seen.size()), 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) {
  m.impl("bimamba_conv", &bimamba_conv_cpu);
  m.impl("bimamba_scan", &bimamba_scan_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
}

// no tensor arguments, so no dispatch key: a catch-all kernel defined with its schema here
TORCH_LIBRARY_FRAGMENT(zoo_scan, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_intrinsics() -> str", &cpu_intrinsics);
  m.def("cpu_vendor() -> str", &cpu_vendor);
  m.def("cpu_parallel_threads() -> int", &cpu_parallel_threads);
}

}  // namespace zoo_scan
