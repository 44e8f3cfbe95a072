"""Triton implicit-GEMM convolutions (NHWC) with BatchNorm fused into their prologue/epilogues.

    forward   out = relu?(conv(act(x), w) + bias? + residual?)
              act(x) = relu?(x * in_scale + in_shift)   (prologue: the previous BatchNorm)
              optional epilogue: per-tile (count, mean, M2) of `out` for the next BatchNorm
    dgrad     grad_act = conv_transpose(grad_out, w); with a prologue, the epilogue applies the
              prologue's ReLU mask (recomputed from x) and emits the partial sums BatchNorm
              backward needs, sum(g) and sum(g * (x - mean))
    wgrad     grad_w = sum over pixels of grad_out x act(x), act recomputed while loading x

Everything is NHWC: ``x`` is ``[N, H, W, CIN]`` memory (a channels-last 4-D tensor), the
weight is ``[COUT, KH, KW, CIN]`` memory (a channels-last weight), the output ``[N, P, Q, COUT]``.
The GEMM views (M rows = output pixels, K = KH*KW*CIN) are never materialised. The main loop
of every kernel is one flat loop that Triton's software pipeliner accepts (num_stages operand
tiles in flight: cp.async on sm_80, asynchronous copies feeding HGMMA on sm_90):

* the row indices of a tile are divided into (image, top row, left column) once, before the
  loop; a K step (one filter tap (kh, kw) x BLOCK_K channels) then only adds a scalar offset to
  the per-row base and compares per-row coordinates (1-D masks), so nothing per element is
  recomputed and the address tensors stay small (no register spills, checked statically by
  ``python -m fastres.kernels.report`` for every config the ResNets launch);
* offsets are int32, or int64 when a tensor has 2**31 elements or more (the INT64
  specialisation);
* a 1x1 stride-1 convolution is a plain GEMM (input pixel = output pixel);
* few input channels (the 3-channel stem): the taps are folded into K (7x7x3 = 147 padded once
  to a multiple of BLOCK_K) in ``_conv_fwd_fold_kernel`` and in the weight gradient, instead of
  padding every tap's 3 channels to a whole K block.

Zero padding is done by the masks, and applied *after* the prologue (a padded pixel is 0, not
relu(in_shift)), as in PyTorch, where the convolution pads the normalised activation. The
prologue works on the loaded activation tile in registers, which the tensor-core instruction
takes as its register operand.

Reductions are deterministic: the forward statistics are written as ``[tiles, COUT]``
partials and merged in fixed order (kernels.batch_norm_act.merge_partial_stats), the dgrad
partial sums likewise, and the weight gradient is split over pixel ranges into an fp32
workspace ``[splits, COUT, KH*KW, CIN]`` that is summed in fixed order (no atomics anywhere).

Strided data-gradient: for stride s the input pixels are split into s*s phase classes
(h % s, w % s); in one class the filter taps that reach a pixel are the same for every pixel,
so a program loops over only those taps (no masked-out MACs).

Block sizes: BLOCK_M is chosen by the launcher (it sizes the statistics partials); BLOCK_N,
BLOCK_K, num_warps and num_stages are autotuned per shape (``triton.autotune``, cached per
key), from a few configs that compile spill-free for sm_80 and sm_90 (see _FWD_SPACE). Under
TRITON_INTERPRET=1 a single small config is used; FASTRES_CONV_AUTOTUNE=0 (read at import)
keeps the first config of each list (no tuning) on a GPU.
"""
import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from .launch import launch

from .batch_norm_act import _affine, _relu, _relu_grad, merge_partial_stats

__all__ = ["conv_forward", "conv_dgrad", "conv_wgrad", "ConvGeometry"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GROUP_M = 8              # programs along M that share the same weight columns (L2 reuse)
_WGRAD_ROWS_PER_SPLIT = 8192  # output pixels summed by one weight-gradient program
_WGRAD_MAX_SPLITS = 64


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(space):
    """Autotuning configs: `space` is a list of (BLOCK_N, BLOCK_K, num_warps, num_stages), the
    first entry the default that FASTRES_CONV_AUTOTUNE=0 keeps."""
    if _interpret():
        space = [(16, 16, 4, 1)]
    elif os.environ.get("FASTRES_CONV_AUTOTUNE", "1") == "0":
        space = space[:1]  # no tuning (fast first calls)
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s,
                          maxnreg=_MAXNREG)
            for n, k, w, s in space]


