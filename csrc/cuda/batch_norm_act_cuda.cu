// CUDA kernels of the fused BatchNorm(+residual add)(+ReLU) op (torch.ops.fastres).
//
// Views of the input (see batch_norm_act.h):
//   NHWC ("rows"):  [M, C] with the channel the fastest dim, M = numel / C.
//   NCHW ("planes"): [N, C, S] contiguous, S = prod(spatial).
//
// Forward (training):  stats kernel -> partial (mean, m2) per (split, channel)
//                      finalize kernel -> mean, var, scale, shift per channel
//                      apply kernel    -> out = relu?(x * scale + shift (+ residual))
// Forward (eval):      scale_shift kernel (from running stats) -> apply kernel
// Backward:            [scale_shift kernel, only to recompute the ReLU mask]
//                      reduce kernel   -> partial (sum g, sum g * (x - mean)) per (split, channel)
//                      finalize kernel -> grad_weight, grad_bias, grad_input coefficients
//                      elementwise     -> grad_input (+ grad_residual)
//
// Only c10 CUDA headers are used (not ATen/cuda/CUDAContext.h, which pulls in the cuSPARSE /
// cuBLAS / cuSOLVER headers that a bare CUDA toolkit may lack). c10::cuda::getCurrentCUDAStream
// is the function at::cuda::getCurrentCUDAStream names.
//
// All reductions are deterministic: every partial is produced by one block with a fixed
// shared-memory tree, and partials are merged in a fixed order (no float atomics).
// Accumulation is in float (double for double input). Element indices are int64.
//
// Desk check of the index math (kept as a reference for reviewers):
//  NHWC M=5, C=3, bf16: C % 8 != 0 -> V=1; TX=4 (pow2 >= 3), TY=64, tiles=1; U=8.
//    stats: splits=1 (5 rows < TY*U), rows_per_split=5, grid (1,1). Thread (tx,ty), tx<3 active,
//    rows ty, ty+64, ... < 5 -> threads ty=0..4 take one row each (tail loop, the full-batch
//    loop needs ty+7*64 < 5). Tree over ty merges them into ty=0, which writes part[0*3+tx].
//    finalize: FX=4, FY=64; thread (c, fy=0) merges split 0 with count min(5,5)-0 = 5.
//    apply: grid (1,1), row r=ty, stride 64; only u=0 of the U=8 batch is < 5.
//  NCHW N=2, C=3, S=5, fp32: S % 4 != 0 -> V=1, Sv=5, Q=N*Sv=10 per channel, U=8.
//    stats: grid (3, 1), chunk=10; thread t<10 takes q=t: n=q/5, s=q%5,
//    offset=((n*3)+c)*5+s (e.g. q=7, c=1 -> (3+1)*5+2 = 22 = element (1,1,2)).
//    step by 256: ds=256%5=1, jump=(256/5)*C*S+ds*V=766, wrap=(C-1)*S=10;
//    q=4 -> 260: s=4+1=5 wraps to 0, offset 5c+4+766+10 = 5c+780 = ((52*3)+c)*5 ✓.
//    apply: nvec=30, 1 block, G=256, j=tid: s=j%5, c=(j/5)%3; ds=G%5=1, dc=(G/5)%3=0;
//    j=4 -> 260: s wraps to 0, c=0+0+1=1 = (260/5)%3 = 52%3 ✓.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "batch_norm_act.h"

namespace fastres {

ForwardResult bn_act_forward_cuda(const at::Tensor& input, const OptTensor& residual,
                                  const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& running_mean, const OptTensor& running_var,
                                  bool training, double eps, bool relu);
BackwardResult bn_act_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    const OptTensor& output, const OptTensor& weight,
                                    const OptTensor& bias, const at::Tensor& mean,
                                    const at::Tensor& var, bool training, double eps, bool relu,
                                    bool has_residual);

namespace {

constexpr int kThreads = 256;   // threads per block of every kernel
// ptxas (CUDA 13.0) keeps a loop bound of the statistics kernels (every type) and of the fp64
// NCHW backward reduction on the stack at its default register target: 4 to 24 bytes of spill
// stores/loads, inside the main loop (python -m fastres.kernels.report shows them). Declaring
// at least one resident block per SM (the second __launch_bounds__ argument) removes them at
// +2 to +9 registers for the statistics kernels; 0 leaves the other kernels as they were.
template <typename acc_t>
constexpr int kSpillFreeMinBlocks = sizeof(acc_t) == 8 ? 1 : 0;
constexpr int kVecBytes = 16;   // widest vector access
constexpr int kMaxGridY = 65535;

constexpr int kMaskNone = 0;       // no ReLU
constexpr int kMaskOutput = 1;     // mask = !(output <= 0)
constexpr int kMaskRecompute = 2;  // mask = !(x * scale + shift <= 0), recomputed

// Items (rows in NHWC, vectors in NCHW) a thread loads before using them: enough bytes in
// flight per thread while keeping the register count moderate.
template <int V>
struct Unroll {
  static constexpr int kReduce = (8 / V) > 2 ? (8 / V) : 2;  // V=8,4:2  V=2:4  V=1:8
  static constexpr int kElem = V == 1 ? 4 : 1;
};

// ------------------------------------------------------------------------------------
// small device helpers
// ------------------------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Loads V consecutive T (aligned to sizeof(T) * V) and converts them to acc_t.
template <int V, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t* out) {
  const Vec<T, V> raw = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(raw.v[i]);
}

template <int V, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const acc_t* in) {
  Vec<T, V> raw;
#pragma unroll
  for (int i = 0; i < V; ++i) raw.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, V>*>(p) = raw;
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// 1 / sqrt(var + eps), IEEE division and square root (no rsqrt).
__device__ __forceinline__ float inv_std(float var, float eps) { return 1.0f / sqrtf(var + eps); }
__device__ __forceinline__ double inv_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Per-channel affine of the normalisation; the single definition used by the forward
// (training finalize and eval) and by the backward mask recompute so both agree bitwise.
template <typename acc_t>
__device__ __forceinline__ void affine_coeffs(acc_t mean, acc_t var, acc_t w, acc_t b, acc_t eps,
                                              acc_t& scale, acc_t& shift) {
  const acc_t invstd = inv_std(var, eps);
  scale = w * invstd;
  shift = fma_acc(-mean, scale, b);  // b - mean * scale, one rounding
}

// Pre-activation x * scale + shift with one rounding (forward output and backward mask).
template <typename acc_t>
__device__ __forceinline__ acc_t bn_affine(acc_t x, acc_t scale, acc_t shift) {
  return fma_acc(x, scale, shift);
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // propagates NaN like torch.relu
}

// ReLU-masked gradient as threshold_backward(g, out, 0): 0 where out <= 0, g elsewhere (also
// where out is NaN). o = forward output (kMaskOutput); for the recompute (kMaskRecompute) out
// is x * scale + shift rounded to T, exactly what the forward stored.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(acc_t g, int mode, acc_t o, acc_t x, acc_t scale,
                                             acc_t shift) {
  if (mode == kMaskOutput) return o <= acc_t(0) ? acc_t(0) : g;
  if (mode == kMaskRecompute) {
    const acc_t out = static_cast<acc_t>(static_cast<T>(bn_affine(x, scale, shift)));
    return out <= acc_t(0) ? acc_t(0) : g;
  }
  return g;
}

