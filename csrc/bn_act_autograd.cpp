// Autograd of fastres::bn_act_forward, in C++ (TORCH_LIBRARY_IMPL(fastres, Autograd, ...)).
//
// A Python autograd registration (torch.library.register_autograd) costs some 100 us per
// forward + backward in Python glue: more than the whole fused kernel on a small CPU batch
// (2 x 512 x 7 x 7), where eager PyTorch's separate ops, whose autograd is C++, then win. Here
// the forward saves what the backward needs and the backward calls fastres::bn_act_backward
// through the dispatcher, so any device's kernel (CPU, CUDA) runs below it. torch.compile
// traces through it like through any C++ autograd kernel (AOTAutograd records the forward and
// the backward ops).
//
// Saved: input, weight, bias, the batch mean and variance (or the running ones in eval), and
// the output only where the ReLU mask cannot be recomputed from them (ReLU after a residual
// add): as the Python registration did, so the backward keeps no more memory than before.
// A gradient of the gradient is refused by fastres::bn_act_backward's own autograd
// (registered from Python): with create_graph the backward op is called through autograd.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double eps, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastres::bn_act_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, bool, double,
                           bool)>();
  return op.call(input, residual, weight, bias, running_mean, running_var, training, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const OptTensor& output,
    const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& var, bool training, double eps, bool relu, bool has_residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastres::bn_act_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, bool, double, bool, bool)>();
  return op.call(grad_output, input, output, weight, bias, mean, var, training, eps, relu,
                 has_residual);
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// `t` with the strides of `ref` (the kernels read the gradient in the input's layout)
at::Tensor same_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  auto out = at::empty_like(ref);
  out.copy_(t);
  return out;
}

class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptTensor& residual, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, var] =
        call_forward(input, residual, weight, bias, running_mean, running_var, training, eps,
                     relu);
    const bool has_residual = residual.has_value() && residual->defined();
    const bool keep_out = relu && has_residual;
    ctx->save_for_backward({input, keep_out ? out : at::Tensor(),
                            weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean,
                            var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = has_residual;
    ctx->mark_non_differentiable({mean, var});
    // mean and var never get a gradient: left undefined instead of two zero [C] tensors
    // allocated and filled on every backward
    ctx->set_materialize_grads(false);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& out = saved[1];
    const at::Tensor& weight = saved[2];
    const at::Tensor& bias = saved[3];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(input);
    grad_out = same_layout(grad_out, input);

    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph: through the backward op's autograd, which refuses a double backward
      r = call_backward(grad_out, input, opt(out), opt(weight), opt(bias), saved[4], saved[5],
                        training, eps, relu, has_residual);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      r = call_backward(grad_out, input, opt(out), opt(weight), opt(bias), saved[4], saved[5],
                        training, eps, relu, has_residual);
    }
    auto& [grad_input, grad_residual, grad_weight, grad_bias] = r;
    return {grad_input,
            has_residual ? grad_residual : at::Tensor(),
            weight.defined() ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            bias.defined() ? grad_bias.to(bias.scalar_type()) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_autograd(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double eps, bool relu) {
  auto r = BnActFunction::apply(input, residual, weight, bias, running_mean, running_var,
                                training, eps, relu);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, Autograd, m) {
  m.impl("bn_act_forward", &bn_act_forward_autograd);
}
