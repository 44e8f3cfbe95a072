// The kernels of bn_act_kernel.inc for ATen's AVX512 capability, compiled for that target with
// a target pragma (the flags of ATen's own AVX512 kernels), so the build itself stays portable:
// they run only where at::get_cpu_capability() says AVX512 (bn_act_kernel_select.cpp).
#include "bn_act_kernel_prelude.h"

// GCC only: clang's target attribute does not define the __AVX2__/__AVX512F__ macros the
// at::vec headers test, so a clang build keeps the DEFAULT kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ does not define the ISA macros after a target pragma (C++ is preprocessed ahead
// of parsing): sleef.h, which at::vec includes, declares its vector functions only
// under them, so they are defined around its inclusion here.
#ifndef __AVX__
#define __AVX__ 1
#define FASTRES_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define FASTRES_UNDEF_AVX2
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define FASTRES_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef FASTRES_UNDEF_AVX
#undef __AVX__
#undef FASTRES_UNDEF_AVX
#endif
#ifdef FASTRES_UNDEF_AVX2
#undef __AVX2__
#undef FASTRES_UNDEF_AVX2
#endif
#ifdef FASTRES_UNDEF_AVX512F
#undef __AVX512F__
#undef FASTRES_UNDEF_AVX512F
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FASTRES_CAPABILITY_NAME "AVX512"
#include "bn_act_kernel.inc"
#pragma GCC pop_options

namespace fastres {
namespace cpu {
const Kernels* kernels_avx512() { return AVX512::get(); }
}  // namespace cpu
}  // namespace fastres

#else
namespace fastres {
namespace cpu {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace fastres
#endif
