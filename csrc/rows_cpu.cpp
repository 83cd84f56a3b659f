// MSVMamba's mixer on the CPU in the channels-last / (batch, L, dim) row layout of its linear layers,
// so neither the depthwise convs nor the scans need transposed or gathered copies:
//
//   depthwise_conv2d_silu: a k x k depthwise conv (stride 1 or 2, zero padding) + bias + SiLU on a
//                          channels-last map, channels in the vector lanes;
//   scan_orders:           the selective scan over K traversal orders of the tokens as ONE sequence
//                          (the state carried from one order into the next, as the official
//                          multi-direction scan does), every order's outputs written straight to
//                          the tokens' row-major positions.
//
// Both kernels are ZOO_CPU_DISPATCH (one clone per ISA, picked at load time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_vec.h"
#include "rows_scan.h"

namespace zoo_scan {
namespace {

constexpr int64_t kLanes = 16;  // channels per block: one AVX-512 register, two AVX2 ones
constexpr int64_t kChunk = 64;  // channels per scan task: whole cache lines of every row it reads

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "zoo_scan::", op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

void check_sizes(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef expected,
                 const char* what) {
  TORCH_CHECK(t.sizes() == expected, "zoo_scan::", op, ": ", name, " must be ", what, " = ", expected, ", got ",
              t.sizes());
}

// ---- depthwise_conv2d_silu ----

struct DwConvArgs {
  int64_t batch, H, W, C, K, stride, pad, Ho, Wo;
  const float* x;
  int64_t x_sb, x_sh, x_sw;  // channel stride 1
  const float* w;            // (K, K, C): taps outermost, so the channel loop is contiguous
  const float* bias;         // (C), or nullptr
  float* out;                // (batch, Ho, Wo, C)
};

// output rows (b, oh) in [begin, end) of the flattened (batch, Ho). Per output pixel the taps are the
// outer loop and all C channels the inner one: each tap's address math is paid once per pixel, and the
// pixel's C accumulators stay in L1 while the taps stream through it.
ZOO_CPU_DISPATCH void dwconv_rows(const DwConvArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.Ho, oh = r % a.Ho;
    const float* xb = a.x + b * a.x_sb;
    const int64_t kh0 = std::max<int64_t>(0, a.pad - oh * a.stride);
    const int64_t kh1 = std::min<int64_t>(a.K, a.H + a.pad - oh * a.stride);
    for (int64_t ow = 0; ow < a.Wo; ++ow) {
      float* __restrict o = a.out + (r * a.Wo + ow) * C;
      if (a.bias != nullptr) {
        std::copy(a.bias, a.bias + C, o);
      } else {
        std::fill(o, o + C, 0.0f);
      }
      const int64_t kw0 = std::max<int64_t>(0, a.pad - ow * a.stride);
      const int64_t kw1 = std::min<int64_t>(a.K, a.W + a.pad - ow * a.stride);
      for (int64_t kh = kh0; kh < kh1; ++kh) {
        const float* xrow = xb + (oh * a.stride - a.pad + kh) * a.x_sh;
        for (int64_t kw = kw0; kw < kw1; ++kw) {
          const float* __restrict xs = xrow + (ow * a.stride - a.pad + kw) * a.x_sw;
          const float* __restrict wk = a.w + (kh * a.K + kw) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] += wk[c] * xs[c];
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = zoo_vec::silu(o[c]);
    }
  }
}

at::Tensor depthwise_conv2d_silu_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t stride) {
  const char* op = "depthwise_conv2d_silu";
  TORCH_CHECK(x.dim() == 4, "zoo_scan::depthwise_conv2d_silu: x must be channels-last (batch, H, W, C), got ",
              x.sizes());
  check_float_cpu(x, op, "x");
  check_float_cpu(weight, op, "weight");
  const int64_t C = x.size(3), K = weight.size(-1);
  TORCH_CHECK(weight.dim() == 4 && K % 2 == 1, "zoo_scan::depthwise_conv2d_silu: weight must be (C, 1, k, k) ",
              "with an odd k, got ", weight.sizes());
  check_sizes(weight, op, "weight", {C, 1, K, K}, "(C, 1, k, k)");
  TORCH_CHECK(stride == 1 || stride == 2, "zoo_scan::depthwise_conv2d_silu: stride must be 1 or 2, got ", stride);
  at::Tensor bc;
  if (bias.has_value()) {
    check_float_cpu(*bias, op, "bias");
    check_sizes(*bias, op, "bias", {C}, "(C)");
    bc = bias->contiguous();
  }
  const at::Tensor xr = x.stride(3) == 1 ? x : x.contiguous();
  const at::Tensor w = weight.view({C, K * K}).t().contiguous();  // (k * k, C)
  const int64_t H = x.size(1), W = x.size(2), pad = (K - 1) / 2;
  const int64_t Ho = (H + 2 * pad - K) / stride + 1, Wo = (W + 2 * pad - K) / stride + 1;
  auto out = at::empty({x.size(0), Ho, Wo, C}, x.options());
  DwConvArgs a{x.size(0), H, W, C, K, stride, pad, Ho, Wo, xr.data_ptr<float>(), xr.stride(0), xr.stride(1),
               xr.stride(2), w.data_ptr<float>(), bias.has_value() ? bc.data_ptr<float>() : nullptr,
               out.data_ptr<float>()};
  at::parallel_for(0, a.batch * Ho, zoo_vec::grain_for(Wo * C * K * K),
                   [&](int64_t begin, int64_t end) { dwconv_rows(a, begin, end); });
  return out;
}

// ---- scan_orders ----

struct OrderScanArgs {
  int64_t batch, L, dim, N, K;
  bool softplus;
  const float *u, *delta;  // (batch, L, dim), channel stride 1
  int64_t u_sb, u_st, d_sb, d_st;
  const float* A;          // (dim, N)
  const float *B, *C;      // (batch, L, N), state stride 1, the same strides
  int64_t bc_sb, bc_st;
  const float *D, *bias;   // (dim)
  const int64_t* orders;   // (K, L): step s of order k reads token orders[k * L + s]
  float* out;              // (batch, K, L, dim)
};

// Channels c0 .. c0 + width (<= kChunk) of batch b over all K orders. The step loop is the outer one, so
// each token's rows are read whole and in order (a per-block task would touch one line of a row and come
// back for the next after it left the cache); inside, blocks of kLanes lanes, then single lanes. At and h
// hold each block's N x lanes values at offset (first lane) * N; dtbuf (L x width) the time scales when K > 1.
template <bool Softplus>
ZOO_INLINE void scan_chunk(const OrderScanArgs& a, int64_t b, int64_t c0, int64_t width, float* At, float* h,
                           float* dtbuf) {
  const int64_t L = a.L, dim = a.dim, N = a.N, full = width / kLanes * kLanes;
  for (int64_t j = 0; j < width; ++j) {
    const int64_t j0 = j < full ? j / kLanes * kLanes : j, lanes = j < full ? kLanes : 1;
    load_scaled_A(a.A + (c0 + j) * N, N, lanes, j - j0, At + j0 * N);
  }
  std::fill(h, h + width * N, 0.0f);
  const float *D = a.D + c0, *bias = a.bias + c0;
  auto delta_row = [&](int64_t t) { return a.delta + b * a.d_sb + t * a.d_st + c0; };
  if (a.K > 1) {  // every token is visited K times: its time scale once, in token order
    for (int64_t t = 0; t < L; ++t) {
      float* dt = dtbuf + t * width;
      for (int64_t j = 0; j < full; j += kLanes) step_dt<kLanes, Softplus>(delta_row(t) + j, bias + j, dt + j);
      for (int64_t j = full; j < width; ++j) step_dt<1, Softplus>(delta_row(t) + j, bias + j, dt + j);
    }
  }
  for (int64_t k = 0; k < a.K; ++k) {  // the state runs on from one order into the next
    const int64_t* order = a.orders + k * L;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = order[s];
      const float* up = a.u + b * a.u_sb + t * a.u_st + c0;
      const float *Bt = a.B + b * a.bc_sb + t * a.bc_st, *Ct = a.C + b * a.bc_sb + t * a.bc_st;
      float* o = a.out + ((b * a.K + k) * L + t) * dim + c0;
      if (a.K > 1) {
        const float* dt = dtbuf + t * width;
        for (int64_t j = 0; j < full; j += kLanes)
          scan_step_dt<kLanes>(up + j, dt + j, D + j, At + j * N, h + j * N, Bt, Ct, N, o + j);
        for (int64_t j = full; j < width; ++j)
          scan_step_dt<1>(up + j, dt + j, D + j, At + j * N, h + j * N, Bt, Ct, N, o + j);
      } else {
        const float* dp = delta_row(t);
        for (int64_t j = 0; j < full; j += kLanes)
          scan_step<kLanes, Softplus>(up + j, dp + j, bias + j, D + j, At + j * N, h + j * N, Bt, Ct, N, o + j);
        for (int64_t j = full; j < width; ++j)
          scan_step<1, Softplus>(up + j, dp + j, bias + j, D + j, At + j * N, h + j * N, Bt, Ct, N, o + j);
      }
    }
  }
}

