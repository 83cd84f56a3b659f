// MSVMamba's and VMamba's mixers on the CPU in the channels-last / (batch, L, dim) row layout of its linear layers,
// so neither the depthwise convs nor the scans need transposed or gathered copies:
//
//   depthwise_conv2d_silu: a k x k depthwise conv (stride 1 or 2, zero padding) + bias + SiLU on a
//                          channels-last map, channels in the vector lanes;
//   depthwise_conv2d_residual_gelu: GELU(x' + conv(x') + bias) with x' = x + x_bias (ConvFFN's middle, which
//                          so also takes in the bias of the 1x1 conv before it);
//   scan_orders:           the selective scan over K traversal orders of the tokens as ONE sequence
//                          (the state carried from one order into the next, as the official
//                          multi-direction scan does), every order's outputs written straight to
//                          the tokens' row-major positions (MSVMamba);
//   scan_cross:            K independent scans, one per traversal order with its own parameters,
//                          summed at the tokens' row-major positions (VMamba's cross-scan and merge);
//   norm_merge_gate:       the mixer's epilogue in one pass over the tokens: LayerNorm of the scan output,
//                          plus the bilinear upsample of the low-resolution branch's normalised order sum
//                          (MSVMamba), per-image channel sums (for the SE gate), times silu(z).
//
// Every kernel is ZOO_CPU_DISPATCH (one clone per ISA, picked at load time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_vec.h"
#include "dwconv_rows.h"
#include "mixer_common.h"
#include "rows_scan.h"
#include "rows_scan_avx512.h"

namespace zoo_scan {
namespace {

constexpr int64_t kLanes = 16;  // channels per block: one AVX-512 register, two AVX2 ones
// channels per scan task at most: 1 KB of every row it reads, 16 consecutive lines a step that the L2 streamer
// follows (A/B, scan_orders at MSVMamba-T: 0.91 of the time of 64 channels; 1024 channels: the same as 256)
constexpr int64_t kChunk = 256;

// the scan ops' seven tensor inputs: float32 CPU tensors
void check_scan_floats(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias) {
  const std::pair<const at::Tensor*, const char*> floats[] = {
      {&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}, {&D, "D"}, {&delta_bias, "delta_bias"}};
  for (const auto& [t, name] : floats) check_float_on(op, *t, name, at::kCPU);
}

// ---- depthwise_conv2d_silu / depthwise_conv2d_residual_gelu (the conv itself: dwconv_rows.h) ----

ZOO_CPU_DISPATCH void dwconv_silu_rows(const DwConvArgs& a, int64_t begin, int64_t end) {
  dwconv_rows<DwEpilogue::SiLU>(a, begin, end);
}

ZOO_CPU_DISPATCH void dwconv_residual_gelu_rows(const DwConvArgs& a, int64_t begin, int64_t end) {
  dwconv_rows<DwEpilogue::ResidualGELU>(a, begin, end);
}

// The checks and the call both conv ops share; x_bias (residual mode only) is added to the input first.
at::Tensor run_depthwise_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, int64_t stride,
                              const c10::optional<at::Tensor>& x_bias, DwEpilogue epilogue) {
  TORCH_CHECK(x.dim() == 4, "zoo_scan::", op, ": x must be channels-last (batch, H, W, C), got ", x.sizes());
  check_float_on(op, x, "x", at::kCPU);
  check_float_on(op, weight, "weight", at::kCPU);
  const int64_t C = x.size(3), K = weight.size(-1);
  TORCH_CHECK(weight.dim() == 4 && K % 2 == 1, "zoo_scan::", op, ": weight must be (C, 1, k, k) with an odd k, got ",
              weight.sizes());
  check_shape(op, weight, "weight", {C, 1, K, K}, "(C, 1, k, k)");
  TORCH_CHECK(stride == 1 || stride == 2, "zoo_scan::", op, ": stride must be 1 or 2, got ", stride);
  at::Tensor bc, xbc;
  if (bias.has_value()) {
    check_float_on(op, *bias, "bias", at::kCPU);
    check_shape(op, *bias, "bias", {C}, "(C)");
    bc = bias->contiguous();
  }
  if (x_bias.has_value()) {
    check_float_on(op, *x_bias, "x_bias", at::kCPU);
    check_shape(op, *x_bias, "x_bias", {C}, "(C)");
    xbc = x_bias->contiguous();
  } else if (epilogue == DwEpilogue::ResidualGELU) {
    xbc = at::zeros({C}, x.options());
  }
  const at::Tensor xr = unit_last(x);
  const at::Tensor w = weight.view({C, K * K}).t().contiguous();  // (k * k, C)
  const int64_t H = x.size(1), W = x.size(2), pad = (K - 1) / 2;
  const int64_t Ho = (H + 2 * pad - K) / stride + 1, Wo = (W + 2 * pad - K) / stride + 1;
  auto out = at::empty({x.size(0), Ho, Wo, C}, x.options());
  DwConvArgs a{x.size(0), H, W, C, K, stride, pad, Ho, Wo, xr.data_ptr<float>(), xr.stride(0), xr.stride(1),
               xr.stride(2), w.data_ptr<float>(), bias.has_value() ? bc.data_ptr<float>() : nullptr,
               xbc.defined() ? xbc.data_ptr<float>() : nullptr, out.data_ptr<float>()};
  at::parallel_for(0, a.batch * Ho, zoo_vec::grain_for(Wo * C * K * K), [&](int64_t begin, int64_t end) {
    if (epilogue == DwEpilogue::SiLU)
      dwconv_silu_rows(a, begin, end);
    else
      dwconv_residual_gelu_rows(a, begin, end);
  });
  return out;
}

at::Tensor depthwise_conv2d_silu_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t stride) {
  return run_depthwise_conv("depthwise_conv2d_silu", x, weight, bias, stride, c10::nullopt, DwEpilogue::SiLU);
}

