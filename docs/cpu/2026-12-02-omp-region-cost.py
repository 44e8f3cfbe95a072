"""What an OpenMP parallel region and a barrier cost on this machine: 2,000 rounds of four
5-us tasks on two threads as four at::parallel_for regions, as one region with four barriers,
and (for reference) two regions; `gap` us of serial work between rounds (the Python between
two ops). Microseconds per round beyond the gap; the ideal is 20 (10 for two regions).
Usage: python docs/cpu/2026-12-02-omp-region-cost.py (builds a small extension first)"""
import torch
from torch.utils.cpp_extension import load_inline
src = r'''
#include <ATen/Parallel.h>
#include <chrono>
#include <omp.h>
volatile double sink;
static void work(int us){ auto t0=std::chrono::steady_clock::now(); while(std::chrono::duration<double,std::micro>(std::chrono::steady_clock::now()-t0).count()<us){} }
double regions(int64_t iters, int64_t per, int64_t gap_us, int64_t work_us){
  auto t0=std::chrono::steady_clock::now();
  for(int64_t i=0;i<iters;i++){
    for(int r=0;r<per;r++) at::parallel_for(0,2,1,[&](int64_t a,int64_t b){ work(work_us); });
    work(gap_us);
  }
  return std::chrono::duration<double,std::micro>(std::chrono::steady_clock::now()-t0).count()/iters;
}
double barriers(int64_t iters, int64_t per, int64_t gap_us, int64_t work_us){
  auto t0=std::chrono::steady_clock::now();
  for(int64_t i=0;i<iters;i++){
    #pragma omp parallel num_threads(2)
    { for(int r=0;r<per;r++){ work(work_us);
      #pragma omp barrier
      } }
    work(gap_us);
  }
  return std::chrono::duration<double,std::micro>(std::chrono::steady_clock::now()-t0).count()/iters;
}
'''
m = load_inline("ompt", cpp_sources=src, functions=["regions","barriers"], extra_cflags=["-O2","-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
torch.set_num_threads(2)
for gap in (0, 20, 100):
  for _ in range(3):
    print("gap",gap,"4 regions of 5us: %.1f us | 1 region 4 barriers: %.1f us | 2 regions: %.1f"%(m.regions(2000,4,gap,5)-gap, m.barriers(2000,4,gap,5)-gap, m.regions(2000,2,gap,5)-gap))
