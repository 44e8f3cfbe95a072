// Convolution + BatchNorm fused through cuDNN's graph API (cudnn-frontend), the conv backend
// "cudnn-fused": the patterns of cuDNN's fused ResNet engines (MLPerf ResNet-50).
//
//   forward    X -> [* scale + shift -> ReLU] -> conv_fprop(W) -> Y, [genstats: sum, sum sq]
//   dgrad      dY -> conv_dgrad(W) -> dA; [P = X * scale + shift; dP = relu_bwd(dA, P)];
//              [dbn_weight(dP, X, mean, invstd, gamma) -> dgamma, dbeta, and the coefficients
//              of dX = a * dP + b * X + c, applied here with one ATen expression]
//   wgrad      X -> [* scale + shift -> ReLU] -> conv_wgrad(dY) -> dW
//   inference  X -> conv_fprop(W) -> + bias -> [+ R] -> [ReLU] -> Y
//
// All activations NHWC (channels-last), weights KRSC; scale/shift/statistics fp32 vectors.
// The prologue's scale and shift are computed here with the same ATen ops in forward and
// backward (rsqrt(var + eps) * gamma; beta - mean * scale), so the recomputed ReLU mask of the
// backward is that of the forward. Graphs are built once per (device, layer spec) and cached
// with their execution plan and workspace size. Host compiler only (no nvcc): the frontend is a
// C++ header library over cuDNN's backend API, which is linked from torch's cuDNN wheel.
#include <torch/extension.h>

#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <cudnn_frontend.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "../conv_bn_cudnn.h"

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace fastres::cudnn_fused {
namespace {

fe::DataType_t io_type(const std::string& dtype) {
  if (dtype == "float16") return fe::DataType_t::HALF;
  if (dtype == "bfloat16") return fe::DataType_t::BFLOAT16;
  if (dtype == "float32") return fe::DataType_t::FLOAT;
  TORCH_CHECK(false, "fastres cudnn-fused: dtype must be float16, bfloat16 or float32, got ",
              dtype);
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: TORCH_CHECK(false, "fastres cudnn-fused: unsupported dtype ", t,
                         " (float16, bfloat16 or float32)");
  }
}

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad) {
  return (in + 2 * pad - k) / stride + 1;
}

// NHWC strides of an (N, C, H, W) tensor; KRSC of a (K, C, R, S) weight is the same formula
std::vector<int64_t> nhwc(const std::vector<int64_t>& d) {
  return {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
}

std::string spec_key(const LayerSpec& s, int device) {
  std::ostringstream o;
  o << device << '|' << s.kind << '|' << s.dtype << '|';
  for (auto v : s.x_shape) o << v << ',';
  o << '|';
  for (auto v : s.w_shape) o << v << ',';
  o << '|' << s.stride << '|' << s.padding << '|' << s.prologue << s.in_relu << s.stats
    << s.residual << s.relu;
  return o.str();
}

void check_spec(const LayerSpec& s) {
  TORCH_CHECK(s.kind == "forward" || s.kind == "dgrad" || s.kind == "wgrad" ||
                  s.kind == "inference",
              "fastres cudnn-fused: kind must be forward, dgrad, wgrad or inference, got '",
              s.kind, "'");
  TORCH_CHECK(s.x_shape.size() == 4 && s.w_shape.size() == 4,
              "fastres cudnn-fused: x_shape and w_shape must have 4 entries");
  TORCH_CHECK(s.x_shape[1] == s.w_shape[1], "fastres cudnn-fused: the input has ",
              s.x_shape[1], " channels but the weight expects ", s.w_shape[1]);
  TORCH_CHECK(s.stride >= 1 && s.padding >= 0, "fastres cudnn-fused: bad stride/padding");
  for (auto v : s.x_shape) TORCH_CHECK(v > 0, "fastres cudnn-fused: empty input shape");
  for (auto v : s.w_shape) TORCH_CHECK(v > 0, "fastres cudnn-fused: empty weight shape");
  TORCH_CHECK(out_size(s.x_shape[2], s.w_shape[2], s.stride, s.padding) > 0 &&
                  out_size(s.x_shape[3], s.w_shape[3], s.stride, s.padding) > 0,
              "fastres cudnn-fused: the convolution's output would be empty");
  io_type(s.dtype);
}

// A layer's graph and the tensors the caller binds at execution.
struct LayerGraph {
  fe::graph::Graph graph;
  // forward / inference / wgrad / dgrad inputs
  TensorAttr x, w, dy, scale, shift, bias, residual, mean, invstd, gamma;
  // outputs
  TensorAttr y, sum, sqsum, dx, dw, dgamma, dbeta, eq_dy, eq_x, eq_bias;
  int64_t workspace = 0;
  bool planned = false;
  std::string error;  // why plan building failed (cached too)
};

TensorAttr vec_tensor(fe::graph::Graph& g, const char* name, int64_t c) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_dim({1, c, 1, 1})
                      .set_stride({c, 1, c, c})
                      .set_data_type(fe::DataType_t::FLOAT));
}

