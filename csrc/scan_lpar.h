// Host interface of the L-parallel CUDA selective scan (scan_cuda_lpar.cu), called by the thin
// dispatch in scan_cuda.cu when ZOO_CUDA_SCAN=lparallel. Inputs arrive checked and prepared there
// (contiguous; A, D, bias and fixed B/C fp32; u, delta, z and variable B/C in u's dtype).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace zoo_scan {
namespace lpar {

// ZOO_CUDA_SCAN: unset, "" or "default" -> the default kernel; "lparallel" -> this one; anything
// else raises, naming the accepted values. Read on every call so a process can switch.
bool enabled();

struct Inputs {
  at::Tensor u, delta, A, B, C, D, z, bias;  // D, z, bias undefined when absent
  int groups;
  bool softplus, reverse;
};

// (out in u's dtype, last state fp32 (batch, dim, N))
std::tuple<at::Tensor, at::Tensor> forward(const Inputs& in);

// (du, ddelta, dA, dB, dC, dD, dz, dbias); dA/dB/dC/dD/dbias fp32, the others in u's dtype,
// absent inputs get undefined tensors. dlast may be undefined.
std::vector<at::Tensor> backward(const Inputs& in, const at::Tensor& dout, const at::Tensor& dlast);

// Vim's two directions: scale * (scan(fwd) + reverse scan(rev)) * silu(z), z in both Inputs; the
// gate is linear in y, so each direction runs with the gate and the two are added.
at::Tensor bidir_forward(const Inputs& fwd, const Inputs& rev, double scale);

// (du, ddelta, dA, dB, dC, dD, dbias) of fwd, the same of rev, then dz; the caller converts dtypes
std::vector<at::Tensor> bidir_backward(const Inputs& fwd, const Inputs& rev, const at::Tensor& dout, double scale);

}  // namespace lpar
}  // namespace zoo_scan
