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
The GEMM views (M rows = output pixels, K = KH*KW*CIN) are never materialised: each K step of a
program loads one filter tap (kh, kw) x BLOCK_K channels of its BLOCK_M pixels, with zero
padding done by masks. Padding is applied *after* the prologue (a padded pixel is 0, not
relu(in_shift)), as in PyTorch, where the convolution pads the normalised activation.

Reductions are deterministic: the forward statistics are written as ``[tiles, COUT]``
partials and merged in fixed order (kernels.batch_norm_act.merge_partial_stats), the dgrad
partial sums likewise, and the weight gradient is split over pixel ranges into an fp32
workspace ``[splits, COUT, KH*KW, CIN]`` that is summed in fixed order (no atomics anywhere).

Strided data-gradient: for stride s the input pixels are split into s*s phase classes
(h % s, w % s); in one class the filter taps that reach a pixel are the same for every pixel,
so a program loops over only those taps (no masked-out MACs).

Block sizes: BLOCK_M is chosen by the launcher (it sizes the statistics partials); BLOCK_N,
BLOCK_K, num_warps and num_stages are autotuned per shape (``triton.autotune``, cached per
key), from a small set of configs that suit sm80 and sm90. Under TRITON_INTERPRET=1 a single
small config is used; FASTRES_CONV_AUTOTUNE=0 (read at import) skips tuning on a GPU.
"""
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
    """Autotuning configs: `space` is a list of (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if _interpret():
        space = [(16, 16, 4, 1)]
    elif os.environ.get("FASTRES_CONV_AUTOTUNE", "1") == "0":
        space = space[3:4]  # one good default per kernel, no tuning (fast first calls)
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in space]


# sm80/sm90: 128-wide tiles with 3-4 stages for the big layers, 64-wide ones for narrow layers.
_FWD_SPACE = [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3),
              (128, 64, 4, 4)]
