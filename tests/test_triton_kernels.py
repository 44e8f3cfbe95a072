"""Triton kernels of the fused BatchNorm(+add)(+ReLU) op against an fp64 PyTorch reference.

Runs on CPU tensors under Triton's interpreter when no GPU is present (tests/conftest.py sets
TRITON_INTERPRET=1), on CUDA tensors otherwise. The kernel module is imported from the repo path
(``kernels/``), so the package does not need to be installed.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # conftest.py does this too; needed before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import batch_norm_act as K  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_input(layout, C, dtype, gen, spatial=(3, 5), n=2, offset=0.5):
    """Input with both signs after normalisation, in the requested memory layout."""
    if layout == "2d":
        x = torch.randn(n * 11 + 1, C, generator=gen)
    elif layout == "nlc":  # 3-D channels-last: (N, C, L) with strides (L*C, 1, C)
        x = torch.randn(n, spatial[0] * spatial[1], C, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(n, C, *spatial, generator=gen)
    x = x * 2 + offset
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "ndhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x.to(dtype=dtype, device=DEVICE)


def make_params(C, dtype, gen, affine):
    """weight (random sign, |w| in [0.5, 1.5]), bias, running_mean, running_var."""
    w = (0.5 + torch.rand(C, generator=gen)) * torch.where(torch.rand(C, generator=gen) < 0.3,
                                                           -1.0, 1.0)
    b = 0.3 * torch.randn(C, generator=gen)
    rm = 0.5 * torch.randn(C, generator=gen)
    rv = 0.5 + torch.rand(C, generator=gen)
    conv = lambda t: t.to(dtype=dtype, device=DEVICE)  # noqa: E731
    return (conv(w) if affine else None, conv(b) if affine else None, conv(rm), conv(rv))


def like(x, gen):
    """Random tensor with the shape, dtype and strides of x."""
    return torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))


def reference(x, residual, weight, bias, rm, rv, training, relu, grad_out):
    """fp64 forward (out, mean, var) and autograd backward (gi, gr, gw, gb)."""
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    xd, rd, wd, bd = d(x), d(residual), d(weight), d(bias)
    y = F.batch_norm(xd, rm.double().clone(), rv.double().clone(), wd, bd, training=training,
                     momentum=0.0, eps=EPS)
    if rd is not None:
        y = y + rd
    if relu:
        y = F.relu(y)
    y.backward(grad_out.double())
    dims = [i for i in range(x.dim()) if i != 1]
    if training:
        mean = xd.detach().mean(dims)
        var = xd.detach().var(dims, unbiased=False)
    else:
        mean, var = rm.double(), rv.double()
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return y.detach(), mean, var, xd.grad, grad(rd), grad(wd), grad(bd)


def assert_close(actual, expected, tol, name):
    """max |actual - expected| <= tol * reference scale (max |expected|, at least 1e-3)."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} * {scale:.3e}"


def run_and_check(x, residual, weight, bias, rm, rv, training, relu, gen, tol):
    out, mean, var = K.bn_act_forward(x, residual, weight, bias, rm, rv, training, EPS, relu)
    grad_out = like(x, gen)
    r_out, r_mean, r_var, r_gi, r_gr, r_gw, r_gb = reference(
        x, residual, weight, bias, rm, rv, training, relu, grad_out)

    assert out.dtype == x.dtype and out.stride() == x.stride()
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (x.shape[1],)
    assert_close(out, r_out, tol, "out")
    assert_close(mean, r_mean, tol, "mean")
    assert_close(var, r_var, tol, "var")
    if relu:  # the mask is exercised: both sides of zero occur
        assert (out == 0).any() and (out > 0).any()

    has_res = residual is not None
    gi, gr, gw, gb = K.bn_act_backward(grad_out, x, out, weight, bias, mean, var, training, EPS,
                                       relu, has_res)
    assert gi.dtype == x.dtype and gi.stride() == x.stride()
    assert gw.dtype == gb.dtype == torch.float32 and gw.shape == gb.shape == (x.shape[1],)
    assert_close(gi, r_gi, tol, "grad_input")
    if has_res:
        assert gr.dtype == x.dtype and gr.stride() == x.stride()
        assert_close(gr, r_gr, tol, "grad_residual")
    else:
        assert gr.numel() == 0 and gr.dtype == x.dtype
    # grad_weight/grad_bias are always computed; compare with autograd when the params exist,
    # else with the same sums of a reference that has weight = 1, bias = 0.
    if weight is None:
        ones = torch.ones(x.shape[1], dtype=x.dtype, device=DEVICE)
        *_, r_gw, r_gb = reference(x, residual, ones, ones * 0, rm, rv, training, relu, grad_out)
    assert_close(gw, r_gw, tol, "grad_weight")
    assert_close(gb, r_gb, tol, "grad_bias")

    if relu and not has_res:  # mask recomputed from the input must agree with out > 0 exactly
        gi2, _, gw2, gb2 = K.bn_act_backward(grad_out, x, None, weight, bias, mean, var,
                                             training, EPS, relu, False)
        assert torch.equal(gi2, gi) and torch.equal(gw2, gw) and torch.equal(gb2, gb)
    return out, gi


