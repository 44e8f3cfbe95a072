// fastres::bn_act: the whole fused BatchNorm(+add)(+ReLU) call of an eager forward in one
// operator: the input made dense, fastres::bn_act_forward (through the dispatcher, so its
// autograd and device kernel run), and in training the update of the running statistics and of
// num_batches_tracked, as nn.BatchNorm2d does them.
//
// The Python version of the same steps (fastres/ops/batch_norm_act.py: batch_norm_act) costs
// some 30 us of interpreter time per call (a layout test, the forward op, five small ATen ops
// for the statistics), as much as the fused kernel itself on a small CPU batch. That Python
// version stays the one torch.compile and the exporters trace; this operator is what eager
// calls. It is CompositeImplicitAutograd: anything that traces it sees bn_act_forward and ATen
// ops. Running statistics of plain CPU tensors (float32/float64, no tracing mode, no tensor
// subclass) are updated by one loop over C; anything else by the ATen ops the Python version
// runs.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "batch_norm_act.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// contiguous or dense channels-last, the two layouts the kernels take; else a contiguous copy
at::Tensor dense_layout(const at::Tensor& t) {
  if (t.is_contiguous() || fastres::is_channels_last_dense(t)) return t;
  return t.contiguous();
}

at::Tensor same_strides(const at::Tensor& t, const at::Tensor& ref) {
  if (t.sym_strides() == ref.sym_strides()) return t;
  at::Tensor out = at::empty_like(ref);
  out.copy_(t);
  return out;
}

// a real CPU tensor this code may write through its data pointer: no tracing mode, no
// tensor subclass or functionalization wrapper, float32/float64, contiguous
bool plain_cpu(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || !t.has_storage() ||
      !t.is_contiguous())
    return false;
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) return false;
  const auto ks = t.key_set();
  return !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::Functionalize) &&
         !ks.has(c10::DispatchKey::FuncTorchBatched) && !ks.has(c10::DispatchKey::Conjugate) &&
         !ks.has(c10::DispatchKey::Negative);
}

template <typename R, typename S>
void blend(R* running, const S* batch, int64_t C, double keep, double take, double scale) {
  for (int64_t c = 0; c < C; ++c)
    running[c] = static_cast<R>(keep * static_cast<double>(running[c]) +
                                take * scale * static_cast<double>(batch[c]));
}

// running = (1 - f) * running + f * batch (variance: the unbiased batch variance), in double
// and rounded once; the version counters are bumped as an in-place ATen op would
void blend_cpu(at::Tensor& running, const at::Tensor& batch, double f, double scale) {
  const int64_t C = running.numel();
  if (running.scalar_type() == at::kFloat && batch.scalar_type() == at::kFloat)
    blend(running.mutable_data_ptr<float>(), batch.const_data_ptr<float>(), C, 1.0 - f, f, scale);
  else if (running.scalar_type() == at::kFloat)
    blend(running.mutable_data_ptr<float>(), batch.const_data_ptr<double>(), C, 1.0 - f, f, scale);
  else if (batch.scalar_type() == at::kFloat)
    blend(running.mutable_data_ptr<double>(), batch.const_data_ptr<float>(), C, 1.0 - f, f, scale);
  else
    blend(running.mutable_data_ptr<double>(), batch.const_data_ptr<double>(), C, 1.0 - f, f,
          scale);
  running.unsafeGetTensorImpl()->bump_version();
}

void update_running_stats(at::Tensor running_mean, at::Tensor running_var,
                          const OptTensor& num_batches_tracked, const at::Tensor& mean,
                          const at::Tensor& var, std::optional<double> momentum, int64_t count) {
  at::NoGradGuard no_grad;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const bool counter = defined(num_batches_tracked);
  const bool fast = c10::impl::TorchDispatchModeTLS::stack_len() == 0 && plain_cpu(running_mean) &&
                    plain_cpu(running_var) && plain_cpu(mean) && plain_cpu(var) &&
                    (!counter || (num_batches_tracked->device().is_cpu() &&
                                  !num_batches_tracked->key_set().has(c10::DispatchKey::Python)));
  if (fast) {
    if (counter) num_batches_tracked->add_(1);
    double f;
    if (momentum.has_value()) {
      f = *momentum;
    } else {  // cumulative moving average: 1 / num_batches_tracked (after the increment)
      TORCH_CHECK(counter, "fastres: momentum=None needs the num_batches_tracked counter");
      f = 1.0 / num_batches_tracked->item<double>();
    }
    blend_cpu(running_mean, mean, f, 1.0);
    blend_cpu(running_var, var, f, unbias);
    return;
  }
  // the ATen ops of the Python version (any device, any tracing)
  if (counter) num_batches_tracked->add_(1);
  at::Tensor unbiased = var * unbias;
  if (!momentum.has_value()) {
    TORCH_CHECK(counter, "fastres: momentum=None needs the num_batches_tracked counter");
    at::Tensor f = at::reciprocal(num_batches_tracked->to(mean.scalar_type()));
    running_mean.mul_(1 - f).add_(mean * f);
    running_var.mul_(1 - f).add_(unbiased * f);
  } else {
    running_mean.mul_(1 - *momentum).add_(mean, *momentum);
    running_var.mul_(1 - *momentum).add_(unbiased, *momentum);
  }
}

at::Tensor bn_act(const at::Tensor& input_, const OptTensor& residual_, const OptTensor& weight,
                  const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, const OptTensor& num_batches_tracked,
                  bool training, std::optional<double> momentum, double eps, bool relu) {
  static auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastres::bn_act_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, bool, double, bool)>();
  const at::Tensor input = dense_layout(input_);
  OptTensor residual;
  if (defined(residual_)) residual = same_strides(*residual_, input);
  auto [out, mean, var] =
      forward.call(input, residual, weight, bias, running_mean, running_var, training, eps, relu);
  if (training && defined(running_mean)) {
    TORCH_CHECK(defined(running_var), "fastres: give both running_mean and running_var, or neither");
    // elements per channel (N * H * W); a concrete number even under symbolic shapes, where
    // the unbiased-variance factor specialises on it
    const c10::SymInt C = input.sym_size(1);
    const int64_t count = C == 0 ? 0 : (input.sym_numel() / C).guard_int(__FILE__, __LINE__);
    update_running_stats(*running_mean, *running_var, num_batches_tracked, mean, var, momentum,
                         count);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  // relu?(batch_norm(input) + residual?) with nn.BatchNorm2d's running-statistics update (in
  // place, training only) and num_batches_tracked increment: what fastres.functional runs in
  // eager mode (see the top of this file)
  m.def(
      "bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "bool training, float? momentum, float eps, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastres, CompositeImplicitAutograd, m) { m.impl("bn_act", &bn_act); }