_WGRAD_SPACE = [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3)]


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
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32; fp32 inputs in full precision when IEEE, else TF32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _output_pixel(rows, P, Q, STRIDE: tl.constexpr, PAD: tl.constexpr):
    """(image, top row, left column) of the input window of output pixels `rows` (n, p, q)."""
    q = rows % Q
    t = rows // Q
    return t // P, (t % P) * STRIDE - PAD, q * STRIDE - PAD


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
@triton.autotune(configs=_configs(_FWD_SPACE), key=["M", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_fwd_kernel(
        x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr,
        cnt_ptr, smean_ptr, sm2_ptr,
        M, H, W, CIN, P, Q, COUT,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
        IEEE: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(COUT, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < COUT
    n, ih0, iw0 = _output_pixel(rows, P, Q, STRIDE, PAD)
    ks = tl.arange(0, BLOCK_K)
    ktot = KH * KW * CIN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in range(KH):
        ih = ih0 + kh
        h_ok = row_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = iw0 + kw
            ok = h_ok & (iw >= 0) & (iw < W)
            base = ((n * H + ih) * W + iw) * CIN
            wbase = (kh * KW + kw) * CIN
            for c0 in range(0, CIN, BLOCK_K):
                ci = c0 + ks
                ci_ok = ci < CIN
                amask = ok[:, None] & ci_ok[None, :]
                a = tl.load(x_ptr + base[:, None] + ci[None, :], mask=amask, other=0.0)
                if PROLOGUE:
                    a = _prologue(a, ci, ci_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
                b = tl.load(w_ptr + cols[None, :].to(tl.int64) * ktot + (wbase + ci)[:, None],
                            mask=ci_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)

    # epilogue
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * COUT + cols[None, :]
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
        tl.store(cnt_ptr + poffs, tl.zeros([BLOCK_N], dtype=tl.float32) + count, mask=col_ok)
        tl.store(smean_ptr + poffs, tmean, mask=col_ok)
        tl.store(sm2_ptr + poffs, tl.sum(d * d, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Data gradient
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_FWD_SPACE), key=["N", "H", "CIN", "COUT", "KH", "STRIDE"])
@triton.jit
def _conv_dgrad_kernel(
        go_ptr, w_ptr, gi_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, psg_ptr, psgx_ptr,
        N, H, W, CIN, P, Q, COUT, HC, WC,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr, IEEE: tl.constexpr,
        GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program_id(1) is the phase class (rh, rw) of the input pixels: h = hh * STRIDE + rh
    cls = tl.program_id(1)
    rh = cls // STRIDE
    rw = cls % STRIDE
    MC = N * HC * WC
    n_m = tl.cdiv(MC, BLOCK_M)
    n_n = tl.cdiv(CIN, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ww = rows % WC
    t = rows // WC
    hh = t % HC
    n = t // HC
    h = hh * STRIDE + rh
    w = ww * STRIDE + rw
    row_ok = (rows < MC) & (h < H) & (w < W)
    col_ok = cols < CIN
    ks = tl.arange(0, BLOCK_K)
    ktot = KH * KW * CIN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in range(KH):
        # output row p = (h + PAD - kh) / STRIDE exists only when the division is exact, which
        # for a phase class holds for all its pixels or for none
        if (rh + PAD - kh + STRIDE * KH) % STRIDE == 0:
            ph = h + PAD - kh
            p = ph // STRIDE
            h_ok = row_ok & (ph >= 0) & (p < P)
            for kw in range(KW):
                if (rw + PAD - kw + STRIDE * KW) % STRIDE == 0:
                    pw = w + PAD - kw
                    q = pw // STRIDE
                    ok = h_ok & (pw >= 0) & (q < Q)
                    base = ((n * P + p) * Q + q) * COUT
                    wbase = (kh * KW + kw) * CIN
                    for c0 in range(0, COUT, BLOCK_K):
                        co = c0 + ks
                        co_ok = co < COUT
                        a = tl.load(go_ptr + base[:, None] + co[None, :],
                                    mask=ok[:, None] & co_ok[None, :], other=0.0)
                        b = tl.load(w_ptr + co[:, None].to(tl.int64) * ktot + wbase
                                    + cols[None, :],
                                    mask=co_ok[:, None] & col_ok[None, :], other=0.0)
                        acc = _dot(a, b, acc, IEEE)

    mask = row_ok[:, None] & col_ok[None, :]
    offs = ((n * H + h) * W + w)[:, None] * CIN + cols[None, :]
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
        PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # tile (co block, ci block, tap) x split of the pixel range; BLOCK_N runs over CIN,
    # BLOCK_K over output pixels (the GEMM's reduction)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_ci = tl.cdiv(CIN, BLOCK_N)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    tap = pid // (n_ci * n_co)
    rest = pid % (n_ci * n_co)
    co = (rest // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = (rest % n_ci) * BLOCK_N + tl.arange(0, BLOCK_N)
    kh = tap // KW
    kw = tap % KW
    co_ok = co < COUT
    ci_ok = ci < CIN
    acc = tl.zeros([BLOCK_CO, BLOCK_N], dtype=tl.float32)
    start = split * ROWS_PER_SPLIT
    stop = tl.minimum(start + ROWS_PER_SPLIT, M)
    for m0 in range(start, stop, BLOCK_K):
        ms = (m0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_ok = ms < stop
        n, ih, iw = _output_pixel(ms, P, Q, STRIDE, PAD)
        ih += kh
        iw += kw
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g = tl.load(go_ptr + ms[:, None] * COUT + co[None, :],
                    mask=m_ok[:, None] & co_ok[None, :], other=0.0)          # [BK, BLOCK_CO]
        amask = ok[:, None] & ci_ok[None, :]
        a = tl.load(x_ptr + (((n * H + ih) * W + iw) * CIN)[:, None] + ci[None, :],
                    mask=amask, other=0.0)                                   # [BK, BLOCK_N]
        if PROLOGUE:
            a = _prologue(a, ci, ci_ok, amask, scale_ptr, shift_ptr, PRO_RELU)
        acc = _dot(tl.trans(g), a, acc, IEEE)
    offs = ((split.to(tl.int64) * COUT + co[:, None]) * (KH * KW) + tap) * CIN + ci[None, :]
    tl.store(ws_ptr + offs, acc, mask=co_ok[:, None] & ci_ok[None, :])


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
        launch(_conv_fwd_kernel)[grid](
            x, weight, out, bias if bias is not None else out,
            residual if residual is not None else out, scale, shift, cnt, pmean, pm2,
            g.M, g.H, g.W, g.CIN, g.P, g.Q, g.COUT,
            KH=g.KH, KW=g.KW, STRIDE=g.stride, PAD=g.padding, PROLOGUE=prologue,
            PRO_RELU=in_relu, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            RELU=relu, STATS=stats, IEEE=_ieee(x.dtype), GROUP_M=_GROUP_M,
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
        launch(_conv_dgrad_kernel)[grid](
            grad_out, weight, grad_in, x, scale, shift,
            in_mean if prologue else scale, psg if prologue else grad_in,
            psgx if prologue else grad_in,
            g.N, g.H, g.W, g.CIN, g.P, g.Q, g.COUT, HC, WC,
            KH=g.KH, KW=g.KW, STRIDE=s, PAD=g.padding, PROLOGUE=prologue, PRO_RELU=in_relu,
            IEEE=_ieee(x.dtype), GROUP_M=_GROUP_M, BLOCK_M=block_m)
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
    splits = max(1, min(_WGRAD_MAX_SPLITS, triton.cdiv(g.M, _WGRAD_ROWS_PER_SPLIT)))
    rows_per_split = triton.cdiv(g.M, splits)
    taps = g.KH * g.KW
    f32 = dict(dtype=torch.float32, device=x.device)
    ws = torch.zeros((splits, g.COUT, g.KH, g.KW, g.CIN), **f32) if g.M == 0 else \
        torch.empty((splits, g.COUT, g.KH, g.KW, g.CIN), **f32)
    block_co = 64 if g.COUT >= 64 and not _interpret() else 16
    if g.M > 0:
        n_co = triton.cdiv(g.COUT, block_co)
        grid = lambda meta: (taps * n_co * triton.cdiv(g.CIN, meta["BLOCK_N"]), splits)  # noqa: E731
        launch(_conv_wgrad_kernel)[grid](
            grad_out, x, scale, shift, ws, g.M, g.H, g.W, g.CIN, g.P, g.Q, g.COUT,
            rows_per_split, KH=g.KH, KW=g.KW, STRIDE=g.stride, PAD=g.padding,
            PROLOGUE=prologue, PRO_RELU=in_relu, IEEE=_ieee(x.dtype),
            BLOCK_CO=block_co)
    grad_w = ws[0] if splits == 1 else ws.sum(dim=0)
    return grad_w.permute(0, 3, 1, 2)  # [COUT, CIN, KH, KW] with channels-last strides
