"""Triton implicit-GEMM convolutions with fused BatchNorm (kernels/conv.py, fastres.ops.conv_bn,
fastres.nn.conv_bn_chain) against F.conv2d + BatchNorm + add + ReLU.

Runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) on
small shapes, fp32 and fp16; tests/test_gpu_conv.py runs every ResNet-18/50 layer shape in
bf16 on a GPU. Numerics follow the project rule (tests/numerics.py): error against an fp64
(fp32 for fp16) reference at most 2x that of unfused PyTorch in the same dtype, plus a floor.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastres  # noqa: E402
from fastres import backends  # noqa: E402
from fastres.kernels import conv as K  # noqa: E402
from fastres.nn import BasicBlock, Bottleneck  # noqa: E402
from fastres.nn.conv_bn_chain import PendingBatchNorm, conv_bn_pending, materialize  # noqa: E402
from fastres.ops import conv_bn  # noqa: E402
from numerics import assert_close_rule, reference_dtype  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
CL = torch.channels_last

# (N, CIN, H, W, COUT, kernel, stride, padding): every kind of ResNet layer, small, with odd
# channel counts and sizes that do not divide the tiles
SHAPES = [
    (2, 8, 6, 6, 12, 1, 1, 0),     # 1x1 stride 1 (bottleneck conv1/conv3)
    (2, 12, 7, 7, 20, 1, 2, 0),    # 1x1 stride 2 (projection shortcut)
    (2, 5, 7, 6, 9, 3, 1, 1),      # 3x3 stride 1, odd channels
    (2, 8, 9, 9, 16, 3, 2, 1),     # 3x3 stride 2
    (1, 3, 11, 11, 8, 7, 2, 3),    # 7x7 stride 2 stem
    (3, 20, 5, 5, 17, 3, 1, 1),    # more channels than one K/N tile
]
IDS = ["1x1s1", "1x1s2", "3x3s1-odd", "3x3s2", "7x7s2-stem", "3x3-multitile"]
DTYPES = [torch.float32, torch.float16]


def cl(t):
    return t.contiguous(memory_format=CL)


def make_case(shape, dtype, seed=0):
    """x (raw conv input with both signs after BN), weight, BN params of x's channels."""
    n, cin, h, w, cout, k, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g) * 2 + 0.5
    weight = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    gamma = torch.rand(cin, generator=g) + 0.5
    beta = torch.randn(cin, generator=g) * 0.5
    return [t.to(DEVICE) for t in (x, weight, gamma, beta)]


def bn_relu(x, gamma, beta, training=True, mean=None, var=None, relu=True):
    y = F.batch_norm(x, mean, var, gamma, beta, training, 0.0, EPS)
    return torch.relu(y) if relu else y


def unfused_train(x, weight, gamma, beta, stride, padding, relu=True):
    """What a user runs today: BatchNorm (batch stats) + ReLU, then the convolution."""
    return F.conv2d(bn_relu(x, gamma, beta, relu=relu), weight, None, stride, padding)