// tasks [begin, end) of the flattened (batch, chunk of kChunk channels)
ZOO_CPU_DISPATCH void order_scan_chunks(const OrderScanArgs& a, int64_t begin, int64_t end) {
  const int64_t chunks = (a.dim + kChunk - 1) / kChunk;
  std::vector<float> At(a.N * kChunk), h(a.N * kChunk), dtbuf(a.K > 1 ? a.L * kChunk : 0);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / chunks, c0 = (task % chunks) * kChunk, width = std::min(kChunk, a.dim - c0);
    if (a.softplus)
      scan_chunk<true>(a, b, c0, width, At.data(), h.data(), dtbuf.data());
    else
      scan_chunk<false>(a, b, c0, width, At.data(), h.data(), dtbuf.data());
  }
}

at::Tensor scan_orders_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                           const at::Tensor& orders, bool delta_softplus) {
  const char* op = "scan_orders";
  TORCH_CHECK(u.dim() == 3 && u.size(1) >= 1, "zoo_scan::scan_orders: u must be (batch, L >= 1, dim), got ",
              u.sizes());
  TORCH_CHECK(A.dim() == 2, "zoo_scan::scan_orders: A must be (dim, d_state), got ", A.sizes());
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = A.size(1);
  const std::pair<const at::Tensor*, const char*> floats[] = {
      {&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}, {&D, "D"}, {&delta_bias, "delta_bias"}};
  for (const auto& [t, name] : floats) check_float_cpu(*t, op, name);
  check_sizes(delta, op, "delta", u.sizes(), "u's shape (batch, L, dim)");
  check_sizes(B, op, "B", {batch, L, N}, "(batch, L, d_state)");
  check_sizes(C, op, "C", {batch, L, N}, "(batch, L, d_state)");
  check_sizes(D, op, "D", {dim}, "(dim)");
  check_sizes(delta_bias, op, "delta_bias", {dim}, "(dim)");
  TORCH_CHECK(orders.dim() == 2 && orders.size(0) >= 1 && orders.size(1) == L &&
                  orders.scalar_type() == at::kLong && orders.device().is_cpu(),
              "zoo_scan::scan_orders: orders must be an int64 CPU tensor (K >= 1, L = ", L, "), got ",
              orders.scalar_type(), " ", orders.sizes());
  const at::Tensor oc = orders.contiguous();
  const int64_t* idx = oc.data_ptr<int64_t>();
  std::vector<int64_t> seen(L, -1);  // every order must visit each token exactly once
  for (int64_t k = 0; k < oc.size(0); ++k) {
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = idx[k * L + s];
      TORCH_CHECK(t >= 0 && t < L, "zoo_scan::scan_orders: orders[", k, "] holds token ", t, " outside [0, ", L,
                  ")");
      TORCH_CHECK(seen[t] != k, "zoo_scan::scan_orders: orders[", k, "] visits token ", t,
                  " twice; each order must be a permutation of 0 .. L - 1");
      seen[t] = k;
    }
  }
  auto unit_last = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor us = unit_last(u), ds = unit_last(delta), Ac = A.contiguous(), Dc = D.contiguous();
  const at::Tensor bc = delta_bias.contiguous();
  at::Tensor Bs = unit_last(B), Cs = unit_last(C);
  if (Cs.strides() != Bs.strides()) {  // the kernel takes one set of strides for both
    Bs = Bs.contiguous();
    Cs = Cs.contiguous();
  }
  const int64_t K = oc.size(0);
  auto out = at::empty({batch, K, L, dim}, u.options());
  OrderScanArgs a{batch, L, dim, N, K, delta_softplus, us.data_ptr<float>(), ds.data_ptr<float>(),
                  us.stride(0), us.stride(1), ds.stride(0), ds.stride(1), Ac.data_ptr<float>(),
                  Bs.data_ptr<float>(), Cs.data_ptr<float>(), Bs.stride(0), Bs.stride(1),
                  Dc.data_ptr<float>(), bc.data_ptr<float>(), idx, out.data_ptr<float>()};
  const int64_t chunks = (dim + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * chunks, zoo_vec::grain_for(K * L * N * kChunk),
                   [&](int64_t begin, int64_t end) { order_scan_chunks(a, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) {
  m.impl("depthwise_conv2d_silu", &depthwise_conv2d_silu_cpu);
  m.impl("scan_orders", &scan_orders_cpu);
}

}  // namespace zoo_scan
