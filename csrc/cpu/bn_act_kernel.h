// Vectorised CPU kernels of the fused BatchNorm(+add)(+ReLU) op: the interface between the
// operator (batch_norm_act_cpu.cpp: argument checks, tensors) and the kernels, which are built
// once per CPU capability (bn_act_kernel.inc, included by bn_act_kernel_{default,avx2,avx512}.cpp)
// and picked at run time from ATen's CPU capability (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), as ATen's own DispatchStub picks its kernels.
//
// Nothing here depends on at::vec, so this header is safe to include anywhere.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastres {
namespace cpu {

// "NCHW": N x C x S contiguous. "NHWC" (channels_last, and every 2-D input): M = N*S rows of
// C contiguous channels.
struct Geometry {
  bool channels_last;
  int64_t N, C, S, M;
  int64_t count() const { return N * S; }
};

// Per-channel parameters are passed as double arrays of C (weight 1 and bias 0 filled in when
// absent). The kernels compute in float (double for double input) and accumulate in double.
struct ForwardArgs {
  c10::ScalarType dtype;
  Geometry g;
  const void* x;
  const void* residual;  // may be null
  void* y;
  const double* weight;
  const double* bias;
  // eval: in, the running statistics; training: out, the batch mean and biased variance,
  // rounded to the statistics dtype (float, double for double input), as returned.
  double* mean;
  double* var;
  bool training;
  double eps;
  bool relu;
  // the elementwise pass may store y streaming (non-temporal, past the caches): see
  // stream_stores() in batch_norm_act_cpu.cpp
  bool stream_stores;
};

struct BackwardArgs {
  c10::ScalarType dtype;
  Geometry g;
  const void* dy;
  const void* x;
  const void* y;  // the forward output (its sign is the ReLU mask), or null: recomputed from x
  void* dx;
  void* dr;  // grad_residual, or null
  const double* weight;
  const double* bias;
  const double* mean;  // as the forward returned them
  const double* var;
  bool training;
  double eps;
  bool relu;
  double* sum_g;   // out [C]: sum of the masked gradient
  double* sum_gx;  // out [C]: sum of masked gradient * (x - mean)
  double* grad_weight;  // out [C]: sum_gx / sqrt(var + eps), as sum_gx * (1 / sqrt(var + eps))
  bool stream_stores;   // dx and dr may be stored streaming (as ForwardArgs::stream_stores)
};

struct Kernels {
  const char* capability;
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
};

// One per capability; null where that capability was not built (not x86-64, not GCC/Clang).
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// The kernels for this machine (ATen's CPU capability; the best one built that does not exceed it).
const Kernels& kernels();

}  // namespace cpu
}  // namespace fastres
