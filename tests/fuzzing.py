"""Differential fuzzing of the fused ops against unfused PyTorch (used by tests/test_fuzz.py).

Every case is drawn from a numpy generator seeded with (SEED, case index), so a case is
reproducible by its index alone. Three results are compared per tensor (outputs, running
statistics, every gradient):

* ``fused``  the fastres op on the backend under test;
* ``same``   unfused PyTorch (F.batch_norm + add + F.relu, or F.conv2d + ...) in the same dtype
             on the same device (BatchNorm: on a contiguous copy of x, see test_fuzz.py);
* ``ref``    an independent reference in extended precision (numpy longdouble, 64-bit
             mantissa) for the BatchNorm ops, PyTorch in float64 for the convolution.

Rule (:func:`assert_matches`):

1. NaN and inf: where PyTorch gives NaN, +inf or -inf and the reference is not finite either,
   the fused result holds exactly the same special value. Where PyTorch gives a finite value,
   the fused result is finite. Where PyTorch overflowed its own dtype but the reference is
   finite (e.g. fp16 ``bn(x) + residual`` whose first sum overflows), the fused result may equal
   PyTorch's value or be finite, and then close to the reference.
2. Finite values: the project's numerics rule (tests/numerics.py) over the positions where all
   three are finite: RMS error at most 2x unfused PyTorch's + floor, max error likewise.

Where the outcome is decided by rounding or by the order of operations, and PyTorch's own
kernels differ among themselves, the rule is relaxed, and only there: a large mean with a tiny
variance (an allowance for the error any implementation makes, ReLU masks within that error
not compared, see :func:`reference_bn`), an infinite gradient meeting another in the
backward's sums (NaN or inf, only "not finite" is required), and the batch mean of a channel
holding inf on CUDA (PyTorch's Welford gives NaN or inf depending on the order).

Environment: FASTRES_FUZZ_CASES (BatchNorm cases, default 300), FASTRES_FUZZ_CONV_CASES
(convolution cases, default 100), FASTRES_FUZZ_SEED (default 12). The counts are reported at
the end of the pytest run (tests/conftest.py).
"""
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from numerics import FLOOR, assert_rms_rule

SEED = int(os.environ.get("FASTRES_FUZZ_SEED", "12"))
BN_CASES = int(os.environ.get("FASTRES_FUZZ_CASES", "300"))
CONV_CASES = int(os.environ.get("FASTRES_FUZZ_CONV_CASES", "100"))

# What the run covered, printed by tests/conftest.py's terminal summary.
SUMMARY: Counter = Counter()

LD = np.longdouble
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
SPECIALS = (float("nan"), float("inf"), float("-inf"))


def record(*keys, n=1):
    for k in keys:
        SUMMARY[k] += n


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _classes(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == math.inf] = 2
    c[t == -math.inf] = 3
    return c


def _where(mask, f, s, r, limit=4):
    idx = mask.nonzero()[:limit].tolist()
    return "; ".join(f"{tuple(i)}: fused {f[tuple(i)].item():.6g}, pytorch "
                     f"{s[tuple(i)].item():.6g}, reference {r[tuple(i)].item():.6g}" for i in idx)


def assert_close(f, s, r, dtype, what, mask_flips=False, allowance=0.0):
    """tests/numerics.py's assert_close_rule with an extra absolute `allowance` (the rounding
    an ill-conditioned case forces on any implementation, see :func:`reference_bn`), which
    also lets a gradient move by a whole value where a ReLU mask flips."""
    scale = assert_rms_rule(f, s, r, dtype, what, allowance)
    floor = FLOOR[dtype] * scale
    max_f = (f - r).abs().max().item()
    max_s = (s - r).abs().max().item()
    low = dtype in (torch.float16, torch.bfloat16)
    slack = scale if mask_flips and (low or allowance > floor) else 0.0
    assert max_f <= 2 * max_s + 4 * floor + 4 * allowance + slack, (
        f"{what} ({dtype}): max error {max_f:.3e} vs unfused PyTorch {max_s:.3e} (floor "
        f"{floor:.1e}, allowance {allowance:.1e})")


