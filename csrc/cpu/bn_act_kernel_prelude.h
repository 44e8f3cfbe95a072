// Headers of bn_act_kernel.inc that do not depend on the CPU capability. The per-capability
// files include this before they switch the compiler's target on, so the inline functions of
// these headers (std::vector, c10, at::parallel_for, ...) are compiled for the baseline
// target in every file, and the linker can never pick an AVX-512 copy of one of them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bn_act_kernel.h"
