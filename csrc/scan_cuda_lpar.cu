// L-parallel selective scan on CUDA (opt-in: ZOO_CUDA_SCAN=lparallel), on the chunk algebra of
// scan_chunk.h.
//
// Decomposition: a row (batch, channel) is walked in chunks of tpr * kRun steps (tpr = 8, 16, 32,
// 64 or 128 lanes, the fewest that cover L; below 32, several rows share a warp, which is the
// short-sequence path of MSVMamba's later stages). Each lane loads its run of kRun consecutive steps into
// registers (16-byte vector loads when rows are aligned), folds each state's run into a Pair, and a
// warp scan (shuffles) plus a cross-warp fold (shared memory) gives every lane the state entering
// its run; the state is carried across chunks. When the grid has too few blocks to fill the GPU
// (long L, small batch x dim), L is also split into segments run by different blocks: a first
// launch folds every segment into one Pair per state (kSummary), the main launch starts each
// segment from the fold of the segments before it.
//
// Backward: the state entering every chunk is written by a kCkpt launch (same two-pass scheme), the
// adjoint's segment Pairs by a kAdjSummary launch (the adjoint does not depend on the state), then
// each block walks its segment's chunks backwards: per state, it replays the chunk's states from the
// checkpoint and runs the adjoint as a reverse lane scan. A block owns a tile of channels of one
// group, visited one after another per state, so the gradients of group-shared B/C are summed in
// registers, then over the block's row groups in a fixed order, and written as per-tile partials that
// the host sums: no atomics, the backward is deterministic.
//
// Compile-time flags: input dtype, d_state class (1, 16 or any up to 256), variable B, variable C,
// z gate, reverse, and the launch mode. softplus stays a run-time flag: it is applied once per
// element while loading delta, outside the recurrence, and doubling the instantiations for it would
// double the build time for no measurable change in the inner loop.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda_math.cuh"
#include "scan_chunk.h"
#include "scan_lpar.h"

namespace zoo_scan {
namespace lpar {
namespace {

using chunk::Pair;
using PairF = Pair<float>;

constexpr int kThreads = 128;  // threads per block, every launch
constexpr int kRun = 8;        // steps per lane: one 16-byte load of fp16/bf16, two of fp32
constexpr int kWarps = kThreads / 32;
using namespace cuda_math;  // NOLINT
constexpr unsigned kFull = 0xffffffffu;

enum Mode { kOut = 0, kSummary = 1, kCkpt = 2, kAdjSummary = 3 };

struct LParams {
  int batch, dim, N, groups, dg;
  int64_t L;
  int tpr;             // lanes per row
  int64_t chunk;       // tpr * kRun
  int64_t nchunks;
  int64_t seg_chunks;  // chunks per segment
  int nseg;
  int tile, parts;     // backward: channels per block (one group), tiles per group
  bool softplus, vec;  // vec: every row start is 16-byte aligned and L % kRun == 0
  const void* u;
  const void* delta;
  const void* z;
  const void* B;  // variable: (batch, G, N, L) in u's dtype; fixed: (dim, N) fp32
  const void* C;
  const void* dout;
  const float* A;
  const float* D;
  const float* bias;
  const float* dlast;
  void* out;
  float* last;        // (rows, N)
  float* ckpt;        // (rows, nchunks, N): the state entering each chunk
  PairF* seg_pairs;   // (rows, nseg, N): forward or adjoint Pair of each segment
  void* du;
  void* ddelta;
  void* dz;
  float* dA_part;     // (rows, nseg, N)
  float* dB_part;     // variable: (parts, batch, G, N, L); fixed: (rows, nseg, N)
  float* dC_part;
  float* dD_part;     // (rows, nseg)
  float* dbias_part;  // (rows, nseg)
};

// ---- lane runs: walk-order steps t0 .. t0 + kRun - 1 of a row; reverse walks memory backwards ----

template <typename T, bool kRev>
__device__ __forceinline__ void load_run(const T* __restrict__ row, int64_t L, int64_t t0, bool vec,
                                         float (&v)[kRun]) {
  if (vec && t0 + kRun <= L) {
    const int64_t m0 = kRev ? L - t0 - kRun : t0;  // a multiple of kRun: aligned
    alignas(16) T tmp[kRun];
    constexpr int kVecs = kRun * (int)sizeof(T) / 16;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) reinterpret_cast<uint4*>(tmp)[k] = reinterpret_cast<const uint4*>(row + m0)[k];
#pragma unroll
    for (int i = 0; i < kRun; ++i) v[i] = to_f(tmp[kRev ? kRun - 1 - i : i]);
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) {
      const int64_t t = t0 + i;
      v[i] = t < L ? to_f(row[kRev ? L - 1 - t : t]) : 0.f;
    }
  }
}

template <typename T, bool kRev>
__device__ __forceinline__ void store_run(T* __restrict__ row, int64_t L, int64_t t0, bool vec, const float (&v)[kRun]) {
  if (vec && t0 + kRun <= L) {
    const int64_t m0 = kRev ? L - t0 - kRun : t0;
    alignas(16) T tmp[kRun];
#pragma unroll
    for (int i = 0; i < kRun; ++i) tmp[kRev ? kRun - 1 - i : i] = from_f<T>(v[i]);
    constexpr int kVecs = kRun * (int)sizeof(T) / 16;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) reinterpret_cast<uint4*>(row + m0)[k] = reinterpret_cast<const uint4*>(tmp)[k];
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) {
      const int64_t t = t0 + i;
      if (t < L) row[kRev ? L - 1 - t : t] = from_f<T>(v[i]);
    }
  }
}

