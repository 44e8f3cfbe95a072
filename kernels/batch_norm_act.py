"""Triton kernels of the fused BatchNorm (+ residual add) (+ ReLU) operator.

    out = relu?(x * scale + shift + residual?)     scale = w * invstd, shift = b - mean * scale

The two launchers, :func:`bn_act_forward` and :func:`bn_act_backward`, are called from the body
of a ``torch.library.triton_op``: every kernel is launched through ``kernels.launch.launch``
(``wrap_triton`` on a GPU), tensors are allocated with torch ops only, and Python decisions
depend on shapes, strides, dtypes and the bool/float arguments only (never on tensor values).

Layouts (same rule as the C++ backends):

* "NHWC": 2-D inputs and channels-last inputs are viewed as rows ``[M, C]`` (channel fastest).
  Kernels work on ``[BLOCK_M, BLOCK_C]`` tiles, so each row segment is a contiguous load.
* "NCHW": contiguous inputs are viewed as ``[N, C, S]``. Reductions run one program per
  (channel, block of images, chunk of S); elementwise passes run on ``[BLOCK_P, BLOCK_S]`` tiles
  of (plane ``n * C + c``, spatial position).

Kernels (one job each):

* ``_stats_nhwc_kernel`` / ``_stats_nchw_kernel``: per-program partial (count, mean, M2), two-pass
  within each tile, tiles of one program merged with Chan's formula.
* ``_merge_stats_kernel``: merges the ``[P, C]`` partials per channel into mean and biased var.
* ``_fwd_nhwc_kernel`` / ``_fwd_nchw_kernel``: normalise, add the residual, ReLU.
* ``_bwd_reduce_nhwc_kernel`` / ``_bwd_reduce_nchw_kernel``: partial sums of g and g * (x - mean)
  per (split, channel), g = grad_output * relu mask.
* ``_bwd_finalize_kernel``: fixed-order sum of the partials into grad_bias and grad_weight.
* ``_bwd_nhwc_kernel`` / ``_bwd_nchw_kernel``: grad_input and grad_residual.

All arithmetic is fp32. Every kernel uses 1-D grids (program ids are split into tile
coordinates in the kernel), so no grid dimension limit applies, and element offsets are int64.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from .launch import launch

__all__ = ["bn_act_forward", "bn_act_backward", "merge_partial_stats", "bn_backward_from_partials"]

# ---------------------------------------------------------------------------------------------
# Block-size heuristics (module constants so tests can shrink them to exercise every loop).
# ---------------------------------------------------------------------------------------------
_TILE = 4096            # elements in one tile of the big passes (16 per thread with 8 warps)
_MAX_BLOCK_C = 128      # NHWC channels per tile: 256 contiguous bytes of bf16 per row
_MAX_BLOCK_S = 512      # NCHW spatial positions per tile
_TARGET_PROGRAMS = 1024  # reduction programs to aim for (about 8 per SM on an H100)
_NUM_WARPS = 8          # for the big passes
_MERGE_BLOCK_C = 32     # channels per program of the small merge/finalize kernels
_MERGE_BLOCK_P = 64     # partial rows per loop step of the merge/finalize kernels

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, ch, cmask, eps,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (scale, shift, mean, invstd) in fp32 for channel indices `ch`."""
    mean = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32) * invstd
    else:
        scale = invstd
    if HAS_B:
        shift = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32) - mean * scale
    else:
        shift = 0.0 - mean * scale
    return scale, shift, mean, invstd


@triton.jit
def _merge_mean(mean_acc, n_acc, mean_t, n_t, frac):
    """Chan's merge of the means of two parts (counts n_acc and n_t, frac = n_t / (n_acc + n_t)),
    with the infinities of a plain sum: a part whose mean is +-inf or NaN gives the merged
    mean mean_acc + mean_t, not (inf - inf) * frac = NaN (PyTorch's mean of [inf, 1] is inf)."""
    finite = (tl.abs(mean_acc) < float("inf")) & (tl.abs(mean_t) < float("inf"))
    special = tl.where(n_t == 0, mean_acc, tl.where(n_acc == 0, mean_t, mean_acc + mean_t))
    return tl.where(finite, mean_acc + (mean_t - mean_acc) * frac, special)


