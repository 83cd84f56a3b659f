// The depthwise k x k conv of depthwise_conv2d_silu and depthwise_conv2d_residual_gelu (rows_cpu.cpp) on a
// channels-last map: one output row at a time, in blocks of 64 channels (then single vectors, then single channels).
//
// Why blocks: per block the row's taps read k input rows x W pixels x 256 bytes (5-43 KB for MSVMamba's 3 x 3
// convs), which stay in L1 across the row's pixels, and the block's sums stay in registers across the taps.
// The whole-channel loop it replaced read all C channels per tap (k * k * C * 4 bytes of input per pixel, from
// L2) and kept its sums in the output row. Measured on a 2-core Xeon: the ops at MSVMamba's and VMamba's calls
// 0.70-0.89 of the time (A/B, AVX-512 clone); the loop alone with AVX2 0.64-0.85 (docs/kernels.md).
//
// The sums are GCC vector-extension values (zoo_vec::Vec16 where the AVX-512 paths run, else Vec8), lowered by
// each ISA clone of the caller to its own registers: one implementation for every clone. Per channel the arithmetic is
// the reference loop's, in its order (bias, then the taps by row and column, each a multiply-add).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_vec.h"

namespace zoo_scan {

struct DwConvArgs {
  int64_t batch, H, W, C, K, stride, pad, Ho, Wo;
  const float* x;
  int64_t x_sb, x_sh, x_sw;  // channel stride 1
  const float* w;            // (K, K, C): taps outermost, so the channel loop is contiguous
  const float* bias;         // (C), or nullptr
  const float* x_bias;       // (C): added to every input value (residual mode; zeros when the op got none)
  float* out;                // (batch, Ho, Wo, C)
};

// what the conv's output becomes: silu(conv + bias), or gelu(x + conv + bias) with x the (stride 1) input
enum class DwEpilogue { SiLU, ResidualGELU };

constexpr int64_t kDwBlock = 64;  // channels per block

// The taps of output row oh that lie inside the map: rows [kh0, kh1) and, for pixel ow, columns [kw0, kw1).
struct DwTaps {
  int64_t kh0, kh1;
  ZOO_INLINE int64_t kw0(const DwConvArgs& a, int64_t ow) const { return std::max<int64_t>(0, a.pad - ow * a.stride); }
  ZOO_INLINE int64_t kw1(const DwConvArgs& a, int64_t ow) const {
    return std::min<int64_t>(a.K, a.W + a.pad - ow * a.stride);
  }
};

ZOO_INLINE DwTaps dw_taps(const DwConvArgs& a, int64_t oh) {
  return {std::max<int64_t>(0, a.pad - oh * a.stride), std::min<int64_t>(a.K, a.H + a.pad - oh * a.stride)};
}

// the final values of `lanes` channels: sums s (bias and taps), xc the centre input pixel (residual mode)
template <DwEpilogue E>
ZOO_INLINE void dw_epilogue(const float* __restrict s, const float* __restrict xc, const float* __restrict xbias,
                            float* __restrict o, int64_t lanes) {
  if constexpr (E == DwEpilogue::ResidualGELU) {
#pragma omp simd
    for (int64_t c = 0; c < lanes; ++c) o[c] = zoo_vec::gelu(s[c] + xc[c] + xbias[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < lanes; ++c) o[c] = zoo_vec::silu(s[c]);
  }
}

// channels c0 .. c0 + NV * (Vec's lanes) of output row r (flattened (batch, Ho)), every pixel of it
template <typename Vec, int64_t NV, DwEpilogue E>
ZOO_INLINE void dw_row_block(const DwConvArgs& a, int64_t r, int64_t c0) {
  constexpr bool residual = E == DwEpilogue::ResidualGELU;
  constexpr int64_t lanes = zoo_vec::kVecLanes<Vec>;
  const int64_t C = a.C, oh = r % a.Ho;
  const float* xb = a.x + (r / a.Ho) * a.x_sb + c0;
  const DwTaps taps = dw_taps(a, oh);
  Vec xbias[NV];
  for (int64_t v = 0; v < NV; ++v) xbias[v] = residual ? zoo_vec::vload<Vec>(a.x_bias + c0 + v * lanes) : Vec{};
  for (int64_t ow = 0; ow < a.Wo; ++ow) {
    Vec s[NV];
    for (int64_t v = 0; v < NV; ++v) s[v] = a.bias != nullptr ? zoo_vec::vload<Vec>(a.bias + c0 + v * lanes) : Vec{};
    const int64_t kw0 = taps.kw0(a, ow), kw1 = taps.kw1(a, ow);
    for (int64_t kh = taps.kh0; kh < taps.kh1; ++kh) {
      const float* xrow = xb + (oh * a.stride - a.pad + kh) * a.x_sh + (ow * a.stride - a.pad) * a.x_sw;
      const float* wrow = a.w + kh * a.K * C + c0;
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const float* xs = xrow + kw * a.x_sw;
        const float* wk = wrow + kw * C;
        for (int64_t v = 0; v < NV; ++v) {
          const Vec xv = zoo_vec::vload<Vec>(xs + v * lanes);
          s[v] += zoo_vec::vload<Vec>(wk + v * lanes) * (residual ? xv + xbias[v] : xv);
        }
      }
    }
    float sums[NV * lanes];
    for (int64_t v = 0; v < NV; ++v) zoo_vec::vstore(sums + v * lanes, s[v]);
    dw_epilogue<E>(sums, xb + oh * a.x_sh + ow * a.x_sw, residual ? a.x_bias + c0 : nullptr,
                   a.out + (r * a.Wo + ow) * C + c0, NV * lanes);
  }
}

// the channels c0 .. C left after the blocks (fewer than one vector's lanes), one lane at a time
template <DwEpilogue E>
ZOO_INLINE void dw_row_tail(const DwConvArgs& a, int64_t r, int64_t c0) {
  constexpr bool residual = E == DwEpilogue::ResidualGELU;
  const int64_t C = a.C, oh = r % a.Ho, lanes = C - c0;
  const float* xb = a.x + (r / a.Ho) * a.x_sb + c0;
  const DwTaps taps = dw_taps(a, oh);
  float s[kDwBlock];
  for (int64_t ow = 0; ow < a.Wo; ++ow) {
    for (int64_t c = 0; c < lanes; ++c) s[c] = a.bias != nullptr ? a.bias[c0 + c] : 0.0f;
    const int64_t kw0 = taps.kw0(a, ow), kw1 = taps.kw1(a, ow);
    for (int64_t kh = taps.kh0; kh < taps.kh1; ++kh) {
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const float* xs = xb + (oh * a.stride - a.pad + kh) * a.x_sh + (ow * a.stride - a.pad + kw) * a.x_sw;
        const float* wk = a.w + (kh * a.K + kw) * C + c0;
        for (int64_t c = 0; c < lanes; ++c) s[c] += wk[c] * (residual ? xs[c] + a.x_bias[c0 + c] : xs[c]);
      }
    }
    dw_epilogue<E>(s, xb + oh * a.x_sh + ow * a.x_sw, residual ? a.x_bias + c0 : nullptr,
                   a.out + (r * a.Wo + ow) * C + c0, lanes);
  }
}