// dt of a run: delta + bias, softplus, and 0 past L (so that those steps are the identity)
template <typename T, bool kRev>
__device__ __forceinline__ void load_dt(const LParams& p, const T* row, float bias, int64_t t0, float (&dt)[kRun],
                                        float (&raw)[kRun]) {
  load_run<T, kRev>(row, p.L, t0, p.vec, raw);
#pragma unroll
  for (int i = 0; i < kRun; ++i) {
    raw[i] += bias;
    const float v = p.softplus ? softplus_f(raw[i]) : raw[i];
    dt[i] = t0 + i < p.L ? v : 0.f;
  }
}

// ---- the lane scan of one row (tpr lanes, a multiple of 32) ----

// shuffles within segments of `width` lanes (a row's lanes when tpr < 32, else the warp)
__device__ __forceinline__ PairF shfl_walk(PairF v, int offset, bool rev, int width) {
  return rev ? PairF{__shfl_down_sync(kFull, v.a, offset, width), __shfl_down_sync(kFull, v.b, offset, width)}
             : PairF{__shfl_up_sync(kFull, v.a, offset, width), __shfl_up_sync(kFull, v.b, offset, width)};
}

__device__ __forceinline__ int warps_per_row(int tpr) { return tpr < 32 ? 1 : tpr / 32; }

struct RowScan {
  PairF excl, total;  // the fold of the lanes before this one (walk order), and of all lanes
};

// `rev` walks the lanes from the last one (the adjoint). `slots`: this row's kWarps-slot buffer,
// alternated by the caller between calls. Every thread of the block must call it (barrier when
// tpr > 32).
__device__ __forceinline__ RowScan row_scan(PairF p, int lane, int tpr, bool rev, PairF* slots) {
  const int width = tpr < 32 ? tpr : 32;
  const int wl = rev ? width - 1 - (lane & (width - 1)) : (lane & (width - 1));
  PairF inc = p;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    if (off < width) inc = chunk::scan_step(shfl_walk(inc, off, rev, width), inc, wl >= off);
  }
  const PairF before = shfl_walk(inc, 1, rev, width);
  const PairF ex_w = wl == 0 ? chunk::identity<float>() : before;
  RowScan rs;
  const int nw = warps_per_row(tpr);
  if (nw == 1) {
    rs.excl = ex_w;
    const int src = rev ? 0 : width - 1;  // the segment's last lane in walk order
    const PairF last = {__shfl_sync(kFull, inc.a, src, width), __shfl_sync(kFull, inc.b, src, width)};
    rs.total = last;
  } else {
    const int w = lane / 32, ww = rev ? nw - 1 - w : w;
    if (wl == 31) slots[ww] = inc;
    __syncthreads();
    rs.excl = chunk::combine(chunk::fold(slots, ww, chunk::identity<float>()), ex_w);
    rs.total = chunk::fold(slots, nw, chunk::identity<float>());
  }
  return rs;
}

// sum over the `width` lanes of a segment (the row's lanes within one warp)
__device__ __forceinline__ float segment_sum(float v, int width) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) v += __shfl_xor_sync(kFull, v, off, width);
  }
  return v;
}

template <typename in_t>
__device__ __forceinline__ const in_t* bc_row(const void* M, const LParams& p, int b, int g, int n) {
  return static_cast<const in_t*>(M) + (((int64_t)b * p.groups + g) * p.N + n) * p.L;
}

// ---- per-row launches: the forward (kOut), its segment Pairs (kSummary), the backward's
// checkpoints (kCkpt) and the adjoint's segment Pairs (kAdjSummary). kThreads / tpr rows per block,
// grid (row blocks, segments). ----