@triton.jit
def _affine(x, scale, shift):
    """The pre-activation; forward and the backward mask recompute share it bit for bit."""
    return x * scale + shift


@triton.jit
def _relu(y):
    """torch.relu: 0 where y < 0, y elsewhere, so NaN stays NaN (tl.maximum would drop it)."""
    return tl.where(y < 0.0, 0.0, y)


@triton.jit
def _relu_grad(g, y):
    """threshold_backward(g, y, 0): 0 where the ReLU output y <= 0, g elsewhere (NaN included)."""
    return tl.where(y <= 0.0, 0.0, g)


@triton.jit
def _masked_grad(go_ptr, out_ptr, offs, mask, x, scale, shift,
                 HAS_OUT: tl.constexpr, RELU: tl.constexpr):
    """g = grad_output * relu'(out) in fp32; out is loaded, or recomputed and rounded to the
    output dtype (that of grad_output) exactly as the forward stored it."""
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        if HAS_OUT:
            y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            y = _affine(x, scale, shift).to(go_ptr.dtype.element_ty).to(tl.float32)
        g = _relu_grad(g, y)
    return g


# ---------------------------------------------------------------------------------------------
# Forward: batch statistics
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stats_nhwc_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, M, C, n_cblocks, ITERS,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (split, channel block) reduces ITERS consecutive row tiles into one partial.
    pid = tl.program_id(0)
    split = pid // n_cblocks
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ITERS):
        rows = (split * ITERS + i).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        # two-pass statistics of the tile
        n_t = tl.sum(rmask.to(tl.float32), axis=0)
        mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        # Chan's merge into the running partial
        n_new = n_acc + n_t
        delta = mean_t - mean_acc
        frac = n_t / tl.maximum(n_new, 1.0)
        m2_acc = m2_acc + m2_t + delta * delta * n_acc * frac
        mean_acc = _merge_mean(mean_acc, n_acc, mean_t, n_t, frac)
        n_acc = n_new
    offs = split * C + cols
    tl.store(cnt_ptr + offs, n_acc, mask=cmask)
    tl.store(mean_ptr + offs, mean_acc, mask=cmask)
    tl.store(m2_ptr + offs, m2_acc, mask=cmask)


