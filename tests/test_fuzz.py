"""Differential fuzzer: fastres' fused ops against unfused PyTorch, NaN and inf included.

BatchNorm(+add)+ReLU (fastres.functional) on every backend: random N, C (1 to 300), spatial
sizes (1x1 and zero-size included), 2-D to 5-D, fp32/fp16/bf16/fp64, contiguous /
channels-last / sliced / permuted / expanded inputs and residuals (broadcast ones too),
training and eval, momentum (None included), eps, affine or not, running statistics or not,
value families (normal, large mean with tiny variance, huge, tiny, constant channels) and NaN /
+inf / -inf in the input, the residual, the gradient and the parameters. Output, running
statistics, num_batches_tracked and all gradients are compared (rule: tests/fuzzing.py).

The Triton convolution op (fastres.ops.conv_bn) against F.conv2d + BatchNorm + add + ReLU on
small shapes: the BatchNorm prologue in training and eval, the statistics epilogue, the
inference epilogue (bias + residual + ReLU), all gradients, NaN/inf in x, the residual and the
prologue's statistics.

Cases are drawn from a fixed seed; FASTRES_FUZZ_CASES / FASTRES_FUZZ_CONV_CASES raise the
budget, FASTRES_FUZZ_SEED draws other cases, FASTRES_FUZZ_ONLY=3,17 runs only those indices.
The case counts appear in pytest's terminal summary.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastres
import fuzzing
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from fuzzing import DTYPES, SEED, assert_matches, bn_case, bn_data, layout_as, record, \
    reference_bn
from backend_cases import (HAS_CUDA, HAS_TRITON, INTERPRET, backend_params, gpu,
                           require_backend)

CHUNK = 25
ONLY = [int(i) for i in os.environ.get("FASTRES_FUZZ_ONLY", "").split(",") if i.strip()]

# NaN and inf inputs are the point: numpy's warnings about them (Triton's interpreter) are noise
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _chunks(total):
    if ONLY:
        return [ONLY]
    return [list(range(i, min(i + CHUNK, total))) for i in range(0, total, CHUNK)]


def _label(backend, device):
    if backend == "triton":
        return "triton (interpreter)" if device == "cpu" else "triton (GPU)"
    return backend


@contextlib.contextmanager
def small_triton_tiles(on=True):
    """Tiny Triton blocks (as tests/test_triton_kernels.py's multi-block test): many programs
    per channel, several tiles per program, multi-step merges."""
    if not on:
        yield
        return
    from fastres.kernels import batch_norm_act as K

    small = dict(_TILE=64, _MAX_BLOCK_C=8, _MAX_BLOCK_S=16, _TARGET_PROGRAMS=6,
                 _MERGE_BLOCK_C=4, _MERGE_BLOCK_P=2)
    saved = {k: getattr(K, k) for k in small}
    for k, v in small.items():
        setattr(K, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(K, k, v)


def _run_chunk(indices, check, describe):
    """check(i) for every case; all failures are reported (with the case), not the first."""
    failures = []
    for i in indices:
        try:
            check(i)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{describe(i)}\n  {type(e).__name__}: {e}")
    assert not failures, \
        f"{len(failures)} of {len(indices)} cases failed:\n" + "\n\n".join(failures)


# ---------------------------------------------------------------------------------------------
# BatchNorm (+ add) + ReLU
# ---------------------------------------------------------------------------------------------
def _leaves(case, data, device):
    """The op's inputs on `device`, in the case's layouts, as autograd leaves."""
    rng = np.random.default_rng([SEED, case.index, 2])
    dt, pdt = DTYPES[case.dtype], data["param_dtype"]
    x = layout_as(data["x"].to(device, dt), case.layout, rng).detach().requires_grad_()
    r = None
    if data["residual"] is not None:
        r = layout_as(data["residual"].to(device, dt), case.residual, rng)
        r = r.detach().requires_grad_()
    grad = layout_as(data["grad"].to(device, dt), case.grad_layout, rng)
    w = data["weight"].to(device, pdt).requires_grad_() if data["weight"] is not None else None
    b = data["bias"].to(device, pdt).requires_grad_() if data["bias"] is not None else None
    return x, r, w, b, grad


def _stats(data, device):
    pdt = data["param_dtype"]
    rm = data["running_mean"].to(device, pdt) if data["running_mean"] is not None else None
    rv = data["running_var"].to(device, pdt) if data["running_var"] is not None else None
    return rm, rv


def _forward_backward(fn, x, r, w, b, grad):
    y = fn()
    inputs = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad)
    names = ["grad_input"] + (["grad_residual"] if r is not None else []) + \
        (["grad_weight"] if w is not None else []) + (["grad_bias"] if b is not None else [])
    return y.detach(), dict(zip(names, grads))


def _is_channels_last(t):
    if t.dim() < 3:
        return True
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def check_bn_case(index, backend, device):
    case = bn_case(index)
    data = bn_data(case)
    dt = DTYPES[case.dtype]
    x, r, w, b, grad = _leaves(case, data, device)
    training, eps = case.training, case.eps
    track = training and case.running
    nbt = data["nbt"]
    key = f"batch_norm fuzz, {_label(backend, device)}"

    # fused
    rm_f, rv_f = _stats(data, device)
    counter = torch.tensor(nbt, device=device) if track else None

    def fused():
        with fastres.backend(backend), small_triton_tiles(backend == "triton" and case.small_tiles):
            if r is None:
                return batch_norm_relu(x, rm_f, rv_f, w, b, training, case.momentum, eps,
                                       num_batches_tracked=counter)
            return batch_norm_add_relu(x, r, rm_f, rv_f, w, b, training, case.momentum, eps,
                                       num_batches_tracked=counter)

    # unfused PyTorch, with nn.BatchNorm's cumulative average for momentum=None
    rm_s, rv_s = _stats(data, device)
    momentum = case.momentum
    if momentum is None:
        momentum = 1.0 / (nbt + 1) if track else 0.0

    def unfused():
        # PyTorch sees a contiguous x: with an infinite parameter its generic (strided, 3-D
        # channels-last) path gives other special values than its contiguous and 4-D/5-D
        # channels-last kernels, e.g. w = inf: (x - mean) * invstd * w = +-inf there,
        # x * alpha + beta = NaN here, which is the formula of the fused kernels
        y = F.batch_norm(x.contiguous(), rm_s, rv_s, w, b, training, momentum, eps)
        return F.relu(y + r if r is not None else y)

    count = x.numel() // x.shape[1]
    if training and count == 1:  # PyTorch's error, word for word
        with pytest.raises(ValueError, match="Expected more than 1 value per channel") as e_f:
            fused()
        with pytest.raises(ValueError) as e_s:
            unfused()
        assert str(e_f.value) == str(e_s.value)
        record(f"{key}: cases", f"{key}: error cases (same error as PyTorch)")
        return
    if backend == "triton" and dt == torch.float64 and x.numel() > 0:
        with pytest.raises(TypeError, match="float32, float16 and bfloat16.*float64"):
            fused()
        record(f"{key}: cases", f"{key}: error cases (float64 refused with a clear error)")
        return

    y, g = _forward_backward(fused, x, r, w, b, grad)
    y_s, g_s = _forward_backward(unfused, x, r, w, b, grad)
    ref = reference_bn(x, r, w, b, data["running_mean"], data["running_var"], grad, training,
                       case.momentum, eps, nbt, dt)
    allowance = ref["allowance"]

    specials = assert_matches("output", y, y_s, ref["out"], dt, allowance=allowance.get("out", 0))
    assert y.dtype == dt, f"output dtype {y.dtype}"
    if case.layout == "contiguous":
        assert y.is_contiguous(), "output must keep the input's memory format (contiguous)"
    elif case.layout == "channels_last":
        assert _is_channels_last(y), "output must keep the input's memory format (channels-last)"
    # An infinite gradient meets another in the per-channel sums of the backward formula:
    # whether inf - inf (NaN) or inf remains depends on the order of operations, which
    # differs between PyTorch's own kernels too; where PyTorch is not finite, any non-finite
    # value is accepted then (a NaN anywhere still spreads exactly)
    grad_inf = bool(torch.isinf(data["grad"]).any())
    for name in g_s:
        assert g[name].dtype == g_s[name].dtype, \
            f"{name} dtype {g[name].dtype} != {g_s[name].dtype}"
        elementwise = name in ("grad_input", "grad_residual")
        specials += assert_matches(name, g[name], g_s[name], ref[name], dt, mask_flips=True,
                                   allowance=allowance.get(name, 0.0),
                                   ignore=ref["ignore"] if elementwise else None,
                                   exempt=ref["exempt"].get(name), nan_or_inf=grad_inf)
    if case.running:
        for name, f, s in (("running_mean", rm_f, rm_s), ("running_var", rv_f, rv_s)):
            assert f.dtype == s.dtype
            specials += assert_matches(name, f, s, ref[name], dt,
                                       nan_or_inf=device == "cuda" and name == "running_mean")
    if counter is not None:
        assert counter.item() == nbt + 1, "num_batches_tracked must be incremented once"
    record(f"{key}: cases")
    if specials:
        record(f"{key}: cases with NaN/inf compared position by position")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("indices", _chunks(fuzzing.BN_CASES),
                         ids=lambda ix: f"cases{ix[0]}-{ix[-1]}")
def test_batch_norm_fuzz(backend, device, indices):
    require_backend(backend)
    _run_chunk(indices, lambda i: check_bn_case(i, backend, device),
               lambda i: bn_case(i).describe())


# ---------------------------------------------------------------------------------------------
# Triton convolution with BatchNorm prologue / statistics / inference epilogues
# ---------------------------------------------------------------------------------------------
def _conv_unfused(case, x, w, gamma, beta, mean, var, bias, residual, training_bn):
    """F.batch_norm (+ ReLU) of the input, then F.conv2d (+ bias + residual) (+ ReLU)."""
    act = x
    if case.mode in ("train", "eval") or case.prologue:
        act = F.batch_norm(x, mean, var, gamma, beta, training_bn, 0.0, CONV_EPS)
        if case.in_relu:
            act = F.relu(act)
    y = F.conv2d(act, w, bias, case.stride, case.padding)
    if residual is not None:
        y = y + residual
    return F.relu(y) if case.mode == "inference" and case.relu else y


CONV_EPS = 1e-5


def check_conv_case(index, device):
    from fastres.ops import conv_bn

    case = fuzzing.conv_case(index)
    data = fuzzing.conv_data(case)
    dt, f32 = DTYPES[case.dtype], torch.float32
    key = f"conv_bn fuzz, {_label('triton', device)}"

    def inputs(dev, act_dtype, vec_dtype):
        t = {k: v.to(dev, act_dtype) for k, v in data.items()
             if k in ("x", "weight", "bias", "residual", "grad")}
        t.update({k: v.to(dev, vec_dtype) for k, v in data.items()
                  if k in ("gamma", "beta", "mean", "var")})
        if not case.in_affine:
            t["gamma"] = t["beta"] = None
        if not case.bias:
            t["bias"] = None
        if not case.residual:
            t["residual"] = None
        return t

    if dt == torch.bfloat16 and device == "cpu":
        with pytest.raises(TypeError, match="bfloat16 does not run under TRITON_INTERPRET=1"):
            with torch.no_grad():
                conv_bn(data["x"].to(dt), data["weight"].to(dt), case.stride, case.padding)
        record(f"{key}: cases", f"{key}: error cases (bfloat16 refused by the interpreter)")
        return
    fused_in = inputs(device, dt, f32)
    same_in = inputs(device, dt, f32)
    ref_in = inputs("cpu", torch.float64, torch.float64)
    x = fused_in["x"]

    if case.mode == "inference":
        with torch.no_grad():
            kw = dict(bias=fused_in["bias"], residual=fused_in["residual"], relu=case.relu)
            if case.prologue:
                kw.update(in_weight=fused_in["gamma"], in_bias=fused_in["beta"],
                          in_mean=fused_in["mean"], in_var=fused_in["var"], in_eps=CONV_EPS,
                          in_relu=case.in_relu, in_training=False)
            out, _, _ = conv_bn(x, fused_in["weight"], case.stride, case.padding, **kw)
            results = {"output": (out, *(
                _conv_unfused(case, t["x"], t["weight"], t["gamma"], t["beta"], t["mean"],
                              t["var"], t["bias"], t["residual"], False)
                for t in (same_in, ref_in)))}
        grads = {}
    else:
        training_bn = case.mode == "train"
        names = ["x", "weight"] + (["gamma", "beta"] if case.in_affine and case.mode != "plain"
                                   else [])

        def run(t, fused):
            leaves = {k: t[k].detach().requires_grad_() for k in names}
            t = {**t, **leaves}
            if fused:
                kw = dict(stats=case.stats)
                if case.mode != "plain":
                    if training_bn:  # the statistics a convolution's epilogue would give
                        mean = t["x"].detach().float().mean((0, 2, 3))
                        var = t["x"].detach().float().var((0, 2, 3), unbiased=False)
                    else:
                        mean, var = t["mean"], t["var"]
                    kw.update(in_weight=t["gamma"], in_bias=t["beta"], in_mean=mean, in_var=var,
                              in_eps=CONV_EPS, in_relu=case.in_relu, in_training=training_bn)
                out, mean, var = conv_bn(t["x"], t["weight"], case.stride, case.padding, **kw)
            else:
                out = _conv_unfused(case, t["x"], t["weight"], t["gamma"], t["beta"],
                                    None if training_bn else t["mean"],
                                    None if training_bn else t["var"], None, None, training_bn)
                mean = out.detach().double().mean((0, 2, 3))
                var = out.detach().double().var((0, 2, 3), unbiased=False)
            g = torch.autograd.grad(out, [leaves[k] for k in names], t["grad"])
            return out.detach(), mean, var, dict(zip(names, g))

        out, mean, var, g = run(fused_in, True)
        out_s, mean_s, var_s, g_s = run(same_in, False)
        out_r, mean_r, var_r, g_r = run(ref_in, False)
        results = {"output": (out, out_s, out_r)}
        if case.stats:
            results["batch mean"] = (mean, mean_s, mean_r)
            results["batch var"] = (var, var_s, var_r)
        grads = {f"grad_{k}": (g[k], g_s[k], g_r[k]) for k in names}

    assert results["output"][0].dtype == dt
    specials = 0
    for name, (f, s, r) in results.items():
        specials += assert_matches(name, f, s, r, dt)
    for name, (f, s, r) in grads.items():
        assert f.dtype == s.dtype, f"{name} dtype {f.dtype} != {s.dtype}"
        specials += assert_matches(name, f, s, r, dt, mask_flips=True)
    record(f"{key}: cases")
    if specials:
        record(f"{key}: cases with NaN/inf compared position by position")


def _conv_devices():
    params = []
    if HAS_TRITON and INTERPRET and not HAS_CUDA:
        params.append(pytest.param("cpu", id="triton-interpreter"))
    params.append(pytest.param("cuda", id="triton-gpu", marks=gpu))
    return params


@pytest.mark.parametrize("device", _conv_devices())
@pytest.mark.parametrize("indices", _chunks(fuzzing.CONV_CASES),
                         ids=lambda ix: f"cases{ix[0]}-{ix[-1]}")
def test_conv_bn_fuzz(device, indices):
    require_backend("triton")
    _run_chunk(indices, lambda i: check_conv_case(i, device),
               lambda i: fuzzing.conv_case(i).describe())