at::Tensor depthwise_conv2d_residual_gelu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& x_bias,
                                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return run_depthwise_conv("depthwise_conv2d_residual_gelu", x, weight, bias, 1, x_bias, DwEpilogue::ResidualGELU);
}

// ---- scan_orders / scan_cross ----

// One kernel for both ops. scan_orders (MSVMamba): the K orders share delta, B, C and the parameters,
// form one sequence (the state runs on from one order into the next) and keep separate outputs.
// scan_cross (VMamba): each order k has its own delta, B, C, A, D and bias (the *_sk strides), starts
// from a zero state, and the K outputs are summed.
struct OrderScanArgs {
  int64_t batch, L, dim, N, K;
  bool softplus, decaying, independent, summed;  // decaying: see rows_scan.h
  bool avx512;             // a decaying scan and zoo_vec::avx512_kernels(): the hand-written AVX-512 step
  const float *u, *delta;  // u (batch, L, dim); delta per order: (batch, L, dim), or (batch, L, R) with dt_w
  int64_t u_sb, u_st, d_sk, d_sb, d_st;
  const float* dt_w;       // nullptr, or dt_proj's weight (K or 1, dim, R): delta = low-rank delta @ dt_w^T
  int64_t R, dtw_sk;       // its rank and order stride (dim * R or 0)
  const float* A;          // (K or 1, dim, N)
  const float *B, *C;      // per order (batch, L, N), state stride 1, the same strides for both
  int64_t bc_sk, bc_sb, bc_st;
  const float *D, *bias;   // (K or 1, dim)
  int64_t p_sk;            // order stride of D and bias (dim or 0); of A it is p_sk * N
  const int64_t* orders;   // (K, L): step s of order k reads token orders[k * L + s]
  float* out;              // summed: (batch, L, dim); else (batch, K, L, dim)
  int64_t chunk;           // channels per task: kChunk, halved (down to kLanes) until every thread has work
};

// whether the K orders share one delta (MSVMamba): each token's time scale is then computed once, not once per visit
ZOO_INLINE bool shares_time_scales(const OrderScanArgs& a) { return a.K > 1 && a.d_sk == 0 && a.dtw_sk == 0; }

// Where token t's rows of batch b (order k) start: one definition for the scan and its prefetch. delta_row is
// the whole row (channel c of the full-width delta at + c; with dt_w the R low-rank values); bc_offset is the
// offset of B's and C's rows (they share strides); out_row is channel 0 of the output row.
ZOO_INLINE const float* u_row(const OrderScanArgs& a, int64_t b, int64_t t) { return a.u + b * a.u_sb + t * a.u_st; }
ZOO_INLINE const float* delta_row(const OrderScanArgs& a, int64_t b, int64_t k, int64_t t) {
  return a.delta + k * a.d_sk + b * a.d_sb + t * a.d_st;
}
ZOO_INLINE int64_t bc_offset(const OrderScanArgs& a, int64_t b, int64_t k, int64_t t) {
  return k * a.bc_sk + b * a.bc_sb + t * a.bc_st;
}
ZOO_INLINE float* out_row(const OrderScanArgs& a, int64_t b, int64_t k, int64_t t) {
  return a.out + (a.summed ? b * a.L + t : (b * a.K + k) * a.L + t) * a.dim;
}