@triton.jit
def _stats_nchw_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, N, C, S, n_nblocks, n_schunks, ITERS,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    # Program (channel c, image block, S chunk) reduces ITERS [BLOCK_N, BLOCK_S] tiles of
    # channel c into the partial `part` = (image block, S chunk).
    pid = tl.program_id(0)
    per_c = n_nblocks * n_schunks
    c = pid // per_c
    part = pid % per_c
    schunk = part % n_schunks
    imgs = (part // n_schunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = imgs < N
    plane_start = (imgs.to(tl.int64) * C + c) * S
    n_imgs = tl.sum(nmask.to(tl.float32), axis=0)
    n_acc = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    mean_acc = n_acc
    m2_acc = n_acc
    for i in range(ITERS):
        s = (schunk * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < S
        mask = nmask[:, None] & smask[None, :]
        x = tl.load(x_ptr + plane_start[:, None] + s[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        # two-pass statistics of the tile
        n_t = n_imgs * tl.sum(smask.to(tl.float32), axis=0)
        mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan's merge into the running partial
        n_new = n_acc + n_t
        delta = mean_t - mean_acc
        frac = n_t / tl.maximum(n_new, 1.0)
        m2_acc = m2_acc + m2_t + delta * delta * n_acc * frac
        mean_acc = _merge_mean(mean_acc, n_acc, mean_t, n_t, frac)
        n_acc = n_new
    offs = part * C + c
    tl.store(cnt_ptr + offs, n_acc)
    tl.store(mean_ptr + offs, mean_acc)
    tl.store(m2_ptr + offs, m2_acc)


@triton.jit
def _merge_stats_kernel(cnt_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, P, C,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Chan's formula over the P partials of each channel, in two passes:
    #   mean = sum(n_i * mean_i) / n,   M2 = sum(M2_i + n_i * (mean_i - mean)^2),  var = M2 / n.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], dtype=tl.float32)
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        offs = ps[:, None] * C + cols[None, :]
        cnt = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        n += tl.sum(cnt, axis=0)
        s += tl.sum(cnt * tl.load(pmean_ptr + offs, mask=mask, other=0.0), axis=0)
    n = tl.maximum(n, 1.0)  # only masked lanes (channels >= C) have n == 0
    mean = s / n
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        offs = ps[:, None] * C + cols[None, :]
        cnt = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        d = tl.load(pmean_ptr + offs, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(pm2_ptr + offs, mask=mask, other=0.0) + cnt * d * d, axis=0)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, m2 / n, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Forward: normalise (+ residual) (+ ReLU)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_nhwc_kernel(x_ptr, res_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, out_ptr, M, C, eps,
                     n_cblocks, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_cblocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale, shift, _, _ = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, cols, cmask, eps,
                                         HAS_W, HAS_B)
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _affine(x, scale[None, :], shift[None, :])
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = _relu(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_nchw_kernel(x_ptr, res_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, out_ptr, NC, C, S, eps,
                     n_sblocks, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    planes = (pid // n_sblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    pmask = planes < NC
    scale, shift, _, _ = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, planes % C, pmask,
                                         eps, HAS_W, HAS_B)
    mask = pmask[:, None] & (s < S)[None, :]
    offs = planes[:, None] * S + s[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _affine(x, scale[:, None], shift[:, None])
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = _relu(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward: per-channel sums of g and g * (x - mean)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_reduce_nhwc_kernel(go_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
                            psg_ptr, psgx_ptr, M, C, eps, n_cblocks, ITERS,
                            HAS_OUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    split = pid // n_cblocks
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale, shift, mean, _ = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, cols, cmask, eps,
                                            HAS_W, HAS_B)
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ITERS):
        rows = (split * ITERS + i).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(go_ptr, out_ptr, offs, mask, x, scale[None, :], shift[None, :],
                         HAS_OUT, RELU)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * (x - mean[None, :]), axis=0)
    offs = split * C + cols
    tl.store(psg_ptr + offs, sg, mask=cmask)
    tl.store(psgx_ptr + offs, sgx, mask=cmask)


@triton.jit
def _bwd_reduce_nchw_kernel(go_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
                            psg_ptr, psgx_ptr, N, C, S, eps, n_nblocks, n_schunks, ITERS,
                            HAS_OUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    per_c = n_nblocks * n_schunks
    c = pid // per_c
    part = pid % per_c
    schunk = part % n_schunks
    imgs = (part // n_schunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = imgs < N
    plane_start = (imgs.to(tl.int64) * C + c) * S
    scale, shift, mean, _ = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, c < C, eps,
                                            HAS_W, HAS_B)
    sg = tl.zeros([BLOCK_S], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_S], dtype=tl.float32)
    for i in range(ITERS):
        s = (schunk * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = nmask[:, None] & (s < S)[None, :]
        offs = plane_start[:, None] + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(go_ptr, out_ptr, offs, mask, x, scale, shift, HAS_OUT, RELU)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * (x - mean), axis=0)
    offs = part * C + c
    tl.store(psg_ptr + offs, tl.sum(sg, axis=0))
    tl.store(psgx_ptr + offs, tl.sum(sgx, axis=0))


@triton.jit
def _bwd_finalize_kernel(psg_ptr, psgx_ptr, var_ptr, gw_ptr, gb_ptr, P, C, eps,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Fixed-order (deterministic) sum of the [P, C] partials:
    #   grad_bias = sum(g),  grad_weight = sum(g * (x - mean)) * invstd.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        offs = ps[:, None] * C + cols[None, :]
        sg += tl.sum(tl.load(psg_ptr + offs, mask=mask, other=0.0), axis=0)
        sgx += tl.sum(tl.load(psgx_ptr + offs, mask=mask, other=0.0), axis=0)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(gb_ptr + cols, sg, mask=cmask)
    tl.store(gw_ptr + cols, sgx * invstd, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Backward: grad_input and grad_residual
# ---------------------------------------------------------------------------------------------
@triton.jit
def _grad_input(g, x, scale, mean, invstd, gw, gb, inv_count, TRAINING: tl.constexpr):
    """training: w*invstd*(g - sum_g/n - (x-mean)*invstd^2*sum_gx/n); eval: g*w*invstd.
    gw = sum_gx * invstd and gb = sum_g are the per-channel results of the finalize kernel."""
    if TRAINING:
        gi = scale * (g - gb * inv_count - (x - mean) * (invstd * gw * inv_count))
    else:
        gi = g * scale
    return gi


@triton.jit
def _bwd_nhwc_kernel(go_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, gw_ptr, gb_ptr,
                     gi_ptr, gr_ptr, M, C, eps, inv_count, n_cblocks,
                     HAS_OUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr,
                     LOAD_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_cblocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale, shift, mean, invstd = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, cols, cmask,
                                                 eps, HAS_W, HAS_B)
    gw = tl.load(gw_ptr + cols, mask=cmask, other=0.0)
    gb = tl.load(gb_ptr + cols, mask=cmask, other=0.0)
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    if LOAD_X:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # not needed
    g = _masked_grad(go_ptr, out_ptr, offs, mask, x, scale[None, :], shift[None, :],
                     HAS_OUT, RELU)
    if HAS_RES:
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
    gi = _grad_input(g, x, scale[None, :], mean[None, :], invstd[None, :], gw[None, :],
                     gb[None, :], inv_count, TRAINING)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_nchw_kernel(go_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, gw_ptr, gb_ptr,
                     gi_ptr, gr_ptr, NC, C, S, eps, inv_count, n_sblocks,
                     HAS_OUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr,
                     LOAD_X: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    planes = (pid // n_sblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    pmask = planes < NC
    ch = planes % C
    scale, shift, mean, invstd = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, ch, pmask,
                                                 eps, HAS_W, HAS_B)
    gw = tl.load(gw_ptr + ch, mask=pmask, other=0.0)
    gb = tl.load(gb_ptr + ch, mask=pmask, other=0.0)
    mask = pmask[:, None] & (s < S)[None, :]
    offs = planes[:, None] * S + s[None, :]
    if LOAD_X:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)  # not needed
    g = _masked_grad(go_ptr, out_ptr, offs, mask, x, scale[:, None], shift[:, None],
                     HAS_OUT, RELU)
    if HAS_RES:
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
    gi = _grad_input(g, x, scale[:, None], mean[:, None], invstd[:, None], gw[:, None],
                     gb[:, None], inv_count, TRAINING)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Python side: layout, block sizes, launches
# ---------------------------------------------------------------------------------------------
class _Layout:
    """How the kernels see the input: rows [M, C] (NHWC) or [N, C, S] (NCHW)."""

    def __init__(self, x: Tensor):
        self.C = x.shape[1]
        self.numel = x.numel()
        self.count = self.numel // self.C if self.C > 0 else 0  # elements per channel
        self.N = x.shape[0]
        self.S = self.count // self.N if self.N > 0 else 0
        # The layout rule of the C++ backends; in addition a contiguous input with S == 1
        # (e.g. N x C x 1 x 1) is the same memory as rows [N, C], which the NHWC kernels read
        # with coalesced loads.
        self.nhwc = x.dim() == 2 or not x.is_contiguous() or self.S == 1


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _split(tiles: int, parallel: int) -> Tuple[int, int]:
    """(tiles per program, number of splits) of a reduction over `tiles` tiles that already
    runs `parallel` programs side by side: about _TARGET_PROGRAMS programs in total."""
    iters = min(max(1, (tiles * parallel) // _TARGET_PROGRAMS), tiles)
    return iters, _cdiv(tiles, iters)


def _nhwc_blocks(M: int, C: int) -> Tuple[int, int]:
    """[BLOCK_M, BLOCK_C]: all channels up to _MAX_BLOCK_C, rows filling a _TILE tile."""
    block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
    block_m = max(1, min(_TILE // block_c, triton.next_power_of_2(M)))
    return block_m, block_c


def _nchw_blocks(rows: int, S: int) -> Tuple[int, int]:
    """[BLOCK_rows, BLOCK_S]: spatial positions up to _MAX_BLOCK_S, planes filling the tile."""
    block_s = min(triton.next_power_of_2(S), _MAX_BLOCK_S)
    block_r = max(1, min(_TILE // block_s, triton.next_power_of_2(rows)))
    return block_r, block_s


def _check_input(input: Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"fastres: input must have at least 2 dims (N, C, ...), got {input.dim()}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fastres triton kernels support float32, float16 and bfloat16 inputs, "
                        f"got {input.dtype}")


def _check_like(t: Optional[Tensor], input: Tensor, name: str) -> None:
    """`t` must have the shape, dtype and memory layout of `input` (the kernels address every
    tensor with the input's offsets). Strides of size-1 dims do not matter."""
    if t is None:
        return
    if t.shape != input.shape or t.dtype != input.dtype:
        raise ValueError(f"fastres: {name} must have the shape and dtype of input, got "
                         f"{tuple(t.shape)} {t.dtype} vs {tuple(input.shape)} {input.dtype}")
    if any(a != b for n, a, b in zip(t.shape, t.stride(), input.stride()) if n > 1):
        raise ValueError(f"fastres: {name} must have the strides of input, got {t.stride()} "
                         f"vs {input.stride()}")


def _check_param(t: Optional[Tensor], C: int, name: str) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != C or not t.is_contiguous()):
        raise ValueError(f"fastres: {name} must be a contiguous tensor of shape [{C}], got "
                         f"{tuple(t.shape)}")


def _batch_stats(x: Tensor, lay: _Layout) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (fp32) of x in training mode."""
    C = lay.C
    if lay.nhwc:
        block_m, block_c = _nhwc_blocks(lay.count, C)
        n_cblocks = _cdiv(C, block_c)
        iters, n_splits = _split(_cdiv(lay.count, block_m), n_cblocks)
        P = n_splits
        grid = (n_splits * n_cblocks,)
    else:
        block_n, block_s = _nchw_blocks(lay.N, lay.S)
        n_nblocks = _cdiv(lay.N, block_n)
        iters, n_schunks = _split(_cdiv(lay.S, block_s), C * n_nblocks)
        P = n_nblocks * n_schunks
        grid = (C * P,)
    f32 = dict(dtype=torch.float32, device=x.device)
    cnt, pmean, pm2 = (torch.empty((P, C), **f32) for _ in range(3))
    if lay.nhwc:
        launch(_stats_nhwc_kernel)[grid](
            x, cnt, pmean, pm2, lay.count, C, n_cblocks, iters,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    else:
        launch(_stats_nchw_kernel)[grid](
            x, cnt, pmean, pm2, lay.N, C, lay.S, n_nblocks, n_schunks, iters,
            BLOCK_N=block_n, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    return merge_partial_stats(cnt, pmean, pm2)


def merge_partial_stats(cnt: Tensor, pmean: Tensor, pm2: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (fp32 [C]) from [P, C] partial (count, mean, M2)
    rows, merged in a fixed order (deterministic). Also used by the convolution kernels' stats
    epilogue (fastres.kernels.conv)."""
    return _merge_per_channel(_merge_stats_kernel, (cnt, pmean, pm2))


def _merge_per_channel(kernel, inputs, *scalars) -> Tuple[Tensor, Tensor]:
    """Launch a merge kernel over [P, C] partials: ``kernel(*inputs, out0, out1, P, C,
    *scalars)``, one program per block of channels, rows summed in fixed order; returns the two
    fp32 [C] outputs."""
    P, C = inputs[0].shape
    f32 = dict(dtype=torch.float32, device=inputs[0].device)
    out0, out1 = torch.empty(C, **f32), torch.empty(C, **f32)
    block_c = min(triton.next_power_of_2(C), _MERGE_BLOCK_C)
    launch(kernel)[(_cdiv(C, block_c),)](
        *inputs, out0, out1, P, C, *scalars,
        BLOCK_P=min(triton.next_power_of_2(P), _MERGE_BLOCK_P), BLOCK_C=block_c, num_warps=4)
    return out0, out1


def bn_act_forward(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, eps: float,
                   relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """out = relu?(batch_norm(input) + residual?); returns (out, mean, var), mean/var fp32 [C]
    (batch statistics with the biased var in training, copies of the running stats in eval)."""
    _check_input(input)
    lay = _Layout(input)
    C = lay.C
    _check_like(residual, input, "residual")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_param(t, C, name)
    out = torch.empty_like(input)

    if training:
        if lay.numel == 0:  # no statistics of an empty batch
            nan = torch.full((C,), float("nan"), dtype=torch.float32, device=input.device)
            return out, nan, nan.clone()
        mean, var = _batch_stats(input, lay)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("fastres: running_mean and running_var are required in eval mode")
        mean = running_mean.to(torch.float32, copy=True)
        var = running_var.to(torch.float32, copy=True)
        if lay.numel == 0:
            return out, mean, var

    # Absent tensors: pass the input as a placeholder, the constexpr flags skip its use.
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None,
                 HAS_B=bias is not None, RELU=relu)
    res = residual if residual is not None else input
    w = weight if weight is not None else input
    b = bias if bias is not None else input
    if lay.nhwc:
        block_m, block_c = _nhwc_blocks(lay.count, C)
        n_cblocks = _cdiv(C, block_c)
        grid = (_cdiv(lay.count, block_m) * n_cblocks,)
        launch(_fwd_nhwc_kernel)[grid](
            input, res, w, b, mean, var, out, lay.count, C, eps, n_cblocks, **flags,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    else:
        NC = lay.N * C
        block_p, block_s = _nchw_blocks(NC, lay.S)
        n_sblocks = _cdiv(lay.S, block_s)
        grid = (_cdiv(NC, block_p) * n_sblocks,)
        launch(_fwd_nchw_kernel)[grid](
            input, res, w, b, mean, var, out, NC, C, lay.S, eps, n_sblocks, **flags,
            BLOCK_P=block_p, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    return out, mean, var


def bn_act_backward(grad_output: Tensor, input: Tensor, output: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                    training: bool, eps: float, relu: bool,
                    has_residual: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_residual, grad_weight, grad_bias); grad_residual is empty unless
    has_residual, grad_weight/grad_bias are fp32 [C]. The ReLU mask is read from `output` when
    given, else recomputed from input, mean, var, weight and bias (only valid without a
    residual)."""
    _check_input(input)
    lay = _Layout(input)
    C = lay.C
    _check_like(grad_output, input, "grad_output")
    _check_like(output, input, "output")
    for t, name in ((weight, "weight"), (bias, "bias"), (mean, "mean"), (var, "var")):
        _check_param(t, C, name)
    if relu and has_residual and output is None:
        raise ValueError("fastres: the backward of add+relu needs the forward output")

    grad_input = torch.empty_like(input)
    if has_residual:
        grad_residual = torch.empty_like(input)
    else:
        grad_residual = torch.empty(0, dtype=input.dtype, device=input.device)
    f32 = dict(dtype=torch.float32, device=input.device)
    if lay.numel == 0:
        return grad_input, grad_residual, torch.zeros(C, **f32), torch.zeros(C, **f32)

    use_out = relu and output is not None
    out = output if use_out else input
    w = weight if weight is not None else input
    b = bias if bias is not None else input
    flags = dict(HAS_OUT=use_out, HAS_W=weight is not None, HAS_B=bias is not None, RELU=relu)

    # 1) partial sums of g and g * (x - mean) per (split, channel)
    if lay.nhwc:
        block_m, block_c = _nhwc_blocks(lay.count, C)
        n_cblocks = _cdiv(C, block_c)
        iters, P = _split(_cdiv(lay.count, block_m), n_cblocks)
        psg, psgx = torch.empty((P, C), **f32), torch.empty((P, C), **f32)
        launch(_bwd_reduce_nhwc_kernel)[(P * n_cblocks,)](
            grad_output, input, out, w, b, mean, var, psg, psgx, lay.count, C, eps, n_cblocks,
            iters, **flags, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    else:
        block_n, block_s = _nchw_blocks(lay.N, lay.S)
        n_nblocks = _cdiv(lay.N, block_n)
        iters, n_schunks = _split(_cdiv(lay.S, block_s), C * n_nblocks)
        P = n_nblocks * n_schunks
        psg, psgx = torch.empty((P, C), **f32), torch.empty((P, C), **f32)
        launch(_bwd_reduce_nchw_kernel)[(C * P,)](
            grad_output, input, out, w, b, mean, var, psg, psgx, lay.N, C, lay.S, eps,
            n_nblocks, n_schunks, iters, **flags,
            BLOCK_N=block_n, BLOCK_S=block_s, num_warps=_NUM_WARPS)

    # 2) grad_bias = sum g, grad_weight = sum g * (x - mean) * invstd (fixed order)
    grad_weight, grad_bias = _finalize_partials(psg, psgx, var, eps)

    # 3) grad_input (and grad_residual = g)
    gr = grad_residual if has_residual else grad_input  # placeholder, not written
    flags.update(HAS_RES=has_residual, TRAINING=training,
                 LOAD_X=training or (relu and not use_out))
    inv_count = 1.0 / lay.count
    if lay.nhwc:
        block_m, block_c = _nhwc_blocks(lay.count, C)
        n_cblocks = _cdiv(C, block_c)
        grid = (_cdiv(lay.count, block_m) * n_cblocks,)
        launch(_bwd_nhwc_kernel)[grid](
            grad_output, input, out, w, b, mean, var, grad_weight, grad_bias, grad_input, gr,
            lay.count, C, eps, inv_count, n_cblocks, **flags,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    else:
        NC = lay.N * C
        block_p, block_s = _nchw_blocks(NC, lay.S)
        n_sblocks = _cdiv(lay.S, block_s)
        grid = (_cdiv(NC, block_p) * n_sblocks,)
        launch(_bwd_nchw_kernel)[grid](
            grad_output, input, out, w, b, mean, var, grad_weight, grad_bias, grad_input, gr,
            NC, C, lay.S, eps, inv_count, n_sblocks, **flags,
            BLOCK_P=block_p, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    return grad_input, grad_residual, grad_weight, grad_bias


def _finalize_partials(psg: Tensor, psgx: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(grad_weight, grad_bias), fp32 [C], from [P, C] partial sums of g and g * (x - mean)."""
    return _merge_per_channel(_bwd_finalize_kernel, (psg, psgx, var), eps)


def bn_backward_from_partials(g: Tensor, input: Tensor, weight: Optional[Tensor],
                              bias: Optional[Tensor], mean: Tensor, var: Tensor, psg: Tensor,
                              psgx: Tensor, training: bool, eps: float
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """BatchNorm backward when the ReLU-masked gradient `g` (NHWC rows, same layout as the
    channels-last `input`) and its per-channel partial sums ``psg = sum(g)`` and
    ``psgx = sum(g * (input - mean))`` ([P, C] fp32) were already produced, by the epilogue of
    the convolution's data-gradient kernel (fastres.kernels.conv). Returns (grad_input,
    grad_weight, grad_bias); grad_input is written over `g` (same offsets, read before write)."""
    lay = _Layout(input)
    C = lay.C
    if not lay.nhwc and C != 1:  # one channel: the contiguous memory is the rows [M, 1] too
        raise ValueError("fastres: bn_backward_from_partials needs a channels-last input")
    _check_like(g, input, "g")
    grad_weight, grad_bias = _finalize_partials(psg, psgx, var, eps)
    w = weight if weight is not None else input
    b = bias if bias is not None else input
    block_m, block_c = _nhwc_blocks(lay.count, C)
    n_cblocks = _cdiv(C, block_c)
    grid = (_cdiv(lay.count, block_m) * n_cblocks,)
    launch(_bwd_nhwc_kernel)[grid](
        g, input, g, w, b, mean, var, grad_weight, grad_bias, g, g,
        lay.count, C, eps, 1.0 / lay.count, n_cblocks, HAS_OUT=False, HAS_RES=False,
        HAS_W=weight is not None, HAS_B=bias is not None, RELU=False, TRAINING=training,
        LOAD_X=training, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return g, grad_weight, grad_bias