// the channels c .. C of output row r: blocks of 64 channels, then single vectors of Vec, then the tail
template <typename Vec, DwEpilogue E>
ZOO_INLINE void dw_row(const DwConvArgs& a, int64_t r) {
  constexpr int64_t lanes = zoo_vec::kVecLanes<Vec>;
  int64_t c = 0;
  for (; c + kDwBlock <= a.C; c += kDwBlock) dw_row_block<Vec, kDwBlock / lanes, E>(a, r, c);
  for (; c + lanes <= a.C; c += lanes) dw_row_block<Vec, 1, E>(a, r, c);
  if (c < a.C) dw_row_tail<E>(a, r, c);
}

// output rows (b, oh) in [begin, end) of the flattened (batch, Ho): 16-lane vectors where the AVX-512 paths run
// (zoo_vec::avx512_kernels), else 8-lane ones (see Vec16)
template <DwEpilogue E>
ZOO_INLINE void dwconv_rows(const DwConvArgs& a, int64_t begin, int64_t end) {
  const bool wide = zoo_vec::avx512_kernels();
  for (int64_t r = begin; r < end; ++r) {
    if (wide)
      dw_row<zoo_vec::Vec16, E>(a, r);
    else
      dw_row<zoo_vec::Vec8, E>(a, r);
  }
}

}  // namespace zoo_scan