def assert_matches(what: str, fused: torch.Tensor, same: torch.Tensor, ref: torch.Tensor,
                   dtype: torch.dtype, *, mask_flips: bool = False, allowance: float = 0.0,
                   ignore: Optional[torch.Tensor] = None,
                   exempt: Optional[torch.Tensor] = None, nan_or_inf: bool = False) -> int:
    """The fuzzer's rule (module docstring). `nan_or_inf`: any non-finite value stands for any
    other where PyTorch is not finite (see the module docstring for where). `allowance`: see
    :func:`assert_close`. `ignore`: positions left out of the comparison of finite values,
    `exempt`: positions left out of every check. Returns the number of non-finite positions
    checked."""
    assert fused.shape == same.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(same.shape)}"
    f = fused.detach().cpu().double()
    s = same.detach().cpu().double()
    r = ref.detach().cpu().double()
    assert r.shape == s.shape, f"{what}: reference shape {tuple(r.shape)} != {tuple(s.shape)}"
    cf, cs, cr = _classes(f), _classes(s), _classes(r)
    if exempt is not None:
        cf[exempt] = cs[exempt] = cr[exempt] = -1  # none of the classes below
        ignore = exempt if ignore is None else ignore | exempt
    special = (cs > 0) & (cr > 0)
    if nan_or_inf:
        bad = special & (cf == 0)
    else:
        bad = special & (cf != cs)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {int(special.sum())} NaN/inf positions "
                           f"of PyTorch differ: {_where(bad, f, s, r)}")
    overflow = (cs > 0) & (cr == 0)  # PyTorch overflowed its dtype, the reference did not
    bad = overflow & (cf != cs) & (cf != 0)
    assert not bad.any(), f"{what}: where PyTorch overflowed: {_where(bad, f, s, r)}"
    better = overflow & (cf == 0)
    if better.any():
        eps = torch.finfo(dtype).eps
        err = (f[better] - r[better]).abs()
        tol = 8 * eps * r[better].abs() + 1e-30
        assert (err <= tol).all(), (f"{what}: finite where PyTorch overflowed, but far from the "
                                    f"reference: {_where(better, f, s, r)}")
    bad = (cs == 0) & (cf > 0) & (cr == 0)
    assert not bad.any(), (f"{what}: {int(bad.sum())} NaN/inf where PyTorch and the reference "
                           f"are finite: {_where(bad, f, s, r)}")
    finite = (cf == 0) & (cs == 0) & (cr == 0)
    if ignore is not None:
        finite &= ~ignore
    if finite.any():
        assert_close(f[finite], s[finite], r[finite], dtype, what, mask_flips, allowance)
    return int(special.sum())


# ---------------------------------------------------------------------------------------------
# BatchNorm (+ add) + ReLU cases
# ---------------------------------------------------------------------------------------------
@dataclass
class BNCase:
    index: int
    shape: tuple
    dtype: str
    layout: str            # x: contiguous | channels_last | sliced | permuted | expanded
    residual: Optional[str]  # None or the residual's layout (the above, or broadcast)
    grad_layout: str
    training: bool
    running: bool
    momentum: Optional[float]
    eps: float
    weight: bool
    bias: bool
    param_dtype: str       # "fp32" or "input"
    values: str            # normal | large_mean | huge | tiny | constant
    specials: dict = field(default_factory=dict)  # target -> number of NaN/inf values
    small_tiles: bool = False  # Triton: tiny blocks, so every loop and merge runs many times

    def describe(self) -> str:
        return (f"case {self.index} (FASTRES_FUZZ_SEED={SEED}): shape {self.shape} {self.dtype} "
                f"x {self.layout}, residual {self.residual}, grad {self.grad_layout}, "
                f"{'train' if self.training else 'eval'}, running stats {self.running}, "
                f"momentum {self.momentum}, eps {self.eps}, weight {self.weight}, bias {self.bias} "
                f"({self.param_dtype}), values {self.values}, specials {self.specials}"
                + (", small Triton tiles" if self.small_tiles else ""))