def grads(fn, inputs, grad_out=None):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs], grad_out


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_with_prologue_and_stats(shape, dtype):
    """out = conv(relu(x * scale + shift)) and the BN statistics of out, against fp64."""
    _, _, _, _, _, k, s, p = shape
    x, w, gamma, beta = make_case(shape, dtype)
    ref_dtype = reference_dtype(dtype)
    scale = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    shift = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(4)).to(DEVICE)
    xd, wd = x.to(dtype), w.to(dtype)
    out, mean, var = K.conv_forward(cl(xd), cl(wd), s, p, in_scale=scale, in_shift=shift,
                                    stats=True)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)

    def act(t, dt):
        return torch.relu(t.to(dt) * scale.to(dt).view(1, -1, 1, 1)
                          + shift.to(dt).view(1, -1, 1, 1))

    ref = F.conv2d(act(xd, ref_dtype), wd.to(ref_dtype), None, s, p)
    same = F.conv2d(act(xd.float(), torch.float32).to(dtype), wd, None, s, p) \
        if dtype != torch.float32 else F.conv2d(act(xd, dtype), wd, None, s, p)
    assert_close_rule(out, same, ref, dtype, "conv forward")
    # statistics of the stored output
    stored = out.to(ref_dtype)
    torch.testing.assert_close(mean.double(), stored.mean((0, 2, 3)).double(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(var.double(), stored.var((0, 2, 3), unbiased=False).double(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=["3x3s1", "3x3s2"])
def test_forward_inference_epilogue(shape, residual, relu):
    """bias + residual + ReLU epilogue (the folded-BN inference path), fp32."""
    _, _, _, _, cout, k, s, p = shape
    x, w, _, _ = make_case(shape, torch.float32)
    bias = torch.randn(cout).to(DEVICE)
    ref_out = F.conv2d(x.double(), w.double(), bias.double(), s, p)
    res = torch.randn(ref_out.shape).to(DEVICE) if residual else None
    if res is not None:
        ref_out = ref_out + res.double()
    if relu:
        ref_out = torch.relu(ref_out)
    out, mean, var = K.conv_forward(cl(x), cl(w), s, p, bias=bias,
                                    residual=None if res is None else cl(res), relu=relu)
    assert mean.numel() == 0 and var.numel() == 0
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)


def test_padding_is_applied_after_the_prologue():
    """A padded pixel contributes 0, not relu(shift): shift > 0 makes the difference visible."""
    x = torch.zeros(1, 4, 3, 3, device=DEVICE)
    w = torch.ones(2, 4, 3, 3, device=DEVICE)
    scale = torch.ones(4, device=DEVICE)
    shift = torch.full((4,), 2.0, device=DEVICE)
    out, _, _ = K.conv_forward(cl(x), cl(w), 1, 1, in_scale=scale, in_shift=shift)
    ref = F.conv2d(torch.relu(x + 2.0), w, None, 1, 1)
    torch.testing.assert_close(out, ref)
    assert out[0, 0, 0, 0].item() == pytest.approx(4 * 4 * 2.0)  # corner: 4 taps inside


# ---------------------------------------------------------------------------------------------
# Backward kernels through the autograd op
# ---------------------------------------------------------------------------------------------
def _fused(stride, padding, training=True, relu=True):
    def fn(x, w, gamma, beta):
        if training:
            mean = x.detach().float().mean((0, 2, 3))
            var = x.detach().float().var((0, 2, 3), unbiased=False)
        else:
            mean, var = RUNNING
        out, _, _ = conv_bn(x, w, stride, padding, in_weight=gamma, in_bias=beta, in_mean=mean,
                            in_var=var, in_training=training, in_relu=relu)
        return out
    return fn


RUNNING = (torch.linspace(-0.5, 0.5, 20, device=DEVICE), torch.linspace(0.5, 2.0, 20, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_all_gradients(shape, dtype):
    """grad of x (full training-mode BN backward through the statistics), weight, BN weight
    and bias, against fp64 autograd of BN + ReLU + conv."""
    _, cin, _, _, _, k, s, p = shape
    x, w, gamma, beta = make_case(shape, dtype)
    ref_dtype = reference_dtype(dtype)
    out_ref, g_ref, go = grads(lambda *t: unfused_train(*t, s, p),
                               [x.to(ref_dtype), w.to(ref_dtype), gamma.to(ref_dtype),
                                beta.to(ref_dtype)])
    if dtype == torch.float32:
        out_same, g_same, _ = grads(lambda *t: unfused_train(*t, s, p), [x, w, gamma, beta], go)
    else:  # unfused fp16: BN in fp32 params, activations and convolution in fp16
        def unfused_low(x, w, gamma, beta):
            a = torch.relu(F.batch_norm(x.float(), None, None, gamma, beta, True, 0.0, EPS))
            return F.conv2d(a.to(dtype), w, None, s, p)
        out_same, g_same, _ = grads(unfused_low, [x.to(dtype), w.to(dtype), gamma, beta], go)
    out, g, _ = grads(_fused(s, p), [x.to(dtype), w.to(dtype), gamma, beta], go)
    assert_close_rule(out, out_same, out_ref, dtype, "output")
    for name, a, b, r in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), g, g_same,
                             g_ref):
        assert a.dtype == b.dtype, name
        assert_close_rule(a, b, r, dtype, name, mask_flips=True)


def test_backward_single_input_channel():
    """One input channel: x is contiguous and channels-last at once; the prologue's backward
    (BatchNorm from the dgrad partial sums) takes it as channels-last rows [M, 1]."""
    shape = (2, 1, 5, 6, 4, 3, 1, 1)
    x, w, gamma, beta = make_case(shape, torch.float32)
    out_ref, g_ref, go = grads(lambda *t: unfused_train(*t, 1, 1),
                               [t.double() for t in (x, w, gamma, beta)])
    out, g, _ = grads(_fused(1, 1), [x, w, gamma, beta], go)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-4)
    for name, a, r in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("relu", [True, False])
def test_backward_eval_mode_prologue(relu):
    """in_training=False: running statistics are constants, grad_x = g * scale."""
    shape = (2, 20, 6, 6, 8, 3, 1, 1)
    x, w, gamma, beta = make_case(shape, torch.float32)
    mean, var = RUNNING

    def ref(x, w, gamma, beta):
        a = bn_relu(x, gamma, beta, False, mean.double(), var.double(), relu)
        return F.conv2d(a, w, None, 1, 1)

    _, g_ref, go = grads(ref, [t.double() for t in (x, w, gamma, beta)])
    _, g, _ = grads(_fused(1, 1, training=False, relu=relu), [x, w, gamma, beta], go)
    for name, a, r in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=["1x1", "3x3s2", "stem"])
