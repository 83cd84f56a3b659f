// Argument checks of the row-layout ops (zoo_scan::bimamba_* for Vim's bidirectional mixer in the (batch, L,
// dim) layout; the MSVMamba / VMamba ops of rows_cpu.cpp), shared by every device implementation so they
// reject the same inputs the same way, each message naming the op.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace zoo_scan {

// t: a float32 tensor on `device`
inline void check_float_on(const char* op, const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == device, "zoo_scan::", op, ": ", name,
              " must be a float32 tensor on ", device, ", got ", t.scalar_type(), " on ", t.device());
}

// The activations (x; u, delta, B, C, z): float32, or with `half_inputs` (a kernel that reads them in
// place, CUDA) also float16 / bfloat16, all of x's (u's) dtype and device. The parameters are always float32.
inline void check_data_on(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                          bool half_inputs) {
  if (!half_inputs) return check_float_on(op, t, name, like.device());
  const auto dtype = like.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "zoo_scan::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, "zoo_scan::", op, ": ", name, " must have the activations' dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "zoo_scan::", op, ": ", name, " is on ", t.device(),
              " but the inputs are on ", like.device());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* what) {
  TORCH_CHECK(t.sizes() == expected, "zoo_scan::", op, ": ", name, " must be ", what, " = ", expected, ", got ",
              t.sizes());
}

// t itself when its last dimension is contiguous (the kernels take the other strides as they are)
inline at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// B and C as the scan kernels read them: unit state stride and one set of strides for both (column slices of
// one x_proj output already share theirs; otherwise both are made contiguous)
inline std::pair<at::Tensor, at::Tensor> with_shared_strides(const at::Tensor& B, const at::Tensor& C) {
  at::Tensor Bs = unit_last(B), Cs = unit_last(C);
  if (Cs.strides() != Bs.strides()) return {Bs.contiguous(), Cs.contiguous()};
  return {Bs, Cs};
}

// bimamba_conv(x, weight, bias): x (batch, L, dim), weight (2, dim, K), bias (2, dim)
inline void check_bimamba_conv_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    bool half_inputs = false) {
  const char* op = "bimamba_conv";
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1, "zoo_scan::bimamba_conv: x must be (batch, L >= 1, dim), got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) >= 1,
              "zoo_scan::bimamba_conv: weight must be (2, dim, kernel), got ", weight.sizes());
  check_data_on(op, x, "x", x, half_inputs);
  check_float_on(op, weight, "weight", x.device());
  check_float_on(op, bias, "bias", x.device());
  check_shape(op, weight, "weight", {2, x.size(2), weight.size(2)}, "(2, dim, kernel)");
  check_shape(op, bias, "bias", {2, x.size(2)}, "(2, dim)");
}

// bimamba_scan(u, delta, A, B, C, D, delta_bias, z, ..., dt_weight): u, delta (2, batch, L, dim); A (2, dim, N);
// B, C (2, batch, L, N); D, delta_bias (2, dim); z (batch, L, dim); with dt_weight (2, dim, R), delta is
// dt_proj's input (2, batch, L, R). Index 0 of the leading 2 is the forward direction, 1 the reverse one.
inline void check_bimamba_scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                    const at::Tensor& delta_bias, const at::Tensor& z,
                                    const c10::optional<at::Tensor>& dt_weight, bool half_inputs = false) {
  const char* op = "bimamba_scan";
  TORCH_CHECK(u.dim() == 4 && u.size(0) == 2 && u.size(2) >= 1,
              "zoo_scan::bimamba_scan: u must be (2, batch, L >= 1, dim), got ", u.sizes());
  TORCH_CHECK(A.dim() == 3, "zoo_scan::bimamba_scan: A must be (2, dim, d_state), got ", A.sizes());
  const int64_t batch = u.size(1), L = u.size(2), dim = u.size(3), N = A.size(2);
  const std::pair<const at::Tensor*, const char*> data[] = {{&u, "u"}, {&delta, "delta"}, {&B, "B"}, {&C, "C"},
                                                            {&z, "z"}};
  for (const auto& [t, name] : data) check_data_on(op, *t, name, u, half_inputs);
  const std::pair<const at::Tensor*, const char*> params[] = {{&A, "A"}, {&D, "D"}, {&delta_bias, "delta_bias"}};
  for (const auto& [t, name] : params) check_float_on(op, *t, name, u.device());
  if (dt_weight.has_value()) {
    check_float_on(op, *dt_weight, "dt_weight", u.device());
    TORCH_CHECK(dt_weight->dim() == 3 && dt_weight->size(2) >= 1,
                "zoo_scan::bimamba_scan: dt_weight must be (2, dim, rank), got ", dt_weight->sizes());
    check_shape(op, *dt_weight, "dt_weight", {2, dim, dt_weight->size(2)}, "(2, dim, rank)");
    check_shape(op, delta, "delta", {2, batch, L, dt_weight->size(2)}, "(2, batch, L, rank) with dt_weight");
  } else {
    check_shape(op, delta, "delta", u.sizes(), "u's shape (2, batch, L, dim)");
  }
  check_shape(op, A, "A", {2, dim, N}, "(2, dim, d_state)");
  check_shape(op, B, "B", {2, batch, L, N}, "(2, batch, L, d_state)");
  check_shape(op, C, "C", {2, batch, L, N}, "(2, batch, L, d_state)");
  check_shape(op, D, "D", {2, dim}, "(2, dim)");
  check_shape(op, delta_bias, "delta_bias", {2, dim}, "(2, dim)");
  check_shape(op, z, "z", {batch, L, dim}, "(batch, L, dim)");
}

}  // namespace zoo_scan