# ---------------------------------------------------------------------------------------------
# Reference comparisons
# ---------------------------------------------------------------------------------------------
VARIANTS = [  # (affine, residual, relu)
    (True, True, True),
    (False, False, True),
    (True, False, False),
    (False, True, False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "aff%d-res%d-relu%d" % v)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("C", [1, 3, 17, 64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d"])
def test_matches_reference(layout, C, training, dtype, variant):
    affine, has_res, relu = variant
    gen = torch.Generator().manual_seed(1000 * C + 7)
    x = make_input(layout, C, dtype, gen)
    residual = like(x, gen) if has_res else None
    weight, bias, rm, rv = make_params(C, dtype, gen, affine)
    run_and_check(x, residual, weight, bias, rm, rv, training, relu, gen, TOL[dtype])


@pytest.mark.parametrize("layout, spatial", [("nlc", (2, 7)), ("ndhwc", (2, 3, 4)),
                                             ("nhwc", (1, 1)), ("nchw", (1, 1))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_other_layouts(layout, spatial, training):
    """3-D and 5-D channels-last, and 1x1 spatial (both contiguous and channels-last)."""
    gen = torch.Generator().manual_seed(3)
    C = 5
    x = make_input(layout, C, torch.float32, gen, spatial=spatial, n=4)
    if layout == "nhwc" and spatial == (1, 1):
        assert x.is_contiguous() and x.stride(1) == 1
    residual = like(x, gen)
    weight, bias, rm, rv = make_params(C, torch.float32, gen, True)
    run_and_check(x, residual, weight, bias, rm, rv, training, True, gen, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_multi_block_paths(layout, training, monkeypatch):
    """Tiny blocks: several tiles per program, several splits, several channel blocks and
    several loop steps in the merge/finalize kernels."""
    monkeypatch.setattr(K, "_TILE", 64)
    monkeypatch.setattr(K, "_MAX_BLOCK_C", 8)
    monkeypatch.setattr(K, "_MAX_BLOCK_S", 16)
    monkeypatch.setattr(K, "_TARGET_PROGRAMS", 48)
    monkeypatch.setattr(K, "_MERGE_BLOCK_C", 4)
    monkeypatch.setattr(K, "_MERGE_BLOCK_P", 2)
    gen = torch.Generator().manual_seed(11)
    C = 20
    x = make_input(layout, C, torch.float32, gen, spatial=(7, 9), n=5)
    lay = K._Layout(x)
    if lay.nhwc:
        block_m, block_c = K._nhwc_blocks(lay.count, C)
        iters, splits = K._split(K._cdiv(lay.count, block_m), K._cdiv(C, block_c))
        assert K._cdiv(C, block_c) > 1
    else:
        block_n, block_s = K._nchw_blocks(lay.N, lay.S)
        n_nblocks = K._cdiv(lay.N, block_n)
        iters, splits = K._split(K._cdiv(lay.S, block_s), C * n_nblocks)
        assert n_nblocks > 1
    assert iters > 1 and splits > 1
    residual = like(x, gen)
    weight, bias, rm, rv = make_params(C, torch.float32, gen, True)
    run_and_check(x, residual, weight, bias, rm, rv, training, True, gen, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_stable_variance_with_large_mean(layout):
    """var of 1000 + N(0, 1) in fp32: a one-pass E[x^2] - E[x]^2 loses about 1e-1 here."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 16, 16, generator=gen) + 1000.0
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE)
    _, mean, var = K.bn_act_forward(x, None, None, None, None, None, True, EPS, False)
    xd = x.double()
    ref_var = xd.var((0, 2, 3), unbiased=False)
    assert_close(mean, xd.mean((0, 2, 3)), 1e-6, "mean")
    assert (var.double().cpu() - ref_var.cpu()).abs().max().item() < 1e-4 * ref_var.max().item()


def test_relu_mask_changes_gradients():
    """The ReLU mask matters: the gradients with and without it differ, and each matches its
    own reference."""
    gen = torch.Generator().manual_seed(9)
    x = make_input("nhwc", 6, torch.float32, gen)
    weight, bias, rm, rv = make_params(6, torch.float32, gen, True)
    _, gi_relu = run_and_check(x, None, weight, bias, rm, rv, True, True, gen, 1e-5)
    gen2 = torch.Generator().manual_seed(9)
    x2 = make_input("nhwc", 6, torch.float32, gen2)
    make_params(6, torch.float32, gen2, True)
    _, gi_lin = run_and_check(x2, None, weight, bias, rm, rv, True, False, gen2, 1e-5)
    assert torch.equal(x, x2)
    assert not torch.allclose(gi_relu, gi_lin, atol=1e-3)


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(4)
    x = make_input("nhwc", 17, torch.float32, gen, spatial=(6, 6), n=3)
    weight, bias, rm, rv = make_params(17, torch.float32, gen, True)
    out, mean, var = K.bn_act_forward(x, None, weight, bias, rm, rv, True, EPS, True)
    go = like(x, gen)
    first = K.bn_act_backward(go, x, out, weight, bias, mean, var, True, EPS, True, False)
    second = K.bn_act_backward(go, x, out, weight, bias, mean, var, True, EPS, True, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------
def test_rejects_float64():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        K.bn_act_forward(x, None, None, None, None, None, True, EPS, False)


def test_add_relu_backward_needs_output():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    mean, var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="needs the forward output"):
        K.bn_act_backward(x, x, None, None, None, mean, var, True, EPS, True, True)


def test_rejects_mismatched_layout():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    r = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="strides of input"):
        K.bn_act_forward(x, r, None, None, None, None, True, EPS, False)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out, mean, var = K.bn_act_forward(x, None, None, None, rm, rv, False, EPS, True)
    assert out.shape == x.shape and torch.equal(mean, rm) and torch.equal(var, rv)
    gi, gr, gw, gb = K.bn_act_backward(x, x, out, None, None, mean, var, False, EPS, True, False)
    assert gi.shape == x.shape and gr.numel() == 0
    assert torch.equal(gw, torch.zeros(3, device=DEVICE)) and torch.equal(gb, gw)
