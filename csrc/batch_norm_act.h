// Shared declarations and argument checks for the fused BatchNorm(+add)(+ReLU) op.
//
// Tensor contract (the Python layer in fastres/ops/batch_norm_act.py guarantees it;
// the checks below re-verify it so a direct torch.ops.fastres call cannot corrupt memory):
//   input      (N, C, *spatial), dense, either contiguous ("NCHW") or channels-last
//              (stride of dim 1 == 1, "NHWC"); see uses_channels_last().
//   residual   same shape, dtype, device and strides as input, or absent.
//   weight/bias/running stats: 1-D of size C, contiguous, float32 or input dtype
//              (float64 for float64 input), same device.
//   mean/var   returned by forward: statistics dtype (float64 for float64 input,
//              float32 otherwise); var is the *biased* batch variance in training and
//              a copy of running_var in eval.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <tuple>

namespace fastres {

using OptTensor = std::optional<at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// channels-last ("NHWC", viewed as rows M = numel / C of C contiguous values) or
// contiguous ("NCHW", viewed as N x C x S). 2-D inputs are always treated as rows.
inline bool uses_channels_last(const at::Tensor& x) {
  if (x.dim() == 2) return true;
  return !x.is_contiguous();
}

// The CPU kernels store outputs of at least `bytes` bytes streaming (non-temporal); returns the
// previous threshold (csrc/cpu/batch_norm_act_cpu.cpp). Bound as
// fastres._C._cpu_stream_store_min_bytes, for side-by-side measurements.
int64_t set_stream_store_min_bytes(int64_t bytes);

inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param(const OptTensor& p, const at::Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "fastres: ", name,
              " must have shape [C] = [", x.size(1), "], got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), "fastres: ", name, " is on ", p->device(),
              " but input is on ", x.device());
  TORCH_CHECK(p->scalar_type() == at::kFloat || p->scalar_type() == x.scalar_type(),
              "fastres: ", name, " must be float32 or the input dtype ", x.scalar_type(),
              ", got ", p->scalar_type());
  TORCH_CHECK(p->is_contiguous(), "fastres: ", name, " must be contiguous");
}

// channels-last dense: the permutation (0, 2, ..., d-1, 1) is contiguous (size-1 dims take any
// stride, as is_contiguous() allows). Read from the strides: x.permute(...) would build a view
// through the dispatcher, a microsecond or two per call on a small CPU batch. Sizes and strides
// as SymInts: AOT tracing with dynamic shapes runs fastres::bn_act (bn_act_eager.cpp) on
// symbolic tensors.
inline bool is_channels_last_dense(const at::Tensor& x) {
  const int64_t d = x.dim();
  if (d < 3) return false;
  c10::SymInt expected = 1;
  auto next = [&](int64_t dim) {
    const c10::SymInt& size = x.sym_size(dim);
    if (size != 1 && x.sym_stride(dim) != expected) return false;
    expected *= size;
    return true;
  };
  if (!next(1)) return false;
  for (int64_t dim = d - 1; dim >= 2; --dim)
    if (!next(dim)) return false;
  return next(0);
}

inline void check_layout(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "fastres: ", name, " must have at least 2 dims (N, C, ...), got ",
              x.dim());
  TORCH_CHECK(x.is_contiguous() || is_channels_last_dense(x), "fastres: ", name,
              " must be contiguous or channels_last, got strides ", x.strides());
}

inline void check_forward_args(const at::Tensor& input, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training) {
  check_layout(input, "input");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastres: input must be floating point");
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == input.sizes(), "fastres: residual shape ",
                residual->sizes(), " does not match input shape ", input.sizes());
    TORCH_CHECK(residual->strides() == input.strides(),
                "fastres: residual must have the same memory format as input");
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(),
                "fastres: residual dtype must match input dtype");
    TORCH_CHECK(residual->device() == input.device(), "fastres: residual device must match input");
  }
  check_param(weight, input, "weight");
  check_param(bias, input, "bias");
  check_param(running_mean, input, "running_mean");
  check_param(running_var, input, "running_var");
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                    running_var->defined(),
                "fastres: running_mean and running_var are required when training=False");
  }
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const OptTensor& output, const at::Tensor& mean,
                                const at::Tensor& var, bool relu, bool has_residual) {
  check_layout(input, "input");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.strides() == input.strides(),
              "fastres: grad_output must have the shape and memory format of input");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "fastres: grad_output dtype must match input dtype");
  if (output.has_value() && output->defined()) {
    TORCH_CHECK(output->sizes() == input.sizes() && output->strides() == input.strides(),
                "fastres: output must have the shape and memory format of input");
  }
  TORCH_CHECK(!(relu && has_residual) || (output.has_value() && output->defined()),
              "fastres: backward of add+relu needs the forward output");
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == input.size(1) && var.dim() == 1 &&
                  var.size(0) == input.size(1),
              "fastres: mean/var must have shape [C]");
  TORCH_CHECK(mean.scalar_type() == stat_dtype(input) && var.scalar_type() == stat_dtype(input),
              "fastres: mean/var must be ", stat_dtype(input));
}

// CPU (csrc/cpu/batch_norm_act_cpu.cpp)
ForwardResult bn_act_forward_cpu(const at::Tensor& input, const OptTensor& residual,
                                 const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 bool training, double eps, bool relu);
BackwardResult bn_act_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   const OptTensor& output, const OptTensor& weight,
                                   const OptTensor& bias, const at::Tensor& mean,
                                   const at::Tensor& var, bool training, double eps, bool relu,
                                   bool has_residual);

}  // namespace fastres