// ---- Welford / Chan ----------------------------------------------------------------

// One value into (mean, m2, n).
template <typename acc_t>
__device__ __forceinline__ void welford_one(acc_t& mean, acc_t& m2, acc_t& n, acc_t x) {
  n += acc_t(1);
  const acc_t delta = x - mean;
  mean += delta / n;
  m2 = fma_acc(delta, x - mean, m2);
}

// Chan's merge of (mean_b, m2_b, n_b) into (mean, m2, n); handles empty sides.
template <typename acc_t>
__device__ __forceinline__ void chan_merge(acc_t& mean, acc_t& m2, acc_t& n, acc_t mean_b,
                                           acc_t m2_b, acc_t n_b) {
  if (n_b == acc_t(0)) return;
  const acc_t n_ab = n + n_b;
  const acc_t frac = n_b / n_ab;  // 1 when n == 0 -> (mean_b, m2_b)
  const acc_t delta = mean_b - mean;
  mean = fma_acc(delta, frac, mean);
  m2 = m2 + m2_b + delta * delta * (n * frac);
  n = n_ab;
}

// K values of one channel (all valid) into (mean, m2, n): batch mean/m2, then Chan.
// K is a power of two, so the batch mean is an exact scaling of the sum.
template <int K, typename acc_t>
__device__ __forceinline__ void welford_batch(acc_t& mean, acc_t& m2, acc_t& n, const acc_t* v) {
  acc_t s = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) s += v[k];
  const acc_t bmean = s * (acc_t(1) / acc_t(K));
  acc_t bm2 = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t d = v[k] - bmean;
    bm2 = fma_acc(d, d, bm2);
  }
  chan_merge(mean, m2, n, bmean, bm2, acc_t(K));
}

// U rows of V channels (all valid) into per-channel states that share the count n.
template <int U, int V, typename acc_t>
__device__ __forceinline__ void welford_batch_rows(acc_t (&mean)[V], acc_t (&m2)[V], acc_t& n,
                                                   const acc_t (&v)[U][V]) {
  const acc_t n_ab = n + acc_t(U);
  const acc_t frac = acc_t(U) / n_ab;
  const acc_t na_frac = n * frac;  // n_a * n_b / n_ab
#pragma unroll
  for (int i = 0; i < V; ++i) {
    acc_t s = acc_t(0);
#pragma unroll
    for (int u = 0; u < U; ++u) s += v[u][i];
    const acc_t bmean = s * (acc_t(1) / acc_t(U));
    acc_t bm2 = acc_t(0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const acc_t d = v[u][i] - bmean;
      bm2 = fma_acc(d, d, bm2);
    }
    const acc_t delta = bmean - mean[i];
    mean[i] = fma_acc(delta, frac, mean[i]);
    m2[i] = m2[i] + bm2 + delta * delta * na_frac;
  }
  n = n_ab;
}

// ---- block reductions ----------------------------------------------------------------
// The block is TX x TY threads (TY a power of two); threads with the same tx own the same
// V channels and are merged over ty with a fixed tree. Every thread must call these (they
// contain __syncthreads). The result is valid in the registers of the ty == 0 threads.
// smem: (2 * V + 1) * TX * TY acc_t for Welford, 2 * V * TX * TY for sums.

template <int V, typename acc_t>
__device__ __forceinline__ void block_merge_welford(acc_t (&mean)[V], acc_t (&m2)[V], acc_t& n,
                                                    int tx, int ty, int TX, int TY,
                                                    acc_t* smem) {
  const int W = TX * V;
  acc_t* s_mean = smem;           // [TY][W]
  acc_t* s_m2 = smem + TY * W;    // [TY][W]
  acc_t* s_n = smem + 2 * TY * W; // [TY][TX]
#pragma unroll
  for (int i = 0; i < V; ++i) {
    s_mean[ty * W + tx * V + i] = mean[i];
    s_m2[ty * W + tx * V + i] = m2[i];
  }
  s_n[ty * TX + tx] = n;
  __syncthreads();
  for (int off = TY / 2; off > 0; off >>= 1) {
    // rows [off, 2 off) are read, rows [0, off) written: no overlap within a step.
    if (ty < off) {
      const int o = ty + off;
      const acc_t nb = s_n[o * TX + tx];
      if (nb != acc_t(0)) {
        const acc_t n_ab = n + nb;
        const acc_t frac = nb / n_ab;
        const acc_t na_frac = n * frac;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t delta = s_mean[o * W + tx * V + i] - mean[i];
          mean[i] = fma_acc(delta, frac, mean[i]);
          m2[i] = m2[i] + s_m2[o * W + tx * V + i] + delta * delta * na_frac;
        }
        n = n_ab;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          s_mean[ty * W + tx * V + i] = mean[i];
          s_m2[ty * W + tx * V + i] = m2[i];
        }
        s_n[ty * TX + tx] = n;
      }
    }
    __syncthreads();
  }
}

template <int V, typename acc_t>
__device__ __forceinline__ void block_merge_sum(acc_t (&a)[V], acc_t (&b)[V], int tx, int ty,
                                                int TX, int TY, acc_t* smem) {
  const int W = TX * V;
  acc_t* s_a = smem;         // [TY][W]
  acc_t* s_b = smem + TY * W;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    s_a[ty * W + tx * V + i] = a[i];
    s_b[ty * W + tx * V + i] = b[i];
  }
  __syncthreads();
  for (int off = TY / 2; off > 0; off >>= 1) {
    if (ty < off) {
      const int o = ty + off;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        a[i] += s_a[o * W + tx * V + i];
        b[i] += s_b[o * W + tx * V + i];
        s_a[ty * W + tx * V + i] = a[i];
        s_b[ty * W + tx * V + i] = b[i];
      }
    }
    __syncthreads();
  }
}