# (BLOCK_N, BLOCK_K, num_warps, num_stages) with BLOCK_M = 128: tiles of 128 x 64-128 output
# pixels x channels, K steps of 32-64, 3-4 stages of software pipelining. Each config compiles
# for sm_90 (HGMMA) and sm_80 (HMMA) without a register spill in every specialisation the
# ResNets launch, under the Triton versions CI installs (python -m fastres.kernels.report;
# tests/test_kernel_static.py). 128 x 256 tiles and 128-wide tiles on 4 warps spilled (the
# epilogues keep the accumulator and a tile of statistics or of x live together) and are gone.
_FWD_SPACE = [(128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 8, 4)]
_DGRAD_SPACE = _FWD_SPACE
_FOLD_SPACE = [(64, 32, 4, 4), (64, 16, 4, 4), (64, 32, 4, 3), (128, 32, 8, 3)]
_WGRAD_SPACE = [(128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 8, 4)]
# fp32 (TF32) tiles are twice the bytes: K blocks of 64 spilled there, so the fp32 autotuners
# (the same kernels) use K blocks of 32; the stem's folded kernel already does
_FP32_SPACE = [(128, 32, 8, 3), (64, 32, 4, 4)]
# ptxas' register limit, stated: without it, the ptxas of triton 3.6 trades a few spills for
# occupancy (128 or 168 registers and 1-8 STL/LDL in some configs, zero with the limit at 255);
# shared memory (36-116 KB per program) bounds these kernels' occupancy anyway
_MAXNREG = 255


