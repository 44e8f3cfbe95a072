"""A plain against a streaming (non-temporal) AVX512 store loop: y = 1.5 * x over 6.4 MB and
1.6 MB float tensors, 2 threads, rotating through 8 buffer pairs (more than the 32 MiB L3, so
every output line starts out of the caches) and on one pair ("hot", alternating with the other
variant). Needs a compiler with AVX512 (torch.utils.cpp_extension.load_inline).

    python docs/cpu/2026-12-03-stream-stores-micro.py
"""
import torch, time, statistics
from torch.utils.cpp_extension import load_inline
from fastres.bench.heap import keep_freed_memory
keep_freed_memory()
src = r'''
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
void scale_store(torch::Tensor x, torch::Tensor y, bool nt) {
  const float* a = x.data_ptr<float>(); float* b = y.data_ptr<float>();
  int64_t n = x.numel();
  at::parallel_for(0, n / 16, 2048, [&](int64_t i0, int64_t i1) {
    __m512 s = _mm512_set1_ps(1.5f);
    if (nt) for (int64_t i = i0; i < i1; ++i) _mm512_stream_ps(b + i * 16, _mm512_mul_ps(_mm512_loadu_ps(a + i * 16), s));
    else for (int64_t i = i0; i < i1; ++i) _mm512_storeu_ps(b + i * 16, _mm512_mul_ps(_mm512_loadu_ps(a + i * 16), s));
  });
  if (nt) _mm_sfence();
}
'''
mod = load_inline("ntstore", cpp_sources=src, functions=["scale_store"], extra_cflags=["-O3", "-mavx512f"], verbose=False)
for mb in (6.4, 1.6):
    n = int(mb * 1e6 / 4) // 64 * 64
    K = 8  # rotate buffers: working set > L3
    xs = [torch.randn(n) for _ in range(K)]; ys = [torch.empty(n) for _ in range(K)]
    res = {False: [], True: []}
    for r in range(60):
        for nt in (False, True):
            i = r % K
            t0 = time.perf_counter(); mod.scale_store(xs[i], ys[i], nt); res[nt].append(time.perf_counter() - t0)
    for nt in (False, True):
        t = statistics.median(res[nt])
        print(f"{mb}MB rotating {K} buffers nt={nt}: {t*1e6:.1f}us  {2*n*4/t/1e9:.1f} GB/s")
    # hot: same buffer
    res = {False: [], True: []}
    for r in range(200):
        for nt in (False, True):
            t0 = time.perf_counter(); mod.scale_store(xs[0], ys[0], nt); res[nt].append(time.perf_counter() - t0)
    for nt in (False, True):
        t = statistics.median(res[nt])
        print(f"{mb}MB hot nt={nt}: {t*1e6:.1f}us")