// Position of a vector inside the channel's N x Sv set of an NCHW tensor, advanced by a
// fixed stride of `kThreads` vectors without divisions:
//   q -> q + kThreads:  sv += ds (mod Sv, carry into the plane index n),
//   offset = ((n * C) + c) * S + sv * V  grows by jump, and by wrap more on a carry.
struct PlaneCursor {
  int64_t sv;      // vector index inside the plane, in [0, Sv)
  int64_t offset;  // element offset of the vector
  __device__ __forceinline__ void advance(int64_t Sv, int64_t ds, int64_t jump, int64_t wrap) {
    sv += ds;
    offset += jump;
    if (sv >= Sv) {
      sv -= Sv;
      offset += wrap;
    }
  }
};

struct NchwStep {  // host-computed constants of PlaneCursor::advance
  int64_t ds, jump, wrap;
};

// ------------------------------------------------------------------------------------
// forward kernels
// ------------------------------------------------------------------------------------

// NHWC statistics. Block (TX, TY): tx -> channel vector cv (channels cv*V .. cv*V+V-1),
// ty -> row lane. grid (ceil(C/V/TX), splits); split y owns rows
// [y * rows_per_split, min(M, (y+1) * rows_per_split)). Writes part_{mean,m2}[y * C + c].
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads, 1)  // see kSpillFreeMinBlocks
    nhwc_stats_kernel(const T* __restrict__ x, int64_t M, int64_t C, int64_t rows_per_split,
                      acc_t* __restrict__ part_mean, acc_t* __restrict__ part_m2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * TX + tx;
  const bool active = cv < C / V;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);

  acc_t mean[V], m2[V];
  acc_t n = acc_t(0);
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = acc_t(0);

  if (active) {
    const T* base = x + cv * V;
    int64_t r = row_begin + ty;
    // full batches: rows r, r + TY, ..., r + (U-1) TY all < row_end
    for (; r + static_cast<int64_t>(U - 1) * TY < row_end; r += static_cast<int64_t>(U) * TY) {
      acc_t v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) load_vec<V>(base + (r + static_cast<int64_t>(u) * TY) * C, v[u]);
      welford_batch_rows<U, V>(mean, m2, n, v);
    }
    // tail: fewer than U rows left for this thread
    for (; r < row_end; r += TY) {
      acc_t v[V];
      load_vec<V>(base + r * C, v);
      n += acc_t(1);
      const acc_t inv_n = acc_t(1) / n;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const acc_t delta = v[i] - mean[i];
        mean[i] = fma_acc(delta, inv_n, mean[i]);
        m2[i] = fma_acc(delta, v[i] - mean[i], m2[i]);
      }
    }
  }

  block_merge_welford<V>(mean, m2, n, tx, ty, TX, TY, smem);
  if (ty == 0 && active) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + cv * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      part_mean[o + i] = mean[i];
      part_m2[o + i] = m2[i];
    }
  }
}

// NCHW statistics. 1-D block of kThreads; grid (C, splits). Block (c, y) owns the vectors
// q in [y * chunk, min(Q, (y+1) * chunk)) of channel c, where q = n * Sv + sv enumerates
// the channel's N planes of Sv = S / V vectors. Writes part_{mean,m2}[y * C + c].
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads, 1)  // see kSpillFreeMinBlocks
    nchw_stats_kernel(const T* __restrict__ x, int64_t C, int64_t S, int64_t Q, int64_t chunk,
                      NchwStep step, acc_t* __restrict__ part_mean,
                      acc_t* __restrict__ part_m2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t Sv = S / V;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t q_end = min64(Q, q_begin + chunk);

  acc_t mean[1] = {acc_t(0)}, m2[1] = {acc_t(0)};
  acc_t n = acc_t(0);

  int64_t q = q_begin + tid;
  PlaneCursor cur;
  cur.sv = q % Sv;
  cur.offset = ((q / Sv) * C + c) * S + cur.sv * V;
  // full batches: vectors q, q + kThreads, ..., q + (U-1) kThreads all < q_end
  for (; q + static_cast<int64_t>(U - 1) * kThreads < q_end;
       q += static_cast<int64_t>(U) * kThreads) {
    acc_t v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_vec<V>(x + cur.offset, v + u * V);
      cur.advance(Sv, step.ds, step.jump, step.wrap);
    }
    welford_batch<U * V>(mean[0], m2[0], n, v);
  }
  // tail
  for (; q < q_end; q += kThreads) {
    acc_t v[V];
    load_vec<V>(x + cur.offset, v);
    cur.advance(Sv, step.ds, step.jump, step.wrap);
#pragma unroll
    for (int i = 0; i < V; ++i) welford_one(mean[0], m2[0], n, v[i]);
  }

  block_merge_welford<1>(mean, m2, n, 0, tid, 1, kThreads, smem);
  if (tid == 0) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    part_mean[o] = mean[0];
    part_m2[o] = m2[0];
  }
}

// Merges the partials of every channel in a fixed order and writes mean, biased var and
// the affine coefficients. Block (FX, FY): fx -> channel, fy -> splits fy, fy + FY, ...;
// then a tree over fy. grid ceil(C / FX). Partial s holds
// min(count, (s+1) * chunk) - s * chunk elements of its channel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2,
                          int64_t splits, int64_t C, int64_t count, int64_t chunk,
                          const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                          acc_t eps, acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out,
                          acc_t* __restrict__ scale_out, acc_t* __restrict__ shift_out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TX + tx;
  const bool active = c < C;

  acc_t mean[1] = {acc_t(0)}, m2[1] = {acc_t(0)};
  acc_t n = acc_t(0);
  if (active) {
    for (int64_t s = ty; s < splits; s += TY) {
      const int64_t ns = min64(count, (s + 1) * chunk) - s * chunk;
      chan_merge(mean[0], m2[0], n, part_mean[s * C + c], part_m2[s * C + c],
                 static_cast<acc_t>(ns));
    }
  }
  block_merge_welford<1>(mean, m2, n, tx, ty, TX, TY, smem);
  if (ty == 0 && active) {
    const acc_t var = m2[0] / static_cast<acc_t>(count);
    const acc_t w = weight != nullptr ? weight[c] : acc_t(1);
    const acc_t b = bias != nullptr ? bias[c] : acc_t(0);
    acc_t scale, shift;
    affine_coeffs(mean[0], var, w, b, eps, scale, shift);
    mean_out[c] = mean[0];
    var_out[c] = var;
    scale_out[c] = scale;
    shift_out[c] = shift;
  }
}

