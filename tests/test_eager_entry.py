"""fastres._C.bn_act_eager, the C++ entry of fastres.functional's eager CPU calls
(csrc/bn_act_python.cpp): it runs the fused op where every argument passes
fastres.functional._check, with the same results as the Python path, and returns None for
everything else (so the Python path raises its documented errors)."""
import types

import pytest
import torch

import fastres
import fastres.functional as functional
from fastres._extension import _C
from fastres.functional import batch_norm_add_relu, batch_norm_relu


def _tensors(dtype=torch.float32, shape=(3, 5, 4, 4), channels_last=False, param_dtype=None,
             seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    pd = param_dtype or (dtype if dtype == torch.float64 else torch.float32)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(c, generator=g) + 0.5).to(pd)
    b = torch.randn(c, generator=g).to(pd)
    rm = torch.randn(c, generator=g).to(pd)
    rv = (torch.rand(c, generator=g) + 0.5).to(pd)
    return x, r, w, b, rm, rv


# (name, dtype, shape, channels_last, residual, training, momentum, eps, weight/bias, counter,
#  param dtype)
ACCEPTED = [
    ("fp32 nchw train", torch.float32, (3, 5, 4, 4), False, False, True, 0.1, 1e-5, True, False, None),
    ("fp32 cl train add", torch.float32, (3, 5, 4, 4), True, True, True, 0.1, 1e-5, True, False, None),
    ("fp32 eval", torch.float32, (3, 5, 4, 4), False, False, False, 0.1, 1e-5, True, False, None),
    ("fp32 eval add", torch.float32, (3, 5, 4, 4), True, True, False, 0.1, 1e-5, True, False, None),
    ("fp64 train", torch.float64, (2, 7, 3, 3), False, True, True, 0.2, 1e-3, True, False, None),
    ("bf16 cl train, fp32 params", torch.bfloat16, (2, 9, 5, 5), True, True, True, 0.1, 1e-5, True,
     False, None),
    ("fp16 train", torch.float16, (2, 9, 5, 5), False, False, True, 0.1, 1e-5, True, False, None),
    ("bf16 params bf16", torch.bfloat16, (2, 9, 5, 5), False, False, True, 0.1, 1e-5, True, False,
     torch.bfloat16),
    ("momentum None, counter", torch.float32, (3, 5, 4, 4), False, False, True, None, 1e-5, True,
     True, None),
    ("int momentum and eps", torch.float32, (3, 5, 4, 4), False, False, True, 1, 1, True, True, None),
    ("no affine", torch.float32, (3, 5, 4, 4), False, True, True, 0.1, 1e-5, False, False, None),
    ("2-D", torch.float32, (6, 5), False, False, True, 0.1, 1e-5, True, False, None),
    ("3-D", torch.float32, (2, 5, 7), False, True, True, 0.1, 1e-5, True, False, None),
]


def _call(x, r, w, b, rm, rv, training, momentum, eps, nbt, fast):
    """The functional op, through the C++ entry (fast) or with it switched off; returns the
    output, the gradients of x, r, w, b (those given) and the running statistics and counter
    after it."""
    x, r, w, b = (t.detach().clone().requires_grad_() if t is not None else None
                  for t in (x, r, w, b))
    rm, rv = rm.clone(), rv.clone()
    nbt = nbt.clone() if nbt is not None else None
    kw = dict(training=training, momentum=momentum, eps=eps, num_batches_tracked=nbt)
    saved = functional._eager_cpu
    if not fast:
        functional._eager_cpu = lambda *a: None
    try:
        if r is None:
            out = batch_norm_relu(x, rm, rv, w, b, **kw)
        else:
            out = batch_norm_add_relu(x, r, rm, rv, w, b, **kw)
    finally:
        functional._eager_cpu = saved
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out)) if training else ()
    return [out.detach(), *grads, rm, rv] + ([nbt] if nbt is not None else [])


