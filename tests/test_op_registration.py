"""torch.library registration: opcheck (schema, fake kernels, autograd registration, AOT
dispatch) on every operator, and torch.compile(fullgraph=True) tracing through them."""
import importlib.util

import pytest
import torch

import fastres
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from numerics import unfused

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

OPS = [(torch.ops.fastres.bn_act_forward, torch.ops.fastres.bn_act_backward, "cpu")]
if HAS_TRITON and not HAS_CUDA:
    OPS.append((torch.ops.fastres.bn_act_forward_triton, torch.ops.fastres.bn_act_backward_triton, "cpu"))
if HAS_CUDA:
    if fastres.build_info()["cuda"]:
        OPS.append((torch.ops.fastres.bn_act_forward, torch.ops.fastres.bn_act_backward, "cuda"))
    if HAS_TRITON:
        OPS.append((torch.ops.fastres.bn_act_forward_triton,
                    torch.ops.fastres.bn_act_backward_triton, "cuda"))
IDS = [f"{f._qualified_op_name.split('::')[1]}-{d}" for f, _, d in OPS]


def forward_samples(device):
    """(args) tuples covering residual/no residual, affine/not, train/eval, both layouts."""
    samples = []
    for cl in (False, True):
        for residual in (False, True):
            for training in (True, False):
                for affine in (True, False):
                    x = torch.randn(3, 5, 4, 4, device=device)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    r = torch.randn_like(x).requires_grad_(True) if residual else None
                    w = torch.randn(5, device=device, requires_grad=True) if affine else None
                    b = torch.randn(5, device=device, requires_grad=True) if affine else None
                    rm = torch.randn(5, device=device)
                    rv = torch.rand(5, device=device) + 0.5
                    samples.append((x, r, w, b, rm, rv, training, 1e-5, True))
    return samples


@pytest.mark.parametrize("fwd,bwd,device", OPS, ids=IDS)
def test_opcheck_forward(fwd, bwd, device):
    for args in forward_samples(device):
        torch.library.opcheck(fwd.default, args)


@pytest.mark.parametrize("fwd,bwd,device", OPS, ids=IDS)
def test_opcheck_backward(fwd, bwd, device):
    for x, r, w, b, rm, rv, training, eps, relu in forward_samples(device)[:8]:
        out, mean, var = fwd(x.detach(), None if r is None else r.detach(), w, b, rm, rv,
                             training, eps, relu)
        g = torch.randn_like(x)
        has_residual = r is not None
        saved_out = out.detach() if has_residual else None
        w_ = None if w is None else w.detach()
        b_ = None if b is None else b.detach()
        torch.library.opcheck(bwd.default, (g, x.detach(), saved_out, w_, b_, mean, var,
                                            training, eps, relu, has_residual))


def test_double_backward_is_a_clear_error():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = batch_norm_relu(x, None, None, None, None, True)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        g.sum().backward()


