// Selective scan on CUDA: forward, backward and the fused two-direction (Vim) forward/backward.
//
// Layout: one thread owns KS consecutive states of one (batch, channel) and walks the whole sequence;
// TPC = ceil(N / KS) threads (a power of two, inside one warp) share a channel. KS = 1 serves
// MSVMamba's d_state 1, KS = 8 everything else up to 256 (Vim's d_state 16 runs as two threads per
// channel). A block holds CPB channels of one batch element and one B/C group. The sequence is
// walked in tiles of T steps: B/C (group-shared) and the block's rows of dt (bias and softplus
// applied once), u and z are staged through shared memory with coalesced loads, the recurrence runs
// out of shared memory, and the epilogue (sum over the channel's threads, D skip, z gate, store) runs
// per tile with coalesced stores.
//
// Backward: a first pass stores the state entering every TB-step chunk; chunks are then visited in
// reverse, the chunk's states recomputed into registers and the adjoint recurrence run through
// them. Gradients of group-shared B/C are summed over the block's channels in shared memory in a
// fixed order and written as per-block partials, which the host sums: no atomics, so the backward
// is deterministic. Every offset that can exceed 2^31 (batch * dim * L, ...) is 64-bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "cuda_math.cuh"
#include "scan_checks.h"
#include "scan_lpar.h"

#include <algorithm>
#include <array>
#include <vector>

