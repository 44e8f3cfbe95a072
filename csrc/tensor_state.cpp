// fastres._C.tensor_state: the data pointer and version counter of every tensor in a list of
// dictionaries (modules' _parameters and _buffers), packed into one bytes object.
//
// The fused models' CPU inference program (fastres/nn/inference_program.py) and the folded
// layers' plans (fastres/nn/conv_bn.py) run only while the parameters and statistics they were
// made from are unchanged: same tensor data (data pointer: `p.data = ...` changes it without a
// version bump) and no in-place change since (version). In Python that is two attribute reads
// and a tuple per tensor, some 40-150 us a call for ResNet-20's 114 tensors (more with cold
// caches); here one pass over the dictionaries in C, one object out, compared with == (memcmp).
//
// Returns None where a tensor has no version counter (an inference tensor, made under
// torch.inference_mode: its in-place changes cannot be seen, so nothing may be cached). A None
// value (a conv without bias) packs as (0, -1); anything else that is not a tensor raises.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "tensor_state.h"

namespace py = pybind11;

namespace {

py::object tensor_state(py::handle dicts) {
  PyObject* list = dicts.ptr();
  if (!PyList_Check(list)) throw py::type_error("tensor_state: expected a list of dicts");
  std::vector<int64_t> state;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  state.reserve(static_cast<size_t>(n) * 8);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(list, i);
    if (!PyDict_Check(d)) throw py::type_error("tensor_state: expected a list of dicts");
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(d, &pos, &key, &value)) {
      if (value == Py_None) {
        state.push_back(0);
        state.push_back(-1);
        continue;
      }
      if (!THPVariable_Check(value))
        throw py::type_error("tensor_state: a dictionary value is neither a tensor nor None");
      const at::Tensor& t = THPVariable_Unpack(value);
      if (t.is_inference()) return py::none();
      state.push_back(t.has_storage()
                          ? reinterpret_cast<int64_t>(t.const_data_ptr())
                          : 0);
      state.push_back(static_cast<int64_t>(t._version()));
    }
  }
  return py::bytes(reinterpret_cast<const char*>(state.data()),
                   state.size() * sizeof(int64_t));
}

}  // namespace

namespace fastres {

void bind_tensor_state(py::module& m) {
  m.def("tensor_state", &tensor_state,
        "The data pointer and version of every tensor in a list of dicts (None values as "
        "(0, -1)), packed as bytes; None where one is an inference tensor",
        py::arg("dicts"));
}

}  // namespace fastres