// scale/shift from given mean/var (forward eval, backward mask recompute). 1-D over C.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_shift_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                       const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                       acc_t eps, int64_t C, acc_t* __restrict__ scale_out,
                       acc_t* __restrict__ shift_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t w = weight != nullptr ? weight[c] : acc_t(1);
  const acc_t b = bias != nullptr ? bias[c] : acc_t(0);
  acc_t scale, shift;
  affine_coeffs(mean[c], var[c], w, b, eps, scale, shift);
  scale_out[c] = scale;
  shift_out[c] = shift;
}

// out = relu?(x * scale + shift (+ res)). NHWC: block (TX, TY), grid (tiles, row_blocks);
// the thread keeps its V channels' scale/shift in registers and strides over rows.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads)
    nhwc_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                      int64_t M, int64_t C, bool relu) {
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;  // no block-level sync in this kernel
  acc_t sc[V], sh[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    sc[i] = scale[cv * V + i];
    sh[i] = shift[cv * V + i];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += U * stride) {
    acc_t v[U][V], rv[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + u * stride;
      if (row < M) {
        load_vec<V>(x + row * C + cv * V, v[u]);
        if (res != nullptr) load_vec<V>(res + row * C + cv * V, rv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + u * stride;
      if (row < M) {
        acc_t o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc_t a = bn_affine(v[u][i], sc[i], sh[i]);
          if (res != nullptr) a += rv[u][i];
          o[i] = relu ? relu_nan(a) : a;
        }
        store_vec<V>(out + row * C + cv * V, o);
      }
    }
  }
}

// NCHW apply: flat grid-stride over the nvec = numel / V vectors (vector j at element j*V).
// The channel of j is tracked incrementally: s = j % Sv, c = (j / Sv) % C; a stride of G
// vectors adds ds = G % Sv to s (carry 1 into the plane) and dc = (G / Sv) % C to c.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads)
    nchw_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                      int64_t nvec, int64_t C, int64_t Sv, int64_t ds, int64_t dc, bool relu) {
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t s = j % Sv;
  int64_t c = (j / Sv) % C;
  for (; j < nvec; j += U * G) {
    acc_t v[U][V], rv[U][V];
    int64_t cu[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + u * G;
      cu[u] = c;
      if (jj < nvec) {
        load_vec<V>(x + jj * V, v[u]);
        if (res != nullptr) load_vec<V>(res + jj * V, rv[u]);
      }
      // advance (s, c) by G vectors
      s += ds;
      c += dc;
      if (s >= Sv) {
        s -= Sv;
        ++c;
      }
      if (c >= C) c -= C;  // c + dc + 1 <= 2C - 1
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + u * G;
      if (jj < nvec) {
        const acc_t sc = scale[cu[u]], sh = shift[cu[u]];
        acc_t o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc_t a = bn_affine(v[u][i], sc, sh);
          if (res != nullptr) a += rv[u][i];
          o[i] = relu ? relu_nan(a) : a;
        }
        store_vec<V>(out + jj * V, o);
      }
    }
  }
}

// ------------------------------------------------------------------------------------
// backward kernels
// ------------------------------------------------------------------------------------

// NHWC partial sums of g and g * (x - mean); same grid/block/splits as nhwc_stats_kernel.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads)
    nhwc_bwd_reduce_kernel(const T* __restrict__ go, const T* __restrict__ x,
                           const T* __restrict__ out, const acc_t* __restrict__ mean,
                           const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                           int mask_mode, int64_t M, int64_t C, int64_t rows_per_split,
                           acc_t* __restrict__ part_g, acc_t* __restrict__ part_gx) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * TX + tx;
  const bool active = cv < C / V;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min64(M, row_begin + rows_per_split);

  acc_t sg[V], sgx[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sg[i] = sgx[i] = acc_t(0);

  if (active) {
    const int64_t c0 = cv * V;
    acc_t mu[V], sc[V], sh[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      mu[i] = mean[c0 + i];
      sc[i] = mask_mode == kMaskRecompute ? scale[c0 + i] : acc_t(0);
      sh[i] = mask_mode == kMaskRecompute ? shift[c0 + i] : acc_t(0);
    }
    for (int64_t r = row_begin + ty; r < row_end; r += static_cast<int64_t>(U) * TY) {
      acc_t gv[U][V], xv[U][V], ov[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * TY;
        if (row < row_end) {
          const int64_t off = row * C + c0;
          load_vec<V>(go + off, gv[u]);
          load_vec<V>(x + off, xv[u]);
          if (mask_mode == kMaskOutput) load_vec<V>(out + off, ov[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * TY;
        if (row < row_end) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const acc_t o = mask_mode == kMaskOutput ? ov[u][i] : acc_t(0);
            const acc_t g = masked_grad<T>(gv[u][i], mask_mode, o, xv[u][i], sc[i], sh[i]);
            sg[i] += g;
            sgx[i] = fma_acc(g, xv[u][i] - mu[i], sgx[i]);
          }
        }
      }
    }
  }

  block_merge_sum<V>(sg, sgx, tx, ty, TX, TY, smem);
  if (ty == 0 && active) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + cv * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      part_g[o + i] = sg[i];
      part_gx[o + i] = sgx[i];
    }
  }
}

