// The C++ CPU implementation of fastres::bn_act_forward / bn_act_backward: argument checks and
// tensors here; the kernels (vectorised with at::vec, parallel with at::parallel_for, one build
// per CPU capability, deterministic for any thread count) in bn_act_kernel.inc.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "batch_norm_act.h"
#include "bn_act_kernel.h"

namespace fastres {
namespace cpu {

namespace {

// What this CPU runs: the instruction sets each build is compiled for (bn_act_kernel_*.cpp).
// at::get_cpu_capability() alone is not enough: it returns ATEN_CPU_CAPABILITY as set, so
// ATEN_CPU_CAPABILITY=avx512 on a CPU without AVX-512 named a build that stops on an illegal
// instruction (ATen's own dispatch checks the CPU as well).
bool cpu_runs_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_runs_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         cpu_runs_avx2();
#else
  return false;
#endif
}

}  // namespace

const Kernels& kernels() {
  static const Kernels* k = [] {
    // ATen's choice (cpuinfo, capped by ATEN_CPU_CAPABILITY), as its own kernels dispatch,
    // and never a build this CPU cannot run
    const std::string cap = at::get_cpu_capability();
    const Kernels* pick = nullptr;
    if (cap == "AVX512" && cpu_runs_avx512()) pick = kernels_avx512();
    if (!pick && (cap == "AVX512" || cap == "AVX2") && cpu_runs_avx2()) pick = kernels_avx2();
    return pick ? pick : kernels_default();
  }();
  return *k;
}

}  // namespace cpu

namespace {

cpu::Geometry geometry_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N * C == 0) ? 0 : x.numel() / (N * C);
  // one value per channel and image ((N, C, 1, 1), (N, C, 1)): contiguous or not, the memory is
  // N rows of C, as a 2-D input's; the per-channel NCHW tasks would walk it with a stride of C
  // (2.3x-5x slower than eager PyTorch there, against 1.7x faster as rows)
  return {uses_channels_last(x) || S == 1, N, C, S, N * S};
}

// A [C] parameter or statistic as doubles (fill where absent). Read in place: the small tensor
// operations a .to(kDouble) would run cost more than the whole kernel on a small input.
std::vector<double> to_doubles(const OptTensor& t, int64_t C, double fill) {
  std::vector<double> out(static_cast<size_t>(C), fill);
  if (!t.has_value() || !t->defined()) return out;
  const at::Tensor& v = *t;  // checked: 1-D of C on the CPU
  switch (v.is_contiguous() ? v.scalar_type() : at::kComplexDouble /* the general path */) {
    case at::kFloat: {
      const float* p = v.const_data_ptr<float>();
      for (int64_t c = 0; c < C; ++c) out[c] = p[c];
      break;
    }
    case at::kDouble: {
      const double* p = v.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) out[c] = p[c];
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = v.const_data_ptr<c10::BFloat16>();
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(p[c]);
      break;
    }
    case at::kHalf: {
      const c10::Half* p = v.const_data_ptr<c10::Half>();
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(p[c]);
      break;
    }
    default: {
      at::Tensor d = v.to(at::kDouble).contiguous();
      const double* p = d.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) out[c] = p[c];
    }
  }
  return out;
}

// A [C] result in the statistics dtype of `like` (float32, float64 for float64 input).
at::Tensor stats_tensor(const std::vector<double>& v, const at::Tensor& like) {
  const int64_t C = static_cast<int64_t>(v.size());
  at::Tensor t = at::empty({C}, like.options().dtype(stat_dtype(like)));
  if (t.scalar_type() == at::kDouble) {
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  } else {
    float* p = t.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<float>(v[c]);
  }
  return t;
}

// Outputs (y; dx and dr) of at least this many bytes are stored streaming: non-temporal stores,
// which write whole lines past the caches instead of first reading each line in (a plain store
// to a line not in the cache reads it from memory first). On the 2-core AMD EPYC VM (32 MiB
// L3) a 6.4 MB elementwise pass took 553-629 us with plain stores and 277-281 us streaming;
// the op steps (forward + backward, batch 2) of ResNet-50's 6.4 MB BatchNorm layers ran
// 1.07x-1.31x faster, and whole training steps alike within the noise (0.98x-1.07x). From
// 2 MiB on, resnet20 channels-last (outputs of 2 and 4 MiB read by the next convolution right
// away) leaned slower (0.975x, 0.987x) (docs/cpu/2026-12-03-stream-stores.md), so the line is
// drawn above 4 MiB. Smaller outputs keep plain stores: whoever reads them next may still find
// them in the caches.
std::atomic<int64_t> g_stream_min_bytes{int64_t(5) << 20};

