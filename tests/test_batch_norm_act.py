"""fastres.functional.batch_norm_relu / batch_norm_add_relu against unfused PyTorch, on every
backend that can run here (C++ CPU always; Triton on CPU under TRITON_INTERPRET=1; CUDA C++ and
Triton on a GPU)."""
import importlib.util
import itertools

import pytest
import torch

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from numerics import assert_close_rule, reference_dtype, unfused

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend_cases():
    """(backend, device) pairs that run on this machine."""
    cases = [("cpu", "cpu")]
    if HAS_TRITON and not HAS_CUDA:
        cases.append(("triton", "cpu"))  # Triton interpreter
    if HAS_CUDA:
        if fastres.build_info()["cuda"]:
            cases.append(("cuda", "cuda"))
        if HAS_TRITON:
            cases.append(("triton", "cuda"))
    return cases


BACKENDS = backend_cases()


def dtypes_for(backend, device):
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]  # the interpreter has no bfloat16
    return [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, device, channels_last, residual, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    # per-channel offsets and scales so the statistics matter, both signs so ReLU cuts
    offset = torch.randn(c, generator=g) * 2
    spread = torch.rand(c, generator=g) * 3 + 0.1
    view = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g) * spread.view(view) + offset.view(view)
    r = torch.randn(shape, generator=g) if residual else None
    w = torch.randn(c, generator=g) if affine else None
    b = torch.randn(c, generator=g) * 0.5 if affine else None
    rm = torch.randn(c, generator=g) * 0.1
    rv = torch.rand(c, generator=g) + 0.5
    grad = torch.randn(shape, generator=g)

    def prep(t, dt=dtype, cl=channels_last):
        if t is None:
            return None
        t = t.to(device=device, dtype=dt)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return dict(x=prep(x), r=prep(r), w=prep(w, torch.float32, False),
                b=prep(b, torch.float32, False), rm=prep(rm, torch.float32, False),
                rv=prep(rv, torch.float32, False), grad=prep(grad))


def run(data, dtype, training, momentum, backend, fused, eps=1e-5):
    """Forward + backward; returns (out, grads, running_mean, running_var)."""
    x = data["x"].to(dtype).detach().requires_grad_(True)
    r = data["r"].to(dtype).detach().requires_grad_(True) if data["r"] is not None else None
    sd = torch.float64 if dtype == torch.float64 else torch.float32  # parameters, statistics
    w = data["w"].detach().to(sd).requires_grad_(True) if data["w"] is not None else None
    b = data["b"].detach().to(sd).requires_grad_(True) if data["b"] is not None else None
    rm, rv = data["rm"].clone().to(sd), data["rv"].clone().to(sd)
    if fused:
        with fastres.backend(backend):
            if r is None:
                y = batch_norm_relu(x, rm, rv, w, b, training, momentum, eps)
            else:
                y = batch_norm_add_relu(x, r, rm, rv, w, b, training, momentum, eps)
    else:
        y = unfused(x, r, rm, rv, w, b, training, momentum, eps)
    inputs = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, data["grad"].to(dtype))
    return y.detach(), grads, rm, rv


