// Operator schemas of the fastres library and the build_info() Python binding.
// Per-device implementations are registered next to their kernels
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(fastres, CPU, ...), csrc/cuda/*.cu with CUDA).
// Fake (meta) kernels and autograd are registered from Python (fastres/ops/).
#include <torch/extension.h>

#include "batch_norm_act.h"
#include "cpu/bn_act_kernel.h"

#ifndef FASTRES_VERSION
#define FASTRES_VERSION "unknown"
#endif
#ifndef FASTRES_TORCH_VERSION
#define FASTRES_TORCH_VERSION "unknown"
#endif
#ifndef FASTRES_CUDA_ARCHS
#define FASTRES_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastres, m) {
  // out = relu?(batch_norm(input) + residual?); returns (out, mean, var) where var is the
  // biased batch variance (training) or a copy of running_var (eval). Running statistics
  // are NOT updated here: the op is functional so autograd and torch.compile can handle it;
  // fastres.functional updates them from the returned mean/var.
  m.def(
      "bn_act_forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_residual, grad_weight, grad_bias). grad_residual is
  // relu'(out) * grad_output when has_residual, else an empty tensor; grad_weight and
  // grad_bias are in the statistics dtype and always computed. The ReLU mask is that of
  // threshold_backward (0 where out <= 0, the gradient elsewhere, NaN included), out read from
  // `output` when given, otherwise recomputed from input, mean, var, weight, bias.
  m.def(
      "bn_act_backward(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor var, bool training, float eps, bool relu, "
      "bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = FASTRES_VERSION;
  d["torch_version"] = FASTRES_TORCH_VERSION;
  // the CPU kernels this machine runs: the at::vec build picked from ATen's CPU capability
  d["cpu_kernels"] = fastres::cpu::kernels().capability;
#ifdef FASTRES_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = FASTRES_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastres C++/CUDA operators (registered under torch.ops.fastres)";
  m.def("build_info", &build_info, "How this extension was built");
}
