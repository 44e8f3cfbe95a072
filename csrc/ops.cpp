// Operator schemas of the fastres library and the build_info() Python binding.
// Per-device implementations are registered next to their kernels
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(fastres, CPU, ...), csrc/cuda/*.cu with CUDA).
// Fake (meta) kernels are registered from Python (fastres/ops/); the autograd of
// bn_act_forward in C++ (csrc/bn_act_autograd.cpp), the others from Python.
#include <torch/extension.h>

#include "batch_norm_act.h"
#include "bn_act_python.h"
#include "tensor_state.h"
#include "conv_bn_cudnn.h"
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
// why the "cudnn-fused" conv backend is absent (setup.py's cudnn_fusion())
#if defined(FASTRES_CUDNN_FUSION_WHY_DISABLED)
#define FASTRES_CUDNN_FUSION_WHY "FASTRES_NO_CUDNN_FUSION=1 at build time"
#elif defined(FASTRES_CUDNN_FUSION_WHY_NO_FRONTEND)
#define FASTRES_CUDNN_FUSION_WHY                                                       \
  "the cuDNN frontend headers were not found at build time (pip install "              \
  "nvidia-cudnn-frontend, or set FASTRES_CUDNN_FRONTEND_INCLUDE to the folder holding " \
  "cudnn_frontend.h), then rebuild"
#elif defined(FASTRES_CUDNN_FUSION_WHY_NO_CUDNN)
#define FASTRES_CUDNN_FUSION_WHY                                                     \
  "cuDNN 9's headers and libcudnn.so.9 were not found at build time (torch's "       \
  "nvidia-cudnn wheel, or set FASTRES_CUDNN_ROOT), then rebuild"
#elif defined(FASTRES_CUDNN_FUSION_WHY_NO_NVRTC)
#define FASTRES_CUDNN_FUSION_WHY \
  "nvrtc.h (included by the cuDNN frontend) was found neither in CUDA_HOME nor in torch's wheels"
#else
#define FASTRES_CUDNN_FUSION_WHY "fastres was built without CUDA"
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
  // Conv backend "cudnn-fused" (csrc/cuda/conv_bn_cudnn.cpp, cuDNN graph API; NHWC):
  // out = conv(relu?(x * scale + shift)) with (scale, shift) of batch_norm(in_*), and with
  // `stats` the per-channel fp32 sum and sum of squares of out (else empty tensors).
  m.def(
      "conv_bn_forward_cudnn(Tensor x, Tensor weight, Tensor? in_weight, Tensor? in_bias, "
      "Tensor? in_mean, Tensor? in_var, int stride, int padding, float in_eps, bool in_relu, "
      "bool stats) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_in_weight, grad_in_bias); with in_training the prologue's
  // in_mean/in_var are the batch statistics of x (full training-mode BatchNorm backward).
  m.def(
      "conv_bn_backward_cudnn(Tensor grad_out, Tensor x, Tensor weight, Tensor? in_weight, "
      "Tensor? in_bias, Tensor? in_mean, Tensor? in_var, int stride, int padding, float in_eps, "
      "bool in_relu, bool in_training, bool need_input, bool need_weight) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // folded inference: relu?(conv(x) + bias + residual?)
  m.def(
      "conv_bias_act_cudnn(Tensor x, Tensor weight, Tensor bias, Tensor? residual, int stride, "
      "int padding, bool relu) -> Tensor");
}

#if defined(FASTRES_WITH_CUDA) && !defined(FASTRES_WITH_CUDNN_FUSION)
// Built without the cuDNN frontend: the ops exist (fake kernels, torch.compile) but say why
// they cannot run.
namespace {
[[noreturn]] void no_cudnn_fusion() {
  TORCH_CHECK(false, "fastres: the 'cudnn-fused' conv backend was not built (",
              FASTRES_CUDNN_FUSION_WHY, "); see fastres.build_info()['cudnn_fused_why']");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_absent(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t, double, bool, bool) {
  no_cudnn_fusion();
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_absent(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t, double, bool, bool, bool, bool) {
  no_cudnn_fusion();
}
at::Tensor infer_absent(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, int64_t, int64_t, bool) {
  no_cudnn_fusion();
}
}  // namespace

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("conv_bn_forward_cudnn", &fwd_absent);
  m.impl("conv_bn_backward_cudnn", &bwd_absent);
  m.impl("conv_bias_act_cudnn", &infer_absent);
}
#endif

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
#ifdef FASTRES_WITH_CUDNN_FUSION
  d["cudnn_fused"] = true;
  d["cudnn_fused_why"] = fastres::cudnn_fused::version_string();
#else
  d["cudnn_fused"] = false;
  d["cudnn_fused_why"] = FASTRES_CUDNN_FUSION_WHY;
#endif
  return d;
}

#ifdef FASTRES_WITH_CUDNN_FUSION
fastres::cudnn_fused::LayerSpec layer_spec(const std::string& kind, std::vector<int64_t> x_shape,
                                           std::vector<int64_t> w_shape, int64_t stride,
                                           int64_t padding, const std::string& dtype,
                                           bool prologue, bool in_relu, bool stats,
                                           bool residual, bool relu) {
  fastres::cudnn_fused::LayerSpec s;
  s.kind = kind;
  s.x_shape = std::move(x_shape);
  s.w_shape = std::move(w_shape);
  s.stride = stride;
  s.padding = padding;
  s.dtype = dtype;
  s.prologue = prologue;
  s.in_relu = in_relu;
  s.stats = stats;
  s.residual = residual;
  s.relu = relu;
  return s;
}
#endif
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastres C++/CUDA operators (registered under torch.ops.fastres)";
  m.def("build_info", &build_info, "How this extension was built");
  fastres::bind_bn_act_eager(m);
  fastres::bind_tensor_state(m);
  m.def("_cpu_stream_store_min_bytes", &fastres::set_stream_store_min_bytes,
        "Set the size from which the CPU BatchNorm kernels store their outputs streaming "
        "(non-temporal stores); returns the previous one",
        pybind11::arg("bytes"));
#ifdef FASTRES_WITH_CUDNN_FUSION
  // (kind, x_shape, w_shape, stride, padding, dtype, prologue, in_relu, stats, residual, relu)
  // -> "" or why not. graph: host-side cudnn_frontend validate(); plan: engines on this GPU.
  m.def("cudnn_fused_graph_check",
        [](const std::string& kind, std::vector<int64_t> x, std::vector<int64_t> w, int64_t stride,
           int64_t padding, const std::string& dtype, bool prologue, bool in_relu, bool stats,
           bool residual, bool relu) {
          return fastres::cudnn_fused::graph_check(layer_spec(kind, x, w, stride, padding, dtype,
                                                              prologue, in_relu, stats, residual,
                                                              relu));
        });
  m.def("cudnn_fused_plan_check",
        [](const std::string& kind, std::vector<int64_t> x, std::vector<int64_t> w, int64_t stride,
           int64_t padding, const std::string& dtype, bool prologue, bool in_relu, bool stats,
           bool residual, bool relu) {
          pybind11::gil_scoped_release no_gil;
          return fastres::cudnn_fused::plan_check(layer_spec(kind, x, w, stride, padding, dtype,
                                                             prologue, in_relu, stats, residual,
                                                             relu));
        });
#endif
}