def check_against_pytorch(data, dtype, training, backend, momentum=0.1):
    # activations are rounded to `dtype` first, so the reference sees the same inputs
    data = {k: (v.to(dtype).to(v.dtype) if k in ("x", "r", "grad") and v is not None else v)
            for k, v in data.items()}
    fused = run(data, dtype, training, momentum, backend, fused=True)
    same = run(data, dtype, training, momentum, backend, fused=False)
    ref = run(data, reference_dtype(dtype), training, momentum, backend, fused=False)
    out, grads, rm, rv = fused
    assert out.dtype == dtype
    assert out.stride() == data["x"].stride(), "output must keep the input's memory format"
    assert_close_rule(out, same[0], ref[0], dtype, "output")
    names = ["grad_input", "grad_residual", "grad_weight", "grad_bias"]
    if data["r"] is None:
        names.remove("grad_residual")
    if data["w"] is None:
        names = names[: len(names) - 2]
    for name, g, gs, gr in zip(names, grads, same[1], ref[1]):
        assert g.dtype == gs.dtype, f"{name} dtype {g.dtype} != {gs.dtype}"
        assert_close_rule(g, gs, gr, dtype, name, mask_flips=True)
    # running statistics: updated from the batch in training, untouched in eval
    torch.testing.assert_close(rm, same[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, same[3], rtol=1e-5, atol=1e-6)
    if not training:
        torch.testing.assert_close(rm, data["rm"].to(rm.dtype), rtol=0, atol=0)


SHAPES_4D = [(2, 1, 3, 3), (4, 3, 5, 5), (3, 17, 6, 7), (2, 64, 4, 4), (8, 32, 1, 1)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES_4D)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_pytorch(backend, device, shape, channels_last, residual, training):
    for dtype in dtypes_for(backend, device):
        data = make_inputs(shape, torch.float32, device, channels_last, residual)
        check_against_pytorch(data, dtype, training, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(16, 17), (6, 5, 9), (2, 3, 4, 5, 3)], ids=["2d", "3d", "5d"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_other_ranks(backend, device, shape, residual):
    data = make_inputs(shape, torch.float32, device, False, residual)
    check_against_pytorch(data, torch.float32, True, backend)
    check_against_pytorch(data, torch.float32, False, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_without_affine(backend, device, residual):
    data = make_inputs((4, 6, 5, 5), torch.float32, device, True, residual, affine=False)
    check_against_pytorch(data, torch.float32, True, backend)
    check_against_pytorch(data, torch.float32, False, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_running_stats_with_momentum_none_and_several_steps(backend, device):
    """momentum=None is the cumulative moving average of nn.BatchNorm2d, over many steps."""
    bn = torch.nn.BatchNorm2d(7, momentum=None).to(device)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    bn_m = torch.nn.BatchNorm2d(7, momentum=0.3).to(device)
    rm_m, rv_m = bn_m.running_mean.clone(), bn_m.running_var.clone()
    for step in range(4):
        x = torch.randn(3, 7, 4, 5, device=device) * (step + 1) + step
        bn(x)
        bn_m(x)
        with fastres.backend(backend):
            batch_norm_relu(x, rm, rv, bn.weight, bn.bias, True, None, bn.eps,
                            num_batches_tracked=nbt)
            batch_norm_relu(x, rm_m, rv_m, bn.weight, bn.bias, True, 0.3, bn.eps)
    assert nbt.item() == bn.num_batches_tracked.item() == 4
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm_m, bn_m.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv_m, bn_m.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_training_without_running_stats(backend, device):
    """track_running_stats=False: batch statistics, nothing to update."""
    x = torch.randn(4, 5, 3, 3, device=device)
    r = torch.randn_like(x)
    with fastres.backend(backend):
        y = batch_norm_add_relu(x, r, None, None, None, None, True)
    ref = unfused(x, r, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_half_parameters_as_after_model_half(backend, device):
    """model.half() gives float16 parameters and buffers: they work like float32 ones."""
    dtype = torch.float16
    data = make_inputs((4, 8, 5, 5), torch.float32, device, True, True)
    x, r = data["x"].to(dtype), data["r"].to(dtype)
    w, b = data["w"].to(dtype), data["b"].to(dtype)
    rm, rv = data["rm"].to(dtype), data["rv"].to(dtype)
    rm2, rv2 = rm.float(), rv.float()
    with fastres.backend(backend):
        y = batch_norm_add_relu(x, r, rm, rv, w, b, True)
    ref = unfused(x.float(), r.float(), rm2, rv2, w.float(), b.float(), True, 0.1, 1e-5)
    assert rm.dtype == dtype and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=4e-3)
    torch.testing.assert_close(rm.float(), rm2.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_dense_input_and_mixed_layouts(backend, device):
    """A strided view and a residual in another memory format give the right answer."""
    base = torch.randn(4, 6, 10, 10, device=device)
    x = base[:, :, ::2, ::2]  # not dense
    r = torch.randn(4, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    with fastres.backend(backend):
        y = batch_norm_add_relu(x, r, None, None, None, None, True)
    torch.testing.assert_close(y, unfused(x, r, None, None, None, None, True, 0.1, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_output_in_another_layout(backend, device):
    x = torch.randn(3, 5, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = torch.randn(3, 5, 4, 4, device=device)  # NCHW gradient for an NHWC activation
    with fastres.backend(backend):
        (gx,) = torch.autograd.grad(batch_norm_relu(x, None, None, None, None, True), x, g)
    (rx,) = torch.autograd.grad(unfused(x, None, None, None, None, None, True, 0.1, 1e-5), x, g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)


def test_cpu_backward_allocates_no_gradients_for_the_statistics():
    """The C++ autograd node leaves the (never used) gradients of the batch mean and variance
    undefined: no zero [C] tensors are allocated and filled on each backward."""
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    b = torch.zeros(6, requires_grad=True)
    g = torch.randn(2, 6, 3, 3)
    with fastres.backend("cpu"):
        y = batch_norm_relu(x, torch.zeros(6), torch.ones(6), w, b, True)
    with torch.profiler.profile() as prof:
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    names = [e.key for e in prof.key_averages()]
    assert "fastres::bn_act_backward" in names
    assert not {"aten::zeros", "aten::zeros_like", "aten::zero_"} & set(names), names
    rx, rw, rb = torch.autograd.grad(
        unfused(x, None, torch.zeros(6), torch.ones(6), w, b, True, 0.1, 1e-5), (x, w, b), g)
    torch.testing.assert_close((gx, gw, gb), (rx, rw, rb), rtol=1e-5, atol=1e-5)


def test_empty_batch_matches_pytorch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y = batch_norm_relu(x, torch.zeros(4), torch.ones(4), None, None, False)
    assert y.shape == x.shape


def test_gradcheck_fp64_cpu():
    """Analytical gradients against finite differences, float64 on the C++ CPU backend."""
    torch.manual_seed(0)
    for cl, (shape, training) in itertools.product(
            [False, True], [((3, 4, 3, 3), True), ((3, 4, 3, 3), False), ((5, 3), True)]):
        x = torch.randn(shape, dtype=torch.float64)
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        r = torch.randn_like(x).requires_grad_(True)
        w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(shape[1], dtype=torch.float64).requires_grad_(True)
        rm = torch.randn(shape[1], dtype=torch.float64)
        rv = torch.rand(shape[1], dtype=torch.float64) + 0.5
        with fastres.backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda x, r, w, b: batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b, training),
                (x, r, w, b))
            assert torch.autograd.gradcheck(
                lambda x, w, b: batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training),
                (x, w, b))
            assert torch.autograd.gradgradcheck is not None