// NCHW partial sums; same grid/block/chunks as nchw_stats_kernel.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads, kSpillFreeMinBlocks<acc_t>)
    nchw_bwd_reduce_kernel(const T* __restrict__ go, const T* __restrict__ x,
                           const T* __restrict__ out, const acc_t* __restrict__ mean,
                           const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                           int mask_mode, int64_t C, int64_t S, int64_t Q, int64_t chunk,
                           NchwStep step, acc_t* __restrict__ part_g,
                           acc_t* __restrict__ part_gx) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t Sv = S / V;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t q_end = min64(Q, q_begin + chunk);
  const acc_t mu = mean[c];
  const acc_t sc = mask_mode == kMaskRecompute ? scale[c] : acc_t(0);
  const acc_t sh = mask_mode == kMaskRecompute ? shift[c] : acc_t(0);

  acc_t sg[1] = {acc_t(0)}, sgx[1] = {acc_t(0)};
  int64_t q = q_begin + tid;
  PlaneCursor cur;
  cur.sv = q % Sv;
  cur.offset = ((q / Sv) * C + c) * S + cur.sv * V;
  for (; q < q_end; q += static_cast<int64_t>(U) * kThreads) {
    acc_t gv[U][V], xv[U][V], ov[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (q + static_cast<int64_t>(u) * kThreads < q_end) {
        load_vec<V>(go + cur.offset, gv[u]);
        load_vec<V>(x + cur.offset, xv[u]);
        if (mask_mode == kMaskOutput) load_vec<V>(out + cur.offset, ov[u]);
      }
      cur.advance(Sv, step.ds, step.jump, step.wrap);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (q + static_cast<int64_t>(u) * kThreads < q_end) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t o = mask_mode == kMaskOutput ? ov[u][i] : acc_t(0);
          const acc_t g = masked_grad<T>(gv[u][i], mask_mode, o, xv[u][i], sc, sh);
          sg[0] += g;
          sgx[0] = fma_acc(g, xv[u][i] - mu, sgx[0]);
        }
      }
    }
  }

  block_merge_sum<1>(sg, sgx, 0, tid, 1, kThreads, smem);
  if (tid == 0) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    part_g[o] = sg[0];
    part_gx[o] = sgx[0];
  }
}

// Sums the partials per channel in a fixed order; writes grad_weight, grad_bias and the
// grad_input coefficients: gi = A * (g - B - (x - mean) * D) in training (A = w * invstd,
// B = sum_g / count, D = invstd^2 * sum_gx / count), gi = A * g in eval.
// Block (FX, FY) and grid as stats_finalize_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bwd_finalize_kernel(const acc_t* __restrict__ part_g, const acc_t* __restrict__ part_gx,
                        int64_t splits, int64_t C, int64_t count,
                        const acc_t* __restrict__ var, const acc_t* __restrict__ weight,
                        acc_t eps, acc_t* __restrict__ grad_weight,
                        acc_t* __restrict__ grad_bias, acc_t* __restrict__ coef_a,
                        acc_t* __restrict__ coef_b, acc_t* __restrict__ coef_d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * TX + tx;
  const bool active = c < C;

  acc_t sg[1] = {acc_t(0)}, sgx[1] = {acc_t(0)};
  if (active) {
    for (int64_t s = ty; s < splits; s += TY) {
      sg[0] += part_g[s * C + c];
      sgx[0] += part_gx[s * C + c];
    }
  }
  block_merge_sum<1>(sg, sgx, tx, ty, TX, TY, smem);
  if (ty == 0 && active) {
    const acc_t invstd = inv_std(var[c], eps);
    const acc_t w = weight != nullptr ? weight[c] : acc_t(1);
    const acc_t n = static_cast<acc_t>(count);
    grad_weight[c] = sgx[0] * invstd;
    grad_bias[c] = sg[0];
    coef_a[c] = w * invstd;
    coef_b[c] = sg[0] / n;
    coef_d[c] = invstd * invstd * (sgx[0] / n);
  }
}

// Per-element backward: g = mask * grad_output; grad_input from the coefficients;
// grad_residual = g. Geometry as nhwc_apply_kernel.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads)
    nhwc_bwd_elem_kernel(const T* __restrict__ go, const T* __restrict__ x,
                         const T* __restrict__ out, T* __restrict__ gi, T* __restrict__ gr,
                         const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                         const acc_t* __restrict__ shift, const acc_t* __restrict__ coef_a,
                         const acc_t* __restrict__ coef_b, const acc_t* __restrict__ coef_d,
                         int mask_mode, bool training, int64_t M, int64_t C) {
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;  // no block-level sync in this kernel
  const int64_t c0 = cv * V;
  const bool need_x = training || mask_mode == kMaskRecompute;
  acc_t a[V], b[V], d[V], mu[V], sc[V], sh[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    a[i] = coef_a[c0 + i];
    b[i] = training ? coef_b[c0 + i] : acc_t(0);
    d[i] = training ? coef_d[c0 + i] : acc_t(0);
    mu[i] = training ? mean[c0 + i] : acc_t(0);
    sc[i] = mask_mode == kMaskRecompute ? scale[c0 + i] : acc_t(0);
    sh[i] = mask_mode == kMaskRecompute ? shift[c0 + i] : acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += U * stride) {
    acc_t gv[U][V], xv[U][V], ov[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + u * stride;
      if (row < M) {
        const int64_t off = row * C + c0;
        load_vec<V>(go + off, gv[u]);
        if (need_x) load_vec<V>(x + off, xv[u]);
        if (mask_mode == kMaskOutput) load_vec<V>(out + off, ov[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + u * stride;
      if (row < M) {
        const int64_t off = row * C + c0;
        acc_t g[V], o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t xi = need_x ? xv[u][i] : acc_t(0);
          const acc_t oi = mask_mode == kMaskOutput ? ov[u][i] : acc_t(0);
          g[i] = masked_grad<T>(gv[u][i], mask_mode, oi, xi, sc[i], sh[i]);
          o[i] = training ? a[i] * (g[i] - b[i] - (xi - mu[i]) * d[i]) : a[i] * g[i];
        }
        store_vec<V>(gi + off, o);
        if (gr != nullptr) store_vec<V>(gr + off, g);
      }
    }
  }
}

// NCHW per-element backward; flat grid-stride with the channel tracking of nchw_apply_kernel.
template <typename T, typename acc_t, int V, int U>
__global__ void __launch_bounds__(kThreads)
    nchw_bwd_elem_kernel(const T* __restrict__ go, const T* __restrict__ x,
                         const T* __restrict__ out, T* __restrict__ gi, T* __restrict__ gr,
                         const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                         const acc_t* __restrict__ shift, const acc_t* __restrict__ coef_a,
                         const acc_t* __restrict__ coef_b, const acc_t* __restrict__ coef_d,
                         int mask_mode, bool training, int64_t nvec, int64_t C, int64_t Sv,
                         int64_t ds, int64_t dc) {
  const bool need_x = training || mask_mode == kMaskRecompute;
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t s = j % Sv;
  int64_t c = (j / Sv) % C;
  for (; j < nvec; j += U * G) {
    acc_t gv[U][V], xv[U][V], ov[U][V];
    int64_t cu[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + u * G;
      cu[u] = c;
      if (jj < nvec) {
        load_vec<V>(go + jj * V, gv[u]);
        if (need_x) load_vec<V>(x + jj * V, xv[u]);
        if (mask_mode == kMaskOutput) load_vec<V>(out + jj * V, ov[u]);
      }
      s += ds;
      c += dc;
      if (s >= Sv) {
        s -= Sv;
        ++c;
      }
      if (c >= C) c -= C;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t jj = j + u * G;
      if (jj < nvec) {
        const int64_t ch = cu[u];
        const acc_t a = coef_a[ch];
        const acc_t b = training ? coef_b[ch] : acc_t(0);
        const acc_t d = training ? coef_d[ch] : acc_t(0);
        const acc_t mu = training ? mean[ch] : acc_t(0);
        const acc_t sc = mask_mode == kMaskRecompute ? scale[ch] : acc_t(0);
        const acc_t sh = mask_mode == kMaskRecompute ? shift[ch] : acc_t(0);
        acc_t g[V], o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t xi = need_x ? xv[u][i] : acc_t(0);
          const acc_t oi = mask_mode == kMaskOutput ? ov[u][i] : acc_t(0);
          g[i] = masked_grad<T>(gv[u][i], mask_mode, oi, xi, sc, sh);
          o[i] = training ? a * (g[i] - b - (xi - mu) * d) : a * g[i];
        }
        store_vec<V>(gi + jj * V, o);
        if (gr != nullptr) store_vec<V>(gr + jj * V, g);
      }
    }
  }
}

// ------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Geometry of the input view.
struct Geometry {
  bool rows;      // NHWC rows view [M, C]; otherwise NCHW [N, C, S]
  int64_t C;
  int64_t numel;
  int64_t count;  // elements per channel (= M for rows, N * S for planes)
  int64_t N, S;   // planes view only
};

Geometry make_geometry(const at::Tensor& x) {
  Geometry g;
  g.rows = uses_channels_last(x);
  g.C = x.size(1);
  g.numel = x.numel();
  g.count = g.C > 0 ? g.numel / g.C : 0;
  g.N = x.size(0);
  g.S = (g.N > 0 && g.C > 0) ? g.numel / (g.N * g.C) : 0;
  // A contiguous (N, C, 1, ...) tensor is laid out exactly like rows [N, C]: use the
  // coalesced rows kernels instead of per-channel gathers with stride C.
  if (!g.rows && g.S == 1) g.rows = true;
  return g;
}

// Blocks that fit on the whole GPU at once for `kernel` with kThreads threads. The
// occupancy query and the SM count are cached per (kernel, smem, device): they are host
// calls on every op invocation otherwise.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, size_t, int>, int64_t> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), smem, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int sm_count = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t blocks =
      static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * (per_sm > 0 ? per_sm : 1);
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = blocks;
  return blocks;
}

