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

template <int64_t L>
ZOO_INLINE void conv_pixel(const DwConvArgs& a, const float* xb, int64_t oh, int64_t ow, int64_t c0,
                           float* __restrict o) {
  float acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = a.bias != nullptr ? a.bias[c0 + j] : 0.0f;
  for (int64_t kh = 0; kh < a.K; ++kh) {
    const int64_t ih = oh * a.stride - a.pad + kh;
    if (ih < 0 || ih >= a.H) continue;
    for (int64_t kw = 0; kw < a.K; ++kw) {
      const int64_t iw = ow * a.stride - a.pad + kw;
      if (iw < 0 || iw >= a.W) continue;
      const float* __restrict xs = xb + ih * a.x_sh + iw * a.x_sw + c0;
      const float* __restrict wk = a.w + (kh * a.K + kw) * a.C + c0;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) acc[j] += wk[j] * xs[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < L; ++j) o[c0 + j] = zoo_vec::silu(acc[j]);
}

// output rows (b, oh) in [begin, end) of the flattened (batch, Ho)
ZOO_CPU_DISPATCH void dwconv_rows(const DwConvArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.Ho, oh = r % a.Ho;
    const float* xb = a.x + b * a.x_sb;
    for (int64_t ow = 0; ow < a.Wo; ++ow) {
      float* o = a.out + (r * a.Wo + ow) * a.C;
      int64_t c0 = 0;
      for (; c0 + kLanes <= a.C; c0 += kLanes) conv_pixel<kLanes>(a, xb, oh, ow, c0, o);
      for (; c0 < a.C; ++c0) conv_pixel<1>(a, xb, oh, ow, c0, o);
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

template <int64_t W, bool Softplus>
ZOO_INLINE void scan_block(const OrderScanArgs& a, int64_t b, int64_t c0, float* At, float* h) {
  const int64_t L = a.L, dim = a.dim, N = a.N;
  float Dd[W], bias[W];
  for (int64_t j = 0; j < W; ++j) {
    Dd[j] = a.D[c0 + j];
    bias[j] = a.bias[c0 + j];
    for (int64_t n = 0; n < N; ++n) At[n * W + j] = a.A[(c0 + j) * N + n];
  }
  std::fill(h, h + N * W, 0.0f);
  for (int64_t k = 0; k < a.K; ++k) {  // the state runs on from one order into the next
    const int64_t* order = a.orders + k * L;
    float* outk = a.out + (b * a.K + k) * L * dim + c0;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = order[s];
      float y[W];
      scan_step<W, Softplus>(a.u + b * a.u_sb + t * a.u_st + c0, a.delta + b * a.d_sb + t * a.d_st + c0, bias,
                             Dd, At, h, a.B + b * a.bc_sb + t * a.bc_st, a.C + b * a.bc_sb + t * a.bc_st, N, y);
      float* __restrict o = outk + t * dim;
      for (int64_t j = 0; j < W; ++j) o[j] = y[j];
    }
  }
}

template <int64_t W>
ZOO_INLINE void scan_block_any(const OrderScanArgs& a, int64_t b, int64_t c0, float* At, float* h) {
  if (a.softplus)
    scan_block<W, true>(a, b, c0, At, h);
  else
    scan_block<W, false>(a, b, c0, At, h);
}

// tasks [begin, end) of the flattened (batch, channel block); a last partial block runs lane by lane
ZOO_CPU_DISPATCH void order_scan_blocks(const OrderScanArgs& a, int64_t begin, int64_t end) {
  const int64_t blocks = (a.dim + kLanes - 1) / kLanes;
  std::vector<float> At(a.N * kLanes), h(a.N * kLanes);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kLanes;
    if (c0 + kLanes <= a.dim) {
      scan_block_any<kLanes>(a, b, c0, At.data(), h.data());
    } else {
      for (int64_t c = c0; c < a.dim; ++c) scan_block_any<1>(a, b, c, At.data(), h.data());
    }
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
  const int64_t blocks = (dim + kLanes - 1) / kLanes;
  at::parallel_for(0, batch * blocks, zoo_vec::grain_for(K * L * N * kLanes),
                   [&](int64_t begin, int64_t end) { order_scan_blocks(a, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) {
  m.impl("depthwise_conv2d_silu", &depthwise_conv2d_silu_cpu);
  m.impl("scan_orders", &scan_orders_cpu);
}

}  // namespace zoo_scan