template <typename in_t, int kN, bool kVarB, bool kVarC, bool kZ, bool kRev, int kMode>
__global__ void __launch_bounds__(kThreads) lpar_rows_kernel(const __grid_constant__ LParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PairF* slots = reinterpret_cast<PairF*>(smem_raw);  // [2][kWarps], used when tpr > 32
  PairF* carry = slots + 2 * kWarps;                    // [2][rpb][N]
  const int tpr = p.tpr, rpb = kThreads / tpr, nw = warps_per_row(tpr);
  const int lane = threadIdx.x % tpr, rib = threadIdx.x / tpr;
  const int N = kN > 0 ? kN : p.N;
  const int64_t rows = (int64_t)p.batch * p.dim, L = p.L;
  const int64_t row_raw = (int64_t)blockIdx.x * rpb + rib;
  const bool row_ok = row_raw < rows;
  const int64_t row = row_ok ? row_raw : rows - 1;  // idle rows compute a copy and store nothing
  const int b = (int)(row / p.dim), d = (int)(row % p.dim), g = d / p.dg;
  const int seg = blockIdx.y;
  const int64_t c0 = (int64_t)seg * p.seg_chunks, c1 = min(p.nchunks, c0 + p.seg_chunks);
  const in_t* u_row = static_cast<const in_t*>(p.u) + row * L;
  const in_t* delta_row = static_cast<const in_t*>(p.delta) + row * L;
  const float bias = p.bias ? p.bias[d] : 0.f;
  PairF* my_slots = slots + (tpr > 32 ? rib * nw : 0);
  constexpr bool kSum = kMode == kSummary || kMode == kAdjSummary;

  for (int n = lane; n < N; n += tpr) {
    PairF init = chunk::identity<float>();
    if (!kSum) {  // the state the segments before this one leave (two-pass); 0 for the first
      float h = 0.f;
      for (int s = 0; s < seg; ++s) h = chunk::apply(p.seg_pairs[(row * p.nseg + s) * N + n], h);
      init.b = h;
    }
    carry[rib * N + n] = init;
  }
  __syncthreads();
  int par = 0, sp = 0;
  for (int64_t k = 0; k < c1 - c0; ++k) {
    const int64_t c = kMode == kAdjSummary ? c1 - 1 - k : c0 + k;
    const int64_t t0 = c * p.chunk + (int64_t)lane * kRun;
    float dt[kRun], raw[kRun], uu[kRun], dy[kRun], y[kRun];
    load_dt<in_t, kRev>(p, delta_row, bias, t0, dt, raw);
    if (kMode != kAdjSummary) load_run<in_t, kRev>(u_row, L, t0, p.vec, uu);
    if (kMode == kAdjSummary) {
      load_run<in_t, kRev>(static_cast<const in_t*>(p.dout) + row * L, L, t0, p.vec, dy);
      if (kZ) {
        float zz[kRun];
        load_run<in_t, kRev>(static_cast<const in_t*>(p.z) + row * L, L, t0, p.vec, zz);
#pragma unroll
        for (int i = 0; i < kRun; ++i) dy[i] *= zz[i] * sigmoid_f(zz[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRun; ++i) y[i] = 0.f;
#pragma unroll(kN == 1 ? 1 : 4)
    for (int n = 0; n < N; ++n) {
      const float An = p.A[(int64_t)d * N + n] * kLog2e;
      float a[kRun], bb[kRun], cc[kRun];
#pragma unroll
      for (int i = 0; i < kRun; ++i) a[i] = exp2_fast(dt[i] * An);
      if (kMode != kAdjSummary) {
        if (kVarB) {
          load_run<in_t, kRev>(bc_row<in_t>(p.B, p, b, g, n), L, t0, p.vec, bb);
        } else {
          const float Bf = static_cast<const float*>(p.B)[(int64_t)d * N + n];
#pragma unroll
          for (int i = 0; i < kRun; ++i) bb[i] = Bf;
        }
#pragma unroll
        for (int i = 0; i < kRun; ++i) bb[i] *= dt[i] * uu[i];
      }
      if (kMode == kOut || kMode == kAdjSummary) {
        if (kVarC) {
          load_run<in_t, kRev>(bc_row<in_t>(p.C, p, b, g, n), L, t0, p.vec, cc);
        } else {
          const float Cf = static_cast<const float*>(p.C)[(int64_t)d * N + n];
#pragma unroll
          for (int i = 0; i < kRun; ++i) cc[i] = Cf;
        }
      }
      PairF pr;
      if (kMode == kAdjSummary) {
#pragma unroll
        for (int i = 0; i < kRun; ++i) cc[i] *= dy[i];  // g = C * dy
        pr = chunk::adjoint_run_pair<float, kRun>(a, cc);
      } else {
        pr = chunk::run_pair<float, kRun>(a, bb);
      }
      const RowScan rs = row_scan(pr, lane, tpr, kMode == kAdjSummary, my_slots + sp * kWarps);
      sp ^= 1;
      const PairF cin = carry[(par * rpb + rib) * N + n];
      if (kMode == kOut) {
        float hs[kRun];
        chunk::replay<float, kRun>(chunk::apply(rs.excl, cin.b), a, bb, cc, y, hs);
      }
      if (kMode == kCkpt && lane == 0 && row_ok) p.ckpt[(row * p.nchunks + c) * N + n] = cin.b;
      if (lane == 0) carry[((par ^ 1) * rpb + rib) * N + n] = chunk::combine(cin, rs.total);
    }
    if (kMode == kOut && row_ok) {
      const float Dd = p.D ? p.D[d] : 0.f;
#pragma unroll
      for (int i = 0; i < kRun; ++i) y[i] += Dd * uu[i];
      if (kZ) {
        float zz[kRun];
        load_run<in_t, kRev>(static_cast<const in_t*>(p.z) + row * L, L, t0, p.vec, zz);
#pragma unroll
        for (int i = 0; i < kRun; ++i) y[i] *= zz[i] * sigmoid_f(zz[i]);
      }
      store_run<in_t, kRev>(static_cast<in_t*>(p.out) + row * L, L, t0, p.vec, y);
    }
    par ^= 1;
    __syncthreads();
  }
  if (!row_ok) return;
  for (int n = lane; n < N; n += tpr) {
    const PairF cur = carry[(par * rpb + rib) * N + n];
    if (kSum) p.seg_pairs[(row * p.nseg + seg) * N + n] = cur;
    else if (kMode == kOut && seg == p.nseg - 1) p.last[row * N + n] = cur.b;
  }
}

// ---- backward main launch: grid (batch x tiles, segments); a block holds rpb row groups of tpr
// lanes, each visiting cpr channels of the tile one after another ----

constexpr int kFields = 6;  // per (channel, step) staging: dt, u, dy, du, ddt, y
enum Field { fDt = 0, fU, fDy, fDu, fDdt, fY };

template <typename in_t, int kN, bool kVarB, bool kVarC, bool kZ, bool kRev>
__global__ void __launch_bounds__(kThreads) lpar_bwd_kernel(const __grid_constant__ LParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tpr = p.tpr, rpb = kThreads / tpr, nw = warps_per_row(tpr), cpr = p.tile / rpb;
  const int N = kN > 0 ? kN : p.N;
  const int lane = threadIdx.x % tpr, rg = threadIdx.x / tpr, w = lane / 32;
  PairF* slots = reinterpret_cast<PairF*>(smem_raw);                       // [2][kWarps]
  float* rcarry = reinterpret_cast<float*>(slots + 2 * kWarps);            // [2][tile][N]
  float* fields = rcarry + 2 * p.tile * N;                                 // [tile][kFields][kRun][tpr]
  float* red = fields + (size_t)p.tile * kFields * kRun * tpr;             // [rpb][2][kRun][tpr]
  float* part_acc = red + (size_t)rpb * 2 * kRun * tpr;                    // [tile][N][nw][3]: dA, dB, dC
  float* row_acc = part_acc + (size_t)p.tile * N * nw * 3;                 // [tile][2][tpr]: dD, dbias
  const int64_t L = p.L;
  const int tiles = p.dim / p.tile;
  const int b = blockIdx.x / tiles, d_first = (blockIdx.x % tiles) * p.tile, g = d_first / p.dg;
  const int part = (d_first % p.dg) / p.tile;
  const int seg = blockIdx.y;
  const int64_t c0 = (int64_t)seg * p.seg_chunks, c1 = min(p.nchunks, c0 + p.seg_chunks);
  PairF* my_slots = slots + (tpr > 32 ? rg * nw : 0);
  auto field = [&](int j, int f, int i) -> float& {
    return fields[(((size_t)(rg * cpr + j) * kFields + f) * kRun + i) * tpr + lane];
  };

  for (int idx = threadIdx.x; idx < p.tile * N; idx += kThreads) {
    const int j = idx / N, n = idx % N;
    const int64_t row = (int64_t)b * p.dim + d_first + j;
    float r = p.dlast ? p.dlast[row * N + n] : 0.f;
    for (int s = p.nseg - 1; s > seg; --s) r = chunk::apply(p.seg_pairs[(row * p.nseg + s) * N + n], r);
    rcarry[idx] = r;
  }
  for (int idx = threadIdx.x; idx < p.tile * N * nw * 3; idx += kThreads) part_acc[idx] = 0.f;
  for (int idx = threadIdx.x; idx < p.tile * 2 * tpr; idx += kThreads) row_acc[idx] = 0.f;
  __syncthreads();
  int par = 0, sp = 0;
  for (int64_t k = 0; k < c1 - c0; ++k) {
    const int64_t c = c1 - 1 - k;
    const int64_t t0 = c * p.chunk + (int64_t)lane * kRun;
    for (int j = 0; j < cpr; ++j) {  // stage the channels' runs (each thread only its own entries)
      const int d = d_first + rg * cpr + j;
      const int64_t row = (int64_t)b * p.dim + d;
      float dt[kRun], raw[kRun], uu[kRun], dy[kRun];
      load_dt<in_t, kRev>(p, static_cast<const in_t*>(p.delta) + row * L, p.bias ? p.bias[d] : 0.f, t0, dt, raw);
      load_run<in_t, kRev>(static_cast<const in_t*>(p.u) + row * L, L, t0, p.vec, uu);
      load_run<in_t, kRev>(static_cast<const in_t*>(p.dout) + row * L, L, t0, p.vec, dy);
      if (kZ) {
        float zz[kRun];
        load_run<in_t, kRev>(static_cast<const in_t*>(p.z) + row * L, L, t0, p.vec, zz);
#pragma unroll
        for (int i = 0; i < kRun; ++i) dy[i] *= zz[i] * sigmoid_f(zz[i]);
      }
#pragma unroll
      for (int i = 0; i < kRun; ++i) {
        field(j, fDt, i) = dt[i];
        field(j, fU, i) = uu[i];
        field(j, fDy, i) = t0 + i < L ? dy[i] : 0.f;
        field(j, fDu, i) = field(j, fDdt, i) = field(j, fY, i) = 0.f;
      }
    }
    for (int n = 0; n < N; ++n) {
      float Bv[kRun], Cv[kRun], dBacc[kRun], dCacc[kRun];
      if (kVarB) load_run<in_t, kRev>(bc_row<in_t>(p.B, p, b, g, n), L, t0, p.vec, Bv);
      if (kVarC) load_run<in_t, kRev>(bc_row<in_t>(p.C, p, b, g, n), L, t0, p.vec, Cv);
#pragma unroll
      for (int i = 0; i < kRun; ++i) dBacc[i] = dCacc[i] = 0.f;
      for (int j = 0; j < cpr; ++j) {
        const int jt = rg * cpr + j, d = d_first + jt;
        const int64_t row = (int64_t)b * p.dim + d;
        const float An = p.A[(int64_t)d * N + n];
        if (!kVarB) {
          const float Bf = static_cast<const float*>(p.B)[(int64_t)d * N + n];
#pragma unroll
          for (int i = 0; i < kRun; ++i) Bv[i] = Bf;
        }
        if (!kVarC) {
          const float Cf = static_cast<const float*>(p.C)[(int64_t)d * N + n];
#pragma unroll
          for (int i = 0; i < kRun; ++i) Cv[i] = Cf;
        }
        float dt[kRun], uu[kRun], dy[kRun], a[kRun], bb[kRun], gg[kRun], yv[kRun], hs[kRun];
#pragma unroll
        for (int i = 0; i < kRun; ++i) {
          dt[i] = field(j, fDt, i);
          uu[i] = field(j, fU, i);
          dy[i] = field(j, fDy, i);
          a[i] = exp2_fast(dt[i] * An * kLog2e);
          bb[i] = dt[i] * uu[i] * Bv[i];
          gg[i] = Cv[i] * dy[i];
          yv[i] = 0.f;
        }
        const RowScan fs = row_scan(chunk::run_pair<float, kRun>(a, bb), lane, tpr, false, my_slots + sp * kWarps);
        sp ^= 1;
        const float h0 = chunk::apply(fs.excl, p.ckpt[(row * p.nchunks + c) * N + n]);
        chunk::replay<float, kRun>(h0, a, bb, Cv, yv, hs);
        const RowScan as = row_scan(chunk::adjoint_run_pair<float, kRun>(a, gg), lane, tpr, true,
                                    my_slots + sp * kWarps);
        sp ^= 1;
        const float rc = rcarry[(par * p.tile + jt) * N + n];
        chunk::RunGrads<float, kRun> out = {};
        chunk::adjoint_replay<float, kRun>(chunk::apply(as.excl, rc), h0, hs, a, gg, dy, dt, uu, Bv, An, out);
        float dBf = 0.f, dCf = 0.f;
#pragma unroll
        for (int i = 0; i < kRun; ++i) {
          field(j, fDu, i) += out.du[i];
          field(j, fDdt, i) += out.ddt[i];
          field(j, fY, i) += yv[i];
          if (kVarB) dBacc[i] += out.dB[i];
          else dBf += out.dB[i];
          if (kVarC) dCacc[i] += out.dC[i];
          else dCf += out.dC[i];
        }
        // per-warp sums of the (channel, state) scalars, accumulated over chunks in a fixed order
        const int width = tpr < 32 ? tpr : 32;
        const float sA = segment_sum(out.dA, width);
        const float sB = kVarB ? 0.f : segment_sum(dBf, width), sC = kVarC ? 0.f : segment_sum(dCf, width);
        if ((lane & (width - 1)) == 0) {
          float* acc = part_acc + (((size_t)jt * N + n) * nw + w) * 3;
          acc[0] += sA;
          acc[1] += sB;
          acc[2] += sC;
        }
        if (lane == 0) rcarry[((par ^ 1) * p.tile + jt) * N + n] = chunk::apply(as.total, rc);
      }
      if (kVarB || kVarC) {  // sum over the row groups in order, one partial row per tile
        if (rpb > 1) {
#pragma unroll
          for (int i = 0; i < kRun; ++i) {
            red[((rg * 2 + 0) * kRun + i) * tpr + lane] = dBacc[i];
            red[((rg * 2 + 1) * kRun + i) * tpr + lane] = dCacc[i];
          }
          __syncthreads();
          if (rg == 0) {
            for (int r = 1; r < rpb; ++r) {
#pragma unroll
              for (int i = 0; i < kRun; ++i) {
                dBacc[i] += red[((r * 2 + 0) * kRun + i) * tpr + lane];
                dCacc[i] += red[((r * 2 + 1) * kRun + i) * tpr + lane];
              }
            }
          }
        }
        if (rg == 0) {
          const int64_t prow = ((((int64_t)part * p.batch + b) * p.groups + g) * N + n) * L;
          if (kVarB) store_run<float, kRev>(p.dB_part + prow, L, t0, p.vec, dBacc);
          if (kVarC) store_run<float, kRev>(p.dC_part + prow, L, t0, p.vec, dCacc);
        }
        if (rpb > 1) __syncthreads();
      }
    }
    for (int j = 0; j < cpr; ++j) {  // the chunk's per-step gradients of this row group's channels
      const int jt = rg * cpr + j, d = d_first + jt;
      const int64_t row = (int64_t)b * p.dim + d;
      float dt[kRun], raw[kRun], dout[kRun], zz[kRun], du[kRun], ddelta[kRun], dz[kRun];
      load_dt<in_t, kRev>(p, static_cast<const in_t*>(p.delta) + row * L, p.bias ? p.bias[d] : 0.f, t0, dt, raw);
      if (kZ) {
        load_run<in_t, kRev>(static_cast<const in_t*>(p.dout) + row * L, L, t0, p.vec, dout);
        load_run<in_t, kRev>(static_cast<const in_t*>(p.z) + row * L, L, t0, p.vec, zz);
      }
      const float Dd = p.D ? p.D[d] : 0.f;
      float sD = 0.f, sBias = 0.f;
#pragma unroll
      for (int i = 0; i < kRun; ++i) {
        const float uu = field(j, fU, i), dy = field(j, fDy, i);
        du[i] = field(j, fDu, i) + Dd * dy;
        const float ddt = field(j, fDdt, i);
        ddelta[i] = p.softplus ? ddt * sigmoid_f(raw[i]) : ddt;
        if (t0 + i >= L) ddelta[i] = 0.f;
        if (kZ) {
          const float s = sigmoid_f(zz[i]);
          dz[i] = dout[i] * (field(j, fY, i) + Dd * uu) * s * (1.f + zz[i] * (1.f - s));
        }
        sD += dy * uu;
        sBias += ddelta[i];
      }
      store_run<in_t, kRev>(static_cast<in_t*>(p.du) + row * L, L, t0, p.vec, du);
      store_run<in_t, kRev>(static_cast<in_t*>(p.ddelta) + row * L, L, t0, p.vec, ddelta);
      if (kZ) store_run<in_t, kRev>(static_cast<in_t*>(p.dz) + row * L, L, t0, p.vec, dz);
      row_acc[(jt * 2 + 0) * tpr + lane] += sD;
      row_acc[(jt * 2 + 1) * tpr + lane] += sBias;
    }
    par ^= 1;
    __syncthreads();
  }
  // per-(channel, segment) sums, each in one fixed order
  for (int idx = threadIdx.x; idx < p.tile * N; idx += kThreads) {
    const int jt = idx / N, n = idx % N;
    const int64_t row = (int64_t)b * p.dim + d_first + jt;
    float s[3] = {0.f, 0.f, 0.f};
    for (int ww = 0; ww < nw; ++ww)
      for (int q = 0; q < 3; ++q) s[q] += part_acc[(((size_t)jt * N + n) * nw + ww) * 3 + q];
    const int64_t o = (row * p.nseg + seg) * N + n;
    p.dA_part[o] = s[0];
    if (!kVarB) p.dB_part[o] = s[1];
    if (!kVarC) p.dC_part[o] = s[2];
  }
  for (int jt = threadIdx.x; jt < p.tile; jt += kThreads) {
    const int64_t row = (int64_t)b * p.dim + d_first + jt;
    float sD = 0.f, sBias = 0.f;
    for (int l = 0; l < tpr; ++l) {
      sD += row_acc[(jt * 2 + 0) * tpr + l];
      sBias += row_acc[(jt * 2 + 1) * tpr + l];
    }
    if (p.dD_part) p.dD_part[row * p.nseg + seg] = sD;
    if (p.dbias_part) p.dbias_part[row * p.nseg + seg] = sBias;
  }
}

// ---- host side ----

template <typename F>
void bool_switch(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// d_state class: 1 (MSVMamba, VMamba), 16 (Vim), any other up to 256
template <typename F>
void nstate_switch(int N, F&& f) {
#ifdef ZOO_SCAN_CI_FLOAT_ONLY  // the CI compile check: the general class only (1 and 16 only fix N)
  (void)N;
  f(std::integral_constant<int, 0>{});
#else
  if (N == 1) f(std::integral_constant<int, 1>{});
  else if (N == 16) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 0>{});
#endif
}

template <typename F>
void dtype_switch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
#ifndef ZOO_SCAN_CI_FLOAT_ONLY
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
#endif
    default: TORCH_CHECK(false, "zoo_scan (CUDA, lparallel): unsupported dtype ", t);
  }
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const LParams& p) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

LParams make_params(const Inputs& in) {
  LParams p{};
  p.batch = (int)in.u.size(0);
  p.dim = (int)in.u.size(1);
  p.L = in.u.size(2);
  p.N = (int)in.A.size(1);
  p.groups = in.groups;
  p.dg = p.dim / p.groups;
  p.tpr = 8;
  while (p.tpr < 128 && (int64_t)p.tpr * kRun < p.L) p.tpr *= 2;
  p.chunk = (int64_t)p.tpr * kRun;
  p.nchunks = (p.L + p.chunk - 1) / p.chunk;
  p.softplus = in.softplus;
  p.vec = p.L % kRun == 0;
  for (const at::Tensor* t : {&in.u, &in.delta, &in.z, &in.B, &in.C}) p.vec = p.vec && aligned16(*t);
  p.u = in.u.data_ptr();
  p.delta = in.delta.data_ptr();
  p.z = in.z.defined() ? in.z.data_ptr() : nullptr;
  p.B = in.B.data_ptr();
  p.C = in.C.data_ptr();
  p.A = in.A.data_ptr<float>();
  p.D = in.D.defined() ? in.D.data_ptr<float>() : nullptr;
  p.bias = in.bias.defined() ? in.bias.data_ptr<float>() : nullptr;
  return p;
}

// Segments: split L over more blocks when `blocks` would leave the GPU mostly idle.
void choose_segments(LParams& p, int64_t blocks) {
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t sms = sm_count;
  int64_t nseg = 1;
  if (blocks < 2 * sms && p.nchunks > 1) nseg = std::min<int64_t>(p.nchunks, (4 * sms + blocks - 1) / blocks);
  p.seg_chunks = (p.nchunks + nseg - 1) / nseg;
  p.nseg = (int)((p.nchunks + p.seg_chunks - 1) / p.seg_chunks);
}

size_t rows_smem(const LParams& p) {
  const int rpb = kThreads / p.tpr;
  return (2 * kWarps + 2 * (size_t)rpb * p.N) * sizeof(PairF);
}

template <int kMode, bool kVarB, bool kVarC, bool kZ>
void launch_rows(const LParams& p, at::ScalarType dtype, bool reverse) {
  const int rpb = kThreads / p.tpr;
  const dim3 grid((unsigned)(((int64_t)p.batch * p.dim + rpb - 1) / rpb), (unsigned)p.nseg);
  dtype_switch(dtype, [&](auto t) {
    using in_t = decltype(t);
    nstate_switch(p.N, [&](auto kn) {
      bool_switch(reverse, [&](auto rev) {
        launch(lpar_rows_kernel<in_t, decltype(kn)::value, kVarB, kVarC, kZ, decltype(rev)::value, kMode>, grid,
               rows_smem(p), p);
      });
    });
  });
}

// the state entering every segment (kSummary) then the launch of `kMode` (kOut or kCkpt)
template <int kMode>
void rows_two_pass(LParams& p, const Inputs& in, bool var_b, bool var_c, bool has_z, const at::Tensor& seg_pairs) {
  p.seg_pairs = p.nseg > 1 ? reinterpret_cast<PairF*>(seg_pairs.data_ptr<float>()) : nullptr;
  const auto dtype = in.u.scalar_type();
  if (p.nseg > 1) {
    bool_switch(var_b, [&](auto vb) { launch_rows<kSummary, decltype(vb)::value, false, false>(p, dtype, in.reverse); });
  }
  if (kMode == kCkpt) {
    bool_switch(var_b, [&](auto vb) { launch_rows<kCkpt, decltype(vb)::value, false, false>(p, dtype, in.reverse); });
  } else {
    bool_switch(var_b, [&](auto vb) {
      bool_switch(var_c, [&](auto vc) {
        bool_switch(has_z, [&](auto z) {
          launch_rows<kOut, decltype(vb)::value, decltype(vc)::value, decltype(z)::value>(p, dtype, in.reverse);
        });
      });
    });
  }
}

at::Tensor seg_buffer(const LParams& p, const at::Tensor& like) {
  if (p.nseg <= 1) return at::Tensor();
  return at::empty({(int64_t)p.batch * p.dim, p.nseg, p.N, 2}, like.options().dtype(at::kFloat));
}

// Channels per backward block (one group): at most two per row group, one above d_state 64 (the
// staging and the per-state accumulators in shared memory grow with them) and never fewer than the block's row groups, so lanes per row may grow to 128
// when the group size has no large power-of-two divisor. Sets tpr (and the chunking) to match.
void choose_backward_tile(LParams& p) {
  int div = 1;
  while (div < 256 && p.dg % (div * 2) == 0) div *= 2;
  while (kThreads / p.tpr > div) p.tpr *= 2;
  p.tile = std::min(div, (p.N > 64 ? 1 : 2) * (kThreads / p.tpr));
  p.parts = p.dg / p.tile;
  p.chunk = (int64_t)p.tpr * kRun;
  p.nchunks = (p.L + p.chunk - 1) / p.chunk;
}

size_t bwd_smem(const LParams& p) {
  const int rpb = kThreads / p.tpr, nw = p.tpr < 32 ? 1 : p.tpr / 32;
  const size_t floats = 2 * (size_t)p.tile * p.N + (size_t)p.tile * kFields * kRun * p.tpr +
                        (size_t)rpb * 2 * kRun * p.tpr + (size_t)p.tile * p.N * nw * 3 + (size_t)p.tile * 2 * p.tpr;
  return 2 * kWarps * sizeof(PairF) + floats * sizeof(float);
}

}  // namespace