// Block shape of the NHWC kernels: TX (pow2 <= 32) channel vectors x TY rows.
struct RowsBlock {
  int TX, TY;
  int64_t tiles;  // blocks along the channels
};

RowsBlock rows_block(int64_t Cv) {
  int TX = 1;
  while (TX < 32 && TX < Cv) TX <<= 1;
  return {TX, kThreads / TX, ceil_div(Cv, TX)};
}

// Block shape of the finalize kernels: FX (pow2 <= 32) channels x FY split lanes.
RowsBlock finalize_block(int64_t C) { return rows_block(C); }

// Split of the reduction dimension into `splits` chunks of `chunk` items (no empty chunk).
struct Splits {
  int64_t splits, chunk;
};

Splits make_splits(int64_t items, int64_t want, int64_t min_items_per_split) {
  int64_t s = std::min(want, ceil_div(items, min_items_per_split));
  s = clamp64(s, 1, kMaxGridY);
  const int64_t chunk = ceil_div(items, s);
  return {ceil_div(items, chunk), chunk};
}

NchwStep nchw_step(int64_t C, int64_t S, int64_t Sv, int V) {
  NchwStep st;
  st.ds = kThreads % Sv;
  st.jump = (kThreads / Sv) * C * S + st.ds * V;
  st.wrap = (C - 1) * S;
  return st;
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Vector width for this tensor: V if the vectorised path is valid, 1 otherwise.
bool can_vectorize(const Geometry& g, int V, std::initializer_list<const void*> ptrs,
                   int elem_size) {
  if (V <= 1) return false;
  const int64_t inner = g.rows ? g.C : g.S;  // the contiguous extent the vectors tile
  if (inner % V != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned(p, V * elem_size)) return false;
  }
  return true;
}

// ---- forward -----------------------------------------------------------------------

