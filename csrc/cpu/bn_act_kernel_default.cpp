// The kernels of bn_act_kernel.inc for ATen's DEFAULT capability (the compiler's baseline
// target; at::vec's portable Vectorized, which the compiler vectorises for that target).
#include "bn_act_kernel_prelude.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // the baseline of x86-64: ReLU and its mask on SSE2 registers
#endif

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define FASTRES_CAPABILITY_NAME "DEFAULT"
#include "bn_act_kernel.inc"

namespace fastres {
namespace cpu {
const Kernels* kernels_default() { return DEFAULT::get(); }
}  // namespace cpu
}  // namespace fastres
