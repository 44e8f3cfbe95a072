// fastres._C.tensor_state (csrc/tensor_state.cpp), bound into the extension's Python module by
// csrc/ops.cpp.
#pragma once

#include <torch/extension.h>

namespace fastres {

void bind_tensor_state(pybind11::module& m);

}  // namespace fastres