TensorAttr act_tensor(fe::graph::Graph& g, const char* name, const std::vector<int64_t>& d) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_dim(d).set_stride(nhwc(d)));
}

std::unique_ptr<LayerGraph> make_graph(const LayerSpec& s) {
  check_spec(s);
  auto lg = std::make_unique<LayerGraph>();
  auto& g = lg->graph;
  auto io = io_type(s.dtype);
  g.set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const int64_t n = s.x_shape[0], c = s.x_shape[1], h = s.x_shape[2], w = s.x_shape[3];
  const int64_t k = s.w_shape[0], r = s.w_shape[2], q = s.w_shape[3];
  const std::vector<int64_t> x_dims{n, c, h, w};
  const std::vector<int64_t> y_dims{n, k, out_size(h, r, s.stride, s.padding),
                                    out_size(w, q, s.stride, s.padding)};
  const std::vector<int64_t> w_dims{k, c, r, q};
  using PW = fe::graph::Pointwise_attributes;
  auto pw = [](fe::PointwiseMode_t m) { return PW().set_mode(m); };

  // the prologue act(X) = relu?(X * scale + shift), for forward and wgrad
  auto prologue = [&](TensorAttr x) {
    lg->scale = vec_tensor(g, "scale", c);
    lg->shift = vec_tensor(g, "shift", c);
    auto a = g.pointwise(x, lg->scale, pw(fe::PointwiseMode_t::MUL));
    a = g.pointwise(a, lg->shift, pw(fe::PointwiseMode_t::ADD));
    if (s.in_relu) a = g.pointwise(a, pw(fe::PointwiseMode_t::RELU_FWD));
    return a;
  };
  auto conv_attrs = [&](auto attrs) {
    return attrs.set_padding({s.padding, s.padding})
        .set_stride({s.stride, s.stride})
        .set_dilation({1, 1})
        .set_compute_data_type(fe::DataType_t::FLOAT);
  };

  if (s.kind == "forward" || s.kind == "inference") {
    lg->x = act_tensor(g, "x", x_dims);
    lg->w = g.tensor(fe::graph::Tensor_attributes().set_name("w").set_dim(w_dims).set_stride(
        nhwc(w_dims)));
    auto a = (s.kind == "forward" && s.prologue) ? prologue(lg->x) : lg->x;
    auto y = g.conv_fprop(a, lg->w, conv_attrs(fe::graph::Conv_fprop_attributes()));
    if (s.kind == "forward") {
      y->set_output(true).set_dim(y_dims).set_stride(nhwc(y_dims)).set_data_type(io);
      lg->y = y;
      if (s.stats) {
        auto [sum, sqsum] = g.genstats(y, fe::graph::Genstats_attributes());
        sum->set_output(true).set_data_type(fe::DataType_t::FLOAT);
        sqsum->set_output(true).set_data_type(fe::DataType_t::FLOAT);
        lg->sum = sum;
        lg->sqsum = sqsum;
      }
    } else {
      lg->bias = vec_tensor(g, "bias", k);
      auto out = g.pointwise(y, lg->bias, pw(fe::PointwiseMode_t::ADD));
      if (s.residual) {
        lg->residual = act_tensor(g, "residual", y_dims);
        out = g.pointwise(out, lg->residual, pw(fe::PointwiseMode_t::ADD));
      }
      if (s.relu) out = g.pointwise(out, pw(fe::PointwiseMode_t::RELU_FWD));
      out->set_output(true).set_dim(y_dims).set_stride(nhwc(y_dims)).set_data_type(io);
      lg->y = out;
    }
  } else if (s.kind == "wgrad") {
    lg->x = act_tensor(g, "x", x_dims);
    lg->dy = act_tensor(g, "dy", y_dims);
    auto a = s.prologue ? prologue(lg->x) : lg->x;
    auto dw = g.conv_wgrad(lg->dy, a, conv_attrs(fe::graph::Conv_wgrad_attributes()));
    dw->set_output(true).set_dim(w_dims).set_stride(nhwc(w_dims)).set_data_type(io);
    lg->dw = dw;
  } else {  // dgrad
    lg->dy = act_tensor(g, "dy", y_dims);
    lg->w = g.tensor(fe::graph::Tensor_attributes().set_name("w").set_dim(w_dims).set_stride(
        nhwc(w_dims)));
    auto da = g.conv_dgrad(lg->dy, lg->w, conv_attrs(fe::graph::Conv_dgrad_attributes()));
    da->set_dim(x_dims).set_stride(nhwc(x_dims));
    if (!s.prologue) {
      da->set_output(true).set_data_type(io);
      lg->dx = da;
    } else {
      if (s.in_relu || s.stats) lg->x = act_tensor(g, "x", x_dims);  // only where it is read
      TensorAttr dp = da;
      if (s.in_relu) {
        lg->scale = vec_tensor(g, "scale", c);
        lg->shift = vec_tensor(g, "shift", c);
        auto p = g.pointwise(lg->x, lg->scale, pw(fe::PointwiseMode_t::MUL));
        p = g.pointwise(p, lg->shift, pw(fe::PointwiseMode_t::ADD));
        dp = g.pointwise(da, p, pw(fe::PointwiseMode_t::RELU_BWD));
      }
      dp->set_output(true).set_dim(x_dims).set_stride(nhwc(x_dims)).set_data_type(io);
      lg->dx = dp;  // dP: the gradient of the prologue's pre-activation
      if (s.stats) {  // dBN weight terms of a training-mode BatchNorm in the prologue
        lg->mean = vec_tensor(g, "mean", c);
        lg->invstd = vec_tensor(g, "invstd", c);
        lg->gamma = vec_tensor(g, "gamma", c);
        auto [dgamma, dbeta, eq_dy, eq_x, eq_bias] = g.dbn_weight(
            dp, lg->x, lg->mean, lg->invstd, lg->gamma, fe::graph::DBN_weight_attributes());
        for (auto& t : {dgamma, dbeta, eq_dy, eq_x, eq_bias}) {
          t->set_output(true).set_dim({1, c, 1, 1}).set_stride({c, 1, c, c}).set_data_type(
              fe::DataType_t::FLOAT);
        }
        lg->dgamma = dgamma;
        lg->dbeta = dbeta;
        lg->eq_dy = eq_dy;
        lg->eq_x = eq_x;
        lg->eq_bias = eq_bias;
      }
    }
  }
  return lg;
}

