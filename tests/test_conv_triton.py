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