def test_backward_without_prologue(shape):
    """Plain convolution (block input, stem): data and weight gradients; only the weight
    gradient when the input needs none (the image)."""
    _, _, _, _, _, k, s, p = shape
    x, w, _, _ = make_case(shape, torch.float32)
    _, (gx_ref, gw_ref), go = grads(lambda a, b: F.conv2d(a, b, None, s, p),
                                    [x.double(), w.double()])
    _, (gx, gw), _ = grads(lambda a, b: conv_bn(a, b, s, p)[0], [x, w], go)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-4)
    wl = w.clone().requires_grad_()
    out, _, _ = conv_bn(x, wl, s, p)
    out.backward(go.float())
    torch.testing.assert_close(wl.grad.double(), gw_ref, rtol=1e-4, atol=1e-4)


def test_weight_gradient_split_over_pixel_ranges(monkeypatch):
    """Several weight-gradient splits (fixed-order fp32 sum) give the one-split result."""
    shape = SHAPES[3]
    _, _, _, _, _, k, s, p = shape
    x, w, _, _ = make_case(shape, torch.float32)
    go = torch.randn(2, 16, 5, 5, device=DEVICE)
    one = K.conv_wgrad(cl(go), cl(x), w.shape, s, p)
    monkeypatch.setattr(K, "_WGRAD_ROWS_PER_SPLIT", 16)
    many = K.conv_wgrad(cl(go), cl(x), w.shape, s, p)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    ref = torch.nn.grad.conv2d_weight(x, w.shape, go, s, p)
    torch.testing.assert_close(many, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Kernel variants: every autotune config, taps folded into K, int64 offsets
# ---------------------------------------------------------------------------------------------
def _launched(fn):
    """(result of fn(), the Triton launches it made)."""
    from fastres.kernels.launch import record_launches

    with record_launches(passthrough=True) as launches:
        result = fn()
    return result, launches


def _all_passes(shape, dtype=torch.float32, only=None):
    """Forward (prologue + statistics), data and weight gradients (with the prologue), and the
    inference epilogue (bias + residual + ReLU), straight from the kernels; `only` ("fwd",
    "dgrad" or "wgrad") launches that pass alone (the data of the others is still drawn, so
    every pass sees the same tensors)."""
    _, cin, _, _, cout, k, s, p = shape
    x, w, _, _ = make_case(shape, dtype)
    x, w = cl(x.to(dtype)), cl(w.to(dtype))
    g = torch.Generator().manual_seed(11)
    scale = (torch.rand(cin, generator=g) + 0.5).to(DEVICE)
    shift = torch.randn(cin, generator=g).to(DEVICE)
    mean = torch.randn(cin, generator=g).to(DEVICE)
    got = {}
    if only in (None, "fwd"):
        got["out"], got["mean"], got["var"] = K.conv_forward(x, w, s, p, in_scale=scale,
                                                             in_shift=shift, stats=True)
    n, _, h, wd = x.shape
    out_shape = (n, cout, (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1)
    if "out" in got:
        assert tuple(got["out"].shape) == out_shape
    go = cl(torch.randn(out_shape, generator=g).to(DEVICE, dtype))
    bias = torch.randn(cout, generator=g).to(DEVICE)
    res = cl(torch.randn(out_shape, generator=g).to(DEVICE, dtype))
    if only in (None, "fwd"):
        got["inference"], _, _ = K.conv_forward(x, w, s, p, bias=bias, residual=res, relu=True)
    if only in (None, "dgrad"):
        got["grad_x"], got["psg"], got["psgx"] = K.conv_dgrad(go, w, x, s, p, scale, shift, mean)
    if only in (None, "wgrad"):
        got["grad_w"] = K.conv_wgrad(go, x, w.shape, s, p, scale, shift)
    return got


def _reference_passes(shape, dtype=torch.float32):
    """The same quantities from PyTorch in float64 (psg/psgx summed over all pixels)."""
    _, cin, _, _, cout, k, s, p = shape
    x, w, _, _ = make_case(shape, dtype)
    x, w = x.to(dtype).double(), w.to(dtype).double()
    g = torch.Generator().manual_seed(11)
    scale = (torch.rand(cin, generator=g) + 0.5).to(DEVICE).double().view(1, -1, 1, 1)
    shift = torch.randn(cin, generator=g).to(DEVICE).double().view(1, -1, 1, 1)
    mean = torch.randn(cin, generator=g).to(DEVICE).double()
    pre = (x * scale + shift).to(dtype).double()  # the prologue rounds act to x's dtype
    act = torch.relu(pre).requires_grad_()
    wr = w.clone().requires_grad_()
    out = F.conv2d(act, wr, None, s, p)
    go = torch.randn(out.shape, generator=g).to(DEVICE, dtype).double()
    bias = torch.randn(cout, generator=g).to(DEVICE)
    res = torch.randn(out.shape, generator=g).to(DEVICE, dtype).double()
    out.backward(go)
    gx = torch.where(pre <= 0, 0.0, act.grad)
    return dict(out=out.detach(), mean=out.detach().mean((0, 2, 3)),
                var=out.detach().var((0, 2, 3), unbiased=False),
                inference=torch.relu(F.conv2d(x, w, bias.double(), s, p) + res), grad_x=gx,
                psg=gx.sum((0, 2, 3)), psgx=(gx * (x - mean.view(1, -1, 1, 1))).sum((0, 2, 3)),
                grad_w=wr.grad)


def _check_passes(got, ref, what, dtype=torch.float32):
    """Every quantity in `got` (all of them, or one pass's) against the reference."""
    assert got and set(got) <= set(ref), (what, sorted(got))
    for key, a in got.items():
        r = ref[key]
        if key in ("psg", "psgx"):
            a = a.sum(0)  # per-tile partials
        if dtype == torch.float32:
            tol = dict(rtol=1e-4, atol=1e-4)
        else:  # fp16 outputs and gradients: a few units of fp16 rounding of the largest value
            tol = dict(rtol=1e-2, atol=4e-3 * r.abs().max().item() + 1e-3)
        torch.testing.assert_close(a.double(), r, msg=f"{what}: {key}", **tol)


CONFIG_SHAPES = [(2, 20, 9, 9, 24, 3, 1, 1), (2, 24, 10, 9, 20, 3, 2, 1),
                 (3, 40, 8, 8, 72, 1, 1, 0), (2, 3, 15, 13, 10, 7, 2, 3)]
# (module attribute, its autotune list, the dtype it runs): the fp16/bf16 autotuners run fp16
# here (bfloat16 cannot run under the interpreter), the fp32 ones fp32
TUNERS = [("_conv_fwd_kernel", "_FWD_SPACE", torch.float16),
          ("_conv_dgrad_kernel", "_DGRAD_SPACE", torch.float16),
          ("_conv_wgrad_kernel", "_WGRAD_SPACE", torch.float16),
          ("_conv_fwd_fold_kernel", "_FOLD_SPACE", torch.float16),
          ("_conv_fwd_fold_kernel", "_FOLD_SPACE", torch.float32),
          ("_conv_fwd_kernel_fp32", "_FP32_SPACE", torch.float32),
          ("_conv_dgrad_kernel_fp32", "_FP32_SPACE", torch.float32),
          ("_conv_wgrad_kernel_fp32", "_FP32_SPACE", torch.float32)]


@pytest.mark.parametrize("attr,space,dtype", TUNERS, ids=[f"{a}-{d}" for a, _, d in TUNERS])
def test_every_autotune_config_computes_the_same(attr, space, dtype, monkeypatch):
    """Each (BLOCK_N, BLOCK_K) of the shipped autotune lists, not only the interpreter's
    default, on shapes with channels that do not divide the tiles (warps and stages do not
    change the interpreter's result; tests/test_gpu_conv.py runs every config on a GPU)."""
    import triton

    tuner = getattr(K, attr)
    shapes = CONFIG_SHAPES[3:] if "fold" in attr else CONFIG_SHAPES[:3]
    # only the pass that launches the kernel under test (the others are tested elsewhere)
    only = "dgrad" if "dgrad" in attr else "wgrad" if "wgrad" in attr else "fwd"
    refs = {shape: _reference_passes(shape, dtype) for shape in shapes}
    done = set()
    for n, k, warps, stages in getattr(K, space):
        if (n, k) in done:
            continue
        done.add((n, k))
        cfg = triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        one = triton.autotune([cfg], key=tuner.keys)(tuner.fn)
        for shape in shapes:
            with monkeypatch.context() as m:
                m.setattr(K, attr, one)
                got, launches = _launched(lambda: _all_passes(shape, dtype, only))
            assert any(launch.kernel is one for launch in launches), (attr, n, k)
            _check_passes(got, refs[shape], f"{attr} {(n, k)} {shape}", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[4]],
                         ids=["3x3s1-odd", "3x3s2", "7x7s2-stem"])
def test_taps_folded_into_k_and_tap_loop_agree(shape, dtype, monkeypatch):
    """Few input channels (the stem) run the folded kernel (K = kh*kw*cin padded once); the
    per-tap kernel gives the same numbers, and both match float64 PyTorch."""
    got, launches = _launched(lambda: _all_passes(shape, dtype))
    names = [launch.name for launch in launches]
    assert "_conv_fwd_fold_kernel" in names and "_conv_fwd_kernel" not in names
    monkeypatch.setattr(K, "_FOLD_MAX_CIN", 0)
    unfolded, launches = _launched(lambda: _all_passes(shape, dtype))
    names = [launch.name for launch in launches]
    assert "_conv_fwd_kernel" in names and "_conv_fwd_fold_kernel" not in names
    ref = _reference_passes(shape, dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for key, r in ref.items():
        a, b = got[key], unfolded[key]
        if key in ("psg", "psgx"):
            a, b = a.sum(0), b.sum(0)
        torch.testing.assert_close(a.double(), r, msg=f"folded {key}", **tol)
        torch.testing.assert_close(b.double(), r, msg=f"per tap {key}", **tol)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]],
                         ids=["1x1s1", "1x1s2", "3x3s2", "7x7s2-stem", "3x3-multitile"])
