// The one argument check of the zoo_scan ops, included by the CPU (scan_cpu.cpp) and CUDA
// (scan_cuda.cu) kernels. The ops can be called directly (torch.ops.zoo_scan.*), bypassing the
// Python validation, so every tensor's shape, dtype and device is checked here before any pointer
// is read: a short D or delta_bias would otherwise be read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace zoo_scan {
namespace checks {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// Sizes every argument is checked against; groups is 1 when B and C are both fixed.
struct ScanDims {
  int64_t batch, dim, L, N, groups;
};

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
              "; accepted: float32, float64, float16, bfloat16");
}

inline void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                         const char* layout, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but u is on ", device);
  check_float(op, name, t);
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " has shape ", shape_str(t.sizes()), ", expected ", layout, " = ",
              shape_str(want));
}

inline void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t,
                           at::IntArrayRef want, const char* layout, const at::Device& device) {
  if (t.has_value()) check_tensor(op, name, *t, want, layout, device);
}

// B or C: fixed (dim, N), one group (batch, N, L) as mamba-ssm takes it, or (batch, groups, N, L).
// Returns the number of groups, 0 for a fixed matrix.
inline int64_t check_state_operand(const char* op, const char* name, const at::Tensor& M, const ScanDims& d,
                                   const at::Device& device) {
  if (M.dim() == 2) {
    check_tensor(op, name, M, {d.dim, d.N}, "(dim, d_state)", device);
    return 0;
  }
  if (M.dim() == 3) {
    check_tensor(op, name, M, {d.batch, d.N, d.L}, "(batch, d_state, L)", device);
    return 1;
  }
  TORCH_CHECK(M.dim() == 4, op, ": ", name, " has shape ", shape_str(M.sizes()),
              ", expected (dim, d_state), (batch, d_state, L) or (batch, groups, d_state, L)");
  const int64_t g = M.size(1);
  TORCH_CHECK(g >= 1 && d.dim % g == 0, op, ": ", name, " has ", g, " groups, which must divide dim = ", d.dim);
  check_tensor(op, name, M, {d.batch, g, d.N, d.L}, "(batch, groups, d_state, L)", device);
  return g;
}

// u, delta, A, B, C and the optional D, z, delta_bias of one scan direction.
inline ScanDims check_scan_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                  const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                  const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, op, ": u has shape ", shape_str(u.sizes()), ", expected (batch, dim, L)");
  check_float(op, "u", u);
  const at::Device device = u.device();
  ScanDims d{u.size(0), u.size(1), u.size(2), 0, 1};
  TORCH_CHECK(d.L >= 1, op, ": the sequence length L must be >= 1, got u of shape ", shape_str(u.sizes()));
  check_tensor(op, "delta", delta, u.sizes(), "(batch, dim, L)", device);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d.dim && A.size(1) >= 1, op, ": A has shape ", shape_str(A.sizes()),
              ", expected (dim, d_state) = (", d.dim, ", N) with N >= 1");
  d.N = A.size(1);
  check_tensor(op, "A", A, {d.dim, d.N}, "(dim, d_state)", device);
  const int64_t gB = check_state_operand(op, "B", B, d, device);
  const int64_t gC = check_state_operand(op, "C", C, d, device);
  TORCH_CHECK(gB == 0 || gC == 0 || gB == gC, op, ": B and C must have the same number of groups, got ", gB,
              " and ", gC);
  d.groups = std::max<int64_t>({gB, gC, 1});
  check_optional(op, "D", D, {d.dim}, "(dim,)", device);
  check_optional(op, "z", z, u.sizes(), "(batch, dim, L)", device);
  check_optional(op, "delta_bias", delta_bias, {d.dim}, "(dim,)", device);
  return d;
}

// The incoming gradients of a backward op: dout over the Ls output steps, dlast of the last state.
inline void check_grad_inputs(const char* op, const at::Tensor& dout, const std::optional<at::Tensor>& dlast,
                              const ScanDims& d, int64_t Ls, const at::Device& device) {
  check_tensor(op, "dout", dout, {d.batch, d.dim, Ls}, "(batch, dim, L)", device);
  check_optional(op, "dlast", dlast, {d.batch, d.dim, d.N}, "(batch, dim, d_state)", device);
}

// The visiting order of the indexed ops: a non-empty 1-D integer tensor of positions in [0, L);
// returned as a contiguous int64 CPU tensor.
inline at::Tensor check_index(const char* op, const at::Tensor& index, int64_t L) {
  TORCH_CHECK(index.dim() == 1 && index.numel() >= 1, op, ": index has shape ", shape_str(index.sizes()),
              ", expected a non-empty 1-D tensor of positions");
  TORCH_CHECK(at::isIntegralType(index.scalar_type(), /*includeBool=*/false), op, ": index has dtype ",
              index.scalar_type(), "; accepted: an integer dtype (int64, int32, ...)");
  auto idx = index.to(at::kCPU, at::kLong).contiguous();
  const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < L, op, ": index values must lie in [0, ", L, "), got [", lo, ", ", hi, "]");
  return idx;
}

}  // namespace checks
}  // namespace zoo_scan
