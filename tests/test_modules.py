"""fastres.nn modules: drop-in BatchNorm2d semantics, conv-BN-ReLU with BN folding for
inference (and its cache), blocks, torch.compile, autocast, channels_last, save/load."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.nn import (BasicBlock, BatchNormAddReLU2d, BatchNormReLU2d, Bottleneck, ConvBNReLU,
                        ShortcutA)


def assert_close_scaled(a, b, rtol=1e-5, msg=None):
    """Close within rtol of the larger of 1 and b's largest magnitude (fp32 summation noise)."""
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale, msg=msg)


def test_batchnorm_modules_are_drop_in_batchnorm2d():
    ref = nn.BatchNorm2d(6)
    m = BatchNormReLU2d(6)
    assert isinstance(m, nn.BatchNorm2d)
    assert list(m.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 5, 5)
    for _ in range(3):
        torch.testing.assert_close(m(x), F.relu(ref(x)))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), F.relu(ref(x)))
    m.reset_parameters()
    assert m.weight.eq(1).all() and m.running_var.eq(1).all() and m.num_batches_tracked == 0


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_add_relu_module_matches_batchnorm_options(momentum, track, affine):
    ref = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track, affine=affine)
    m = BatchNormAddReLU2d(5, momentum=momentum, track_running_stats=track, affine=affine)
    m.load_state_dict(ref.state_dict())
    for mode in ("train", "train", "eval"):
        getattr(ref, mode)(), getattr(m, mode)()
        x, r = torch.randn(3, 5, 4, 4) + 1, torch.randn(3, 5, 4, 4)
        torch.testing.assert_close(m(x, r), F.relu(ref(x) + r))
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_batchnorm_module_errors():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNormReLU2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="needs a residual"):
        BatchNormAddReLU2d(3)(torch.randn(2, 3, 4, 4), None)


def test_conv_bn_relu_fold_cache_is_invalidated():
    torch.manual_seed(0)
    m = ConvBNReLU(4, 6, 3)
    ref = ConvBNReLU(4, 6, 3, fused=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 8, 8)
    m(x), ref(x)  # one training step moves the running stats
    m.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
        cached = m.bn.__dict__["_fastres_folded"]
        m(x)
        assert m.bn.__dict__["_fastres_folded"] is cached, "unchanged weights reuse the cache"
        # in-place weight change (as an optimizer does) must be seen
        m.conv.weight.mul_(2)
        ref.conv.weight.mul_(2)
        torch.testing.assert_close(m(x), ref(x))
        # load_state_dict copies in place: seen too
        other = ConvBNReLU(4, 6, 3)
        other.bn.running_mean.fill_(0.3)
        m.load_state_dict(other.state_dict())
        ref.load_state_dict(other.state_dict())
        torch.testing.assert_close(m(x), ref(x))
    # back to training: batch statistics again, never the folded weights
    m.train(), ref.train()
    torch.testing.assert_close(m(x), ref(x))
    m.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))


def test_eval_with_grad_does_not_fold():
    """Fine-tuning in eval mode needs gradients for the conv weight: no folding then."""
    m = ConvBNReLU(3, 4).eval()
    x = torch.randn(2, 3, 6, 6)
    m(x).sum().backward()
    assert m.conv.weight.grad is not None and m.bn.weight.grad is not None
    assert "_fastres_folded" not in m.bn.__dict__


@pytest.mark.parametrize("block,kwargs", [
    (BasicBlock, dict(inplanes=8, planes=8)),
    (BasicBlock, dict(inplanes=8, planes=16, stride=2)),
    (BasicBlock, dict(inplanes=8, planes=16, stride=2, shortcut="A")),
    (BasicBlock, dict(inplanes=8, planes=8, shortcut="C")),
    (BasicBlock, dict(inplanes=8, planes=16, stride=2, residual=False)),
    (Bottleneck, dict(inplanes=16, planes=4)),
    (Bottleneck, dict(inplanes=16, planes=8, stride=2)),
], ids=["basic", "basic-B-down", "basic-A-down", "basic-C", "basic-plain", "bottleneck",
        "bottleneck-down"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_fused_equals_unfused(block, kwargs, channels_last):
    torch.manual_seed(0)
    fused = block(**kwargs, fused=True)
    plain = block(**kwargs, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, kwargs["inplanes"], 8, 8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    fused, plain = fused.to(memory_format=fmt), plain.to(memory_format=fmt)
    yf, yp = fused(x), plain(x)
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yf)
    gf = torch.autograd.grad(yf, list(fused.parameters()), g)
    gp = torch.autograd.grad(yp, list(plain.parameters()), g)
    for a, b in zip(gf, gp):
        assert_close_scaled(a, b, 2e-5)
    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_shortcut_a_has_no_parameters_and_pads_zeros():
    s = ShortcutA(4, 8, 2)
    assert not list(s.parameters())
    y = s(torch.ones(1, 4, 6, 6))
    assert y.shape == (1, 8, 3, 3) and y[:, 4:].eq(0).all() and y[:, :4].eq(1).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride,cin,cout,size", [(2, 4, 8, 6), (2, 3, 8, 7), (1, 4, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_shortcut_a_equals_plain_and_keeps_the_layout(layout, stride, cin, cout, size,
                                                             dtype):
    """The fused blocks' option A (fastres.ops.shortcut_a): the values and the gradient of
    PyTorch's slice + pad, bit for bit, with output and gradient in the input's layout
    (PyTorch's slice backward gives an NCHW gradient, which a channels-last network then
    copies across layouts)."""
    torch.manual_seed(0)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, cin, size, size, dtype=dtype).contiguous(memory_format=mf)
    s = ShortcutA(cin, cout, stride)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yp = s(xf, fused=True), s(xp)
    assert yf.grad_fn is not None and "ShortcutA" in type(yf.grad_fn).__name__
    assert "ShortcutA" not in type(yp.grad_fn).__name__
    assert torch.equal(yf, yp) and yf.dtype == dtype
    assert yf.is_contiguous(memory_format=mf)
    g = torch.randn_like(yf)
    yf.backward(g), yp.backward(g)
    assert torch.equal(xf.grad, xp.grad)
    assert xf.grad.is_contiguous(memory_format=mf)
    # no gradient needed: PyTorch's ops, the same values
    with torch.no_grad():
        assert torch.equal(s(x, fused=True), yp.detach())