// Step t of order k: the time scales of channels c0 .. c0 + width of batch b. A function, not a lambda: the
// callees of ZOO_CPU_DISPATCH kernels must be inlined into each ISA clone (a lambda ran as baseline code).
template <bool Softplus>
ZOO_INLINE void fill_dt(const OrderScanArgs& a, int64_t b, int64_t c0, int64_t width, int64_t k, int64_t t,
                        const float* Wt, float* dt) {
  const int64_t full = width / kLanes * kLanes, R = a.R;
  const float* bias = a.bias + k * a.p_sk + c0;
  const float* dp = delta_row(a, b, k, t);
  if (a.dt_w != nullptr) {  // the blocks' sums four at a time (lowrank_sums), then softplus over the row
    lowrank_sums_all<kLanes / kVec8Lanes>({dp, 0, Wt, kLanes * R, bias, kLanes, dt, kLanes}, full / kLanes, R);
    for (int64_t j = full; j < width; ++j) step_dt_lowrank<1, false>(dp, R, Wt + j * R, bias + j, dt + j);
    softplus_in_place<Softplus>(dt, width);
  } else {
    for (int64_t j = 0; j < full; j += kLanes) step_dt<kLanes, Softplus>(dp + c0 + j, bias + j, dt + j);
    for (int64_t j = full; j < width; ++j) step_dt<1, Softplus>(dp + c0 + j, bias + j, dt + j);
  }
}

// Per-chunk buffers: At (N x width) and Wt (R x width) in the block layout (a block's values at offset
// (first lane) * N or * R, state- / rank-major inside it), h (N x width), dtbuf (L x width: every token's
// time scales when the K orders share them), dt (kDtSteps x width: the next steps' time scales otherwise)
// and y (one step's).
struct ChunkBuffers {
  std::vector<float> At, Wt, h, dtbuf, dt, y;
};

// the rows a step reads and writes are fetched this many steps ahead of it, in every order: a task reads
// width channels of each token's row, so even row-major tokens are dim * 4 bytes apart (3 KB in MSVMamba-T's
// third stage), past the strides the hardware prefetchers follow; fetching only where an order jumped left
// scan_orders waiting on its u rows (0.78-0.81 of the time with every step prefetched)
constexpr int64_t kPrefetchSteps = 8;

// prefetch token t's rows of the chunk: u, the time scales (or delta), B and C, and the output row
ZOO_INLINE void prefetch_step(const OrderScanArgs& a, int64_t b, int64_t c0, int64_t width, int64_t k, int64_t t,
                              bool shared_dt, const ChunkBuffers& buf) {
  const int64_t bytes = width * int64_t(sizeof(float));
  zoo_vec::prefetch_span(u_row(a, b, t) + c0, bytes);
  if (shared_dt) {
    zoo_vec::prefetch_span(buf.dtbuf.data() + t * width, bytes);
  } else if (a.dt_w != nullptr) {
    zoo_vec::prefetch_span(delta_row(a, b, k, t), a.R * int64_t(sizeof(float)));
  } else {
    zoo_vec::prefetch_span(delta_row(a, b, k, t) + c0, bytes);
  }
  const int64_t bc = bc_offset(a, b, k, t);
  zoo_vec::prefetch_span(a.B + bc, a.N * int64_t(sizeof(float)));
  zoo_vec::prefetch_span(a.C + bc, a.N * int64_t(sizeof(float)));
  zoo_vec::prefetch_span<true>(out_row(a, b, k, t) + c0, bytes);
}