template <typename T, typename acc_t, int V>
void forward_launch(const Geometry& g, const T* x, const T* res, T* out, const acc_t* w,
                    const acc_t* b, bool training, acc_t eps, bool relu, acc_t* mean,
                    acc_t* var, acc_t* scale, acc_t* shift, const at::TensorOptions& acc_opts,
                    cudaStream_t stream) {
  constexpr int UR = Unroll<V>::kReduce;
  constexpr int UE = Unroll<V>::kElem;
  const int64_t C = g.C;

  if (training) {
    at::Tensor part_mean, part_m2;
    int64_t splits = 0, chunk = 0;
    if (g.rows) {
      const int64_t M = g.count;
      const RowsBlock rb = rows_block(C / V);
      const size_t smem = (2 * V + 1) * kThreads * sizeof(acc_t);
      auto kernel = nhwc_stats_kernel<T, acc_t, V, UR>;
      const Splits sp = make_splits(M, ceil_div(resident_blocks(kernel, smem), rb.tiles),
                                    static_cast<int64_t>(rb.TY) * UR);
      splits = sp.splits;
      chunk = sp.chunk;
      part_mean = at::empty({splits, C}, acc_opts);
      part_m2 = at::empty({splits, C}, acc_opts);
      kernel<<<dim3(rb.tiles, splits), dim3(rb.TX, rb.TY), smem, stream>>>(
          x, M, C, chunk, part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t Sv = g.S / V, Q = g.N * Sv;
      const size_t smem = 3 * kThreads * sizeof(acc_t);
      auto kernel = nchw_stats_kernel<T, acc_t, V, UR>;
      const Splits sp = make_splits(Q, ceil_div(resident_blocks(kernel, smem), C),
                                    static_cast<int64_t>(kThreads) * UR);
      splits = sp.splits;
      chunk = sp.chunk * V;  // in elements, for the finalize counts
      part_mean = at::empty({splits, C}, acc_opts);
      part_m2 = at::empty({splits, C}, acc_opts);
      kernel<<<dim3(C, splits), dim3(kThreads), smem, stream>>>(
          x, C, g.S, Q, sp.chunk, nchw_step(C, g.S, Sv, V), part_mean.data_ptr<acc_t>(),
          part_m2.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const RowsBlock fb = finalize_block(C);
    stats_finalize_kernel<acc_t><<<dim3(fb.tiles), dim3(fb.TX, fb.TY),
                                   3 * kThreads * sizeof(acc_t), stream>>>(
        part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>(), splits, C, g.count, chunk, w, b,
        eps, mean, var, scale, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    scale_shift_kernel<acc_t><<<dim3(ceil_div(C, kThreads)), dim3(kThreads), 0, stream>>>(
        mean, var, w, b, eps, C, scale, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (g.rows) {
    const int64_t M = g.count;
    const RowsBlock rb = rows_block(C / V);
    auto kernel = nhwc_apply_kernel<T, acc_t, V, UE>;
    const int64_t row_blocks = clamp64(
        std::min(ceil_div(M, static_cast<int64_t>(rb.TY) * UE),
                 ceil_div(resident_blocks(kernel, 0), rb.tiles)),
        1, kMaxGridY);
    kernel<<<dim3(rb.tiles, row_blocks), dim3(rb.TX, rb.TY), 0, stream>>>(x, res, out, scale,
                                                                          shift, M, C, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t Sv = g.S / V, nvec = g.numel / V;
    auto kernel = nchw_apply_kernel<T, acc_t, V, UE>;
    const int64_t blocks = clamp64(ceil_div(nvec, static_cast<int64_t>(kThreads) * UE), 1,
                                   resident_blocks(kernel, 0));
    const int64_t G = blocks * kThreads;
    kernel<<<dim3(blocks), dim3(kThreads), 0, stream>>>(x, res, out, scale, shift, nvec, C, Sv,
                                                        G % Sv, (G / Sv) % C, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- backward ----------------------------------------------------------------------

template <typename T, typename acc_t, int V>
void backward_launch(const Geometry& g, const T* go, const T* x, const T* out, T* gi, T* gr,
                     const acc_t* mean, const acc_t* var, const acc_t* w, const acc_t* scale,
                     const acc_t* shift, int mask_mode, bool training, acc_t eps,
                     acc_t* grad_weight, acc_t* grad_bias, const at::TensorOptions& acc_opts,
                     cudaStream_t stream) {
  constexpr int UR = Unroll<V>::kReduce;
  constexpr int UE = Unroll<V>::kElem;
  const int64_t C = g.C;

  // 1. partial sums
  at::Tensor part_g, part_gx;
  int64_t splits = 0;
  if (g.rows) {
    const int64_t M = g.count;
    const RowsBlock rb = rows_block(C / V);
    const size_t smem = 2 * V * kThreads * sizeof(acc_t);
    auto kernel = nhwc_bwd_reduce_kernel<T, acc_t, V, UR>;
    const Splits sp = make_splits(M, ceil_div(resident_blocks(kernel, smem), rb.tiles),
                                  static_cast<int64_t>(rb.TY) * UR);
    splits = sp.splits;
    part_g = at::empty({splits, C}, acc_opts);
    part_gx = at::empty({splits, C}, acc_opts);
    kernel<<<dim3(rb.tiles, splits), dim3(rb.TX, rb.TY), smem, stream>>>(
        go, x, out, mean, scale, shift, mask_mode, M, C, sp.chunk, part_g.data_ptr<acc_t>(),
        part_gx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t Sv = g.S / V, Q = g.N * Sv;
    const size_t smem = 2 * kThreads * sizeof(acc_t);
    auto kernel = nchw_bwd_reduce_kernel<T, acc_t, V, UR>;
    const Splits sp = make_splits(Q, ceil_div(resident_blocks(kernel, smem), C),
                                  static_cast<int64_t>(kThreads) * UR);
    splits = sp.splits;
    part_g = at::empty({splits, C}, acc_opts);
    part_gx = at::empty({splits, C}, acc_opts);
    kernel<<<dim3(C, splits), dim3(kThreads), smem, stream>>>(
        go, x, out, mean, scale, shift, mask_mode, C, g.S, Q, sp.chunk,
        nchw_step(C, g.S, Sv, V), part_g.data_ptr<acc_t>(), part_gx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. per-channel sums and coefficients
  at::Tensor coefs = at::empty({3, C}, acc_opts);
  acc_t* coef_a = coefs.data_ptr<acc_t>();
  acc_t* coef_b = coef_a + C;
  acc_t* coef_d = coef_a + 2 * C;
  const RowsBlock fb = finalize_block(C);
  bwd_finalize_kernel<acc_t><<<dim3(fb.tiles), dim3(fb.TX, fb.TY), 2 * kThreads * sizeof(acc_t),
                               stream>>>(part_g.data_ptr<acc_t>(), part_gx.data_ptr<acc_t>(),
                                         splits, C, g.count, var, w, eps, grad_weight, grad_bias,
                                         coef_a, coef_b, coef_d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. grad_input (+ grad_residual)
  if (g.rows) {
    const int64_t M = g.count;
    const RowsBlock rb = rows_block(C / V);
    auto kernel = nhwc_bwd_elem_kernel<T, acc_t, V, UE>;
    const int64_t row_blocks = clamp64(
        std::min(ceil_div(M, static_cast<int64_t>(rb.TY) * UE),
                 ceil_div(resident_blocks(kernel, 0), rb.tiles)),
        1, kMaxGridY);
    kernel<<<dim3(rb.tiles, row_blocks), dim3(rb.TX, rb.TY), 0, stream>>>(
        go, x, out, gi, gr, mean, scale, shift, coef_a, coef_b, coef_d, mask_mode, training, M,
        C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t Sv = g.S / V, nvec = g.numel / V;
    auto kernel = nchw_bwd_elem_kernel<T, acc_t, V, UE>;
    const int64_t blocks = clamp64(ceil_div(nvec, static_cast<int64_t>(kThreads) * UE), 1,
                                   resident_blocks(kernel, 0));
    const int64_t G = blocks * kThreads;
    kernel<<<dim3(blocks), dim3(kThreads), 0, stream>>>(
        go, x, out, gi, gr, mean, scale, shift, coef_a, coef_b, coef_d, mask_mode, training,
        nvec, C, Sv, G % Sv, (G / Sv) % C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_cuda(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastres: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == input.device(), "fastres: ", name, " is on ", t.device(),
              " but input is on ", input.device());
}

void check_cuda(const OptTensor& t, const at::Tensor& input, const char* name) {
  if (present(t)) check_cuda(*t, input, name);
}

// Parameter converted to the statistics dtype (contiguous), or undefined when absent.
at::Tensor param_as(const OptTensor& p, at::ScalarType sd) {
  if (!present(p)) return at::Tensor();
  return p->to(sd).contiguous();
}

void check_grid_limits(const Geometry& g) {
  // blocks along the channels (NCHW reductions use grid.x = C) must fit grid.x
  TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(), "fastres: too many channels (", g.C,
              ")");
}

}  // namespace

ForwardResult bn_act_forward_cuda(const at::Tensor& input, const OptTensor& residual,
                                  const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& running_mean, const OptTensor& running_var,
                                  bool training, double eps, bool relu) {
  check_forward_args(input, residual, weight, bias, running_mean, running_var, training);
  check_cuda(input, input, "input");
  check_cuda(residual, input, "residual");
  check_cuda(weight, input, "weight");
  check_cuda(bias, input, "bias");
  check_cuda(running_mean, input, "running_mean");
  check_cuda(running_var, input, "running_var");

  const c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType sd = stat_dtype(input);
  const auto acc_opts = input.options().dtype(sd);
  const Geometry g = make_geometry(input);
  check_grid_limits(g);

  at::Tensor out = at::empty_like(input);
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({g.C}, acc_opts);
    var = at::empty({g.C}, acc_opts);
  } else {
    mean = running_mean->to(sd, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(sd, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  if (g.numel == 0) {
    if (training) {
      mean.zero_();
      var.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {out, mean, var};
  }

  const at::Tensor w = param_as(weight, sd);
  const at::Tensor b = param_as(bias, sd);
  at::Tensor ss = at::empty({2, g.C}, acc_opts);  // scale, shift
  const bool has_res = present(residual);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_forward_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        constexpr int VW = kVecBytes / static_cast<int>(sizeof(scalar_t));
        const scalar_t* x = input.data_ptr<scalar_t>();
        const scalar_t* res = has_res ? residual->data_ptr<scalar_t>() : nullptr;
        scalar_t* o = out.data_ptr<scalar_t>();
        const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
        const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
        acc_t* scale = ss.data_ptr<acc_t>();
        acc_t* shift = scale + g.C;
        const acc_t e = static_cast<acc_t>(eps);
        if (can_vectorize(g, VW, {x, res, o}, sizeof(scalar_t))) {
          forward_launch<scalar_t, acc_t, VW>(g, x, res, o, wp, bp, training, e, relu,
                                              mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
                                              scale, shift, acc_opts, stream);
        } else {
          forward_launch<scalar_t, acc_t, 1>(g, x, res, o, wp, bp, training, e, relu,
                                             mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
                                             scale, shift, acc_opts, stream);
        }
      });
  return {out, mean, var};
}

BackwardResult bn_act_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    const OptTensor& output, const OptTensor& weight,
                                    const OptTensor& bias, const at::Tensor& mean,
                                    const at::Tensor& var, bool training, double eps, bool relu,
                                    bool has_residual) {
  check_backward_args(grad_output, input, output, mean, var, relu, has_residual);
  check_param(weight, input, "weight");
  check_param(bias, input, "bias");
  if (present(output)) {
    TORCH_CHECK(output->scalar_type() == input.scalar_type(),
                "fastres: output dtype must match input dtype");
  }
  check_cuda(input, input, "input");
  check_cuda(grad_output, input, "grad_output");
  check_cuda(output, input, "output");
  check_cuda(weight, input, "weight");
  check_cuda(bias, input, "bias");
  check_cuda(mean, input, "mean");
  check_cuda(var, input, "var");

  const c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType sd = stat_dtype(input);
  const auto acc_opts = input.options().dtype(sd);
  const Geometry g = make_geometry(input);
  check_grid_limits(g);

  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_residual =
      has_residual ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({g.C}, acc_opts);
  at::Tensor grad_bias = at::empty({g.C}, acc_opts);
  if (g.numel == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_residual, grad_weight, grad_bias};
  }

  const int mask_mode = !relu ? kMaskNone : (present(output) ? kMaskOutput : kMaskRecompute);
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor var_c = var.contiguous();
  const at::Tensor w = param_as(weight, sd);
  const at::Tensor b = param_as(bias, sd);
  at::Tensor ss;  // scale, shift for the mask recompute
  if (mask_mode == kMaskRecompute) ss = at::empty({2, g.C}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        constexpr int VW = kVecBytes / static_cast<int>(sizeof(scalar_t));
        const scalar_t* go = grad_output.data_ptr<scalar_t>();
        const scalar_t* x = input.data_ptr<scalar_t>();
        const scalar_t* o = mask_mode == kMaskOutput ? output->data_ptr<scalar_t>() : nullptr;
        scalar_t* gi = grad_input.data_ptr<scalar_t>();
        scalar_t* gr = has_residual ? grad_residual.data_ptr<scalar_t>() : nullptr;
        const acc_t* mp = mean_c.data_ptr<acc_t>();
        const acc_t* vp = var_c.data_ptr<acc_t>();
        const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
        const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
        const acc_t e = static_cast<acc_t>(eps);
        acc_t* scale = nullptr;
        acc_t* shift = nullptr;
        if (mask_mode == kMaskRecompute) {
          scale = ss.data_ptr<acc_t>();
          shift = scale + g.C;
          scale_shift_kernel<acc_t><<<dim3(ceil_div(g.C, kThreads)), dim3(kThreads), 0, stream>>>(
              mp, vp, wp, bp, e, g.C, scale, shift);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        acc_t* gw = grad_weight.data_ptr<acc_t>();
        acc_t* gb = grad_bias.data_ptr<acc_t>();
        if (can_vectorize(g, VW, {go, x, o, gi, gr}, sizeof(scalar_t))) {
          backward_launch<scalar_t, acc_t, VW>(g, go, x, o, gi, gr, mp, vp, wp, scale, shift,
                                               mask_mode, training, e, gw, gb, acc_opts, stream);
        } else {
          backward_launch<scalar_t, acc_t, 1>(g, go, x, o, gi, gr, mp, vp, wp, scale, shift,
                                              mask_mode, training, e, gw, gb, acc_opts, stream);
        }
      });
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

}  // namespace fastres

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("bn_act_forward", &fastres::bn_act_forward_cuda);
  m.impl("bn_act_backward", &fastres::bn_act_backward_cuda);
}