def _pick(rng, options, p=None):
    return options[rng.choice(len(options), p=p)]


def bn_case(index: int, max_numel: int = 12000) -> BNCase:
    rng = np.random.default_rng([SEED, index])
    ndim = int(_pick(rng, [2, 3, 4, 4, 4, 5]))
    band = rng.random()
    if band < 0.45:
        c = int(rng.integers(1, 9))
    elif band < 0.8:
        c = int(rng.integers(9, 65))
    else:
        c = int(rng.integers(65, 301))
    n = int(_pick(rng, [1, 2, 2, 3, 4, 5, 8]))
    spatial = [int(rng.integers(1, 7)) for _ in range(ndim - 2)]
    if ndim > 2 and rng.random() < 0.15:
        spatial = [1] * (ndim - 2)  # N x C x 1 x 1
    while n * c * math.prod(spatial) > max_numel:
        if spatial and max(spatial) > 1:
            spatial[spatial.index(max(spatial))] -= 1
        elif n > 1:
            n -= 1
        else:
            c = max(1, c // 2)
    if rng.random() < 0.03:
        if spatial and rng.random() < 0.5:
            spatial[int(rng.integers(len(spatial)))] = 0
        else:
            n = 0
    shape = (n, c, *spatial)
    dtype = _pick(rng, ["fp32", "fp32", "fp16", "bf16", "fp64"])
    layouts = ["contiguous", "channels_last", "sliced", "permuted", "expanded"]
    # Wide NCHW inputs are slow under the Triton interpreter (one program per channel): they
    # are drawn less often than channels-last ones
    lp = [0.35, 0.35, 0.12, 0.1, 0.08] if c <= 64 else [0.1, 0.7, 0.1, 0.05, 0.05]
    layout = _pick(rng, layouts, lp)
    residual = _pick(rng, [None] + layouts + ["broadcast"],
                     [0.45, 0.2, 0.15, 0.06, 0.05, 0.04, 0.05])
    training = bool(rng.random() < 0.6)
    running = bool(rng.random() < 0.8) or not training
    momentum = _pick(rng, [0.1, None, float(rng.uniform(0.01, 0.99)), 0.0, 1.0],
                     [0.35, 0.25, 0.2, 0.1, 0.1])
    eps = float(_pick(rng, [1e-5, 1e-5, 1e-3, 0.1, 1.0]))
    affine = _pick(rng, ["both", "both", "both", "weight", "bias", "none"])
    param_dtype = "input" if dtype == "fp64" or (dtype != "fp32" and rng.random() < 0.3) \
        else "fp32"
    values = _pick(rng, ["normal", "large_mean", "huge", "tiny", "constant"],
                   [0.5, 0.15, 0.12, 0.08, 0.15])
    specials = {}
    if rng.random() < 0.45:
        specials["x"] = int(rng.integers(1, 4))
    if residual is not None and rng.random() < 0.2:
        specials["residual"] = int(rng.integers(1, 3))
    if rng.random() < 0.1:
        specials["grad"] = int(rng.integers(1, 3))
    if rng.random() < 0.06:
        specials["params"] = 1
    return BNCase(index, shape, dtype, layout, residual,
                  _pick(rng, ["contiguous", "channels_last"]), training, running, momentum, eps,
                  affine in ("both", "weight"), affine in ("both", "bias"), param_dtype, values,
                  specials, bool(rng.random() < 0.3))


def _value_scale(values: str, dtype: str):
    """(offset scale, spread scale) of x per value family and dtype."""
    big = {"fp32": 1e15, "fp64": 1e100, "bf16": 1e15, "fp16": 3e3}[dtype]
    tiny = {"fp32": 1e-20, "fp64": 1e-200, "bf16": 1e-20, "fp16": 1e-4}[dtype]
    if values == "large_mean":
        return {"fp32": (1e4, 3e-2), "fp64": (1e8, 1e-2), "bf16": (3e2, 8.0),
                "fp16": (1e3, 2.0)}[dtype]
    if values == "huge":
        return big, big
    if values == "tiny":
        return tiny, tiny
    return 2.0, 1.5


def _sprinkle(rng, t: torch.Tensor, count: int) -> None:
    """Put `count` NaN/+inf/-inf values at random positions of the float64 tensor t."""
    if t.numel() == 0:
        return
    flat = t.view(-1)
    for _ in range(count):
        flat[int(rng.integers(flat.numel()))] = SPECIALS[int(rng.integers(3))]


def bn_data(case: BNCase) -> dict:
    """float64 CPU tensors holding exactly the values the fused op will see (already rounded
    to the case's dtypes): x, residual, grad, weight, bias, running_mean, running_var, nbt."""
    rng = np.random.default_rng([SEED, case.index, 1])
    dt = DTYPES[case.dtype]
    pdt = dt if case.param_dtype == "input" else torch.float32
    n, c = case.shape[:2]
    view = [1, c] + [1] * (len(case.shape) - 2)
    off_scale, spread_scale = _value_scale(case.values, case.dtype)
    offset = rng.standard_normal(c) * off_scale
    if case.values == "large_mean":
        offset = np.sign(offset) * off_scale * rng.uniform(0.5, 1.0, c)
    spread = rng.uniform(0.1, 1.0, c) * spread_scale
    if case.values == "constant":
        spread[rng.random(c) < 0.5] = 0.0
    x = rng.standard_normal(case.shape) * spread.reshape(view) + offset.reshape(view)
    x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if "x" in case.specials:
        _sprinkle(rng, x, case.specials["x"])
    if case.layout == "expanded":
        x = _repeat_first(x, "expanded")
    residual = None
    if case.residual is not None:
        residual = torch.from_numpy(rng.standard_normal(case.shape) * 1.5)
        if case.values == "huge" and case.dtype == "fp16":
            residual = residual * 2e4  # fp16 bn(x) + residual may overflow its first sum
        if "residual" in case.specials:
            _sprinkle(rng, residual, case.specials["residual"])
        residual = _repeat_first(residual, case.residual)
    grad = torch.from_numpy(rng.standard_normal(case.shape))
    if "grad" in case.specials:
        _sprinkle(rng, grad, case.specials["grad"])
    weight = torch.from_numpy(rng.normal(1.0, 0.6, c)) if case.weight else None
    if weight is not None and c > 2:
        weight[int(rng.integers(c))] = 0.0  # a zero scale: 0 * inf = NaN, and no gradient
    bias = torch.from_numpy(rng.normal(0.0, 0.5, c)) if case.bias else None
    rm = torch.from_numpy(rng.normal(0.0, 1.0, c) * min(off_scale, 1e30)) if case.running else None
    rv = torch.from_numpy(rng.uniform(0.2, 2.0, c) * min(spread_scale, 1e15) ** 2) \
        if case.running else None
    if "params" in case.specials:
        targets = [t for t in (weight, bias, rm, rv) if t is not None]
        if targets:
            _sprinkle(rng, targets[int(rng.integers(len(targets)))], 1)
    nbt = int(rng.integers(0, 5))

    def rounded(t, d):
        return None if t is None else t.to(d).double()

    return dict(x=rounded(x, dt), residual=rounded(residual, dt), grad=rounded(grad, dt),
                weight=rounded(weight, pdt), bias=rounded(bias, pdt),
                running_mean=rounded(rm, pdt), running_var=rounded(rv, pdt), nbt=nbt,
                param_dtype=pdt)


def layout_as(t: torch.Tensor, layout: str, rng) -> torch.Tensor:
    """A tensor equal to t (same shape and values) with the strides of `layout`."""
    shape = tuple(t.shape)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        perm = [0, *range(2, t.dim()), 1]
        return t.permute(perm).contiguous().permute(np.argsort(perm).tolist())
    if layout == "permuted":  # dense, in a random order of dims
        perm = rng.permutation(t.dim()).tolist()
        return t.permute(perm).contiguous().permute(np.argsort(perm).tolist())
    if layout == "sliced":  # every other element of a larger buffer along one dim
        d = int(rng.integers(t.dim()))
        big_shape = list(shape)
        big_shape[d] = 2 * shape[d] + 1
        big = torch.full(big_shape, 7.0, dtype=t.dtype, device=t.device)
        index = [slice(None)] * t.dim()
        index[d] = slice(1, None, 2)
        view = big[tuple(index)]
        view.copy_(t)
        return view
    if layout in ("expanded", "broadcast"):  # stride 0 where the values repeat
        return t[_first(t.dim(), layout)].expand(shape)
    raise ValueError(layout)


def _first(ndim: int, layout: str) -> tuple:
    """Index of the part of a tensor an expanded ("expanded": the first sample) or broadcast
    ("broadcast": one value per channel) tensor is made of."""
    if layout == "expanded":
        return (slice(0, 1),)
    return (slice(0, 1), slice(None)) + (slice(0, 1),) * (ndim - 2)


def _repeat_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t with the values an expanded/broadcast tensor of its shape can hold (unchanged for
    the other layouts)."""
    if layout not in ("expanded", "broadcast"):
        return t
    return t[_first(t.dim(), layout)].expand(t.shape).contiguous()


# ---------------------------------------------------------------------------------------------
# Extended-precision reference of BatchNorm (+ add) + ReLU, forward and backward
# ---------------------------------------------------------------------------------------------
def reference_bn(x, residual, weight, bias, running_mean, running_var, grad, training, momentum,
                 eps, nbt, dtype):
    """numpy longdouble; returns dict(out, grad_input, grad_residual, grad_weight, grad_bias,
    running_mean, running_var, ignore, allowance). momentum None: cumulative average with
    counter nbt + 1.

    Conditioning: with statistics in fp32 (fp64 for fp64 input), any implementation computes
    x_hat = (x - mean) * invstd with an absolute error of about
    delta = 4 * eps_acc * |mean| * invstd (the mean's rounding, amplified by |mean| / std):
    large for a large mean with a tiny variance, where fused and unfused PyTorch are both that
    inaccurate and the ratio of their errors is noise. ``allowance`` holds, per result, the
    absolute error delta can cause (added to the numerics rule), ``ignore`` the positions whose
    ReLU mask is ambiguous at that accuracy (|pre-activation| <= 2 * delta * |w|): their
    elementwise gradients are not compared, and what their flips can move in the per-channel
    sums is part of the allowances. ``exempt``: where such an ambiguous mask meets a NaN/inf
    gradient, whether it passes (and spreads over the channel's sums) is decided by rounding;
    those positions (per-channel results: channels) are not compared at all."""
    def ld(t):
        return None if t is None else t.detach().cpu().double().numpy().astype(LD)

    xv, g = ld(x), ld(grad)
    c = xv.shape[1]
    if xv.size == 0:  # nothing to normalise; PyTorch leaves the running statistics alone
        zeros = torch.zeros(c, dtype=torch.float64)
        empty = torch.zeros(xv.shape, dtype=torch.float64)
        return dict(out=empty, grad_input=empty, grad_residual=empty, grad_weight=zeros,
                    grad_bias=zeros, running_mean=None if running_mean is None
                    else running_mean.double(), running_var=None if running_var is None
                    else running_var.double(), ignore=None, allowance={}, exempt={})
    axes = tuple(i for i in range(xv.ndim) if i != 1)
    view = [1, c] + [1] * (xv.ndim - 2)
    count = xv.size // c if c else 0
    w = ld(weight) if weight is not None else np.ones(c, dtype=LD)
    b = ld(bias) if bias is not None else np.zeros(c, dtype=LD)
    rm, rv = ld(running_mean), ld(running_var)
    with np.errstate(all="ignore"):
        if training:
            mean = xv.sum(axis=axes) / LD(count)
            var = ((xv - mean.reshape(view)) ** 2).sum(axis=axes) / LD(count)
        else:
            mean, var = rm, rv
        invstd = LD(1) / np.sqrt(var + LD(eps))
        xhat = (xv - mean.reshape(view)) * invstd.reshape(view)
        pre = xhat * w.reshape(view) + b.reshape(view)
        if residual is not None:
            pre = pre + ld(residual)
        out = np.where(pre < 0, LD(0), pre)  # torch.relu: NaN stays NaN
        gm = np.where(out <= 0, LD(0), g)   # threshold_backward(grad, out, 0)
        gb = gm.sum(axis=axes)
        gw = (gm * xhat).sum(axis=axes)
        k = (w * invstd).reshape(view)
        if training:
            gi = k * (gm - (gb / LD(count)).reshape(view) - xhat * (gw / LD(count)).reshape(view))
        else:
            gi = k * gm
        new_rm, new_rv = rm, rv
        if training and rm is not None:
            f = LD(1) / LD(nbt + 1) if momentum is None else LD(momentum)
            unbiased = var * LD(count) / LD(count - 1)
            new_rm = (LD(1) - f) * rm + f * mean
            new_rv = (LD(1) - f) * rv + f * unbiased

    def back(a):
        return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))

    with np.errstate(all="ignore"):
        acc_eps = LD(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)
        finite_c = np.isfinite(mean) & np.isfinite(invstd) & np.isfinite(w)
        cond = np.where(finite_c, np.abs(mean) * invstd, 0)
        delta = LD(4) * acc_eps * (cond.max() if cond.size else LD(0))
        wabs = np.where(finite_c, np.abs(w), 0)
        ambiguous = np.abs(pre) <= LD(2) * delta * wabs.reshape(view)
        # |grad| before the mask (a flipped mask lets it through), |x_hat| + its error
        ga = np.where(np.isfinite(g), np.abs(g), 0)
        xa = np.where(np.isfinite(xhat), np.abs(xhat), 0) + delta
        flips_g = np.where(ambiguous, ga, 0).sum(axis=axes)   # per channel
        flips_gx = np.where(ambiguous, ga * xa, 0).sum(axis=axes)
        kk = np.where(finite_c, np.abs(w * invstd), 0)
        xmax = xa.max() if xa.size else LD(0)
        gmax = ga.max() if ga.size else LD(0)
        allowance = dict(
            out=delta * (wabs.max() if wabs.size else 0),
            grad_weight=(delta * ga.sum(axis=axes) + flips_gx).max(),
            grad_bias=flips_g.max(),
            grad_input=(kk * (2 * delta * gmax + (flips_g + xmax * flips_gx) / LD(count))).max()
            if training else LD(0))
        amb_special = ambiguous & ~np.isfinite(g)
        channels = amb_special.any(axis=axes) if amb_special.size else np.zeros(c, dtype=bool)
    allowance = {k: float(v) for k, v in allowance.items()}
    whole = torch.from_numpy(np.broadcast_to(channels.reshape(view), xv.shape).copy())
    exempt = dict(grad_residual=torch.from_numpy(np.asarray(amb_special)),
                  grad_input=whole if training else torch.from_numpy(np.asarray(amb_special)),
                  grad_weight=torch.from_numpy(channels), grad_bias=torch.from_numpy(channels))
    return dict(out=back(out), grad_input=back(gi), grad_residual=back(gm),
                grad_weight=back(gw), grad_bias=back(gb), running_mean=back(new_rm),
                running_var=back(new_rv), ignore=torch.from_numpy(np.asarray(ambiguous)),
                allowance=allowance, exempt=exempt)


# ---------------------------------------------------------------------------------------------
# Triton convolution (fastres.ops.conv_bn) cases
# ---------------------------------------------------------------------------------------------
@dataclass
class ConvCase:
    index: int
    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int
    stride: int
    padding: int
    dtype: str
    mode: str          # train | eval | plain | inference
    in_relu: bool
    relu: bool         # inference: ReLU epilogue
    bias: bool         # inference: bias epilogue
    residual: bool     # inference: residual epilogue
    prologue: bool     # inference: an eval-mode BatchNorm prologue
    in_affine: bool
    stats: bool
    specials: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"conv case {self.index} (FASTRES_FUZZ_SEED={SEED}): x ({self.n}, {self.cin}, "
                f"{self.h}, {self.w}) {self.dtype}, {self.cout} filters {self.k}x{self.k} stride "
                f"{self.stride} padding {self.padding}, mode {self.mode}, in_relu {self.in_relu}, "
                f"in_affine {self.in_affine}, stats {self.stats}, bias {self.bias}, residual "
                f"{self.residual}, relu {self.relu}, prologue {self.prologue}, specials "
                f"{self.specials}")

    def out_hw(self):
        return ((self.h + 2 * self.padding - self.k) // self.stride + 1,
                (self.w + 2 * self.padding - self.k) // self.stride + 1)


def conv_case(index: int) -> ConvCase:
    rng = np.random.default_rng([SEED, 1000003, index])
    k = int(_pick(rng, [1, 1, 3, 3, 3, 5, 7]))
    stride = int(rng.integers(1, 3))
    padding = int(rng.integers(0, k // 2 + 1))
    h = max(int(rng.integers(1, 10)), k - 2 * padding)
    w = max(int(rng.integers(1, 10)), k - 2 * padding)
    mode = _pick(rng, ["train", "train", "eval", "plain", "inference", "inference"])
    specials = {}
    if rng.random() < 0.5:
        specials["x"] = int(rng.integers(1, 3))
    residual = mode == "inference" and bool(rng.random() < 0.6)
    if residual and rng.random() < 0.3:
        specials["residual"] = 1
    prologue = mode in ("train", "eval") or (mode == "inference" and bool(rng.random() < 0.5))
    if prologue and mode != "train" and rng.random() < 0.15:
        specials["in_stats"] = 1
    return ConvCase(index, int(rng.integers(1, 4)), int(rng.integers(1, 21)), h, w,
                    int(rng.integers(1, 21)), k, stride, padding,
                    _pick(rng, ["fp32", "fp32", "fp16", "bf16"]), mode,
                    bool(rng.random() < 0.8), bool(rng.random() < 0.7),
                    mode == "inference" and bool(rng.random() < 0.7), residual, prologue,
                    bool(rng.random() < 0.8),
                    mode in ("train", "plain") and bool(rng.random() < 0.7), specials)


def conv_data(case: ConvCase) -> dict:
    """float64 CPU tensors rounded to the case's dtype (activations, weights) or fp32 (the
    BatchNorm vectors): x, weight, gamma, beta, running mean/var, bias, residual, grad."""
    rng = np.random.default_rng([SEED, 1000003, case.index, 1])
    dt = DTYPES[case.dtype]
    p, q = case.out_hw()
    x = torch.from_numpy(rng.standard_normal((case.n, case.cin, case.h, case.w)) * 2 + 0.3)
    if "x" in case.specials:
        _sprinkle(rng, x, case.specials["x"])
    fan_in = case.cin * case.k * case.k
    weight = torch.from_numpy(rng.standard_normal((case.cout, case.cin, case.k, case.k))
                              / math.sqrt(fan_in))
    gamma = torch.from_numpy(rng.uniform(0.5, 1.5, case.cin))
    beta = torch.from_numpy(rng.normal(0, 0.5, case.cin))
    mean = torch.from_numpy(rng.normal(0.3, 0.5, case.cin))
    var = torch.from_numpy(rng.uniform(1.0, 6.0, case.cin))
    if "in_stats" in case.specials:
        _sprinkle(rng, mean if rng.random() < 0.5 else var, 1)
    bias = torch.from_numpy(rng.normal(0, 0.5, case.cout))
    residual = torch.from_numpy(rng.standard_normal((case.n, case.cout, p, q)))
    if "residual" in case.specials:
        _sprinkle(rng, residual, case.specials["residual"])
    grad = torch.from_numpy(rng.standard_normal((case.n, case.cout, p, q)))
    f32 = torch.float32
    return dict(x=x.to(dt).double(), weight=weight.to(dt).double(), gamma=gamma.to(f32).double(),
                beta=beta.to(f32).double(), mean=mean.to(f32).double(),
                var=var.to(f32).double(), bias=bias.to(dt).double(),
                residual=residual.to(dt).double(), grad=grad.to(dt).double())