// One step over the first `full` lanes of a chunk (whole blocks of kLanes): on AVX-512 the hand-written step
// for decaying scans, else scan_step_dt per block; d_state 1 with N fixed at compile time.
template <bool Decaying>
ZOO_INLINE void step_blocks(const OrderScanArgs& a, const float* up, const float* dt, const float* D,
                            const float* At, float* h, const float* Bt, const float* Ct, int64_t full, float* y) {
  const int64_t N = a.N;
#if ZOO_INTRINSICS
  if constexpr (Decaying) {
    if (a.avx512) {
      if (N == 1)
        scan_step_blocks_avx512<1>(up, dt, D, At, h, Bt, Ct, 1, full, y);
      else
        scan_step_blocks_avx512(up, dt, D, At, h, Bt, Ct, N, full, y);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < full; j += kLanes) {
    if (N == 1)
      scan_step_dt<kLanes, Decaying, 1>(up + j, dt + j, D + j, At + j, h + j, Bt, Ct, 1, y + j);
    else
      scan_step_dt<kLanes, Decaying>(up + j, dt + j, D + j, At + j * N, h + j * N, Bt, Ct, N, y + j);
  }
}

// Channels c0 .. c0 + width (<= a.chunk) of batch b over all K orders. The step loop is the outer one, so
// each token's rows are read whole and in order (a per-block task would touch one line of a row and come
// back for the next after it left the cache); inside, blocks of kLanes lanes, then single lanes.
template <bool Softplus, bool Decaying>
ZOO_INLINE void scan_chunk(const OrderScanArgs& a, int64_t b, int64_t c0, int64_t width, ChunkBuffers& buf) {
  const int64_t L = a.L, N = a.N, R = a.R, full = width / kLanes * kLanes;
  float *At = buf.At.data(), *Wt = buf.Wt.data(), *h = buf.h.data(), *ybuf = buf.y.data();
  const bool shared_dt = shares_time_scales(a);
  for (int64_t k = 0; k < a.K; ++k) {
    for (int64_t j = 0; j < width; ++j) {  // this order's parameters in the block layout
      const int64_t j0 = j < full ? j / kLanes * kLanes : j, lanes = j < full ? kLanes : 1, c = c0 + j;
      if (k == 0 || a.p_sk != 0) load_scaled_A(a.A + (k * a.p_sk + c) * N, N, lanes, j - j0, At + j0 * N);
      if (a.dt_w != nullptr && (k == 0 || a.dtw_sk != 0)) {
        load_dt_weight(a.dt_w + k * a.dtw_sk + c * R, R, lanes, j - j0, Wt + j0 * R);
      }
    }
    if (k == 0 && shared_dt) {
      for (int64_t t = 0; t < L; ++t) fill_dt<Softplus>(a, b, c0, width, 0, t, Wt, buf.dtbuf.data() + t * width);
    }
    if (k == 0 || a.independent) std::fill(h, h + width * N, 0.0f);
    const float* D = a.D + k * a.p_sk + c0;
    const int64_t* order = a.orders + k * L;
    const bool accumulate = a.summed && k > 0;  // later orders of scan_cross add to the output row
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = order[s];
      const int64_t ahead = std::min(s + kPrefetchSteps, L - 1);
      prefetch_step(a, b, c0, width, k, order[ahead], shared_dt, buf);
      const float* up = u_row(a, b, t) + c0;
      const float* Bt = a.B + bc_offset(a, b, k, t);
      const float* Ct = a.C + bc_offset(a, b, k, t);
      const float* dt = shared_dt ? buf.dtbuf.data() + t * width : buf.dt.data() + (s % kDtSteps) * width;
      if (!shared_dt && s % kDtSteps == 0) {
        for (int64_t q = s; q < std::min(s + kDtSteps, L); ++q)
          fill_dt<Softplus>(a, b, c0, width, k, order[q], Wt, buf.dt.data() + (q - s) * width);
      }
      float* __restrict o = out_row(a, b, k, t) + c0;
      float* y = accumulate ? ybuf : o;
      step_blocks<Decaying>(a, up, dt, D, At, h, Bt, Ct, full, y);
      for (int64_t j = full; j < width; ++j)
        scan_step_dt<1, Decaying>(up + j, dt + j, D + j, At + j * N, h + j * N, Bt, Ct, N, y + j);
      if (accumulate) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) o[j] += ybuf[j];
      }
    }
  }
}

// tasks [begin, end) of the flattened (batch, chunk of a.chunk channels)
ZOO_CPU_DISPATCH void order_scan_chunks(const OrderScanArgs& a, int64_t begin, int64_t end) {
  const int64_t chunks = (a.dim + a.chunk - 1) / a.chunk, w = a.chunk;
  const bool shared_dt = shares_time_scales(a);
  ChunkBuffers buf{std::vector<float>(a.N * w), std::vector<float>(a.R * w), std::vector<float>(a.N * w),
                   std::vector<float>(shared_dt ? a.L * w : 0), std::vector<float>(kDtSteps * w),
                   std::vector<float>(w)};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / chunks, c0 = (task % chunks) * w, width = std::min(w, a.dim - c0);
    if (a.decaying)
      scan_chunk<true, true>(a, b, c0, width, buf);
    else if (a.softplus)
      scan_chunk<true, false>(a, b, c0, width, buf);
    else
      scan_chunk<false, false>(a, b, c0, width, buf);
  }
}

// orders (K, L) int64: each a permutation of the L tokens; returns it contiguous
at::Tensor checked_orders(const at::Tensor& orders, const char* op, int64_t K, int64_t L) {
  TORCH_CHECK(orders.dim() == 2 && orders.size(0) >= 1 && (K < 0 || orders.size(0) == K) && orders.size(1) == L &&
                  orders.scalar_type() == at::kLong && orders.device().is_cpu(),
              "zoo_scan::", op, ": orders must be an int64 CPU tensor (", K < 0 ? "K >= 1" : "K", ", L = ", L,
              "), got ", orders.scalar_type(), " ", orders.sizes());
  const at::Tensor oc = orders.contiguous();
  const int64_t* idx = oc.data_ptr<int64_t>();
  std::vector<int64_t> seen(L, -1);  // every order must visit each token exactly once
  for (int64_t k = 0; k < oc.size(0); ++k) {
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = idx[k * L + s];
      TORCH_CHECK(t >= 0 && t < L, "zoo_scan::", op, ": orders[", k, "] holds token ", t, " outside [0, ", L, ")");
      TORCH_CHECK(seen[t] != k, "zoo_scan::", op, ": orders[", k, "] visits token ", t,
                  " twice; each order must be a permutation of 0 .. L - 1");
      seen[t] = k;
    }
  }
  return oc;
}