def test_int64_offsets_give_the_int32_results(shape, monkeypatch):
    """Tensors of 2**31 elements or more switch every kernel to int64 offsets (INT64=True);
    forced on small tensors, that path gives bit for bit the int32 path's results."""
    small, _ = _launched(lambda: _all_passes(shape))
    from fastres.kernels.launch import record_launches

    monkeypatch.setattr(K, "_INT32_MAX", 0)
    with record_launches(passthrough=True) as launches:
        wide = _all_passes(shape)
    conv = [launch for launch in launches if launch.name.startswith("_conv_")]
    assert len(conv) == 4 and all(launch.kwargs["INT64"] for launch in conv)
    for key, a in small.items():
        torch.testing.assert_close(wide[key], a, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 4])
def test_tensor_descriptor_path_of_1x1_layers(dtype, splits, monkeypatch):
    """sm_90 runs 1x1 stride-1 layers (activations are [pixels, channels] matrices) on tensor
    descriptors (TMA): forced on under the interpreter, which zero-fills out-of-range tiles as
    TMA does, forward, data and weight gradients (over several pixel splits) match float64 and
    the pointer path; NaN and inf in grad_output stay where they belong."""
    shape = (3, 16, 9, 9, 24, 1, 1, 0)  # 243 pixels: two row tiles, the second one ragged
    monkeypatch.setattr(K, "_WGRAD_ROWS_PER_SPLIT", 243 // splits)
    pointer, launches = _launched(lambda: _all_passes(shape, dtype))
    assert not any(launch.kwargs.get("TMA") for launch in launches)
    monkeypatch.setattr(K, "_TMA_ON_CPU", True)
    tma, launches = _launched(lambda: _all_passes(shape, dtype))
    conv = [launch for launch in launches if launch.name.startswith("_conv_")]
    assert len(conv) == 4 and all(launch.kwargs["TMA"] for launch in conv)
    wgrad = next(launch for launch in conv if launch.name == "_conv_wgrad_kernel")
    assert wgrad.grid({"BLOCK_N": 16})[1] == splits  # pixel splits
    assert wgrad.args[12] % 16 == 0  # ROWS_PER_SPLIT: whole K steps
    ref = _reference_passes(shape, dtype)
    _check_passes(tma, ref, "TMA", dtype)
    _check_passes(pointer, ref, "pointers", dtype)
    # non-finite gradients: positions as in PyTorch
    x, w, _, _ = make_case(shape, dtype)
    x, w = cl(x.to(dtype)), cl(w.to(dtype))
    go = torch.randn(3, 24, 9, 9, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    go[1, 3, 4, 4] = float("inf")
    go[2, 5, 8, 8] = float("nan")
    gx, _, _ = K.conv_dgrad(cl(go), w, x, 1, 0)
    gw = K.conv_wgrad(cl(go), x, w.shape, 1, 0)
    ref_gx = torch.nn.grad.conv2d_input(x.shape, w.double(), go.double(), 1, 0)
    ref_gw = torch.nn.grad.conv2d_weight(x.double(), w.shape, go.double(), 1, 0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    for got, want, name in ((gx, ref_gx, "grad_x"), (gw, ref_gw, "grad_w")):
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.isinf(), want.isinf()), name
        torch.testing.assert_close(got.double(), want, equal_nan=True, msg=name, **tol)


def test_tensor_descriptors_need_sm90_and_16_byte_rows(monkeypatch):
    cl4 = dict(device="meta", memory_format=CL)
    g = K.ConvGeometry((256, 64, 56, 56), (256, 64, 1, 1), 1, 0)
    x = torch.empty(256, 64, 56, 56, dtype=torch.bfloat16, **cl4)
    w = torch.empty(256, 64, 1, 1, dtype=torch.bfloat16, **cl4)
    assert not K._tma(g, x, w)  # meta tensors with no target: no TMA
    with K.meta_target((9, 0)):
        assert K._tma(g, x, w)
        monkeypatch.setenv("FASTRES_CONV_TMA", "0")
        assert not K._tma(g, x, w)
        monkeypatch.delenv("FASTRES_CONV_TMA")
        odd = torch.empty(256, 60, 56, 56, dtype=torch.bfloat16, **cl4)  # 120-byte rows
        assert not K._tma(K.ConvGeometry(odd.shape, (256, 60, 1, 1), 1, 0), odd, w)
        assert not K._tma(K.ConvGeometry(x.shape, (64, 64, 3, 3), 1, 1), x, w)  # 3x3
        assert not K._tma(K.ConvGeometry(x.shape, (256, 64, 1, 1), 2, 0), x, w)  # stride 2
    with K.meta_target((8, 0)):
        assert not K._tma(g, x, w)


def test_int64_is_chosen_from_the_tensor_sizes():
    g = K.ConvGeometry((256, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    assert not K._int64(g, 256 * 64 * 56 * 56)
    assert K._int64(g, 2 ** 31)
    assert K._int64(g, 2 ** 31 - 1000)  # a padded window reaches past the end


# ---------------------------------------------------------------------------------------------
# Operator registration
# ---------------------------------------------------------------------------------------------
def test_opcheck_forward_and_backward_ops():
    shape = (2, 6, 5, 5, 8, 3, 2, 1)
    x, w, gamma, beta = make_case(shape, torch.float32)
    x, w = cl(x), cl(w)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    fwd = torch.ops.fastres.conv_bn_forward_triton.default
    for args in [
        (x, w, None, None, None, None, None, None, 2, 1, EPS, True, True, False, True),
        (x.requires_grad_(), w.requires_grad_(), None, None, gamma.requires_grad_(),
         beta.requires_grad_(), mean, var, 2, 1, EPS, True, True, False, True),
    ]:
        torch.library.opcheck(fwd, args)
    go = cl(torch.randn(2, 8, 3, 3, device=DEVICE))
    torch.library.opcheck(torch.ops.fastres.conv_bn_backward_triton.default,
                          (go, x.detach(), w.detach(), gamma.detach(), beta.detach(), mean, var,
                           2, 1, EPS, True, True, True, True))


def test_double_backward_is_a_clear_error():
    x, w, _, _ = make_case(SHAPES[0], torch.float32)
    x.requires_grad_()
    out, _, _ = conv_bn(x, w, 1, 0)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---------------------------------------------------------------------------------------------
# Bad input gets a clear error
# ---------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    x, w, gamma, beta = make_case(SHAPES[2], torch.float32)
    with pytest.raises(ValueError, match="channels-last"):
        K.conv_forward(x, cl(w), 1, 1)
    with pytest.raises(TypeError, match="weight dtype"):
        K.conv_forward(cl(x), cl(w.half()), 1, 1)
    with pytest.raises(ValueError, match="input channels"):
        K.conv_forward(cl(x), cl(w[:, :3]), 1, 1)
    with pytest.raises(ValueError, match="smaller than"):
        K.conv_forward(cl(x[:, :, :2, :2]), cl(w), 1, 0)
    with pytest.raises(ValueError, match="equal stride"):
        conv_bn(x, w, (1, 2), 1)
    with pytest.raises(ValueError, match="square kernel"):
        conv_bn(x, w[:, :, :2], 1, 1)
    with pytest.raises(ValueError, match="both in_mean and in_var"):
        conv_bn(x, w, 1, 1, in_mean=gamma)
    with pytest.raises(ValueError, match="in_weight"):
        conv_bn(x, w, 1, 1, in_weight=gamma[:2], in_mean=gamma, in_var=gamma)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        conv_bn(x.double(), w.double(), 1, 1)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn(x.requires_grad_(), w, 1, 1, relu=True)


# ---------------------------------------------------------------------------------------------
# Conv backend switch
# ---------------------------------------------------------------------------------------------
def test_conv_backend_switch():
    assert fastres.get_conv_backend() == "cudnn"
    with fastres.conv_backend("triton"):
        assert fastres.get_conv_backend() == "triton"
        with fastres.conv_backend("auto"):
            assert fastres.get_conv_backend() == "auto"
            # "auto" never measures on CPU: PyTorch's convolution
            assert backends.resolve_conv(torch.device("cpu"), key=("k",)) == "cudnn"
        assert fastres.get_conv_backend() == "triton"
    assert fastres.get_conv_backend() == "cudnn"
    with pytest.raises(ValueError, match="unknown convolution backend"):
        fastres.set_conv_backend("tensorrt")


# ---------------------------------------------------------------------------------------------
# Blocks and models: the conv chain against unfused PyTorch
# ---------------------------------------------------------------------------------------------
def _pair(cls, *args, **kwargs):
    fused = cls(*args, fused=True, **kwargs).to(DEVICE)
    ref = cls(*args, fused=False, **kwargs).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _check_train_step(fused, ref, x, atol=2e-4):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastres.conv_backend("triton"):
        out = fused(x1)
    out_ref = ref(x2)
    go = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out.backward(go)
    out_ref.backward(go)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=atol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-3, atol=atol)
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=atol, msg=name)
    for (name, b), (_, c) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    return out


BLOCKS = [
    (Bottleneck, (16, 8), dict(stride=2)),                # projection shortcut (B), stride 2
    (Bottleneck, (32, 8), dict()),                        # identity shortcut
    (BasicBlock, (8, 12), dict(stride=2)),
    (BasicBlock, (6, 6), dict(shortcut="A")),
    (BasicBlock, (6, 10), dict(stride=2, shortcut="A")),  # zero-padded channels
    (BasicBlock, (6, 6), dict(shortcut="C")),
    (BasicBlock, (6, 6), dict(residual=False)),           # plain net
]


@pytest.mark.parametrize("cls,args,kwargs", BLOCKS,
                         ids=["bottleneck-s2", "bottleneck", "basic-s2", "basic-A", "basic-A-s2",
                              "basic-C", "plain"])
def test_block_train_and_eval(cls, args, kwargs):
    fused, ref = _pair(cls, *args, **kwargs)
    x = torch.randn(2, args[0], 9, 9).to(DEVICE)
    out = _check_train_step(fused, ref, x)
    assert out.is_contiguous(memory_format=CL)  # the Triton convolutions compute in NHWC
    fused.eval()
    ref.eval()
    with torch.no_grad(), fastres.conv_backend("triton"):
        y = fused(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)


def test_block_eval_with_gradients_uses_running_stats():
    """Eval mode with gradients (not foldable): prologue with running statistics."""
    fused, ref = _pair(Bottleneck, 16, 4)
    fused(torch.randn(4, 16, 6, 6, device=DEVICE))  # move running stats off their defaults
    ref.load_state_dict(fused.state_dict())
    fused.eval()
    ref.eval()
    _check_train_step(fused, ref, torch.randn(2, 16, 6, 6, device=DEVICE))


def test_block_momentum_none_and_no_running_stats():
    fused, ref = _pair(BasicBlock, 6, 6)
    for model in (fused, ref):
        model.bn1.momentum = None  # cumulative moving average
        model.bn2.track_running_stats = False
        model.bn2.running_mean = model.bn2.running_var = None
        model.bn2.num_batches_tracked = None
    for _ in range(2):
        _check_train_step(fused, ref, torch.randn(2, 6, 5, 5, device=DEVICE))
    assert fused.bn1.num_batches_tracked.item() == 2


def test_pending_chain_falls_back_to_pytorch_convolution():
    """A grouped convolution cannot run on Triton: the chain materialises and uses conv2d."""
    conv1 = nn.Conv2d(4, 8, 1, bias=False).to(DEVICE)
    bn1 = nn.BatchNorm2d(8).to(DEVICE)
    conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False).to(DEVICE)
    bn2 = nn.BatchNorm2d(8).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    with fastres.conv_backend("triton"):
        p1 = conv_bn_pending(conv1, bn1, x)
        assert isinstance(p1, PendingBatchNorm) and p1.mean is not None
        p2 = conv_bn_pending(conv2, bn2, p1)
        assert p2.mean is None  # cuDNN/PyTorch path: BatchNorm computes its own stats
        out = materialize(p2)
    ref_bn1, ref_bn2 = nn.BatchNorm2d(8).to(DEVICE), nn.BatchNorm2d(8).to(DEVICE)
    ref = torch.relu(ref_bn2(conv2(torch.relu(ref_bn1(conv1(x))))))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn2.running_var, ref_bn2.running_var)


def test_autocast_float16_block():
    """Under autocast the chain runs in the autocast dtype with fp32 parameters."""
    fused, ref = _pair(Bottleneck, 16, 4)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    with fastres.conv_backend("triton"), torch.autocast(DEVICE, dtype=torch.float16):
        out = fused(x)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in fused.parameters())
    with torch.no_grad():
        ref_out = ref(x)
    err = (out.float() - ref_out).abs().max().item()
    assert err < 2e-2 * max(1.0, ref_out.abs().max().item()), err


def test_compiled_block_matches_eager():
    """torch.compile(fullgraph=True) traces the chain through the ops' fake kernels."""
    fused, _ = _pair(Bottleneck, 16, 4, stride=2)
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    with fastres.conv_backend("triton"):
        eager = fused(x)
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


def test_cifar_resnet20_train_step_matches_unfused():
    """A whole (small) network training step: stem, 9 chained blocks, option-A shortcuts."""
    fused = fastres.models.resnet20().to(DEVICE)
    ref = fastres.models.resnet20(fused=False).to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check_train_step(fused, ref, x, atol=1e-3)