bool enabled() {
  const char* v = std::getenv("ZOO_CUDA_SCAN");
  if (v == nullptr || !*v || std::strcmp(v, "default") == 0) return false;
  if (std::strcmp(v, "lparallel") == 0) return true;
  TORCH_CHECK(false, "ZOO_CUDA_SCAN must be unset, 'default' or 'lparallel', got '", v, "'");
  return false;
}

std::tuple<at::Tensor, at::Tensor> forward(const Inputs& in) {
  if (in.u.numel() == 0) {  // no rows or no steps: nothing to launch
    return {at::empty_like(in.u), at::zeros({in.u.size(0), in.u.size(1), in.A.size(1)}, in.u.options().dtype(at::kFloat))};
  }
  LParams p = make_params(in);
  const int rpb = kThreads / p.tpr;
  choose_segments(p, ((int64_t)p.batch * p.dim + rpb - 1) / rpb);
  auto out = at::empty_like(in.u);
  auto last = at::empty({in.u.size(0), in.u.size(1), in.A.size(1)}, in.u.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.last = last.data_ptr<float>();
  at::Tensor segs = seg_buffer(p, in.u);
  rows_two_pass<kOut>(p, in, in.B.dim() == 4, in.C.dim() == 4, in.z.defined(), segs);
  return {out, last};
}

std::vector<at::Tensor> backward(const Inputs& in, const at::Tensor& dout, const at::Tensor& dlast) {
  if (in.u.numel() == 0) {  // no rows or no steps: every gradient is zero
    const auto f32 = in.u.options().dtype(at::kFloat);
    auto zeros_or_none = [&](const at::Tensor& t) { return t.defined() ? at::zeros(t.sizes(), f32) : at::Tensor(); };
    return {at::zeros_like(in.u), at::zeros_like(in.u), at::zeros(in.A.sizes(), f32), at::zeros(in.B.sizes(), f32),
            at::zeros(in.C.sizes(), f32), zeros_or_none(in.D), in.z.defined() ? at::zeros_like(in.u) : at::Tensor(),
            zeros_or_none(in.bias)};
  }
  LParams p = make_params(in);
  const bool var_b = in.B.dim() == 4, var_c = in.C.dim() == 4, has_z = in.z.defined();
  TORCH_CHECK(dout.sizes() == in.u.sizes() && dout.scalar_type() == in.u.scalar_type() && dout.is_contiguous(),
              "zoo_scan (lparallel): dout must be contiguous with u's shape and dtype");
  p.vec = p.vec && aligned16(dout);
  p.dout = dout.data_ptr();
  p.dlast = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
  const auto f32 = in.u.options().dtype(at::kFloat);
  const int64_t rows = (int64_t)p.batch * p.dim;
  choose_backward_tile(p);  // before the checkpoints: both use its chunking
  const int rpb = kThreads / p.tpr;
  // 1. the state entering every chunk, with the forward's two-pass scheme. One chunk (L <= 8 x lanes
  // per row, e.g. Vim at 224 px): it enters from the zero state, so no launch is needed.
  auto ckpt = p.nchunks == 1 ? at::zeros({rows, 1, p.N}, f32) : at::empty({rows, p.nchunks, p.N}, f32);
  p.ckpt = ckpt.data_ptr<float>();
  if (p.nchunks > 1) {
    choose_segments(p, (rows + rpb - 1) / rpb);
    rows_two_pass<kCkpt>(p, in, var_b, false, false, seg_buffer(p, in.u));
  }
  // 2. the adjoint's segment Pairs, for the backward's own segments
  const int64_t blocks = (int64_t)p.batch * (p.dim / p.tile);
  choose_segments(p, blocks);
  at::Tensor adj = seg_buffer(p, in.u);
  p.seg_pairs = p.nseg > 1 ? reinterpret_cast<PairF*>(adj.data_ptr<float>()) : nullptr;
  const auto dtype = in.u.scalar_type();
  if (p.nseg > 1) {
    bool_switch(var_c, [&](auto vc) {
      bool_switch(has_z, [&](auto z) {
        launch_rows<kAdjSummary, false, decltype(vc)::value, decltype(z)::value>(p, dtype, in.reverse);
      });
    });
  }
  // 3. the backward proper
  auto du = at::empty_like(in.u), ddelta = at::empty_like(in.u);
  at::Tensor dz = has_z ? at::empty_like(in.u) : at::Tensor();
  auto dA_part = at::empty({rows, p.nseg, p.N}, f32);
  auto dB_part = var_b ? at::empty({p.parts, p.batch, p.groups, p.N, p.L}, f32) : at::empty({rows, p.nseg, p.N}, f32);
  auto dC_part = var_c ? at::empty({p.parts, p.batch, p.groups, p.N, p.L}, f32) : at::empty({rows, p.nseg, p.N}, f32);
  at::Tensor dD_part = in.D.defined() ? at::empty({rows, p.nseg}, f32) : at::Tensor();
  at::Tensor dbias_part = in.bias.defined() ? at::empty({rows, p.nseg}, f32) : at::Tensor();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = has_z ? dz.data_ptr() : nullptr;
  p.dA_part = dA_part.data_ptr<float>();
  p.dB_part = dB_part.data_ptr<float>();
  p.dC_part = dC_part.data_ptr<float>();
  p.dD_part = dD_part.defined() ? dD_part.data_ptr<float>() : nullptr;
  p.dbias_part = dbias_part.defined() ? dbias_part.data_ptr<float>() : nullptr;
  const dim3 grid((unsigned)blocks, (unsigned)p.nseg);
  dtype_switch(dtype, [&](auto t) {
    using in_t = decltype(t);
    nstate_switch(p.N, [&](auto kn) {
      bool_switch(var_b, [&](auto vb) {
        bool_switch(var_c, [&](auto vc) {
          bool_switch(has_z, [&](auto z) {
            bool_switch(in.reverse, [&](auto rev) {
              launch(lpar_bwd_kernel<in_t, decltype(kn)::value, decltype(vb)::value, decltype(vc)::value,
                                     decltype(z)::value, decltype(rev)::value>,
                     grid, bwd_smem(p), p);
            });
          });
        });
      });
    });
  });
  const int64_t batch = p.batch, dim = p.dim, N = p.N;
  auto by_channel = [&](const at::Tensor& t) { return t.view({batch, dim, p.nseg, N}).sum({0, 2}); };
  at::Tensor dB = var_b ? dB_part.sum(0) : by_channel(dB_part);
  at::Tensor dC = var_c ? dC_part.sum(0) : by_channel(dC_part);
  at::Tensor dD = in.D.defined() ? dD_part.view({batch, dim, p.nseg}).sum({0, 2}) : at::Tensor();
  at::Tensor dbias = in.bias.defined() ? dbias_part.view({batch, dim, p.nseg}).sum({0, 2}) : at::Tensor();
  return {du, ddelta, by_channel(dA_part), dB, dC, dD, dz, dbias};
}

at::Tensor bidir_forward(const Inputs& fwd, const Inputs& rev, double scale) {
  auto y = std::get<0>(forward(fwd)).to(at::kFloat);
  y.add_(std::get<0>(forward(rev)).to(at::kFloat)).mul_(scale);
  return y.to(fwd.u.scalar_type());
}

std::vector<at::Tensor> bidir_backward(const Inputs& fwd, const Inputs& rev, const at::Tensor& dout, double scale) {
  const auto ds = (dout.to(at::kFloat) * scale).to(fwd.u.scalar_type()).contiguous();
  auto gf = backward(fwd, ds, at::Tensor());
  auto gb = backward(rev, ds, at::Tensor());
  std::vector<at::Tensor> out;
  for (auto* g : {&gf, &gb}) {
    for (int k : {0, 1, 2, 3, 4, 5, 7}) out.push_back((*g)[k]);  // dz (6) is summed below
  }
  at::Tensor dz;
  if (fwd.z.defined()) dz = (gf[6].to(at::kFloat) + gb[6].to(at::kFloat)).to(fwd.u.scalar_type());
  out.push_back(dz);
  return out;
}

}  // namespace lpar
}  // namespace zoo_scan
