// fastres._C.bn_act_eager: the fast entry of fastres.functional's fused ops for eager CPU calls.
//
// Through Python, batch_norm_relu(x, ...) costs some 20 us before the kernels start: the
// argument checks (fastres/functional.py: _check, some 8 us), the backend and tracing tests
// of fastres.ops.batch_norm_act, and a boxed call of torch.ops.fastres.bn_act (every argument
// converted to an IValue). On a small CPU batch that is a tenth of a training step's forward
// and backward. This function tests the same conditions in C++ and calls fastres::bn_act
// through the dispatcher, unboxed (autograd, Python dispatch modes and the CPU kernels run as
// they would from Python).
//
// It only says yes: whenever an argument is anything but what _check accepts (a wrong dtype,
// shape or device, a non-tensor, a tensor subclass, a torch function mode, an empty
// input, a non-CPU tensor), it returns None and the caller takes the Python path, which raises
// the documented error or handles the case. So the errors and their messages stay those of
// fastres/functional.py.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "bn_act_python.h"

namespace py = pybind11;

namespace {

using OptTensor = std::optional<at::Tensor>;

// a torch.Tensor or nn.Parameter (not a subclass, which may override __torch_function__),
// with no torch function mode active
bool plain_tensor(py::handle h) {
  return THPVariable_CheckExact(h.ptr()) && !at::impl::torch_function_mode_enabled();
}

// None, or a plain tensor (unpacked into `out`)
bool optional_tensor(py::handle h, OptTensor& out) {
  if (h.is_none()) return true;
  if (!plain_tensor(h)) return false;
  out = THPVariable_Unpack(h.ptr());
  return true;
}

bool float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// a Python int or float (bool included, as isinstance(x, (int, float)) has it)
bool number(py::handle h, double& out) {
  if (!PyFloat_Check(h.ptr()) && !PyLong_Check(h.ptr())) return false;
  out = PyFloat_AsDouble(h.ptr());
  if (out == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    return false;
  }
  return true;
}

// the conditions of fastres.functional._check (all of them hold), for CPU tensors
bool accepted(const at::Tensor& x, const OptTensor& residual, const OptTensor& running_mean,
              const OptTensor& running_var, const OptTensor& weight, const OptTensor& bias,
              bool training, bool has_momentum, const OptTensor& num_batches_tracked) {
  if (!x.device().is_cpu() || x.layout() != at::kStrided || !float_dtype(x.scalar_type()) ||
      x.dim() < 2 || x.numel() == 0)
    return false;
  const int64_t c = x.size(1);
  if (residual.has_value() &&
      (residual->sizes() != x.sizes() || !residual->device().is_cpu() ||
       residual->scalar_type() != x.scalar_type()))
    return false;
  for (const OptTensor* t : {&running_mean, &running_var, &weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    if (p.dim() != 1 || p.size(0) != c || !p.device().is_cpu() ||
        (p.scalar_type() != at::kFloat && p.scalar_type() != x.scalar_type()))
      return false;
  }
  if (running_mean.has_value() != running_var.has_value()) return false;
  if (!training && !running_mean.has_value()) return false;
  if (training) {
    if (x.numel() / c == 1) return false;
    if (!has_momentum && running_mean.has_value() && !num_batches_tracked.has_value())
      return false;
  }
  return true;
}

py::object bn_act_eager(py::handle input, py::handle residual, py::handle running_mean,
                        py::handle running_var, py::handle weight, py::handle bias,
                        py::handle training, py::handle momentum, py::handle eps,
                        py::handle num_batches_tracked, bool relu) {
  HANDLE_TH_ERRORS
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastres::bn_act", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, bool, std::optional<double>, double,
                                         bool)>();
  if (!plain_tensor(input) || !PyBool_Check(training.ptr())) return py::none();
  const at::Tensor x = THPVariable_Unpack(input.ptr());
  OptTensor r, rm, rv, w, b, nbt;
  if (!optional_tensor(residual, r) || !optional_tensor(running_mean, rm) ||
      !optional_tensor(running_var, rv) || !optional_tensor(weight, w) ||
      !optional_tensor(bias, b) || !optional_tensor(num_batches_tracked, nbt))
    return py::none();
  std::optional<double> mom;
  double value, e;
  if (!momentum.is_none()) {
    if (!number(momentum, value)) return py::none();
    mom = value;
  }
  if (!number(eps, e)) return py::none();
  const bool train = training.ptr() == Py_True;
  if (!accepted(x, r, rm, rv, w, b, train, mom.has_value(), nbt)) return py::none();
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(x, r, w, b, rm, rv, nbt, train, mom, e, relu);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

namespace fastres {

void bind_bn_act_eager(py::module& m) {
  m.def("bn_act_eager", &bn_act_eager,
        "fastres::bn_act for eager CPU calls of fastres.functional when every argument is one "
        "it accepts; else None (the caller takes the Python path)",
        py::arg("input"), py::arg("residual"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("weight"), py::arg("bias"), py::arg("training"), py::arg("momentum"),
        py::arg("eps"), py::arg("num_batches_tracked"), py::arg("relu"));
}

}  // namespace fastres