// delta's last size: dim, or with dt_proj folded in (dt_weight (..., dim, R)) its rank R; sets the args' dt_w
int64_t delta_width(const c10::optional<at::Tensor>& dt_weight, const char* op, at::IntArrayRef lead, int64_t dim,
                    OrderScanArgs& a, at::Tensor& dtw) {
  a.dt_w = nullptr, a.R = 0, a.dtw_sk = 0;
  if (!dt_weight.has_value()) return dim;
  check_float_on(op, *dt_weight, "dt_weight", at::kCPU);
  const int64_t R = dt_weight->size(-1);
  std::vector<int64_t> want(lead.begin(), lead.end());
  want.push_back(dim);
  want.push_back(R);
  check_shape(op, *dt_weight, "dt_weight", want, lead.empty() ? "(dim, rank)" : "(K, dim, rank)");
  dtw = dt_weight->contiguous();
  a.dt_w = dtw.data_ptr<float>(), a.R = R, a.dtw_sk = lead.empty() ? 0 : dim * R;
  return R;
}

// The kernel call both ops share, after their own checks: B and C get one set of strides (unit state stride).
at::Tensor run_order_scan(OrderScanArgs a, const at::Tensor& B, const at::Tensor& C, at::Tensor out,
                          int64_t bc_order_dim) {
  const auto [Bs, Cs] = with_shared_strides(B, C);
  a.B = Bs.data_ptr<float>();
  a.C = Cs.data_ptr<float>();
  a.bc_sk = bc_order_dim < 0 ? 0 : Bs.stride(bc_order_dim);
  a.bc_sb = Bs.stride(0);
  a.bc_st = Bs.stride(1);
  a.out = out.data_ptr<float>();
  a.avx512 = a.decaying && zoo_vec::avx512_kernels();
  // small batches (batch 1 inference on many cores): narrower chunks, so that every thread gets tasks
  a.chunk = kChunk;
  while (a.chunk > kLanes && a.batch * ((a.dim + a.chunk - 1) / a.chunk) < 2 * at::get_num_threads()) a.chunk /= 2;
  const int64_t chunks = (a.dim + a.chunk - 1) / a.chunk;
  at::parallel_for(0, a.batch * chunks, zoo_vec::grain_for(a.K * a.L * a.N * a.chunk),
                   [&](int64_t begin, int64_t end) { order_scan_chunks(a, begin, end); });
  return out;
}

at::Tensor scan_orders_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                           const at::Tensor& orders, bool delta_softplus,
                           const c10::optional<at::Tensor>& dt_weight) {
  const char* op = "scan_orders";
  TORCH_CHECK(u.dim() == 3 && u.size(1) >= 1, "zoo_scan::scan_orders: u must be (batch, L >= 1, dim), got ",
              u.sizes());
  TORCH_CHECK(A.dim() == 2, "zoo_scan::scan_orders: A must be (dim, d_state), got ", A.sizes());
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), N = A.size(1);
  check_scan_floats(op, u, delta, A, B, C, D, delta_bias);
  OrderScanArgs a{};
  at::Tensor dtw;
  const int64_t dwidth = delta_width(dt_weight, op, {}, dim, a, dtw);
  check_shape(op, delta, "delta", {batch, L, dwidth},
              dt_weight.has_value() ? "(batch, L, rank) with dt_weight" : "u's shape (batch, L, dim)");
  check_shape(op, B, "B", {batch, L, N}, "(batch, L, d_state)");
  check_shape(op, C, "C", {batch, L, N}, "(batch, L, d_state)");
  check_shape(op, D, "D", {dim}, "(dim)");
  check_shape(op, delta_bias, "delta_bias", {dim}, "(dim)");
  const at::Tensor oc = checked_orders(orders, op, -1, L);
  const int64_t K = oc.size(0);
  const at::Tensor us = unit_last(u), ds = unit_last(delta), Ac = A.contiguous(), Dc = D.contiguous();
  const at::Tensor bc = delta_bias.contiguous();
  a.batch = batch, a.L = L, a.dim = dim, a.N = N, a.K = K;
  a.softplus = delta_softplus, a.decaying = decaying_scan(delta_softplus, Ac.max().item<float>());
  a.independent = false, a.summed = false;
  a.u = us.data_ptr<float>(), a.u_sb = us.stride(0), a.u_st = us.stride(1);
  a.delta = ds.data_ptr<float>(), a.d_sk = 0, a.d_sb = ds.stride(0), a.d_st = ds.stride(1);
  a.A = Ac.data_ptr<float>(), a.D = Dc.data_ptr<float>(), a.bias = bc.data_ptr<float>(), a.p_sk = 0;
  a.orders = oc.data_ptr<int64_t>();
  return run_order_scan(a, B, C, at::empty({batch, K, L, dim}, u.options()), -1);
}

