"""GPU-only checks: every ResNet-50 BatchNorm shape on the CUDA and Triton backends in bf16,
tensors with more than 2^31 elements, and torch.compile with Inductor. Skipped without CUDA;
run by scripts/gpu_check.sh on a GPU machine."""
import importlib.util

import pytest
import torch

import fastres
from fastres.bench.op_benchmark import RESNET50_BN_SHAPES
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from numerics import assert_close_rule, unfused

pytestmark = pytest.mark.gpu

GPU_BACKENDS = []
if torch.cuda.is_available():
    GPU_BACKENDS = [n for n in ("cuda", "triton") if n in fastres.available_backends()]


def fused(backend, x, r, rm, rv, w, b, training):
    with fastres.backend(backend):
        if r is None:
            return batch_norm_relu(x, rm, rv, w, b, training)
        return batch_norm_add_relu(x, r, rm, rv, w, b, training)


def forward_backward(fn, x, r, w, b, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w, b) if t is not None]
    x_, r_ = leaves[0], (leaves[1] if r is not None else None)
    w_, b_ = leaves[-2], leaves[-1]
    rm, rv = torch.zeros(x.shape[1], device="cuda"), torch.ones(x.shape[1], device="cuda")
    y = fn(x_, r_, rm, rv, w_, b_)
    grads = torch.autograd.grad(y, leaves, g)
    return [y.detach(), *grads, rm, rv]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_shapes(backend, dtype, channels_last, training):
    torch.manual_seed(0)
    for op, c, hw, _ in RESNET50_BN_SHAPES:
        shape = (16, c, hw, hw)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = (torch.randn(shape, device="cuda") * 2 + 0.3).to(dtype).contiguous(memory_format=fmt)
        r = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt) \
            if op == "bn_add_relu" else None
        w = torch.randn(c, device="cuda")
        b = torch.randn(c, device="cuda")
        g = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32

        def ref_fn(x_, r_, rm, rv, w_, b_, dt=ref_dtype):
            args = [t.to(dt) if t is not None else None for t in (x_, r_, rm, rv, w_, b_)]
            if not training:
                args[2], args[3] = args[2] + 0.1, args[3] * 1.5
            return unfused(*args, training, 0.1, 1e-5)

        def same_fn(x_, r_, rm, rv, w_, b_):
            if not training:
                rm, rv = rm + 0.1, rv * 1.5
            return unfused(x_, r_, rm, rv, w_, b_, training, 0.1, 1e-5)

        def fused_fn(x_, r_, rm, rv, w_, b_):
            if not training:
                rm, rv = rm + 0.1, rv * 1.5
            return fused(backend, x_, r_, rm, rv, w_, b_, training)

        out_f = forward_backward(fused_fn, x, r, w, b, g)
        out_s = forward_backward(same_fn, x, r, w, b, g)
        out_r = forward_backward(ref_fn, x, r, w, b, g.to(ref_dtype))
        assert out_f[0].stride() == x.stride()
        names = ["output", "grad_input"] + (["grad_residual"] if r is not None else []) + \
                ["grad_weight", "grad_bias"]
        for i, name in enumerate(names):
            assert_close_rule(out_f[i], out_s[i], out_r[i], dtype, f"{op} {shape} {name}",
                              mask_flips=i > 0)
        torch.testing.assert_close(out_f[-2], out_s[-2], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(out_f[-1], out_s[-1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    """Index arithmetic past 2^31: bf16 channels_last, 2 x 64 x 4096 x 4100 elements."""
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip("needs 48 GiB of free GPU memory")
    torch.manual_seed(0)
    shape = (2, 64, 4096, 4100)
    assert torch.Size(shape).numel() > 2**31
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[1, :, -1, -1] = 4.0  # a marker at the very end of memory
    r = torch.randn_like(x)
    w = torch.rand(64, device="cuda") + 0.5
    b = torch.randn(64, device="cuda")
    y = fused(backend, x, r, None, None, w, b, True)
    mean = x.float().mean(dim=(0, 2, 3))
    var = x.float().var(dim=(0, 2, 3), unbiased=False)
    tail = (x[1, :, -8:, :].float() - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
    tail = torch.relu(tail * w[:, None, None] + b[:, None, None] + r[1, :, -8:, :].float())
    torch.testing.assert_close(y[1, :, -8:, :].float(), tail, rtol=2e-2, atol=2e-2)
    del y
    xg = x.requires_grad_(True)
    y = fused(backend, xg, None, None, None, w, b, True)
    (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    assert torch.isfinite(gx[1, :, -8:, :].float()).all()
    # for an all-ones gradient, grad_input sums to ~0 per channel (the mean term)
    assert gx[1, :, -8:, :].float().abs().max() < 100


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_inductor_gpu(backend):
    torch._dynamo.reset()
    x = torch.randn(8, 64, 14, 14, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    r = torch.randn_like(x)
    w = torch.ones(64, device="cuda", requires_grad=True)
    b = torch.zeros(64, device="cuda", requires_grad=True)

    def f(x, r, w, b):
        return batch_norm_add_relu(x * 1.5, r, None, None, w, b, True).float().sum()

    with fastres.backend(backend):
        eager = torch.autograd.grad(f(x, r, w, b), (x, w, b))
        compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, r, w, b), (x, w, b))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_auto_backend_picks_an_available_gpu_backend():
    if not GPU_BACKENDS:
        pytest.skip("no GPU backend")
    from fastres import backends

    assert backends.resolve(torch.device("cuda")) in GPU_BACKENDS