@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_arguments_run_in_cpp_with_the_python_paths_results(case):
    name, dtype, shape, cl, res, training, momentum, eps, affine, counter, pd = case
    x, r, w, b, rm, rv = _tensors(dtype, shape, cl, pd)
    nbt = torch.tensor(3) if counter else None
    direct = _C.bn_act_eager(x, r if res else None, rm.clone(), rv.clone(),
                             w if affine else None, b if affine else None, training, momentum,
                             eps, nbt.clone() if counter else None, True)
    assert isinstance(direct, torch.Tensor), "the C++ entry declined arguments _check accepts"
    args = (x, r if res else None, w if affine else None, b if affine else None, rm, rv,
            training, momentum, eps, nbt)
    fast = _call(*args, True)
    slow = _call(*args, False)
    assert torch.equal(direct, fast[0])
    assert len(fast) == len(slow)
    for a, s in zip(fast, slow):
        assert a.dtype == s.dtype and a.stride() == s.stride()
        assert torch.equal(a, s)


class _Traced(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (must take the Python path)."""
    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return super().__torch_function__(func, types_, args, kwargs or {})


def _declined():
    x, r, w, b, rm, rv = _tensors()
    ok = dict(input=x, residual=None, running_mean=rm, running_var=rv, weight=w, bias=b,
              training=True, momentum=0.1, eps=1e-5, num_batches_tracked=None)
    cases = {
        "integer input": dict(input=x.long()),
        "1-D input": dict(input=torch.randn(5), running_mean=None, running_var=None, weight=None,
                          bias=None),
        "empty input": dict(input=x[:0]),
        "meta input": dict(input=x.to("meta")),
        "input not a tensor": dict(input=x.tolist()),
        "input subclass with __torch_function__": dict(input=x.as_subclass(_Traced)),
        "residual of another shape": dict(residual=r[:, :, :3]),
        "residual of another dtype": dict(residual=r.double()),
        "residual not a tensor": dict(residual=1.0),
        "weight of another size": dict(weight=w[:4]),
        "bias 2-D": dict(bias=b[None]),
        "weight int": dict(weight=w.long()),
        "running_var float64 under float32": dict(running_var=rv.double()),
        "running_mean on meta": dict(running_mean=rm.to("meta")),
        "running_mean without running_var": dict(running_var=None),
        "eval without running statistics": dict(training=False, running_mean=None,
                                                running_var=None),
        "one value per channel": dict(input=torch.randn(1, 5, 1, 1), residual=None),
        "momentum None without counter": dict(momentum=None),
        "momentum a string": dict(momentum="0.1"),
        "eps a string": dict(eps="1e-5"),
        "training not a bool": dict(training=1),
        "counter not a tensor": dict(num_batches_tracked=3),
    }
    return ok, cases


@pytest.mark.parametrize("name", list(_declined()[1]))
def test_anything_check_would_question_is_left_to_python(name):
    ok, cases = _declined()
    kw = {**ok, **cases[name]}
    assert _C.bn_act_eager(*kw.values(), True) is None


def test_the_accepted_base_case_of_the_declined_list_runs():
    ok, _ = _declined()  # so each declined case differs from a call that runs in C++
    assert isinstance(_C.bn_act_eager(*ok.values(), True), torch.Tensor)


def test_torch_function_mode_takes_the_python_path():
    ok, _ = _declined()

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _C.bn_act_eager(*ok.values(), True) is None


def test_functional_uses_the_entry_only_for_the_cpu_backend(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(args)
        return _C.bn_act_eager(*args)

    monkeypatch.setattr(functional, "_C", types.SimpleNamespace(bn_act_eager=counting))
    x, r, w, b, rm, rv = _tensors()
    out = batch_norm_add_relu(x, r, rm, rv, w, b, True)
    assert len(calls) == 1 and isinstance(out, torch.Tensor)
    with fastres.backend("cpu"):
        batch_norm_relu(x, rm, rv, w, b, True)
    assert len(calls) == 2
    if "triton" in fastres.available_backends():
        with fastres.backend("triton"):
            batch_norm_relu(x, rm, rv, w, b, True)
        assert len(calls) == 2  # another backend: the Python path


def test_errors_are_the_python_paths():
    x, r, w, b, rm, rv = _tensors()
    with pytest.raises(ValueError, match="weight has shape \\(4,\\) but input has 5 channels"):
        batch_norm_relu(x, rm, rv, w[:4], b, True)
    with pytest.raises(TypeError, match="momentum must be a float or None, got str"):
        batch_norm_relu(x, rm, rv, w, b, True, "0.1")