at::Tensor scan_cross_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                          const at::Tensor& orders, bool delta_softplus,
                          const c10::optional<at::Tensor>& dt_weight) {
  const char* op = "scan_cross";
  TORCH_CHECK(u.dim() == 3 && u.size(1) >= 1, "zoo_scan::scan_cross: u must be (batch, L >= 1, dim), got ",
              u.sizes());
  TORCH_CHECK(A.dim() == 3 && A.size(0) >= 1, "zoo_scan::scan_cross: A must be (K, dim, d_state), got ", A.sizes());
  const int64_t batch = u.size(0), L = u.size(1), dim = u.size(2), K = A.size(0), N = A.size(2);
  check_scan_floats(op, u, delta, A, B, C, D, delta_bias);
  OrderScanArgs a{};
  at::Tensor dtw;
  const int64_t dwidth = delta_width(dt_weight, op, {K}, dim, a, dtw);
  check_shape(op, delta, "delta", {K, batch, L, dwidth},
              dt_weight.has_value() ? "(K, batch, L, rank) with dt_weight" : "(K, batch, L, dim)");
  check_shape(op, A, "A", {K, dim, N}, "(K, dim, d_state)");
  check_shape(op, B, "B", {batch, L, K, N}, "(batch, L, K, d_state)");
  check_shape(op, C, "C", {batch, L, K, N}, "(batch, L, K, d_state)");
  check_shape(op, D, "D", {K, dim}, "(K, dim)");
  check_shape(op, delta_bias, "delta_bias", {K, dim}, "(K, dim)");
  const at::Tensor oc = checked_orders(orders, op, K, L);
  const at::Tensor us = unit_last(u), ds = unit_last(delta);
  const at::Tensor Ac = A.contiguous(), Dc = D.contiguous(), bc = delta_bias.contiguous();
  a.batch = batch, a.L = L, a.dim = dim, a.N = N, a.K = K;
  a.softplus = delta_softplus, a.decaying = decaying_scan(delta_softplus, Ac.max().item<float>());
  a.independent = true, a.summed = true;
  a.u = us.data_ptr<float>(), a.u_sb = us.stride(0), a.u_st = us.stride(1);
  a.delta = ds.data_ptr<float>(), a.d_sk = ds.stride(0), a.d_sb = ds.stride(1), a.d_st = ds.stride(2);
  a.A = Ac.data_ptr<float>(), a.D = Dc.data_ptr<float>(), a.bias = bc.data_ptr<float>(), a.p_sk = dim;
  a.orders = oc.data_ptr<int64_t>();
  return run_order_scan(a, B, C, at::empty({batch, L, dim}, u.options()), 2);
}

// ---- norm_merge_gate ----

struct MergeArgs {
  int64_t batch, H, W, d, K, lh, lw;
  float eps;
  const float* y;  // (batch, H * W, d), channel stride 1
  int64_t y_sb, y_st;
  const float* y_low;  // (batch, K, lh * lw, d) contiguous, or nullptr
  const float *w, *b;  // LayerNorm weight and bias (d)
  const float* z;      // (batch, H * W, d), channel stride 1, or nullptr
  int64_t z_sb, z_st;
  float* low_sum;  // (batch, lh * lw, d): sum over the K orders of LayerNorm(y_low) (the kernel's scratch)
  float* out;      // (batch, H * W, d)
  float* row_sums;  // (batch, H, d): per output row, the channel sums before the gate
};

// sum over c < d of f(x[c]) in 16 partial sums (two AVX2 registers) added as a tree: with a single vector
// accumulator the reduction is one chain of dependent adds, which bounded LayerNorm on rows of d = 96..384
template <typename F>
ZOO_INLINE float row_sum(const float* __restrict x, int64_t d, F f) {
  constexpr int64_t P = 16;
  float part[P] = {};
  int64_t c = 0;
  for (; c + P <= d; c += P) {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) part[j] += f(x[c + j]);
  }
  for (int64_t j = 0; c + j < d; ++j) part[j] += f(x[c + j]);
  float lane[8];