std::string validate(LayerGraph& lg) {
  auto st = lg.graph.validate();
  return st.is_good() ? std::string() : "validate: " + st.get_message();
}

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<LayerGraph>>& cache() {
  static std::unordered_map<std::string, std::shared_ptr<LayerGraph>> c;
  return c;
}

// The cached, planned graph of `spec` on the current device (lg->error says why not).
std::shared_ptr<LayerGraph> planned(const LayerSpec& spec) {
  const int device = c10::cuda::current_device();
  const std::string key = spec_key(spec, device);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache().find(key);
  if (it != cache().end()) return it->second;
  std::shared_ptr<LayerGraph> lg = make_graph(spec);  // throws on a bad spec: not cached
  std::string err = validate(*lg);
  if (err.empty()) {
    cudnnHandle_t handle = at::native::getCudnnHandle();
    auto& g = lg->graph;
    fe::error_t st = g.build_operation_graph(handle);
    if (st.is_bad()) err = "build_operation_graph: " + st.get_message();
    if (err.empty()) {
      st = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
      if (st.is_bad()) err = "create_execution_plans: " + st.get_message();
    }
    if (err.empty()) {
      st = g.check_support(handle);
      if (st.is_bad()) err = "check_support: " + st.get_message();
    }
    if (err.empty()) {
      st = g.build_plans(handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
      if (st.is_bad()) err = "build_plans: " + st.get_message();
    }
    if (err.empty()) {
      st = g.get_workspace_size(lg->workspace);
      if (st.is_bad()) err = "get_workspace_size: " + st.get_message();
    }
  }
  lg->error = err;
  lg->planned = err.empty();
  cache().emplace(key, lg);
  return lg;
}

void execute(LayerGraph& lg, std::unordered_map<TensorAttr, void*>& pack, const at::Tensor& like,
             const char* what) {
  cudnnHandle_t handle = at::native::getCudnnHandle();  // on the current stream
  at::Tensor ws = at::empty({std::max<int64_t>(lg.workspace, 1)},
                            like.options().dtype(at::kByte));
  auto st = lg.graph.execute(handle, pack, ws.data_ptr());
  TORCH_CHECK(st.is_good(), "fastres cudnn-fused: executing the ", what, " graph failed: ",
              st.get_message());
}

std::shared_ptr<LayerGraph> require(const LayerSpec& spec) {
  auto lg = planned(spec);
  TORCH_CHECK(lg->planned, "fastres cudnn-fused: cuDNN has no engine for the ", spec.kind,
              " graph of this layer (", lg->error, "); fastres.set_conv_backend('cudnn-fused') "
              "runs such layers on the 'cudnn' path: call this op only for layers that "
              "fastres.nn.conv_bn_chain.cudnn_fused_for() accepts");
  return lg;
}

// ------------------------------------------------------------------------------------------
// Operators
// ------------------------------------------------------------------------------------------
at::Tensor cl(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "fastres::", op, ": x and weight must be CUDA "
              "tensors (the cudnn-fused backend runs on a GPU), got ", x.device(), " and ",
              weight.device());
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "fastres::", op, ": x and weight must be 4-D");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastres::", op,
              ": x and weight must have one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.get_device() == weight.get_device(), "fastres::", op,
              ": x and weight are on different devices");
}