bool stream_stores(const at::Tensor& out) {
  return static_cast<int64_t>(out.nbytes()) >= g_stream_min_bytes.load(std::memory_order_relaxed);
}

}  // namespace

int64_t set_stream_store_min_bytes(int64_t bytes) {
  return g_stream_min_bytes.exchange(bytes);
}

ForwardResult bn_act_forward_cpu(const at::Tensor& input, const OptTensor& residual,
                                 const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 bool training, double eps, bool relu) {
  check_forward_args(input, residual, weight, bias, running_mean, running_var, training);
  TORCH_CHECK(input.device().is_cpu(), "fastres: the cpu backend needs CPU tensors, got ",
              input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf,
              "fastres: the cpu backend supports float32, float64, bfloat16 and float16, got ",
              input.scalar_type());
  const cpu::Geometry g = geometry_of(input);
  at::Tensor out = at::empty_like(input);
  const bool has_res = residual.has_value() && residual->defined();
  const std::vector<double> w = to_doubles(weight, g.C, 1.0), b = to_doubles(bias, g.C, 0.0);
  std::vector<double> mean, var;
  if (training) {
    mean.assign(g.C, 0.0);
    var.assign(g.C, 0.0);
  } else {
    mean = to_doubles(running_mean, g.C, 0.0);
    var = to_doubles(running_var, g.C, 1.0);
  }
  cpu::ForwardArgs args{input.scalar_type(),
                        g,
                        input.const_data_ptr(),
                        has_res ? residual->const_data_ptr() : nullptr,
                        out.mutable_data_ptr(),
                        w.data(),
                        b.data(),
                        mean.data(),
                        var.data(),
                        training,
                        eps,
                        relu,
                        stream_stores(out)};
  cpu::kernels().forward(args);
  return {out, stats_tensor(mean, input), stats_tensor(var, input)};
}

BackwardResult bn_act_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   const OptTensor& output, const OptTensor& weight,
                                   const OptTensor& bias, const at::Tensor& mean_t,
                                   const at::Tensor& var_t, bool training, double eps, bool relu,
                                   bool has_residual) {
  check_backward_args(grad_output, input, output, mean_t, var_t, relu, has_residual);
  TORCH_CHECK(input.device().is_cpu(), "fastres: the cpu backend needs CPU tensors, got ",
              input.device());
  const cpu::Geometry g = geometry_of(input);
  const std::vector<double> mean = to_doubles(mean_t, g.C, 0.0), var = to_doubles(var_t, g.C, 1.0);
  const std::vector<double> w = to_doubles(weight, g.C, 1.0), b = to_doubles(bias, g.C, 0.0);
  const bool has_out = output.has_value() && output->defined();

  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_residual =
      has_residual ? at::empty_like(input) : at::empty({0}, input.options());
  std::vector<double> sum_g(g.C, 0.0), sum_gx(g.C, 0.0), gw(g.C, 0.0);
  cpu::BackwardArgs args{input.scalar_type(),
                         g,
                         grad_output.const_data_ptr(),
                         input.const_data_ptr(),
                         has_out ? output->const_data_ptr() : nullptr,
                         grad_input.mutable_data_ptr(),
                         has_residual ? grad_residual.mutable_data_ptr() : nullptr,
                         w.data(),
                         b.data(),
                         mean.data(),
                         var.data(),
                         training,
                         eps,
                         relu,
                         sum_g.data(),
                         sum_gx.data(),
                         gw.data(),
                         stream_stores(grad_input)};
  cpu::kernels().backward(args);
  // the bias's gradient is sum_g
  return {grad_input, grad_residual, stats_tensor(gw, input), stats_tensor(sum_g, input)};
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace fastres