#pragma omp simd
  for (int64_t j = 0; j < 8; ++j) lane[j] = part[j] + part[j + 8];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

struct Identity {
  ZOO_INLINE float operator()(float v) const { return v; }
};
struct SquaredDeviation {
  float mean;
  ZOO_INLINE float operator()(float v) const { return (v - mean) * (v - mean); }
};

// out[c] = (or, Accumulate, +=) (x[c] - mean) / sqrt(var + eps) * w[c] + b[c] over the d channels of one token
template <bool Accumulate>
ZOO_INLINE void layer_norm_row(const float* __restrict x, int64_t d, float eps, const float* __restrict w,
                               const float* __restrict b, float* __restrict out) {
  const float mean = row_sum(x, d, Identity{}) / static_cast<float>(d);
  const float var = row_sum(x, d, SquaredDeviation{mean}) / static_cast<float>(d);  // two passes: no cancellation
  const float rstd = 1.0f / std::sqrt(var + eps);
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) {
    const float v = (x[c] - mean) * rstd * w[c] + b[c];
    out[c] = Accumulate ? out[c] + v : v;
  }
}

// low-resolution tokens [begin, end) of the flattened (batch, lh * lw): the K orders' normalised outputs summed
ZOO_CPU_DISPATCH void merge_low_tokens(const MergeArgs& a, int64_t begin, int64_t end) {
  const int64_t l = a.lh * a.lw, d = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / l, t = r % l;
    float* o = a.low_sum + r * d;
    for (int64_t k = 0; k < a.K; ++k) {
      const float* x = a.y_low + ((b * a.K + k) * l + t) * d;
      if (k == 0)
        layer_norm_row<false>(x, d, a.eps, a.w, a.b, o);
      else
        layer_norm_row<true>(x, d, a.eps, a.w, a.b, o);
    }
  }
}

// align_corners=False bilinear source index of output index i along an axis of in -> out pixels, as
// F.interpolate computes it: (i + 1/2) * in / out - 1/2, clamped at 0; the upper neighbour clamped to in - 1
struct Tap {
  int64_t i0, i1;
  float l0, l1;
};
ZOO_INLINE Tap bilinear_tap(int64_t i, int64_t in, int64_t out) {
  if (in == out) return {i, i, 1.0f, 0.0f};
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const float src = std::max(scale * (static_cast<float>(i) + 0.5f) - 0.5f, 0.0f);
  const int64_t i0 = static_cast<int64_t>(src);
  const float l1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
  return {i0, i0 + (i0 < in - 1 ? 1 : 0), 1.0f - l1, l1};
}

// merge_rows fetches the y and z rows of the token this many ahead: both are rows of wider tensors (z a column
// slice of in_proj's output, 2 * d floats apart), whose strides the hardware prefetchers did not follow; the
// loads of z stalled the gate
constexpr int64_t kMergePrefetch = 2;

ZOO_INLINE void prefetch_merge_rows(const MergeArgs& a, int64_t b, int64_t t) {
  const int64_t bytes = a.d * int64_t(sizeof(float));
  zoo_vec::prefetch_span(a.y + b * a.y_sb + t * a.y_st, bytes);
  if (a.z != nullptr) zoo_vec::prefetch_span(a.z + b * a.z_sb + t * a.z_st, bytes);
}

