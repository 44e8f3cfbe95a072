// Portable C++ implementation of fastres::bn_act_forward / bn_act_backward.
//
// Always built, so every op runs (and is tested) on a machine without a GPU. Reductions
// accumulate in double and are deterministic (fixed chunking, fixed combine order); the
// elementwise passes compute in float (double for double input), like PyTorch's CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "batch_norm_act.h"

namespace fastres {
namespace {

// "NCHW": N x C x S contiguous. "NHWC": M = N*S rows of C contiguous channels.
struct Layout {
  bool channels_last;
  int64_t N, C, S, M;
  int64_t count() const { return N * S; }
};

Layout layout_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N * C == 0) ? 0 : x.numel() / (N * C);
  return {uses_channels_last(x), N, C, S, N * S};
}

// Sum K per-element quantities per channel: f(c, offset, acc) adds into acc[0..K).
// Returns a [C][K] array. Deterministic for a given thread count and shape.
template <int K, typename F>
std::vector<double> channel_sums(const Layout& L, const F& f) {
  std::vector<double> out(static_cast<size_t>(K * L.C), 0.0);
  if (L.count() == 0) return out;
  if (!L.channels_last) {
    at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double acc[K] = {};
        for (int64_t n = 0; n < L.N; ++n) {
          const int64_t base = (n * L.C + c) * L.S;
          for (int64_t s = 0; s < L.S; ++s) f(c, base + s, acc);
        }
        for (int k = 0; k < K; ++k) out[c * K + k] = acc[k];
      }
    });
    return out;
  }
  // Rows are split into a fixed number of chunks, each with its own [C][K] partials.
  const int64_t chunks = std::min<int64_t>(L.M, 64);
  std::vector<double> part(static_cast<size_t>(chunks * K * L.C), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* acc = part.data() + b * K * L.C;
      const int64_t m0 = L.M * b / chunks, m1 = L.M * (b + 1) / chunks;
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t base = m * L.C;
        for (int64_t c = 0; c < L.C; ++c) f(c, base + c, acc + c * K);
      }
    }
  });
  for (int64_t b = 0; b < chunks; ++b)
    for (int64_t i = 0; i < K * L.C; ++i) out[i] += part[b * K * L.C + i];
  return out;
}

// Run f(c, offset) over every element, in parallel.
template <typename F>
void for_each_element(const Layout& L, const F& f) {
  if (L.count() == 0 || L.C == 0) return;
  if (!L.channels_last) {
    at::parallel_for(0, L.N * L.C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % L.C, base = p * L.S;
        for (int64_t s = 0; s < L.S; ++s) f(c, base + s);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L.C, 1));
    at::parallel_for(0, L.M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t base = m * L.C;
        for (int64_t c = 0; c < L.C; ++c) f(c, base + c);
      }
    });
  }
}

std::vector<double> to_doubles(const OptTensor& t, int64_t C, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(C, fill);
  at::Tensor d = t->to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return std::vector<double>(p, p + C);
}

template <typename opmath_t>
struct ScaleShift {
  std::vector<opmath_t> scale, shift;
};

// scale = w / sqrt(var + eps), shift = b - mean * scale. Shared by forward and the backward
// mask recompute so both see bit-identical pre-activations.
template <typename opmath_t>
ScaleShift<opmath_t> scale_shift(const std::vector<double>& mean, const std::vector<double>& var,
                                 const std::vector<double>& w, const std::vector<double>& b,
                                 double eps) {
  const size_t C = mean.size();
  ScaleShift<opmath_t> r{std::vector<opmath_t>(C), std::vector<opmath_t>(C)};
  for (size_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(var[c] + eps);
    const double scale = w[c] * invstd;
    r.scale[c] = static_cast<opmath_t>(scale);
    r.shift[c] = static_cast<opmath_t>(b[c] - mean[c] * scale);
  }
  return r;
}

at::Tensor stats_tensor(const std::vector<double>& v, const at::Tensor& like) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(stat_dtype(like));
}

// Mean and biased variance, two-pass (mean first, then sum of squared deviations).
template <typename scalar_t>
void batch_stats(const Layout& L, const scalar_t* x, std::vector<double>& mean,
                 std::vector<double>& var) {
  const double n = static_cast<double>(L.count());
  std::vector<double> sum =
      channel_sums<1>(L, [&](int64_t, int64_t i, double* a) { a[0] += static_cast<double>(x[i]); });
  mean.resize(L.C);
  for (int64_t c = 0; c < L.C; ++c) mean[c] = n > 0 ? sum[c] / n : 0.0;
  std::vector<double> m2 = channel_sums<1>(L, [&](int64_t c, int64_t i, double* a) {
    const double d = static_cast<double>(x[i]) - mean[c];
    a[0] += d * d;
  });
  var.resize(L.C);
  for (int64_t c = 0; c < L.C; ++c) var[c] = n > 0 ? m2[c] / n : 0.0;
}

}  // namespace