@triton.jit
def _grouped_tile(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles walked together for L2 reuse of weight tiles."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.jit
def _wide(v, INT64: tl.constexpr):
    """Element offsets in int64 when a tensor has 2**31 elements or more, else int32."""
    if INT64:
        return v.to(tl.int64)
    return v


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32; fp32 inputs in full precision when IEEE, else TF32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _prologue(a, ch, ch_ok, amask, scale_ptr, shift_ptr, RELU: tl.constexpr):
    """act = relu?(a * scale + shift) in fp32, 0 where masked (padding), in a's dtype."""
    scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
    act = _affine(a.to(tl.float32), scale[None, :], shift[None, :])
    if RELU:
        act = _relu(act)
    return tl.where(amask, act, 0.0).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_epilogue(acc, rows, cols, row_ok, col_ok, pid_m, out_ptr, bias_ptr, res_ptr, cnt_ptr,
                  smean_ptr, sm2_ptr, COUT, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  RELU: tl.constexpr, STATS: tl.constexpr, INT64: tl.constexpr):
    """Store relu?(acc + bias? + residual?) and, with STATS, the tile's per-channel
    (count, mean, M2) of the stored values."""
    mask = row_ok[:, None] & col_ok[None, :]
    offs = _wide(rows, INT64)[:, None] * COUT + cols[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = _relu(acc)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    if STATS:
        # statistics of the stored values (what BatchNorm will normalise), two-pass in the tile
        y = tl.where(mask, out.to(tl.float32), 0.0)
        count = tl.sum(row_ok.to(tl.float32), axis=0)
        tmean = tl.sum(y, axis=0) / count
        d = tl.where(mask, y - tmean[None, :], 0.0)
        poffs = pid_m * COUT + cols
        tl.store(cnt_ptr + poffs, tl.zeros_like(tmean) + count, mask=col_ok)
        tl.store(smean_ptr + poffs, tmean, mask=col_ok)
        tl.store(sm2_ptr + poffs, tl.sum(d * d, axis=0), mask=col_ok)


@triton.autotune(configs=_configs(_FWD_SPACE), key=["M", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr,
        cnt_ptr, smean_ptr, sm2_ptr,
        M, H, W, CIN, P, Q, COUT,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr, TMA: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(COUT, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < COUT
    ks = tl.arange(0, BLOCK_K)
    wcols = cols * (KH * KW * CIN)  # weight offsets of the output channels (< 2**31 elements)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0 and TMA:
        # a plain GEMM, x a [M, CIN] matrix; sm_90's tensor memory accelerator copies the tiles
        # of x and of the weight ([COUT, CIN]) into shared memory, zero past the ends (rows past
        # M are computed from zeros and not stored, nor counted in the statistics)
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, CIN], strides=[CIN, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
        wd = tl.make_tensor_descriptor(w_ptr, shape=[COUT, CIN], strides=[CIN, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
        for c0 in range(0, CIN, BLOCK_K):
            a = xd.load([pid_m * BLOCK_M, c0])
            if PROLOGUE:
                ci = c0 + ks
                ci_ok = ci < CIN
                a = _prologue(a, ci, ci_ok, ci_ok[None, :], scale_ptr, shift_ptr, PRO_RELU)
            acc = _dot(a, tl.trans(wd.load([pid_n * BLOCK_N, c0])), acc, IEEE)
    elif KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0:
        # a plain GEMM: output pixel m reads input pixel m
        xrow = _wide(rows, INT64) * CIN
        for c0 in range(0, CIN, BLOCK_K):
            ci = c0 + ks
            ci_ok = ci < CIN
            amask = row_ok[:, None] & ci_ok[None, :]
            a = tl.load(x_ptr + (xrow[:, None] + ci[None, :]), mask=amask, other=0.0)
            if PROLOGUE:
                a = _prologue(a, ci, ci_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
            b = tl.load(w_ptr + (wcols[None, :] + ci[:, None]),
                        mask=ci_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
    else:
        # the top-left input pixel of each output pixel's window, divided out once; then one
        # loop over filter taps x channel blocks (a single software-pipelined loop)
        q = rows % Q
        t = rows // Q
        ih0 = (t % P) * STRIDE - PAD
        iw0 = q * STRIDE - PAD
        xrow = ((_wide(t // P, INT64) * H + ih0) * W + iw0) * CIN
        n_cb = tl.cdiv(CIN, BLOCK_K)
        for it in range(0, KH * KW * n_cb):
            tap = it // n_cb
            c0 = (it - tap * n_cb) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh
            iw = iw0 + kw
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = c0 + ks
            ci_ok = ci < CIN
            amask = ok[:, None] & ci_ok[None, :]
            a = tl.load(x_ptr + ((xrow + (kh * W + kw) * CIN)[:, None] + ci[None, :]),
                        mask=amask, other=0.0)
            if PROLOGUE:
                a = _prologue(a, ci, ci_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
            b = tl.load(w_ptr + (wcols[None, :] + (tap * CIN + ci)[:, None]),
                        mask=ci_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
    _fwd_epilogue(acc, rows, cols, row_ok, col_ok, pid_m, out_ptr, bias_ptr, res_ptr, cnt_ptr,
                  smean_ptr, sm2_ptr, COUT, HAS_BIAS, HAS_RES, RELU, STATS, INT64)


@triton.autotune(configs=_configs(_FOLD_SPACE), key=["M", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_fwd_fold_kernel(
        x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr,
        cnt_ptr, smean_ptr, sm2_ptr,
        M, H, W, CIN, P, Q, COUT,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The forward for few input channels (the 3-channel stem): K = (kh, kw, ci) flattened and
    padded once to a multiple of BLOCK_K (7x7x3 = 147 -> 160), instead of every tap's channels
    padded to a whole K block."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(COUT, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < COUT
    ktot = KH * KW * CIN
    wcols = cols * ktot
    q = rows % Q
    t = rows // Q
    ih0 = (t % P) * STRIDE - PAD
    iw0 = q * STRIDE - PAD
    xrow = ((_wide(t // P, INT64) * H + ih0) * W + iw0) * CIN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, ktot, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < ktot
        tap = k // CIN
        ci = k - tap * CIN
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        amask = (row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                 & (iw < W))
        a = tl.load(x_ptr + (xrow[:, None] + ((kh * W + kw) * CIN + ci)[None, :]),
                    mask=amask, other=0.0)
        if PROLOGUE:
            a = _prologue(a, ci, k_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
        b = tl.load(w_ptr + (wcols[None, :] + k[:, None]),
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
    _fwd_epilogue(acc, rows, cols, row_ok, col_ok, pid_m, out_ptr, bias_ptr, res_ptr, cnt_ptr,
                  smean_ptr, sm2_ptr, COUT, HAS_BIAS, HAS_RES, RELU, STATS, INT64)


# ---------------------------------------------------------------------------------------------
# Data gradient
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_DGRAD_SPACE), key=["N", "H", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_dgrad_kernel(
        go_ptr, w_ptr, gi_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, psg_ptr, psgx_ptr,
        N, H, W, CIN, P, Q, COUT, HC, WC,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr, IEEE: tl.constexpr,
        INT64: tl.constexpr, TMA: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program_id(1) is the phase class (rh, rw) of the input pixels: h = hh * STRIDE + rh; the
    # filter taps that reach it are kh = kh0 + j * STRIDE (likewise kw), reading output row
    # p = hh + dh - j: the same taps for every pixel of the class, so no masked-out MACs
    cls = tl.program_id(1)
    rh = cls // STRIDE
    rw = cls % STRIDE
    MC = N * HC * WC
    n_m = tl.cdiv(MC, BLOCK_M)
    n_n = tl.cdiv(CIN, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ww = rows % WC
    t = rows // WC
    hh = t % HC
    n = _wide(t // HC, INT64)
    h = hh * STRIDE + rh
    w = ww * STRIDE + rw
    row_ok = (rows < MC) & (h < H) & (w < W)
    col_ok = cols < CIN
    ks = tl.arange(0, BLOCK_K)
    ktot = KH * KW * CIN
    kh0 = (rh + PAD) % STRIDE
    kw0 = (rw + PAD) % STRIDE
    nkh = (KH - kh0 + STRIDE - 1) // STRIDE
    nkw = (KW - kw0 + STRIDE - 1) // STRIDE
    p0 = hh + (rh + PAD - kh0) // STRIDE
    q0 = ww + (rw + PAD - kw0) // STRIDE
    gorow = ((n * P + p0) * Q + q0) * COUT
    n_cb = tl.cdiv(COUT, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0 and TMA:
        # grad_out a [MC, COUT] matrix times the weight as [COUT, CIN], tiles by TMA (sm_90)
        gd = tl.make_tensor_descriptor(go_ptr, shape=[MC, COUT], strides=[COUT, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
        wd = tl.make_tensor_descriptor(w_ptr, shape=[COUT, CIN], strides=[CIN, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
        for c0 in range(0, COUT, BLOCK_K):
            acc = _dot(gd.load([pid_m * BLOCK_M, c0]), wd.load([c0, pid_n * BLOCK_N]), acc,
                       IEEE)
    else:
        for it in range(0, nkh * nkw * n_cb):
            tap = it // n_cb
            c0 = (it - tap * n_cb) * BLOCK_K
            j = tap // nkw
            jw = tap - j * nkw
            p = p0 - j
            q = q0 - jw
            ok = row_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
            co = c0 + ks
            co_ok = co < COUT
            a = tl.load(go_ptr + ((gorow - (j * Q + jw) * COUT)[:, None] + co[None, :]),
                        mask=ok[:, None] & co_ok[None, :], other=0.0)
            wtap = ((kh0 + j * STRIDE) * KW + kw0 + jw * STRIDE) * CIN
            b = tl.load(w_ptr + ((co * ktot)[:, None] + (wtap + cols)[None, :]),
                        mask=co_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)

    mask = row_ok[:, None] & col_ok[None, :]
    offs = (((n * H + h) * W + w) * CIN)[:, None] + cols[None, :]
    if PROLOGUE:
        # backward of act = relu(x * scale + shift): mask recomputed from x, then the partial
        # sums of BatchNorm backward over this tile's pixels
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        if PRO_RELU:  # the mask of relu(act), act rounded to x's dtype as the prologue did
            act = _affine(x, scale[None, :], shift[None, :]).to(x_ptr.dtype.element_ty)
            acc = _relu_grad(acc, act.to(tl.float32))
        g = acc.to(gi_ptr.dtype.element_ty)
        tl.store(gi_ptr + offs, g, mask=mask)
        gf = tl.where(mask, g.to(tl.float32), 0.0)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        poffs = (cls * n_m + pid_m) * CIN + cols
        tl.store(psg_ptr + poffs, tl.sum(gf, axis=0), mask=col_ok)
        tl.store(psgx_ptr + poffs, tl.sum(gf * (x - mean[None, :]), axis=0), mask=col_ok)
    else:
        tl.store(gi_ptr + offs, acc.to(gi_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Weight gradient
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_WGRAD_SPACE), key=["M", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_wgrad_kernel(
        go_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr,
        M, H, W, CIN, P, Q, COUT, ROWS_PER_SPLIT,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        FOLD: tl.constexpr, PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr, TMA: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # tile (co block, ci block, tap) x split of the pixel range; BLOCK_N runs over CIN (with
    # FOLD over the flattened (kh, kw, ci), all taps in one tile), BLOCK_K over output pixels
    # (the GEMM's reduction)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ktot = KH * KW * CIN
    if FOLD:
        n_ci = tl.cdiv(ktot, BLOCK_N)
    else:
        n_ci = tl.cdiv(CIN, BLOCK_N)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    tap = pid // (n_ci * n_co)
    rest = pid % (n_ci * n_co)
    co = (rest // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    kc = (rest % n_ci) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    if FOLD:
        ci_ok = kc < ktot
        ktap = kc // CIN
        ci = kc - ktap * CIN
        kh = ktap // KW
        kw = ktap - kh * KW
        wcol = kc
    else:
        ci_ok = kc < CIN
        ci = kc
        kh = tap // KW
        kw = tap - kh * KW
        wcol = tap * CIN + kc
    xcol = (kh * W + kw) * CIN + ci
    acc = tl.zeros([BLOCK_CO, BLOCK_N], dtype=tl.float32)
    start = split * ROWS_PER_SPLIT
    stop = tl.minimum(start + ROWS_PER_SPLIT, M)
    if KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0 and TMA:
        # grad_out [M, COUT] and x [M, CIN] as matrices, tiles by TMA (sm_90); the launcher
        # makes ROWS_PER_SPLIT a multiple of BLOCK_K, so a tile never reaches into the next
        # split, only past M, where TMA reads zeros
        gd = tl.make_tensor_descriptor(go_ptr, shape=[M, COUT], strides=[COUT, 1],
                                       block_shape=[BLOCK_K, BLOCK_CO])
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, CIN], strides=[CIN, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
        co0 = (rest // n_ci) * BLOCK_CO
        ci0 = (rest % n_ci) * BLOCK_N
        for m0 in range(start, stop, BLOCK_K):
            a = xd.load([m0, ci0])
            if PROLOGUE:  # rows past M are zeros before the prologue, not after it
                m_ok = (m0 + tl.arange(0, BLOCK_K)) < stop
                a = _prologue(a, ci, ci_ok, m_ok[:, None] & ci_ok[None, :], scale_ptr,
                              shift_ptr, PRO_RELU)
            acc = _dot(tl.trans(gd.load([m0, co0])), a, acc, IEEE)
    else:
        for m0 in range(start, stop, BLOCK_K):
            ms = m0 + tl.arange(0, BLOCK_K)
            m_ok = ms < stop
            g = tl.load(go_ptr + (_wide(ms, INT64)[:, None] * COUT + co[None, :]),
                        mask=m_ok[:, None] & co_ok[None, :], other=0.0)  # [BK, BLOCK_CO]
            if KH == 1 and KW == 1 and STRIDE == 1 and PAD == 0:
                amask = m_ok[:, None] & ci_ok[None, :]
                xrow = _wide(ms, INT64) * CIN
            else:
                q = ms % Q
                t = ms // Q
                ih = (t % P) * STRIDE - PAD
                iw = q * STRIDE - PAD
                xrow = ((_wide(t // P, INT64) * H + ih) * W + iw) * CIN
                if FOLD:
                    ih2 = ih[:, None] + kh[None, :]
                    iw2 = iw[:, None] + kw[None, :]
                    amask = (m_ok[:, None] & ci_ok[None, :] & (ih2 >= 0) & (ih2 < H)
                             & (iw2 >= 0) & (iw2 < W))
                else:
                    ih += kh
                    iw += kw
                    ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    amask = ok[:, None] & ci_ok[None, :]
            a = tl.load(x_ptr + (xrow[:, None] + xcol[None, :]), mask=amask,
                        other=0.0)  # [BK, BN]
            if PROLOGUE:
                a = _prologue(a, ci, ci_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
            acc = _dot(tl.trans(g), a, acc, IEEE)
    offs = (split.to(tl.int64) * COUT + co[:, None]) * ktot + wcol[None, :]
    tl.store(ws_ptr + offs, acc, mask=co_ok[:, None] & ci_ok[None, :])


# the same kernels tuned over _FP32_SPACE, for float32 tensors
_conv_fwd_kernel_fp32 = triton.autotune(configs=_configs(_FP32_SPACE),
                                        key=_conv_fwd_kernel.keys)(_conv_fwd_kernel.fn)
_conv_dgrad_kernel_fp32 = triton.autotune(configs=_configs(_FP32_SPACE),
                                          key=_conv_dgrad_kernel.keys)(_conv_dgrad_kernel.fn)
_conv_wgrad_kernel_fp32 = triton.autotune(configs=_configs(_FP32_SPACE),
                                          key=_conv_wgrad_kernel.keys)(_conv_wgrad_kernel.fn)


def _tuned(kernel_fp16, kernel_fp32, dtype: torch.dtype):
    return kernel_fp32 if dtype == torch.float32 else kernel_fp16


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------
class ConvGeometry:
    """Shapes of a convolution with a square kernel, equal stride and padding in H and W."""

    def __init__(self, x_shape, w_shape, stride: int, padding: int):
        self.N, self.CIN, self.H, self.W = (int(s) for s in x_shape)
        self.COUT, cin_w, self.KH, self.KW = (int(s) for s in w_shape)
        if cin_w != self.CIN:
            raise ValueError(f"fastres conv: weight has {cin_w} input channels but input has "
                             f"{self.CIN} (groups are not supported by the Triton convolution)")
        self.stride, self.padding = int(stride), int(padding)
        if self.stride < 1 or self.padding < 0:
            raise ValueError(f"fastres conv: stride must be >= 1 and padding >= 0, got "
                             f"stride={stride}, padding={padding}")
        self.P = (self.H + 2 * self.padding - self.KH) // self.stride + 1
        self.Q = (self.W + 2 * self.padding - self.KW) // self.stride + 1
        if self.P < 1 or self.Q < 1:
            raise ValueError(f"fastres conv: input {self.H}x{self.W} is smaller than the "
                             f"{self.KH}x{self.KW} kernel with padding {self.padding}")
        self.M = self.N * self.P * self.Q

    @property
    def out_shape(self):
        return (self.N, self.COUT, self.P, self.Q)


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _check_nhwc(t: Tensor, name: str) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fastres conv: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dtype == torch.bfloat16 and _interpret():
        raise TypeError("fastres conv: bfloat16 does not run under TRITON_INTERPRET=1: Triton's "
                        "interpreter computes tl.dot of bfloat16 tiles wrongly (numpy has no "
                        "bfloat16); use float32 or float16 on CPU, bfloat16 on a GPU")
    if not _channels_last(t):
        raise ValueError(f"fastres conv: {name} must be a channels-last 4-D tensor "
                         f"(x.contiguous(memory_format=torch.channels_last)), got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 products: full precision unless torch.backends.cudnn.allow_tf32 (PyTorch's default
    for its own convolutions), then TF32."""
    return dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


_INT32_MAX = 2 ** 31 - 1
_FOLD_MAX_CIN = 16  # fewer input channels than this: taps folded into K (the 3-channel stem)


def _int64(g: "ConvGeometry", *numels: int) -> bool:
    """Offsets need int64: a tensor of 2**31 elements or more, counting the reach of a filter
    window past the ends of x (padding offsets are formed before they are masked)."""
    reach = (g.KH + 1) * (g.W + g.KW + 1) * g.CIN
    return max(numels) + reach > _INT32_MAX


def _fold(g: "ConvGeometry") -> bool:
    """Fold the filter taps into K (one K block spans taps): a few input channels would
    otherwise pad every tap's channels to a whole K block (3 of 16-64 for the stem)."""
    return g.CIN < _FOLD_MAX_CIN and g.KH * g.KW > 1


def _capability(device: torch.device) -> Tuple[int, int]:
    """The compute capability the launch targets: the GPU's; on the meta device (the static
    kernel report) the one `meta_target` sets; on CPU (the interpreter) (0, 0)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    if device.type == "meta":
        return _META_CAPABILITY[-1]
    return (0, 0)


_META_CAPABILITY = [(0, 0)]


@contextlib.contextmanager
def meta_target(capability: Tuple[int, int]):
    """Launches on meta tensors inside the block choose as on a GPU of `capability` (the
    static kernel report records the launches once per target arch)."""
    _META_CAPABILITY.append(tuple(capability))
    try:
        yield
    finally:
        _META_CAPABILITY.pop()


def _tma(g: "ConvGeometry", *tensors: Tensor) -> bool:
    """Tensor descriptors (TMA) for a 1x1 stride-1 layer on sm_90+: its activations are plain
    [pixels, channels] matrices. TMA needs 16-byte aligned bases and row pitches; elsewhere,
    and with FASTRES_CONV_TMA=0, the pointer path runs."""
    if not (g.KH == g.KW == 1 and g.stride == 1 and g.padding == 0) or \
            os.environ.get("FASTRES_CONV_TMA", "1") == "0" or \
            not hasattr(tl, "make_tensor_descriptor"):
        return False
    device = tensors[0].device
    if _capability(device) < (9, 0) and not (device.type == "cpu" and _TMA_ON_CPU):
        return False
    size = tensors[0].element_size()
    return all((t.shape[1] * size) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


_TMA_ON_CPU = False  # tests switch the TMA path on under the interpreter


def _scratch(size: int, alignment: int, stream):
    """Global scratch for the tensor descriptors a kernel makes (128 bytes each per program),
    on the device the launch runs on (the current CUDA device; the CPU under the interpreter)."""
    device = "cpu" if _interpret() or not torch.cuda.is_available() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def _set_allocator() -> None:
    """Kernels that make tensor descriptors need Triton's allocator at launch; it is per thread
    (a ContextVar), and autograd runs backward in a thread of its own: set ours wherever none
    is set (a user's stays)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "_NULL_ALLOCATOR", None)
    if current is None or null is None or current.get() is null:
        triton.set_allocator(_scratch)


def _block_m(rows: int) -> int:
    return max(16, min(128, triton.next_power_of_2(rows)))


def _prologue_args(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]):
    if (in_scale is None) != (in_shift is None):
        raise ValueError("fastres conv: give both in_scale and in_shift, or neither")
    if in_scale is None:
        return False, x, x
    C = x.shape[1]
    for t, name in ((in_scale, "in_scale"), (in_shift, "in_shift")):
        if t.shape != (C,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"fastres conv: {name} must be a contiguous float32 tensor of "
                             f"shape [{C}], got {tuple(t.shape)} {t.dtype}")
    return True, in_scale, in_shift


def conv_forward(x: Tensor, weight: Tensor, stride: int, padding: int,
                 bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                 in_relu: bool = True, relu: bool = False, stats: bool = False
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """``out = relu?(conv2d(act(x), weight) + bias? + residual?)`` with
    ``act(x) = relu?(x * in_scale + in_shift)`` when in_scale/in_shift are given.

    x, weight and residual are channels-last (weight: ``w.contiguous(memory_format=
    torch.channels_last)``); bias is [COUT]; in_scale/in_shift fp32 [CIN]. Returns (out, mean,
    var): out channels-last in x's dtype; with `stats`, the per-channel mean and biased variance
    (fp32) of the stored out, else empty tensors.
    """
    _check_nhwc(x, "input")
    _check_nhwc(weight, "weight")
    if weight.dtype != x.dtype:
        raise TypeError(f"fastres conv: weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    g = ConvGeometry(x.shape, weight.shape, stride, padding)
    prologue, scale, shift = _prologue_args(x, in_scale, in_shift)
    out = torch.empty(g.out_shape, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    if residual is not None:
        if residual.shape != out.shape or residual.dtype != x.dtype:
            raise ValueError(f"fastres conv: residual must have shape {tuple(out.shape)} and "
                             f"dtype {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
        _check_nhwc(residual, "residual")
    if bias is not None and (bias.shape != (g.COUT,) or not bias.is_contiguous()):
        raise ValueError(f"fastres conv: bias must be contiguous of shape [{g.COUT}], got "
                         f"{tuple(bias.shape)}")
    block_m = _block_m(g.M)
    n_m = triton.cdiv(g.M, block_m)
    f32 = dict(dtype=torch.float32, device=x.device)
    if stats:
        cnt, pmean, pm2 = (torch.empty((n_m, g.COUT), **f32) for _ in range(3))
    else:
        cnt = pmean = pm2 = out
    if g.M > 0:
        grid = lambda meta: (n_m * triton.cdiv(g.COUT, meta["BLOCK_N"]),)  # noqa: E731
        if _fold(g):
            kernel, layout = _conv_fwd_fold_kernel, {}
        else:
            kernel = _tuned(_conv_fwd_kernel, _conv_fwd_kernel_fp32, x.dtype)
            layout = dict(TMA=_tma(g, x, weight))
            if layout["TMA"]:
                _set_allocator()
        launch(kernel)[grid](
            x, weight, out, bias if bias is not None else out,
            residual if residual is not None else out, scale, shift, cnt, pmean, pm2,
            g.M, g.H, g.W, g.CIN, g.P, g.Q, g.COUT,
            KH=g.KH, KW=g.KW, STRIDE=g.stride, PAD=g.padding,
            PROLOGUE=prologue, PRO_RELU=prologue and in_relu, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, RELU=relu, STATS=stats, IEEE=_ieee(x.dtype),
            INT64=_int64(g, x.numel(), out.numel()), **layout, GROUP_M=_GROUP_M,
            BLOCK_M=block_m)
    if stats and g.M > 0:
        mean, var = merge_partial_stats(cnt, pmean, pm2)
    elif stats:
        mean = torch.full((g.COUT,), float("nan"), **f32)
        var = mean.clone()
    else:
        mean, var = torch.empty(0, **f32), torch.empty(0, **f32)
    return out, mean, var


def conv_dgrad(grad_out: Tensor, weight: Tensor, x: Tensor, stride: int, padding: int,
               in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
               in_mean: Optional[Tensor] = None, in_relu: bool = True
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradient with respect to the convolution's input activation.

    Without a prologue: returns (grad_act, empty, empty). With one (in_scale/in_shift/in_mean
    of the previous BatchNorm): returns (g, psg, psgx) where g = grad_act * relu mask (in x's
    dtype, channels-last) and psg/psgx are [P, CIN] fp32 partial sums of g and
    g * (x - in_mean), for kernels.batch_norm_act.bn_backward_from_partials.
    """
    _check_nhwc(grad_out, "grad_output")
    _check_nhwc(weight, "weight")
    _check_nhwc(x, "input")
    g = ConvGeometry(x.shape, weight.shape, stride, padding)
    if tuple(grad_out.shape) != g.out_shape:
        raise ValueError(f"fastres conv: grad_output has shape {tuple(grad_out.shape)}, "
                         f"expected {g.out_shape}")
    prologue, scale, shift = _prologue_args(x, in_scale, in_shift)
    if prologue and (in_mean is None or in_mean.shape != (g.CIN,)):
        raise ValueError("fastres conv: the prologue's backward needs in_mean of shape [CIN]")
    grad_in = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    s = g.stride
    HC, WC = triton.cdiv(g.H, s), triton.cdiv(g.W, s)
    rows = g.N * HC * WC
    block_m = _block_m(rows)
    n_m = triton.cdiv(rows, block_m)
    f32 = dict(dtype=torch.float32, device=x.device)
    if prologue:
        psg = torch.empty((s * s * n_m, g.CIN), **f32)
        psgx = torch.empty((s * s * n_m, g.CIN), **f32)
    else:
        psg = psgx = torch.empty(0, **f32)
    if x.numel() > 0:
        grid = lambda meta: (n_m * triton.cdiv(g.CIN, meta["BLOCK_N"]), s * s)  # noqa: E731
        tma = _tma(g, grad_out, weight)
        if tma:
            _set_allocator()
        launch(_tuned(_conv_dgrad_kernel, _conv_dgrad_kernel_fp32, x.dtype))[grid](
            grad_out, weight, grad_in, x, scale, shift,
            in_mean if prologue else scale, psg if prologue else grad_in,
            psgx if prologue else grad_in,
            g.N, g.H, g.W, g.CIN, g.P, g.Q, g.COUT, HC, WC,
            KH=g.KH, KW=g.KW, STRIDE=s, PAD=g.padding, PROLOGUE=prologue,
            PRO_RELU=prologue and in_relu, IEEE=_ieee(x.dtype),
            INT64=_int64(g, x.numel(), grad_out.numel()), TMA=tma, GROUP_M=_GROUP_M,
            BLOCK_M=block_m)
    return grad_in, psg, psgx


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape, stride: int, padding: int,
               in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
               in_relu: bool = True) -> Tensor:
    """Gradient with respect to the weight, fp32, shape ``weight_shape`` (channels-last
    strides); act(x) is recomputed from x while loading when in_scale/in_shift are given."""
    _check_nhwc(grad_out, "grad_output")
    _check_nhwc(x, "input")
    g = ConvGeometry(x.shape, weight_shape, stride, padding)
    if tuple(grad_out.shape) != g.out_shape:
        raise ValueError(f"fastres conv: grad_output has shape {tuple(grad_out.shape)}, "
                         f"expected {g.out_shape}")
    prologue, scale, shift = _prologue_args(x, in_scale, in_shift)
    kernel = _tuned(_conv_wgrad_kernel, _conv_wgrad_kernel_fp32, x.dtype)
    tma = _tma(g, grad_out, x)
    # a split's pixel range is a whole number of K steps (TMA tiles then never reach into the
    # next split's rows, whose gradients are not masked)
    step = max(c.kwargs["BLOCK_K"] for c in kernel.configs)
    splits = max(1, min(_WGRAD_MAX_SPLITS, triton.cdiv(g.M, _WGRAD_ROWS_PER_SPLIT)))
    rows_per_split = max(1, triton.cdiv(triton.cdiv(g.M, splits), step)) * step
    splits = max(1, triton.cdiv(g.M, rows_per_split))
    taps = g.KH * g.KW
    f32 = dict(dtype=torch.float32, device=x.device)
    ws = torch.zeros((splits, g.COUT, g.KH, g.KW, g.CIN), **f32) if g.M == 0 else \
        torch.empty((splits, g.COUT, g.KH, g.KW, g.CIN), **f32)
    block_co = 64 if g.COUT >= 64 and not _interpret() else 16
    if g.M > 0:
        n_co = triton.cdiv(g.COUT, block_co)
        cols, tiles = (taps * g.CIN, 1) if _fold(g) else (g.CIN, taps)
        grid = lambda meta: (tiles * n_co * triton.cdiv(cols, meta["BLOCK_N"]), splits)  # noqa: E731
        if tma:
            _set_allocator()
        launch(kernel)[grid](
            grad_out, x, scale, shift, ws, g.M, g.H, g.W, g.CIN, g.P, g.Q, g.COUT,
            rows_per_split, KH=g.KH, KW=g.KW, STRIDE=g.stride, PAD=g.padding, FOLD=_fold(g),
            PROLOGUE=prologue, PRO_RELU=prologue and in_relu, IEEE=_ieee(x.dtype),
            INT64=_int64(g, x.numel(), grad_out.numel()), TMA=tma, BLOCK_CO=block_co)
    grad_w = ws[0] if splits == 1 else ws.sum(dim=0)
    return grad_w.permute(0, 3, 1, 2)  # [COUT, CIN, KH, KW] with channels-last strides
