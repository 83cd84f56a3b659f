// CUDA side of Vim's row-layout mixer ops (schemas in zoo/ops/mixer.py, argument checks in
// mixer_common.h, CPU kernels in mixer_cpu.cpp): inference ops, float32.
//
// bimamba_conv: one thread per (direction, batch, step, channel), consecutive threads on consecutive
// channels, so every tap is a coalesced row load. bimamba_scan: the two directions through the
// L-parallel scan (scan_cuda_lpar.cu) on channel-major copies, the reverse one walking time
// backwards in the kernel (no flipped copies); the gate and scale are applied in the scans. The
// fused row-layout kernel (no transposes, conv recomputed inside the scan) is not written yet.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mixer_common.h"
#include "scan_lpar.h"

namespace zoo_scan {
namespace {

__global__ void bimamba_conv_kernel(const float* __restrict__ x, int64_t x_sb, int64_t x_st,
                                    const float* __restrict__ w, const float* __restrict__ bias,
                                    float* __restrict__ out, int64_t batch, int64_t L, int64_t dim, int K,
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
    if (s >= 0 && s < L) acc += wc[k] * x[b * x_sb + s * x_st + c];
  }
  out[r * dim + c] = acc / (1.f + __expf(-acc));
}

at::Tensor bimamba_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_bimamba_conv_args(x, weight, bias);
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
    bimamba_conv_kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xr.data_ptr<float>(), xr.stride(0), xr.stride(1), wc.data_ptr<float>(), bc.data_ptr<float>(),
        out.data_ptr<float>(), batch, L, dim, (int)weight.size(2), r0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// (batch, L, X) -> (batch, X, L), the layout the L-parallel scan reads
at::Tensor channel_major(const at::Tensor& t) { return t.transpose(-1, -2).contiguous(); }

at::Tensor bimamba_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                             const at::Tensor& z, bool delta_softplus, double scale) {
  check_bimamba_scan_args(u, delta, A, B, C, D, delta_bias, z);
  c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor zc = channel_major(z);
  lpar::Inputs dirs[2];
  for (int k = 0; k < 2; ++k) {  // B, C (batch, L, N) -> (batch, 1 group, N, L)
    dirs[k] = {channel_major(u[k]), channel_major(delta[k]), A[k].contiguous(), channel_major(B[k]).unsqueeze(1),
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