def _step(x, r, w, b, rm, rv):
    y = batch_norm_add_relu(x, r, rm, rv, w, b, True, 0.1, 1e-5)
    z = batch_norm_relu(y, None, None, w, b, True)
    return (z * z).sum()


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAS_TRITON else []))
def test_compile_fullgraph_train_step(backend):
    """No graph break; forward, backward and running stats equal eager."""
    device = "cpu" if not HAS_CUDA or backend == "cpu" else "cuda"
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    w = torch.randn(6, device=device)
    b = torch.randn(6, device=device)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
        rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
        loss = fn(*leaves, rm, rv)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves], rm, rv

    torch._dynamo.reset()
    with fastres.backend(backend):
        eager = run(_step)
        compiled = run(torch.compile(_step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    for a, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(compiled[2], eager[2])
    torch.testing.assert_close(compiled[3], eager[3])


def test_compile_inductor_cpu_matches_unfused():
    """Inductor (the default compiler) runs the C++ op inside a compiled graph."""
    torch._dynamo.reset()
    x = torch.randn(4, 6, 5, 5)
    r = torch.randn_like(x)

    def f(x, r):
        return batch_norm_add_relu(x * 2, r, None, None, None, None, True) + 1

    with fastres.backend("cpu"):
        out = torch.compile(f, fullgraph=True)(x, r)
    ref = unfused(x * 2, r, None, None, None, None, True, 0.1, 1e-5) + 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_momentum_none_compiles_without_graph_break():
    torch._dynamo.reset()
    x = torch.randn(4, 3, 5, 5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)

    def f(x):
        return batch_norm_relu(x, rm, rv, None, None, True, None, 1e-5, num_batches_tracked=nbt)

    with fastres.backend("cpu"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False)
    bn(x)
    assert nbt.item() == 1
    torch.testing.assert_close(rv, bn.running_var)


# ---------------------------------------------------------------------------------------------
# fastres::bn_act: the eager entry point (csrc/bn_act_eager.cpp) that fastres.functional calls
# on the CPU outside torch.compile: forward + running-statistics update in one C++ operator
# ---------------------------------------------------------------------------------------------
def _bn_act_samples():
    samples = []
    for cl in (False, True):
        for residual in (False, True):
            for momentum in (0.1, None):
                x = torch.randn(3, 5, 4, 4)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                r = torch.randn_like(x).requires_grad_(True) if residual else None
                w = torch.randn(5, requires_grad=True)
                b = torch.randn(5, requires_grad=True)
                rm, rv = torch.randn(5), torch.rand(5) + 0.5
                nbt = torch.tensor(3, dtype=torch.long)
                samples.append((x, r, w, b, rm, rv, nbt, True, momentum, 1e-5, True))
    return samples


def test_opcheck_bn_act():
    for args in _bn_act_samples():
        torch.library.opcheck(torch.ops.fastres.bn_act.default, args)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_act_updates_running_stats_as_batch_norm(momentum, dtype):
    """The C++ update (one loop over C) against nn.BatchNorm2d's, the counter included, and
    the version counters bumped as an in-place op would (fastres' folded-weight caches key on
    them)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(7, momentum=momentum).to(dtype)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for step in range(3):
        x = torch.randn(4, 7, 5, 3, dtype=dtype) * (step + 1) + step
        versions = (rm._version, rv._version)
        out = torch.ops.fastres.bn_act(x, None, bn.weight, bn.bias, rm, rv, nbt, True, momentum,
                                       bn.eps, True)
        ref = torch.relu(bn(x))
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(rm, bn.running_mean, **tol)
        torch.testing.assert_close(rv, bn.running_var, **tol)
        assert int(nbt) == int(bn.num_batches_tracked) == step + 1
        assert rm._version > versions[0] and rv._version > versions[1]


def test_bn_act_under_a_dispatch_mode_uses_aten_ops():
    """Under a TorchDispatchMode (tracers, counters) the statistics are updated by ATen ops
    the mode sees, with the same result as the direct update."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, 3, 3)
    direct = (torch.zeros(4), torch.ones(4))
    traced = (torch.zeros(4), torch.ones(4))
    torch.ops.fastres.bn_act(x, None, None, None, *direct, None, True, 0.1, 1e-5, True)
    with Seen() as mode:
        torch.ops.fastres.bn_act(x, None, None, None, *traced, None, True, 0.1, 1e-5, True)
    assert any("mul_" in op for op in mode.ops) and any("add_" in op for op in mode.ops)
    torch.testing.assert_close(traced[0], direct[0])
    torch.testing.assert_close(traced[1], direct[1])


def test_functional_calls_the_eager_op_on_cpu():
    """batch_norm_relu on the CPU backend runs fastres::bn_act (one operator) in eager mode."""
    from torch.profiler import profile

    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    with profile() as prof:
        batch_norm_relu(x, rm, rv, None, None, True, 0.1, 1e-5)
    names = [e.name for e in prof.events()]
    assert "fastres::bn_act" in names and "fastres::bn_act_forward" in names
    assert "aten::mul_" not in names  # the statistics were updated in C++, not by ATen ops