def test_fused_shortcut_a_gradcheck_and_non_dense_input():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    f = lambda t: fastres.ops.shortcut_a(t, 5, 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a,)) and torch.autograd.gradgradcheck(f, (a,))
    # a non-dense view: an NCHW-contiguous output and gradient, the plain ops' values
    base = torch.randn(2, 3, 6, 9)
    v = base[..., :7].requires_grad_()
    s = ShortcutA(3, 5, 2)
    y = s(v, fused=True)
    assert torch.equal(y, s(base[..., :7])) and y.is_contiguous()
    y.sum().backward()
    assert v.grad.is_contiguous() and v.grad[:, :, ::2, ::2].eq(1).all()
    assert v.grad.sum().item() == v[:, :, ::2, ::2].numel()


def test_fused_shortcut_a_rejects_fewer_channels_and_runs_in_the_fused_cifar_nets():
    with pytest.raises(ValueError, match="cannot reduce channels"):
        fastres.ops.shortcut_a(torch.randn(1, 8, 4, 4), 4, 2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) input"):
        fastres.ops.shortcut_a(torch.randn(1, 8, 4), 8, 2)
    torch.manual_seed(0)
    fused = fastres.models.resnet20(fused=True)
    plain = fastres.models.resnet20(fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    names = []
    for m in fused.modules():
        if isinstance(m, ShortcutA):
            m.register_forward_hook(lambda mod, i, o: names.append(type(o.grad_fn).__name__))
    fused(x).sum().backward()
    plain(x).sum().backward()
    assert len(names) == 2 and all("ShortcutA" in n for n in names)
    for (k, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert_close_scaled(a.grad, b.grad, 1e-4, msg=k)


def test_compile_fullgraph_block_train_and_eval():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Bottleneck(16, 4)
    ref = copy.deepcopy(block)
    x = torch.randn(4, 16, 6, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    yr = ref(x)
    yr.sum().backward()
    torch.testing.assert_close(y, yr)
    for a, b in zip(block.parameters(), ref.parameters()):
        assert_close_scaled(a.grad, b.grad, 2e-5)
    torch.testing.assert_close(block.bn1.running_mean, ref.bn1.running_mean)
    block.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_cpu_block():
    torch.manual_seed(0)
    fused = BasicBlock(8, 8)
    plain = BasicBlock(8, 8, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf, yp = fused(x), plain(x)
    assert yf.dtype == torch.bfloat16
    assert fused.bn1.running_mean.dtype == torch.float32
    torch.testing.assert_close(yf.float(), yp.float(), rtol=5e-2, atol=5e-2)
    fused.eval(), plain.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(x).float(), plain(x).float(), rtol=5e-2, atol=5e-2)


def test_save_load_weights_only_round_trip():
    m = Bottleneck(16, 8, stride=2)
    m(torch.randn(2, 16, 8, 8))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m2 = Bottleneck(16, 8, stride=2)
    m2.load_state_dict(state)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert isinstance(m2.bn3, BatchNormAddReLU2d)


def test_fold_cache_sees_plain_batchnorm_train_updates():
    """The projection shortcut's BN is a plain nn.BatchNorm2d, whose train-mode running-stat
    update does not bump the tensors' _version: eval -> train -> eval must still refold."""
    torch.manual_seed(0)
    fused = BasicBlock(8, 16, 2, fused=True)
    plain = BasicBlock(8, 16, 2, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 8, 8, 8) + 1
    for m in (fused, plain):
        m.eval()
        with torch.no_grad():
            m(x)
        m.train()
        with torch.no_grad():
            m(x)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
