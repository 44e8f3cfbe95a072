// fastres._C.bn_act_eager (csrc/bn_act_python.cpp): the unboxed entry of fastres.functional's
// eager CPU calls, bound into the extension's Python module by csrc/ops.cpp.
#pragma once

#include <torch/extension.h>

namespace fastres {

void bind_bn_act_eager(pybind11::module& m);

}  // namespace fastres
