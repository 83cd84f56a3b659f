// CUDA side of Vim's row-layout mixer ops (schemas in zoo/ops/mixer.py, argument checks in
// mixer_common.h, CPU kernels in mixer_cpu.cpp): inference ops. Activations float32, float16 or
// bfloat16 (read and written in place, fp32 arithmetic), parameters float32. Used by zoo.ops.mixer only
// under ZOO_CUDA_SCAN=lparallel until `pytest -m cuda` has passed on a device.
//
// bimamba_conv: one thread per (direction, batch, step, channel), consecutive threads on consecutive
// channels, so every tap is a coalesced row load. bimamba_scan: the two directions through the
// L-parallel scan (scan_cuda_lpar.cu) on channel-major copies, the reverse one walking time
// backwards in the kernel (no flipped copies); the gate and scale are applied in the scans. The
// fused row-layout kernel (no transposes, conv recomputed inside the scan) is not written yet.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "mixer_common.h"
#include "scan_lpar.h"

namespace zoo_scan {
namespace {

template <typename scalar_t>
__global__ void bimamba_conv_kernel(const scalar_t* __restrict__ x, int64_t x_sb, int64_t x_st,
                                    const float* __restrict__ w, const float* __restrict__ bias,
                                    scalar_t* __restrict__ out, int64_t batch, int64_t L, int64_t dim, int K,
                                    int64_t r0) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  const int64_t r = r0 + blockIdx.y;  // (direction, batch, step) flattened
  const int dir = (int)(r / (batch * L));
  const int64_t b = (r / L) % batch, t = r % L;
  const float* wc = w + ((int64_t)dir * dim + c) * K;  // official layout (2, dim, K)
  float acc = bias[dir * dim + c];
  for (int k = 0; k < K; ++k) {
    // forward (causal): tap k reads step t - (K - 1) + k; reverse (anti-causal): t + (K - 1) - k
    const int64_t s = dir == 0 ? t - (K - 1) + k : t + (K - 1) - k;
    if (s >= 0 && s < L) acc += wc[k] * static_cast<float>(x[b * x_sb + s * x_st + c]);
  }
  out[r * dim + c] = static_cast<scalar_t>(acc / (1.f + __expf(-acc)));
}

template <typename F>
void activation_dtype_switch(at::ScalarType t, F&& f) {  // the dtypes check_data_on accepts
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "zoo_scan::bimamba (CUDA): unsupported dtype ", t);
  }
}

at::Tensor bimamba_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_bimamba_conv_args(x, weight, bias, /*half_inputs=*/true);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xr = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  const int64_t batch = x.size(0), L = x.size(1), dim = x.size(2);
  auto out = at::empty({2, batch, L, dim}, x.options());
  const int threads = 128;
  const int64_t rows = 2 * batch * L;
  TORCH_CHECK(rows <= 65535 * 65535LL, "zoo_scan::bimamba_conv (CUDA): batch x L too large, got ", batch, " x ", L);
  for (int64_t r0 = 0; r0 < rows; r0 += 65535) {  // grid.y is limited to 65535 rows per launch
    const int64_t n = std::min<int64_t>(65535, rows - r0);
    dim3 grid((unsigned)((dim + threads - 1) / threads), (unsigned)n);
    activation_dtype_switch(x.scalar_type(), [&](auto t) {
      using scalar_t = decltype(t);
      bimamba_conv_kernel<scalar_t><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          xr.data_ptr<scalar_t>(), xr.stride(0), xr.stride(1), wc.data_ptr<float>(), bc.data_ptr<float>(),
          out.data_ptr<scalar_t>(), batch, L, dim, (int)weight.size(2), r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

// (batch, L, X) -> (batch, X, L), the layout the L-parallel scan reads
at::Tensor channel_major(const at::Tensor& t) { return t.transpose(-1, -2).contiguous(); }

at::Tensor bimamba_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                             const at::Tensor& z, bool delta_softplus, double scale,
                             const c10::optional<at::Tensor>& dt_weight) {
  check_bimamba_scan_args(u, delta, A, B, C, D, delta_bias, z, dt_weight, /*half_inputs=*/true);
  TORCH_CHECK(A.size(2) <= 256, "zoo_scan::bimamba_scan: d_state must be in 1..256 on CUDA, got ", A.size(2));
  c10::cuda::CUDAGuard guard(u.device());
  // with dt_weight, dt_proj as a GEMM here: the L-parallel kernel reads the full-width delta
  const at::Tensor full_delta =
      dt_weight.has_value()
          ? at::matmul(delta, dt_weight->to(delta.scalar_type()).transpose(1, 2).unsqueeze(1))
          : delta;
  const at::Tensor zc = channel_major(z);
  lpar::Inputs dirs[2];
  for (int k = 0; k < 2; ++k) {  // B, C (batch, L, N) -> (batch, 1 group, N, L)
    dirs[k] = {channel_major(u[k]), channel_major(full_delta[k]), A[k].contiguous(), channel_major(B[k]).unsqueeze(1),
               channel_major(C[k]).unsqueeze(1), D[k].contiguous(), zc, delta_bias[k].contiguous(), 1,
               delta_softplus, k == 1};
  }
  return lpar::bidir_forward(dirs[0], dirs[1], scale).transpose(1, 2).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CUDA, m) {
  m.impl("bimamba_conv", &bimamba_conv_cuda);
  m.impl("bimamba_scan", &bimamba_scan_cuda);
}

}  // namespace zoo_scan