// output rows [begin, end) of the flattened (batch, H)
ZOO_CPU_DISPATCH void merge_rows(const MergeArgs& a, int64_t begin, int64_t end) {
  const int64_t d = a.d;
  std::vector<float> v(d);
  std::vector<Tap> column_taps;
  if (a.y_low != nullptr) {
    for (int64_t ow = 0; ow < a.W; ++ow) column_taps.push_back(bilinear_tap(ow, a.lw, a.W));
  }
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.H, oh = r % a.H;
    float* __restrict sums = a.row_sums + r * d;
    std::fill(sums, sums + d, 0.0f);
    const Tap th = a.y_low != nullptr ? bilinear_tap(oh, a.lh, a.H) : Tap{0, 0, 0.0f, 0.0f};
    for (int64_t ow = 0; ow < a.W; ++ow) {
      const int64_t t = oh * a.W + ow;
      if (ow + kMergePrefetch < a.W) prefetch_merge_rows(a, b, t + kMergePrefetch);
      float* __restrict vp = v.data();
      layer_norm_row<false>(a.y + b * a.y_sb + t * a.y_st, d, a.eps, a.w, a.b, vp);
      if (a.y_low != nullptr) {
        const Tap& tw = column_taps[ow];
        const float* base = a.low_sum + b * a.lh * a.lw * d;
        const float* __restrict s00 = base + (th.i0 * a.lw + tw.i0) * d;
        const float* __restrict s01 = base + (th.i0 * a.lw + tw.i1) * d;
        const float* __restrict s10 = base + (th.i1 * a.lw + tw.i0) * d;
        const float* __restrict s11 = base + (th.i1 * a.lw + tw.i1) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c)
          vp[c] += th.l0 * (tw.l0 * s00[c] + tw.l1 * s01[c]) + th.l1 * (tw.l0 * s10[c] + tw.l1 * s11[c]);
      }
      float* __restrict o = a.out + (b * a.H * a.W + t) * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) sums[c] += vp[c];
      if (a.z != nullptr) {
        const float* __restrict zp = a.z + b * a.z_sb + t * a.z_st;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = vp[c] * zoo_vec::silu(zp[c]);
      } else {
        std::copy(vp, vp + d, o);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> norm_merge_gate_cpu(const at::Tensor& y, const c10::optional<at::Tensor>& y_low,
                                                       int64_t height, int64_t width, int64_t low_height,
                                                       int64_t low_width, const at::Tensor& norm_weight,
                                                       const at::Tensor& norm_bias, double eps,
                                                       const c10::optional<at::Tensor>& z) {
  const char* op = "norm_merge_gate";
  check_float_on(op, y, "y", at::kCPU);
  TORCH_CHECK(y.dim() == 3 && height >= 1 && width >= 1 && y.size(1) == height * width,
              "zoo_scan::norm_merge_gate: y must be (batch, height * width, d) with height, width >= 1, got ",
              y.sizes(), " for height ", height, ", width ", width);
  const int64_t batch = y.size(0), d = y.size(2);
  check_float_on(op, norm_weight, "norm_weight", at::kCPU);
  check_float_on(op, norm_bias, "norm_bias", at::kCPU);
  check_shape(op, norm_weight, "norm_weight", {d}, "(d)");
  check_shape(op, norm_bias, "norm_bias", {d}, "(d)");
  MergeArgs a{};
  a.batch = batch, a.H = height, a.W = width, a.d = d, a.eps = static_cast<float>(eps);
  const at::Tensor ys = unit_last(y), wc = norm_weight.contiguous(), bc = norm_bias.contiguous();
  a.y = ys.data_ptr<float>(), a.y_sb = ys.stride(0), a.y_st = ys.stride(1);
  a.w = wc.data_ptr<float>(), a.b = bc.data_ptr<float>();
  at::Tensor low, low_sum;
  if (y_low.has_value()) {
    check_float_on(op, *y_low, "y_low", at::kCPU);
    TORCH_CHECK(y_low->dim() == 4 && low_height >= 1 && low_width >= 1,
                "zoo_scan::norm_merge_gate: y_low must be (batch, K, low_height * low_width, d), got ",
                y_low->sizes());
    check_shape(op, *y_low, "y_low", {batch, y_low->size(1), low_height * low_width, d},
                "(batch, K, low_height * low_width, d)");
    low = y_low->contiguous();
    low_sum = at::empty({batch, low_height * low_width, d}, y.options());
    a.y_low = low.data_ptr<float>(), a.K = low.size(1), a.lh = low_height, a.lw = low_width;
    a.low_sum = low_sum.data_ptr<float>();
  }
  at::Tensor zs;
  if (z.has_value()) {
    check_float_on(op, *z, "z", at::kCPU);
    check_shape(op, *z, "z", y.sizes(), "y's shape (batch, height * width, d)");
    zs = unit_last(*z);
    a.z = zs.data_ptr<float>(), a.z_sb = zs.stride(0), a.z_st = zs.stride(1);
  }
  auto out = at::empty({batch, height * width, d}, y.options());
  auto row_sums = at::empty({batch, height, d}, y.options());
  a.out = out.data_ptr<float>(), a.row_sums = row_sums.data_ptr<float>();
  if (a.y_low != nullptr) {
    at::parallel_for(0, batch * a.lh * a.lw, zoo_vec::grain_for(4 * a.K * d),
                     [&](int64_t begin, int64_t end) { merge_low_tokens(a, begin, end); });
  }
  at::parallel_for(0, batch * height, zoo_vec::grain_for(8 * width * d),
                   [&](int64_t begin, int64_t end) { merge_rows(a, begin, end); });
  return {out, row_sums.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) {
  m.impl("norm_merge_gate", &norm_merge_gate_cpu);
  m.impl("depthwise_conv2d_silu", &depthwise_conv2d_silu_cpu);
  m.impl("depthwise_conv2d_residual_gelu", &depthwise_conv2d_residual_gelu_cpu);
  m.impl("scan_orders", &scan_orders_cpu);
  m.impl("scan_cross", &scan_cross_cpu);
}

}  // namespace zoo_scan