ForwardResult bn_act_forward_cpu(const at::Tensor& input, const OptTensor& residual,
                                 const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 bool training, double eps, bool relu) {
  check_forward_args(input, residual, weight, bias, running_mean, running_var, training);
  TORCH_CHECK(input.device().is_cpu(), "fastres: the cpu backend needs CPU tensors, got ",
              input.device());
  const Layout L = layout_of(input);
  at::Tensor out = at::empty_like(input);
  const bool has_res = residual.has_value() && residual->defined();
  std::vector<double> mean, var;
  const std::vector<double> w = to_doubles(weight, L.C, 1.0), b = to_doubles(bias, L.C, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_forward_cpu", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (training) {
      batch_stats(L, x, mean, var);
    } else {
      mean = to_doubles(running_mean, L.C, 0.0);
      var = to_doubles(running_var, L.C, 1.0);
    }
    const auto ss = scale_shift<opmath_t>(mean, var, w, b, eps);
    const scalar_t* r = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    for_each_element(L, [&](int64_t c, int64_t i) {
      opmath_t v = static_cast<opmath_t>(x[i]) * ss.scale[c] + ss.shift[c];
      if (r) v += static_cast<opmath_t>(r[i]);
      if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;  // torch.relu: NaN stays NaN
      y[i] = static_cast<scalar_t>(v);
    });
  });
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
  const Layout L = layout_of(input);
  const double n = static_cast<double>(L.count());
  const std::vector<double> mean = to_doubles(mean_t, L.C, 0.0), var = to_doubles(var_t, L.C, 1.0);
  const std::vector<double> w = to_doubles(weight, L.C, 1.0), b = to_doubles(bias, L.C, 0.0);
  const bool has_out = output.has_value() && output->defined();

  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_residual =
      has_residual ? at::empty_like(input) : at::empty({0}, input.options());
  std::vector<double> sums;  // [C][2]: sum(g), sum(g * (x - mean))

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_cpu", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* y = has_out ? output->const_data_ptr<scalar_t>() : nullptr;
    const auto ss = scale_shift<opmath_t>(mean, var, w, b, eps);
    // g = dy * relu'(out), as threshold_backward(dy, out, 0): 0 where out <= 0, dy elsewhere
    // (also where out is NaN). out is the saved output when there is one, else it is
    // recomputed from x exactly as the forward computed and stored it (rounded to scalar_t).
    auto masked_grad = [&](int64_t c, int64_t i) -> opmath_t {
      const opmath_t g = static_cast<opmath_t>(dy[i]);
      if (!relu) return g;
      const opmath_t out =
          y ? static_cast<opmath_t>(y[i])
            : static_cast<opmath_t>(static_cast<scalar_t>(
                  static_cast<opmath_t>(x[i]) * ss.scale[c] + ss.shift[c]));
      return out <= opmath_t(0) ? opmath_t(0) : g;
    };
    sums = channel_sums<2>(L, [&](int64_t c, int64_t i, double* a) {
      const double g = static_cast<double>(masked_grad(c, i));
      a[0] += g;
      a[1] += g * (static_cast<double>(x[i]) - mean[c]);
    });
    // grad_x = k1 * (g - mean_g - (x - mean) * k2) in training, k1 * g in eval.
    std::vector<opmath_t> k1(L.C), k2(L.C), mean_g(L.C), mu(L.C);
    for (int64_t c = 0; c < L.C; ++c) {
      const double invstd = 1.0 / std::sqrt(var[c] + eps);
      k1[c] = static_cast<opmath_t>(w[c] * invstd);
      mu[c] = static_cast<opmath_t>(mean[c]);
      mean_g[c] = static_cast<opmath_t>(training && n > 0 ? sums[2 * c] / n : 0.0);
      k2[c] = static_cast<opmath_t>(training && n > 0 ? invstd * invstd * sums[2 * c + 1] / n : 0.0);
    }
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* dr = has_residual ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    for_each_element(L, [&](int64_t c, int64_t i) {
      const opmath_t g = masked_grad(c, i);
      if (dr) dr[i] = static_cast<scalar_t>(g);
      if (!training) {  // x is not read: an inf or NaN input does not reach grad_input
        dx[i] = static_cast<scalar_t>(g * k1[c]);
        return;
      }
      const opmath_t xmu = static_cast<opmath_t>(x[i]) - mu[c];
      dx[i] = static_cast<scalar_t>((g - mean_g[c] - xmu * k2[c]) * k1[c]);
    });
  });

  std::vector<double> gw(L.C), gb(L.C);
  for (int64_t c = 0; c < L.C; ++c) {
    gb[c] = sums[2 * c];
    gw[c] = sums[2 * c + 1] / std::sqrt(var[c] + eps);
  }
  return {grad_input, grad_residual, stats_tensor(gw, input), stats_tensor(gb, input)};
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace fastres