namespace zoo_scan {
namespace {

using namespace cuda_math;  // NOLINT: exp2_fast, to_f, from_f, softplus_f, sigmoid_f, kLog2e, kLn2
constexpr int kThreads = 64;  // threads per block, forward and backward

// One scan direction: its inputs, parameters and outputs.
struct Dir {
  const void* u;
  const void* delta;
  const float* A;
  const void* B;  // variable: (batch, G, N, L) in the input dtype; fixed: (dim, N) fp32
  const void* C;
  const float* D;
  const float* bias;
  bool reverse;
  void* out;      // forward, when not accumulating
  float* last;    // (batch, dim, N)
  void* du;       // backward
  void* ddelta;
  float* dz;      // fp32 (batch, dim, L), per direction
  float* dA_part;  // (batch, dim, N)
  float* dB_part;  // variable: (parts, batch, G, N, L); fixed: (batch, dim, N)
  float* dC_part;
  float* dD_part;     // (batch, dim)
  float* dbias_part;  // (batch, dim)
  float* ckpt;        // (batch, dim, nchunks, N)
  const float* dlast;
};

struct Params {
  int batch, dim, N, groups, dg;
  int64_t L;
  bool varB, varC, softplus, accumulate;
  const void* z;
  const void* dout;
  float scale;
  float* out_acc;  // fp32 (batch, dim, L) when accumulating both directions
  int tpc, cpb, T, parts;
  int64_t nchunks;
  Dir dir[2];
};

template <int KS>
__device__ __forceinline__ bool state_ok(int n, int N) {
  return KS == 1 ? true : n < N;  // KS 1 is only used when N == 1
}

template <typename in_t, int KS>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(const __grid_constant__ Params p) {
  // static indices: a run-time index into the kernel parameters makes every later access to them a
  // slow generic load; this copy is made once, from the constant bank, into registers
  const Dir q = blockIdx.z == 0 ? p.dir[0] : p.dir[1];
  extern __shared__ float smem[];
  const int N = p.N, NP = N + 1, T = p.T, TP = T + 1;
  // per tile: B/C (time-major), and the block's per-channel rows of dt (after bias and softplus), u,
  // z and y, all staged with coalesced loads/stores so that the sequential loop touches only smem
  float* sB = smem;                // (T, N + 1)
  float* sC = sB + T * NP;         // (T, N + 1)
  float* sBf = sC + T * NP;        // (cpb, N): fixed B rows of the block's channels
  float* sCf = sBf + p.cpb * N;
  float* sDt = sCf + p.cpb * N;    // (cpb, T + 1)
  float* sU = sDt + p.cpb * TP;
  float* sZ = sU + p.cpb * TP;
  float* sY = sZ + p.cpb * TP;     // (cpb * tpc, T + 1): per-thread partial outputs
  float* sD = sY + p.cpb * p.tpc * TP;  // (cpb): D and delta_bias of the block's channels, so that
  float* sBias = sD + p.cpb;            // no loop below mixes global loads with global stores
  const int tid = threadIdx.x, c = tid / p.tpc, slice = tid % p.tpc, n0 = slice * KS;
  const int b = blockIdx.y, d0 = blockIdx.x * p.cpb, d = d0 + c, g = d / p.dg;
  const int64_t L = p.L;
  const int64_t row0 = ((int64_t)b * p.dim + d0) * L;  // first channel of the block
  const int64_t bc = ((int64_t)b * p.groups + g) * N * L;
  const in_t* __restrict__ u = static_cast<const in_t*>(q.u) + row0;
  const in_t* __restrict__ delta = static_cast<const in_t*>(q.delta) + row0;
  const in_t* __restrict__ z = p.z ? static_cast<const in_t*>(p.z) + row0 : nullptr;
  const in_t* __restrict__ Bv = static_cast<const in_t*>(q.B) + bc;
  const in_t* __restrict__ Cv = static_cast<const in_t*>(q.C) + bc;

  for (int idx = tid; idx < p.cpb * N; idx += blockDim.x) {
    const int64_t off = (int64_t)d0 * N + idx;
    if (!p.varB) sBf[idx] = static_cast<const float*>(q.B)[off];
    if (!p.varC) sCf[idx] = static_cast<const float*>(q.C)[off];
  }
  for (int cc = tid; cc < p.cpb; cc += blockDim.x) {
    sD[cc] = q.D ? q.D[d0 + cc] : 0.f;
    sBias[cc] = q.bias ? q.bias[d0 + cc] : 0.f;
  }
  float Al2[KS], h[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = n0 + k;
    Al2[k] = state_ok<KS>(n, N) ? q.A[(int64_t)d * N + n] * kLog2e : 0.f;
    h[k] = 0.f;
  }

  for (int64_t t0 = 0; t0 < L; t0 += T) {
    const int nT = (int)min((int64_t)T, L - t0);
    __syncthreads();
    // staging: kUnroll independent loads per thread in flight before the first smem store
    constexpr int kUnroll = 8;
    if (p.varB || p.varC) {
      for (int base = tid; base < N * nT; base += kUnroll * blockDim.x) {
        float rb[kUnroll], rc[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int idx = base + j * blockDim.x;
          if (idx < N * nT) {
            const int n = idx / nT, i = idx - n * nT;
            const int64_t off = (int64_t)n * L + (q.reverse ? L - 1 - (t0 + i) : t0 + i);
            rb[j] = p.varB ? to_f(Bv[off]) : 0.f;
            rc[j] = p.varC ? to_f(Cv[off]) : 0.f;
          }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int idx = base + j * blockDim.x;
          if (idx < N * nT) {
            const int n = idx / nT, i = idx - n * nT;
            sB[i * NP + n] = rb[j];
            sC[i * NP + n] = rc[j];
          }
        }
      }
    }
    for (int base = tid; base < p.cpb * nT; base += kUnroll * blockDim.x) {
      float rd[kUnroll], ru[kUnroll], rz[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int idx = base + j * blockDim.x;
        if (idx < p.cpb * nT) {
          const int cc = idx / nT, i = idx - cc * nT;
          const int64_t off = (int64_t)cc * L + (q.reverse ? L - 1 - (t0 + i) : t0 + i);
          rd[j] = to_f(delta[off]);
          ru[j] = to_f(u[off]);
          rz[j] = z ? to_f(z[off]) : 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int idx = base + j * blockDim.x;
        if (idx < p.cpb * nT) {
          const int cc = idx / nT, i = idx - cc * nT;
          const float dt = rd[j] + sBias[cc];
          sDt[cc * TP + i] = p.softplus ? softplus_f(dt) : dt;
          sU[cc * TP + i] = ru[j];
          sZ[cc * TP + i] = rz[j];
        }
      }
    }
    __syncthreads();
    const float* Bt = p.varB ? sB : sBf + c * N;
    const float* Ct = p.varC ? sC : sCf + c * N;
    const int bstride = p.varB ? NP : 0, cstride = p.varC ? NP : 0;
    // the recurrence proper: straight-line code (no shuffles, no branches) so that the compiler can
    // overlap the exp and loads of later steps with the one dependent FMA per state and step
#pragma unroll 4
    for (int i = 0; i < nT; ++i) {
      const float dt = sDt[c * TP + i];
      const float dtu = dt * sU[c * TP + i];
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) {
        const int n = n0 + k;
        if (state_ok<KS>(n, N)) {
          h[k] = exp2_fast(dt * Al2[k]) * h[k] + dtu * Bt[i * bstride + n];
          y += h[k] * Ct[i * cstride + n];
        }
      }
      sY[tid * TP + i] = y;  // this thread's share of y; summed over the channel's threads below
    }
    __syncthreads();
    for (int idx = tid; idx < p.cpb * nT; idx += blockDim.x) {
      const int cc = idx / nT, i = idx - cc * nT;
      float y = 0.f;
      for (int sl = 0; sl < p.tpc; ++sl) y += sY[(cc * p.tpc + sl) * TP + i];
      y += sD[cc] * sU[cc * TP + i];
      if (z) {
        const float zz = sZ[cc * TP + i];
        y *= zz * sigmoid_f(zz);
      }
      y *= p.scale;
      const int64_t off = row0 + (int64_t)cc * L + (q.reverse ? L - 1 - (t0 + i) : t0 + i);
      if (p.accumulate)
        atomicAdd(p.out_acc + off, y);  // exactly two addends onto zero: order-independent
      else
        static_cast<in_t*>(q.out)[off] = from_f<in_t>(y);
    }
  }
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = n0 + k;
    if (state_ok<KS>(n, N)) q.last[((int64_t)b * p.dim + d) * N + n] = h[k];
  }
}

template <typename in_t, int KS, int TB>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(const __grid_constant__ Params p) {
  // static indices: a run-time index into the kernel parameters makes every later access to them a
  // slow generic load; this copy is made once, from the constant bank, into registers
  const Dir q = blockIdx.z == 0 ? p.dir[0] : p.dir[1];
  extern __shared__ float smem[];
  const int N = p.N, NP = N + 1, CP = p.cpb + 1;
  float* sB = smem;                  // (TB, N + 1)
  float* sC = sB + TB * NP;          // (TB, N + 1)
  float* sdB = sC + TB * NP;         // (N, TB, cpb + 1): per-channel dB of the tile
  float* sdC = sdB + N * TB * CP;
  float* sBf = sdC + N * TB * CP;    // (cpb, N) fixed B / C rows and their gradient accumulators
  float* sCf = sBf + p.cpb * N;
  float* sdBf = sCf + p.cpb * N;
  float* sdCf = sdBf + p.cpb * N;
  const int tid = threadIdx.x, c = tid / p.tpc, slice = tid % p.tpc, n0 = slice * KS;
  const int b = blockIdx.y, d = blockIdx.x * p.cpb + c, g = d / p.dg;
  const int64_t L = p.L;
  const int64_t bd = (int64_t)b * p.dim + d;
  const int64_t row = bd * L;
  const int64_t bc = ((int64_t)b * p.groups + g) * N * L;
  const in_t* __restrict__ u = static_cast<const in_t*>(q.u) + row;
  const in_t* __restrict__ delta = static_cast<const in_t*>(q.delta) + row;
  const in_t* __restrict__ z = p.z ? static_cast<const in_t*>(p.z) + row : nullptr;
  const in_t* __restrict__ dout = static_cast<const in_t*>(p.dout) + row;
  const in_t* __restrict__ Bv = static_cast<const in_t*>(q.B) + bc;
  const in_t* __restrict__ Cv = static_cast<const in_t*>(q.C) + bc;
  float* ckpt = q.ckpt + bd * p.nchunks * N;
  const unsigned mask = blockDim.x >= 32 ? 0xffffffffu : ((1u << blockDim.x) - 1u);
  const int part = (d % p.dg) / p.cpb;

  for (int idx = tid; idx < p.cpb * N; idx += blockDim.x) {
    const int64_t off = (int64_t)(blockIdx.x * p.cpb) * N + idx;
    if (!p.varB) sBf[idx] = static_cast<const float*>(q.B)[off];
    if (!p.varC) sCf[idx] = static_cast<const float*>(q.C)[off];
    sdBf[idx] = 0.f;
    sdCf[idx] = 0.f;
  }
  __syncthreads();
  float Al2[KS], h[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = n0 + k;
    Al2[k] = state_ok<KS>(n, N) ? q.A[(int64_t)d * N + n] * kLog2e : 0.f;
    h[k] = 0.f;
  }
  const float Dv = q.D ? q.D[d] : 0.f;
  const float bias = q.bias ? q.bias[d] : 0.f;

  // pass 1: the state entering each chunk; a chunk's loads are all issued before its arithmetic
  for (int64_t ch = 0; ch < p.nchunks; ++ch) {
#pragma unroll
    for (int k = 0; k < KS; ++k)
      if (state_ok<KS>(n0 + k, N)) ckpt[ch * N + n0 + k] = h[k];
    const int64_t t0 = ch * TB;
    const int nT = (int)min((int64_t)TB, L - t0);
    float dtv[TB], dtu[TB], bv[TB][KS];
#pragma unroll
    for (int i = 0; i < TB; ++i) {
      if (i < nT) {
        const int64_t t = q.reverse ? L - 1 - (t0 + i) : t0 + i;
        float dt = to_f(delta[t]) + bias;
        dtv[i] = p.softplus ? softplus_f(dt) : dt;
        dtu[i] = dtv[i] * to_f(u[t]);
#pragma unroll
        for (int k = 0; k < KS; ++k) {
          const int n = n0 + k;
          bv[i][k] = !state_ok<KS>(n, N) ? 0.f : (p.varB ? to_f(Bv[(int64_t)n * L + t]) : sBf[c * N + n]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TB; ++i) {
      if (i < nT) {
#pragma unroll
        for (int k = 0; k < KS; ++k) h[k] = exp2_fast(dtv[i] * Al2[k]) * h[k] + dtu[i] * bv[i][k];
      }
    }
  }

  // pass 2: chunks in reverse
  float gc[KS], dA[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = n0 + k;
    gc[k] = (q.dlast && state_ok<KS>(n, N)) ? q.dlast[bd * N + n] : 0.f;
    dA[k] = 0.f;
  }
  float dD = 0.f, dbias = 0.f;
  for (int64_t ch = p.nchunks - 1; ch >= 0; --ch) {
    const int64_t t0 = ch * TB;
    const int nT = (int)min((int64_t)TB, L - t0);
    __syncthreads();
    if (p.varB || p.varC) {
      for (int idx = tid; idx < N * nT; idx += blockDim.x) {
        const int n = idx / nT, i = idx - n * nT;
        const int64_t tp = q.reverse ? L - 1 - (t0 + i) : t0 + i;
        if (p.varB) sB[i * NP + n] = to_f(Bv[(int64_t)n * L + tp]);
        if (p.varC) sC[i * NP + n] = to_f(Cv[(int64_t)n * L + tp]);
      }
    }
    __syncthreads();
    const float* Bt = p.varB ? sB : sBf + c * N;
    const float* Ct = p.varC ? sC : sCf + c * N;
    const int bstride = p.varB ? NP : 0, cstride = p.varC ? NP : 0;
    float h0[KS], hs[TB][KS], dts[TB], us[TB], raws[TB];
#pragma unroll
    for (int k = 0; k < KS; ++k) h0[k] = state_ok<KS>(n0 + k, N) ? ckpt[ch * N + n0 + k] : 0.f;
#pragma unroll
    for (int i = 0; i < TB; ++i) {
      if (i < nT) {
        const int64_t t = q.reverse ? L - 1 - (t0 + i) : t0 + i;
        raws[i] = to_f(delta[t]) + bias;
        dts[i] = p.softplus ? softplus_f(raws[i]) : raws[i];
        us[i] = to_f(u[t]);
        const float dtu = dts[i] * us[i];
#pragma unroll
        for (int k = 0; k < KS; ++k) {
          const int n = n0 + k;
          const float prev = i ? hs[i - 1][k] : h0[k];
          hs[i][k] = state_ok<KS>(n, N) ? exp2_fast(dts[i] * Al2[k]) * prev + dtu * Bt[i * bstride + n] : 0.f;
        }
      }
    }
#pragma unroll
    for (int i = TB - 1; i >= 0; --i) {
      if (i < nT) {
        const int64_t t = q.reverse ? L - 1 - (t0 + i) : t0 + i;
        const float go = to_f(dout[t]) * p.scale;
        float dy = go;
        if (z) {
          float y = 0.f;
#pragma unroll
          for (int k = 0; k < KS; ++k)
            if (state_ok<KS>(n0 + k, N)) y += hs[i][k] * Ct[i * cstride + n0 + k];
          for (int off = 1; off < p.tpc; off <<= 1) y += __shfl_xor_sync(mask, y, off);
          y += Dv * us[i];
          const float zz = to_f(z[t]), sz = sigmoid_f(zz);
          if (slice == 0) q.dz[row + t] = go * y * sz * (1.f + zz * (1.f - sz));
          dy = go * zz * sz;
        }
        float ddt = 0.f, duu = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) {
          const int n = n0 + k;
          if (state_ok<KS>(n, N)) {
            const float bk = Bt[i * bstride + n], ck = Ct[i * cstride + n];
            const float gk = gc[k] + ck * dy;
            const float a = exp2_fast(dts[i] * Al2[k]);
            const float prev = i ? hs[i - 1][k] : h0[k];
            const float dgate = gk * prev * a;  // d loss / d (dt * A)
            const float dBv = gk * dts[i] * us[i], dCv = dy * hs[i][k];
            if (p.varB) sdB[(n * TB + i) * CP + c] = dBv; else sdBf[c * N + n] += dBv;
            if (p.varC) sdC[(n * TB + i) * CP + c] = dCv; else sdCf[c * N + n] += dCv;
            dA[k] += dgate * dts[i];
            ddt += dgate * Al2[k] * kLn2 + gk * bk * us[i];
            duu += gk * dts[i] * bk;
            gc[k] = a * gk;
          }
        }
        for (int off = 1; off < p.tpc; off <<= 1) {
          ddt += __shfl_xor_sync(mask, ddt, off);
          duu += __shfl_xor_sync(mask, duu, off);
        }
        if (slice == 0) {
          duu += dy * Dv;
          dD += dy * us[i];
          if (p.softplus) ddt *= sigmoid_f(raws[i]);
          dbias += ddt;
          static_cast<in_t*>(q.du)[row + t] = from_f<in_t>(duu);
          static_cast<in_t*>(q.ddelta)[row + t] = from_f<in_t>(ddt);
        }
      }
    }
    if (p.varB || p.varC) {
      __syncthreads();
      // sum the tile's dB/dC over the block's channels (fixed order) into this block's partial
      const int64_t pbase = (((int64_t)part * p.batch + b) * p.groups + g) * N * L;
      for (int idx = tid; idx < N * nT; idx += blockDim.x) {
        const int n = idx / nT, i = idx - n * nT;
        const int64_t tp = q.reverse ? L - 1 - (t0 + i) : t0 + i;
        const float* rb = sdB + (n * TB + i) * CP;
        const float* rc = sdC + (n * TB + i) * CP;
        float sb = 0.f, sc = 0.f;
        for (int cc = 0; cc < p.cpb; ++cc) {
          sb += rb[cc];
          sc += rc[cc];
        }
        if (p.varB) q.dB_part[pbase + (int64_t)n * L + tp] = sb;
        if (p.varC) q.dC_part[pbase + (int64_t)n * L + tp] = sc;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const int n = n0 + k;
    if (state_ok<KS>(n, N)) {
      q.dA_part[bd * N + n] = dA[k];
      if (!p.varB) q.dB_part[bd * N + n] = sdBf[c * N + n];
      if (!p.varC) q.dC_part[bd * N + n] = sdCf[c * N + n];
    }
  }
  if (slice == 0) {
    if (q.dD_part) q.dD_part[bd] = dD;
    if (q.dbias_part) q.dbias_part[bd] = dbias;
  }
}

// ---- host side ----

// N = 16 runs as two threads of 8 states: twice the threads of one-per-channel hides more latency
int states_per_thread(int N) { return N == 1 ? 1 : 8; }
int bwd_tile(int ks) { return ks == 1 ? 16 : 4; }
int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

struct Prepared {
  at::Tensor u, delta, A, B, C, D, bias;
  int groups;
  checks::ScanDims dims;
};

// The shared argument check (scan_checks.h) plus what these kernels add: CUDA tensors, fp32/fp16/bf16
// u, d_state up to 256 and the grid's batch limit.
checks::ScanDims check_cuda_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias) {
  auto d = checks::check_scan_inputs(op, u, delta, A, B, C, D, z, bias);
  TORCH_CHECK(u.is_cuda(), op, ": the CUDA kernel got u on ", u.device());
  const auto dt = u.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": u has dtype ", dt, "; the CUDA kernels accept float32, float16 or bfloat16");
  TORCH_CHECK(d.N <= 256, op, ": d_state must be in 1..256 on CUDA, got ", d.N);
  TORCH_CHECK(d.batch <= 65535, op, ": batch must be <= 65535 on CUDA, got ", d.batch);
  return d;
}

// a variable B/C as (batch, groups, N, L) in u's dtype (a 3-D one is one group), a fixed one in fp32
at::Tensor state_operand(const at::Tensor& M, const at::Tensor& u) {
  if (M.dim() == 2) return M.to(at::kFloat).contiguous();
  return (M.dim() == 3 ? M.unsqueeze(1) : M).to(u.scalar_type()).contiguous();
}

Prepared prepare(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias) {
  Prepared p;
  p.dims = check_cuda_inputs(op, u, delta, A, B, C, D, z, bias);
  p.u = u.contiguous();
  p.delta = delta.to(u.scalar_type()).contiguous();
  p.A = A.to(at::kFloat).contiguous();
  p.B = state_operand(B, u);
  p.C = state_operand(C, u);
  p.D = D ? D->to(at::kFloat).contiguous() : at::Tensor();
  p.bias = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  p.groups = (int)p.dims.groups;
  return p;
}

Dir make_dir(const Prepared& pr, bool reverse) {
  Dir q{};
  q.u = pr.u.data_ptr();
  q.delta = pr.delta.data_ptr();
  q.A = pr.A.data_ptr<float>();
  q.B = pr.B.data_ptr();
  q.C = pr.C.data_ptr();
  q.D = pr.D.defined() ? pr.D.data_ptr<float>() : nullptr;
  q.bias = pr.bias.defined() ? pr.bias.data_ptr<float>() : nullptr;
  q.reverse = reverse;
  return q;
}

Params make_params(const Prepared& pr, bool softplus) {
  Params p{};
  p.batch = (int)pr.u.size(0);
  p.dim = (int)pr.u.size(1);
  p.L = pr.u.size(2);
  p.N = (int)pr.A.size(1);
  p.groups = pr.groups;
  p.dg = p.dim / p.groups;
  p.varB = pr.B.dim() == 4;
  p.varC = pr.C.dim() == 4;
  p.softplus = softplus;
  p.scale = 1.f;
  const int ks = states_per_thread(p.N);
  p.tpc = next_pow2((p.N + ks - 1) / ks);
  // channels per block: a power of two dividing the group size, so a block never straddles groups
  int cpb = kThreads / p.tpc;
  while (cpb > 1 && p.dg % cpb != 0) cpb >>= 1;
  p.cpb = cpb;
  p.parts = p.dg / cpb;
  return p;
}

template <typename Kernel>
void launch(Kernel kernel, const Params& p, int ndir, size_t smem) {
  if (smem > 48 * 1024) {  // above the default limit a kernel must opt in to more shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  dim3 grid(p.dim / p.cpb, p.batch, ndir), block(p.cpb * p.tpc);
  kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t>
void launch_fwd(Params& p, int ndir) {
  p.T = std::max(1, std::min(32, 2048 / (p.N + 1)));
  const size_t smem =
      (size_t)(2 * p.T * (p.N + 1) + 2 * p.cpb * p.N + (3 + p.tpc) * p.cpb * (p.T + 1) + 2 * p.cpb) *
      sizeof(float);
  switch (states_per_thread(p.N)) {
    case 1: launch(scan_fwd_kernel<in_t, 1>, p, ndir, smem); break;
    default: launch(scan_fwd_kernel<in_t, 8>, p, ndir, smem); break;
  }
}

template <typename in_t>
void launch_bwd(Params& p, int ndir) {
  const int tb = bwd_tile(states_per_thread(p.N));
  const size_t smem =
      (size_t)(2 * tb * (p.N + 1) + 2 * p.N * tb * (p.cpb + 1) + 4 * p.cpb * p.N) * sizeof(float);
  switch (states_per_thread(p.N)) {
    case 1: launch(scan_bwd_kernel<in_t, 1, 16>, p, ndir, smem); break;
    default: launch(scan_bwd_kernel<in_t, 8, 4>, p, ndir, smem); break;
  }
}

#ifdef ZOO_SCAN_CI_FLOAT_ONLY  // compile check in CI: one dtype keeps nvcc's time down
#define ZOO_CUDA_DISPATCH(DTYPE, FN, ...)                                       \
  switch (DTYPE) {                                                             \
    case at::kFloat: FN<float>(__VA_ARGS__); break;                            \
    default: TORCH_CHECK(false, "zoo_scan (CUDA): unsupported dtype ", DTYPE); \
  }
#else
#define ZOO_CUDA_DISPATCH(DTYPE, FN, ...)                                       \
  switch (DTYPE) {                                                             \
    case at::kFloat: FN<float>(__VA_ARGS__); break;                            \
    case at::kHalf: FN<__half>(__VA_ARGS__); break;                            \
    case at::kBFloat16: FN<__nv_bfloat16>(__VA_ARGS__); break;                 \
    default: TORCH_CHECK(false, "zoo_scan (CUDA): unsupported dtype ", DTYPE); \
  }
#endif

// ZOO_CUDA_SCAN=lparallel: the L-parallel kernels (scan_cuda_lpar.cu) on the same prepared inputs
lpar::Inputs lpar_inputs(const Prepared& pr, const at::Tensor& z, bool softplus, bool reverse) {
  return {pr.u, pr.delta, pr.A, pr.B, pr.C, pr.D, z, pr.bias, pr.groups, softplus, reverse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lpar_backward(const Prepared& pr, const at::Tensor& z, const at::Tensor& dout, const at::Tensor& dlast, bool softplus,
              bool reverse, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
              const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& bias) {
  auto g = lpar::backward(lpar_inputs(pr, z, softplus, reverse), dout, dlast);
  auto empty = at::empty({0}, pr.u.options().dtype(at::kFloat));
  return {g[0], g[1], g[2].to(A.scalar_type()), g[3].to(B.scalar_type()), g[4].to(C.scalar_type()),
          D ? g[5].to(D->scalar_type()) : empty, z.defined() ? g[6] : empty,
          bias ? g[7].to(bias->scalar_type()) : empty};
}

std::tuple<at::Tensor, at::Tensor> scan_fwd_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                 const at::Tensor& B, const at::Tensor& C,
                                                 const std::optional<at::Tensor>& D,
                                                 const std::optional<at::Tensor>& z,
                                                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                                 bool reverse) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared pr = prepare("zoo_scan.scan_fwd", u, delta, A, B, C, D, z, delta_bias);
  at::Tensor zc;
  if (z) zc = z->to(u.scalar_type()).contiguous();
  if (lpar::enabled()) return lpar::forward(lpar_inputs(pr, zc, delta_softplus, reverse));
  auto out = at::empty_like(pr.u);
  auto last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options().dtype(at::kFloat));
  Params p = make_params(pr, delta_softplus);
  p.z = z ? zc.data_ptr() : nullptr;
  p.dir[0] = make_dir(pr, reverse);
  p.dir[0].out = out.data_ptr();
  p.dir[0].last = last.data_ptr<float>();
  ZOO_CUDA_DISPATCH(u.scalar_type(), launch_fwd, p, 1);
  return {out, last};
}

struct BwdBuffers {
  at::Tensor du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part, ckpt;
};

BwdBuffers alloc_bwd(const Prepared& pr, Params& p, Dir& q, bool has_z, int64_t nchunks) {
  BwdBuffers bb;
  auto f = pr.u.options().dtype(at::kFloat);
  const int64_t batch = p.batch, dim = p.dim, N = p.N, L = p.L;
  bb.du = at::empty_like(pr.u);
  bb.ddelta = at::empty_like(pr.u);
  bb.dz = has_z ? at::empty({batch, dim, L}, f) : at::Tensor();
  bb.dA_part = at::empty({batch, dim, N}, f);
  bb.dB_part = p.varB ? at::empty({p.parts, batch, p.groups, N, L}, f) : at::empty({batch, dim, N}, f);
  bb.dC_part = p.varC ? at::empty({p.parts, batch, p.groups, N, L}, f) : at::empty({batch, dim, N}, f);
  bb.dD_part = pr.D.defined() ? at::empty({batch, dim}, f) : at::Tensor();
  bb.dbias_part = pr.bias.defined() ? at::empty({batch, dim}, f) : at::Tensor();
  bb.ckpt = at::empty({batch, dim, nchunks, N}, f);
  q.du = bb.du.data_ptr();
  q.ddelta = bb.ddelta.data_ptr();
  q.dz = has_z ? bb.dz.data_ptr<float>() : nullptr;
  q.dA_part = bb.dA_part.data_ptr<float>();
  q.dB_part = bb.dB_part.data_ptr<float>();
  q.dC_part = bb.dC_part.data_ptr<float>();
  q.dD_part = pr.D.defined() ? bb.dD_part.data_ptr<float>() : nullptr;
  q.dbias_part = pr.bias.defined() ? bb.dbias_part.data_ptr<float>() : nullptr;
  q.ckpt = bb.ckpt.data_ptr<float>();
  return bb;
}

// (du, ddelta, dA, dB, dC, dD, dbias) in the callers' dtypes; dz is handled by the caller
std::vector<at::Tensor> finish_bwd(const BwdBuffers& bb, const at::Tensor& A, const at::Tensor& B,
                                   const at::Tensor& C, const std::optional<at::Tensor>& D,
                                   const std::optional<at::Tensor>& bias) {
  auto empty = at::empty({0}, bb.du.options().dtype(at::kFloat));
  return {bb.du,
          bb.ddelta,
          bb.dA_part.sum(0).to(A.scalar_type()),
          bb.dB_part.sum(0).reshape(B.sizes()).to(B.scalar_type()),  // a 3-D B/C gets a 3-D gradient
          bb.dC_part.sum(0).reshape(C.sizes()).to(C.scalar_type()),
          D ? bb.dD_part.sum(0).to(D->scalar_type()) : empty,
          bias ? bb.dbias_part.sum(0).to(bias->scalar_type()) : empty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scan_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlast, const at::Tensor& u,
              const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
              const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
              const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool reverse) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared pr = prepare("zoo_scan.scan_bwd", u, delta, A, B, C, D, z, delta_bias);
  checks::check_grad_inputs("zoo_scan.scan_bwd", dout, dlast, pr.dims, pr.dims.L, u.device());
  auto dout_c = dout.to(u.scalar_type()).contiguous();
  at::Tensor zc, dlast_c;
  if (z) zc = z->to(u.scalar_type()).contiguous();
  if (dlast) dlast_c = dlast->to(at::kFloat).contiguous();
  if (lpar::enabled()) return lpar_backward(pr, zc, dout_c, dlast_c, delta_softplus, reverse, A, B, C, D, delta_bias);
  Params p = make_params(pr, delta_softplus);
  const int tb = bwd_tile(states_per_thread(p.N));
  p.nchunks = (p.L + tb - 1) / tb;
  p.z = z ? zc.data_ptr() : nullptr;
  p.dout = dout_c.data_ptr();
  p.dir[0] = make_dir(pr, reverse);
  p.dir[0].dlast = dlast ? dlast_c.data_ptr<float>() : nullptr;
  BwdBuffers bb = alloc_bwd(pr, p, p.dir[0], z.has_value(), p.nchunks);
  ZOO_CUDA_DISPATCH(u.scalar_type(), launch_bwd, p, 1);
  auto g = finish_bwd(bb, A, B, C, D, delta_bias);
  at::Tensor dz = z ? bb.dz.to(u.scalar_type()) : at::empty({0}, u.options().dtype(at::kFloat));
  return {g[0], g[1], g[2], g[3], g[4], g[5], dz, g[6]};
}

void check_pair(const Prepared& a, const Prepared& b) {
  TORCH_CHECK(a.u.sizes() == b.u.sizes() && a.A.sizes() == b.A.sizes() && a.B.sizes() == b.B.sizes() &&
                  a.C.sizes() == b.C.sizes() && a.D.defined() == b.D.defined() &&
                  a.bias.defined() == b.bias.defined() && a.u.scalar_type() == b.u.scalar_type(),
              "zoo_scan.bidir: both directions must have the same shapes, dtypes and optional inputs");
}

at::Tensor bidir_fwd_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& delta_bias, const at::Tensor& u_r,
                          const at::Tensor& delta_r, const at::Tensor& A_r, const at::Tensor& B_r,
                          const at::Tensor& C_r, const std::optional<at::Tensor>& D_r,
                          const std::optional<at::Tensor>& delta_bias_r, const std::optional<at::Tensor>& z,
                          bool delta_softplus, double scale) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared pf = prepare("zoo_scan.bidir_fwd", u, delta, A, B, C, D, z, delta_bias);
  Prepared pb = prepare("zoo_scan.bidir_fwd (reverse direction)", u_r, delta_r, A_r, B_r, C_r, D_r, z, delta_bias_r);
  check_pair(pf, pb);
  at::Tensor zc;
  if (z) zc = z->to(u.scalar_type()).contiguous();
  if (lpar::enabled()) {
    return lpar::bidir_forward(lpar_inputs(pf, zc, delta_softplus, false), lpar_inputs(pb, zc, delta_softplus, true),
                               scale);
  }
  auto acc = at::zeros(u.sizes(), u.options().dtype(at::kFloat));
  auto last = at::empty({2, u.size(0), u.size(1), A.size(1)}, acc.options());
  Params p = make_params(pf, delta_softplus);
  p.z = z ? zc.data_ptr() : nullptr;
  p.scale = (float)scale;
  p.accumulate = true;
  p.out_acc = acc.data_ptr<float>();
  p.dir[0] = make_dir(pf, false);
  p.dir[1] = make_dir(pb, true);
  p.dir[0].last = last[0].data_ptr<float>();
  p.dir[1].last = last[1].data_ptr<float>();
  ZOO_CUDA_DISPATCH(u.scalar_type(), launch_fwd, p, 2);
  return u.scalar_type() == at::kFloat ? acc : acc.to(u.scalar_type());
}

// gradients of (A, B, C, D, bias) are returned in these tensors' dtypes (D/bias may be absent)
using ParamRefs = std::array<const at::Tensor*, 5>;

std::vector<at::Tensor> lpar_bidir_backward(const Prepared& pf, const Prepared& pb, const at::Tensor& z,
                                            const at::Tensor& dout, bool softplus, double scale, ParamRefs pf_refs,
                                            ParamRefs pb_refs) {
  auto g = lpar::bidir_backward(lpar_inputs(pf, z, softplus, false), lpar_inputs(pb, z, softplus, true), dout, scale);
  auto empty = at::empty({0}, pf.u.options().dtype(at::kFloat));
  for (int dir = 0; dir < 2; ++dir) {
    const ParamRefs& refs = dir == 0 ? pf_refs : pb_refs;
    for (int k = 0; k < 5; ++k) {  // g[dir * 7 + 2 ..]: dA, dB, dC, dD, dbias
      at::Tensor& t = g[dir * 7 + 2 + k];
      t = refs[k] ? t.to(refs[k]->scalar_type()) : empty;
    }
  }
  if (!g[14].defined()) g[14] = empty;
  return g;
}

std::vector<at::Tensor> bidir_bwd_cuda(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D,
                                       const std::optional<at::Tensor>& delta_bias, const at::Tensor& u_r,
                                       const at::Tensor& delta_r, const at::Tensor& A_r, const at::Tensor& B_r,
                                       const at::Tensor& C_r, const std::optional<at::Tensor>& D_r,
                                       const std::optional<at::Tensor>& delta_bias_r,
                                       const std::optional<at::Tensor>& z, bool delta_softplus, double scale) {
  c10::cuda::CUDAGuard guard(u.device());
  Prepared pf = prepare("zoo_scan.bidir_bwd", u, delta, A, B, C, D, z, delta_bias);
  Prepared pb = prepare("zoo_scan.bidir_bwd (reverse direction)", u_r, delta_r, A_r, B_r, C_r, D_r, z, delta_bias_r);
  check_pair(pf, pb);
  checks::check_grad_inputs("zoo_scan.bidir_bwd", dout, std::nullopt, pf.dims, pf.dims.L, u.device());
  auto dout_c = dout.to(u.scalar_type()).contiguous();
  at::Tensor zc;
  if (z) zc = z->to(u.scalar_type()).contiguous();
  if (lpar::enabled()) {
    return lpar_bidir_backward(pf, pb, zc, dout_c, delta_softplus, scale,
                               {&A, &B, &C, D ? &*D : nullptr, delta_bias ? &*delta_bias : nullptr},
                               {&A_r, &B_r, &C_r, D_r ? &*D_r : nullptr, delta_bias_r ? &*delta_bias_r : nullptr});
  }
  Params p = make_params(pf, delta_softplus);
  const int tb = bwd_tile(states_per_thread(p.N));
  p.nchunks = (p.L + tb - 1) / tb;
  p.z = z ? zc.data_ptr() : nullptr;
  p.dout = dout_c.data_ptr();
  p.scale = (float)scale;
  p.dir[0] = make_dir(pf, false);
  p.dir[1] = make_dir(pb, true);
  BwdBuffers bf = alloc_bwd(pf, p, p.dir[0], z.has_value(), p.nchunks);
  BwdBuffers bb = alloc_bwd(pb, p, p.dir[1], z.has_value(), p.nchunks);
  ZOO_CUDA_DISPATCH(u.scalar_type(), launch_bwd, p, 2);
  auto gf = finish_bwd(bf, A, B, C, D, delta_bias);
  auto gb = finish_bwd(bb, A_r, B_r, C_r, D_r, delta_bias_r);
  std::vector<at::Tensor> out(gf.begin(), gf.end());
  out.insert(out.end(), gb.begin(), gb.end());
  out.push_back(z ? (bf.dz + bb.dz).to(u.scalar_type()) : at::empty({0}, u.options().dtype(at::kFloat)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CUDA, m) {
  m.impl("scan_fwd", &scan_fwd_cuda);
  m.impl("scan_bwd", &scan_bwd_cuda);
  m.impl("bidir_fwd", &bidir_fwd_cuda);
  m.impl("bidir_bwd", &bidir_bwd_cuda);
}

}  // namespace zoo_scan