at::Tensor f32vec(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32 (scale, shift) with act = x * scale + shift == batch_norm(x); same ops as
// fastres.ops.conv_bn.prologue_scale_shift
std::pair<at::Tensor, at::Tensor> scale_shift(const std::optional<at::Tensor>& gamma,
                                              const std::optional<at::Tensor>& beta,
                                              const at::Tensor& mean, const at::Tensor& var,
                                              double eps) {
  at::Tensor scale = at::rsqrt(var.to(at::kFloat) + eps);
  if (gamma.has_value()) scale = scale * gamma->to(at::kFloat);
  at::Tensor shift = -mean.to(at::kFloat) * scale;
  if (beta.has_value()) shift = shift + beta->to(at::kFloat);
  return {scale.contiguous(), shift.contiguous()};
}

LayerSpec spec_of(const char* kind, const at::Tensor& x, const at::Tensor& w, int64_t stride,
                  int64_t padding) {
  LayerSpec s;
  s.kind = kind;
  s.x_shape = x.sizes().vec();
  s.w_shape = w.sizes().vec();
  s.stride = stride;
  s.padding = padding;
  s.dtype = dtype_name(x.scalar_type());
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_forward_cudnn(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& in_weight,
    const std::optional<at::Tensor>& in_bias, const std::optional<at::Tensor>& in_mean,
    const std::optional<at::Tensor>& in_var, int64_t stride, int64_t padding, double in_eps,
    bool in_relu, bool stats) {
  check_inputs(x_in, weight_in, "conv_bn_forward_cudnn");
  TORCH_CHECK(in_mean.has_value() == in_var.has_value(),
              "fastres::conv_bn_forward_cudnn: give both in_mean and in_var, or neither");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = cl(x_in), weight = cl(weight_in);
  LayerSpec s = spec_of("forward", x, weight, stride, padding);
  s.prologue = in_mean.has_value();
  s.in_relu = in_relu;
  s.stats = stats;
  auto lg = require(s);
  const int64_t k = weight.size(0);
  at::Tensor y = at::empty({x.size(0), k, out_size(x.size(2), weight.size(2), stride, padding),
                            out_size(x.size(3), weight.size(3), stride, padding)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sum = at::empty({stats ? k : 0}, f32), sqsum = at::empty({stats ? k : 0}, f32);
  std::unordered_map<TensorAttr, void*> pack{{lg->x, x.data_ptr()}, {lg->w, weight.data_ptr()},
                                             {lg->y, y.data_ptr()}};
  at::Tensor scale, shift;
  if (s.prologue) {
    std::tie(scale, shift) = scale_shift(in_weight, in_bias, *in_mean, *in_var, in_eps);
    pack[lg->scale] = scale.data_ptr();
    pack[lg->shift] = shift.data_ptr();
  }
  if (stats) {
    pack[lg->sum] = sum.data_ptr();
    pack[lg->sqsum] = sqsum.data_ptr();
  }
  execute(*lg, pack, x, "forward");
  return {y, sum, sqsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward_cudnn(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_var,
    int64_t stride, int64_t padding, double in_eps, bool in_relu, bool in_training,
    bool need_input, bool need_weight) {
  check_inputs(x_in, weight_in, "conv_bn_backward_cudnn");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = cl(x_in), weight = cl(weight_in);
  at::Tensor dy = cl(grad_out_in.to(x.scalar_type()));
  const bool prologue = in_mean.has_value();
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor scale, shift;
  if (prologue) std::tie(scale, shift) = scale_shift(in_weight, in_bias, *in_mean, *in_var, in_eps);

  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (need_weight) {
    LayerSpec s = spec_of("wgrad", x, weight, stride, padding);
    s.prologue = prologue;
    s.in_relu = in_relu;
    auto lg = require(s);
    grad_weight = at::empty(weight.sizes(), weight.options().memory_format(
                                                at::MemoryFormat::ChannelsLast));
    std::unordered_map<TensorAttr, void*> pack{
        {lg->x, x.data_ptr()}, {lg->dy, dy.data_ptr()}, {lg->dw, grad_weight.data_ptr()}};
    if (prologue) {
      pack[lg->scale] = scale.data_ptr();
      pack[lg->shift] = shift.data_ptr();
    }
    execute(*lg, pack, x, "wgrad");
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_gamma = at::empty({0}, f32), grad_beta = at::empty({0}, f32);
  if (need_input) {
    LayerSpec s = spec_of("dgrad", x, weight, stride, padding);
    s.prologue = prologue;
    s.in_relu = in_relu;
    s.stats = prologue && in_training;
    auto lg = require(s);
    at::Tensor dp = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    std::unordered_map<TensorAttr, void*> pack{
        {lg->dy, dy.data_ptr()}, {lg->w, weight.data_ptr()}, {lg->dx, dp.data_ptr()}};
    if (lg->x) pack[lg->x] = x.data_ptr();
    if (prologue && in_relu) {
      pack[lg->scale] = scale.data_ptr();
      pack[lg->shift] = shift.data_ptr();
    }
    const int64_t c = x.size(1);
    at::Tensor mean, invstd, gamma, coef;
    if (s.stats) {
      mean = f32vec(*in_mean);
      invstd = at::rsqrt(in_var->to(at::kFloat) + in_eps).contiguous();
      gamma = in_weight.has_value() ? f32vec(*in_weight) : at::ones({c}, f32);
      coef = at::empty({5, c}, f32);  // dgamma, dbeta, a, b, c
      pack[lg->mean] = mean.data_ptr();
      pack[lg->invstd] = invstd.data_ptr();
      pack[lg->gamma] = gamma.data_ptr();
      pack[lg->dgamma] = coef[0].data_ptr();
      pack[lg->dbeta] = coef[1].data_ptr();
      pack[lg->eq_dy] = coef[2].data_ptr();
      pack[lg->eq_x] = coef[3].data_ptr();
      pack[lg->eq_bias] = coef[4].data_ptr();
    }
    execute(*lg, pack, x, "dgrad");
    if (!prologue) {
      grad_x = dp;
    } else if (s.stats) {
      // dBNApply: dX = a * dP + b * X + c (fp32 math, one fused ATen expression per term)
      auto v = [&](int i) { return coef[i].view({1, c, 1, 1}); };
      grad_x = (dp.to(at::kFloat) * v(2) + x.to(at::kFloat) * v(3) + v(4)).to(x.scalar_type());
      grad_x = cl(grad_x);
      grad_gamma = coef[0].clone();
      grad_beta = coef[1].clone();
    } else {
      // eval-mode BatchNorm in the prologue: constants, dX = dP * scale
      at::Tensor dpf = dp.to(at::kFloat);
      grad_x = cl((dpf * scale.view({1, c, 1, 1})).to(x.scalar_type()));
      at::Tensor xhat = (x.to(at::kFloat) - in_mean->to(at::kFloat).view({1, c, 1, 1})) *
                        at::rsqrt(in_var->to(at::kFloat) + in_eps).view({1, c, 1, 1});
      grad_gamma = (dpf * xhat).sum({0, 2, 3});
      grad_beta = dpf.sum({0, 2, 3});
    }
  }
  return {grad_x, grad_weight, grad_gamma, grad_beta};
}

at::Tensor conv_bias_act_cudnn(const at::Tensor& x_in, const at::Tensor& weight_in,
                               const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                               int64_t stride, int64_t padding, bool relu) {
  check_inputs(x_in, weight_in, "conv_bias_act_cudnn");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = cl(x_in), weight = cl(weight_in);
  LayerSpec s = spec_of("inference", x, weight, stride, padding);
  s.residual = residual.has_value();
  s.relu = relu;
  auto lg = require(s);
  const int64_t k = weight.size(0);
  TORCH_CHECK(bias.numel() == k, "fastres::conv_bias_act_cudnn: bias must have ", k,
              " elements, got ", bias.numel());
  at::Tensor b = f32vec(bias);
  at::Tensor y = at::empty({x.size(0), k, out_size(x.size(2), weight.size(2), stride, padding),
                            out_size(x.size(3), weight.size(3), stride, padding)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::unordered_map<TensorAttr, void*> pack{{lg->x, x.data_ptr()}, {lg->w, weight.data_ptr()},
                                             {lg->bias, b.data_ptr()}, {lg->y, y.data_ptr()}};
  at::Tensor res;
  if (s.residual) {
    TORCH_CHECK(residual->sizes() == y.sizes(), "fastres::conv_bias_act_cudnn: residual shape ",
                residual->sizes(), " differs from the output's ", y.sizes());
    res = cl(residual->to(x.scalar_type()));
    pack[lg->residual] = res.data_ptr();
  }
  execute(*lg, pack, x, "inference");
  return y;
}

}  // namespace

std::string graph_check(const LayerSpec& spec) {
  auto lg = make_graph(spec);
  return validate(*lg);
}

std::string plan_check(const LayerSpec& spec) {
  TORCH_CHECK(c10::cuda::device_count() > 0, "fastres cudnn-fused: plan_check needs a CUDA device "
              "(graph_check validates graphs without one)");
  return planned(spec)->error;
}

std::string version_string() {
  std::ostringstream o;
  o << "cudnn-frontend " << CUDNN_FRONTEND_MAJOR_VERSION << '.' << CUDNN_FRONTEND_MINOR_VERSION
    << '.' << CUDNN_FRONTEND_PATCH_VERSION << ", cuDNN headers " << CUDNN_MAJOR << '.'
    << CUDNN_MINOR << '.' << CUDNN_PATCHLEVEL;
  return o.str();
}

}  // namespace fastres::cudnn_fused

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("conv_bn_forward_cudnn", &fastres::cudnn_fused::conv_bn_forward_cudnn);
  m.impl("conv_bn_backward_cudnn", &fastres::cudnn_fused::conv_bn_backward_cudnn);
  m.impl("conv_bias_act_cudnn", &fastres::cudnn_fused::conv_bias_act_cudnn);
}
