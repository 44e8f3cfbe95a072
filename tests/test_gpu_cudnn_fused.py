"""GPU check of the "cudnn-fused" conv backend (cuDNN graph API): every distinct convolution of
ResNet-18 and ResNet-50 (224x224) in fp16 and bf16, channels-last — which layers cuDNN takes
(recorded, not asserted: bf16 is not documented for the fused engines), and for those the
forward (prologue + conv + statistics), all gradients and the folded inference against an
fp32 reference with the project's numerics rule; whole-model training steps and inference
against the cuDNN path; the fallback report. Skipped without a CUDA device or without the
backend built (run by ``bash scripts/gpu_check.sh cudnn-fused``; part of ``first``)."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.ops import conv_bn_cudnn
from gpu_helpers import (BATCH, check_layer_forward_and_gradients, resnet_conv_shapes,
                         shape_id)
from numerics import assert_close_rule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not fastres.build_info().get("cudnn_fused"),
                                 reason="fastres built without cudnn-fused")]

SUPPORT_LOG = os.environ.get("FASTRES_CUDNN_FUSED_SUPPORT_LOG")  # JSON lines, per layer
SHAPES = resnet_conv_shapes() if torch.cuda.is_available() else []


def _log(record):
    if SUPPORT_LOG:
        with open(SUPPORT_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_layer_forward_and_gradients(shape, dtype):
    cin, h, w, cout, k, stride, padding = shape
    prologue = cin > 3
    dev = torch.device("cuda")
    why = conv_bn_cudnn.layer_support(dev, (BATCH, cin, h, w), (cout, cin, k, k), stride,
                                      padding, dtype, True, prologue=prologue)
    _log({"layer": shape_id(shape), "dtype": str(dtype), "mode": "train",
          "fused": why is None, "why": why})
    if why is not None:
        if dtype == torch.float16 and cin % 8 == 0 and cout % 8 == 0:
            pytest.fail(f"cuDNN documents its fused engines for this fp16 layer: {why}")
        pytest.skip(f"falls back to the cudnn path: {why}")

    def fused(x, w, gm, bt, dt):
        kw = {}
        if prologue:
            xf = x.detach().float()
            kw = dict(in_weight=gm, in_bias=bt, in_mean=xf.mean((0, 2, 3)),
                      in_var=xf.var((0, 2, 3), unbiased=False))
        out, mean, var = conv_bn_cudnn.conv_bn_cudnn(x, w.to(dt), stride, padding, stats=True,
                                                     **kw)
        of = out.detach().float()
        torch.testing.assert_close(mean, of.mean((0, 2, 3)), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(var, of.var((0, 2, 3), unbiased=False), rtol=2e-3, atol=2e-3)
        return out

    check_layer_forward_and_gradients(shape, dtype, fused)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_layer_folded_inference(shape, dtype, residual):
    cin, h, w, cout, k, stride, padding = shape
    dev = torch.device("cuda")
    why = conv_bn_cudnn.layer_support(dev, (BATCH, cin, h, w), (cout, cin, k, k), stride,
                                      padding, dtype, False, residual=residual, relu=True)
    _log({"layer": shape_id(shape), "dtype": str(dtype), "mode": f"infer residual={residual}",
          "fused": why is None, "why": why})
    if why is not None:
        pytest.skip(f"falls back to the cudnn path: {why}")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(BATCH, cin, h, w, device="cuda", generator=g).to(dtype)
    wt = (torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5)
    bias = torch.randn(cout, device="cuda", generator=g)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    r = torch.randn(BATCH, cout, ho, wo, device="cuda", generator=g).to(dtype) if residual \
        else None
    x[0, 0, 0, 0] = float("nan")  # NaN propagates through cuDNN's ReLU (CUDNN_PROPAGATE_NAN)

    def run(dt, fn):
        y = fn(x.to(dt).contiguous(memory_format=torch.channels_last), wt.to(dt))
        return y

    def unfused(xx, ww):
        y = F.conv2d(xx, ww, bias.to(xx.dtype), stride, padding)
        if r is not None:
            y = y + r.to(xx.dtype)
        return torch.relu(y)

    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        ref = run(torch.float32, unfused)
        same = run(dtype, unfused)
        got = run(dtype, lambda xx, ww: conv_bn_cudnn.conv_bias_act_cudnn(
            xx, ww, bias, stride, padding, residual=r, relu=True))
    assert torch.equal(got.isnan(), ref.isnan()), "NaN positions differ from PyTorch's"
    m = ~ref.isnan()
    assert_close_rule(got[m], same[m], ref[m], dtype, f"{shape_id(shape)} inference")


def _models(arch):
    torch.manual_seed(0)
    a = getattr(fastres.models, arch)().cuda().to(memory_format=torch.channels_last)
    b = getattr(fastres.models, arch)().cuda().to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_train_steps_and_inference_match_cudnn(arch, dtype):
    model, twin = _models(arch)
    x = torch.randn(16, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (16,), device="cuda")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    for step in range(2):
        losses = []
        for m, conv, opt in ((model, "cudnn-fused", opts[0]), (twin, "cudnn", opts[1])):
            opt.zero_grad()
            with fastres.conv_backend(conv), torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(m(x), target)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 3e-2 * max(1.0, abs(losses[1])), (step, losses)
        for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            rel = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
            assert rel < 0.1, (step, name, rel.item())
        for opt in opts:
            opt.step()
    for (name, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=3e-2, atol=3e-2, msg=name)
    rows = fastres.conv_backend_report(model)
    fused = [r for r in rows if r["backend"] == "cudnn-fused"]
    _log({"model": arch, "dtype": str(dtype), "mode": "train",
          "fused_layers": len(fused), "layers": len(rows),
          "fallbacks": [r for r in rows if r["backend"] != "cudnn-fused"]})
    if dtype == torch.float16:
        assert len(fused) >= len(rows) - 2, [r for r in rows if r["backend"] != "cudnn-fused"]
    model.eval()
    twin.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        with fastres.conv_backend("cudnn-fused"):
            a = model(x).float()
        with fastres.conv_backend("cudnn"):
            b = twin(x).float()
    assert (a - b).abs().max() < 5e-2 * b.abs().max(), (a - b).abs().max()


def test_momentum_none_and_running_stats_like_batchnorm2d():
    block = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    twin = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    twin.load_state_dict(block.state_dict())
    for m in (block, twin):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
    x = torch.randn(16, 256, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            with fastres.conv_backend("cudnn-fused"):
                block(x)
            with fastres.conv_backend("cudnn"):
                twin(x)
    for (name, b), (_, c) in zip(block.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=1e-2, atol=1e-2, msg=name)


def test_compiled_bottleneck_with_cudnn_fused():
    block = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    with fastres.conv_backend("cudnn-fused"), torch.autocast("cuda", dtype=torch.float16):
        eager = block(x)
        compiled = torch.compile(block)(x)
        compiled.float().sum().backward()
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_auto_includes_cudnn_fused():
    block = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    fastres.backends._conv_auto_choice.clear()
    with fastres.conv_backend("auto"), torch.autocast("cuda", dtype=torch.float16):
        block(x).float().sum().backward()
    choices = set(fastres.backends._conv_auto_choice.values())
    _log({"auto_choices": sorted(choices)})
    assert choices and choices <= {"triton", "cudnn", "cudnn-fused"}
