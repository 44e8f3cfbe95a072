"""Helpers of the per-layer GPU convolution checks (tests/test_gpu_conv.py, Triton;
tests/test_gpu_cudnn_fused.py, cuDNN's fused graphs): the distinct convolutions of ResNet-18 and
ResNet-50, their test ids, and the forward + gradients of a fused conv (with its BatchNorm+ReLU
prologue) against an fp32 reference and the unfused PyTorch path in the same dtype, with the
project's numerics rule. Imported as ``gpu_helpers`` (tests/ is on the path, as for
``numerics``); nothing here touches a GPU at import."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from numerics import assert_close_rule

EPS = 1e-5
BATCH = 8


def resnet_conv_shapes(archs=("resnet18", "resnet50")):
    """Sorted distinct (CIN, H, W, COUT, kernel, stride, padding) of the convolutions of
    torchvision's ``archs`` at 224x224 (forward hooks on meta tensors)."""
    import torchvision

    seen = []
    for arch in archs:
        model = getattr(torchvision.models, arch)().to("meta")

        def hook(conv, inputs, _out):
            _, c, h, w = inputs[0].shape
            key = (c, h, w, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                   conv.padding[0])
            if key not in seen:
                seen.append(key)

        hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.empty(1, 3, 224, 224, device="meta"))
        for h in hs:
            h.remove()
    return sorted(seen)


def shape_id(s):
    c, h, w, co, k, st, p = s
    return f"{c}x{h}x{w}-{co}-k{k}s{st}"


def check_layer_forward_and_gradients(shape, dtype, fused):
    """Inputs drawn from a seeded CUDA generator (x, weight, BatchNorm gamma and beta, then the
    output gradient); ``fused(x, w, gamma, beta, dtype)`` (its prologue only when CIN > 3: the
    stem reads the image) against ``relu(batch_norm(x))`` (training statistics) then conv2d,
    in fp32 (reference) and in ``dtype`` (PyTorch): output and every gradient by
    ``assert_close_rule`` (gradients with sign flips masked)."""
    cin, h, w, cout, k, stride, padding = shape
    prologue = cin > 3
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, cin, h, w, device="cuda", generator=g) * 2 + 0.5
    weight = torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5
    gamma = torch.rand(cin, device="cuda", generator=g) + 0.5
    beta = torch.randn(cin, device="cuda", generator=g) * 0.5

    def unfused(x, w, gm, bt, dt):
        a = x
        if prologue:
            a = torch.relu(F.batch_norm(x.float(), None, None, gm, bt, True, 0.0, EPS))
        return F.conv2d(a.to(dt).contiguous(memory_format=torch.channels_last), w.to(dt), None,
                        stride, padding)

    go = torch.randn(BATCH, cout, (h + 2 * padding - k) // stride + 1,
                     (w + 2 * padding - k) // stride + 1, device="cuda", generator=g)
    results = {}
    for name, fn, dt in (("ref", unfused, torch.float32), ("torch", unfused, dtype),
                         ("fused", fused, dtype)):
        xin = x.to(dtype)  # every variant sees the same (dtype-representable) input
        if name == "ref":
            xin = xin.float()
        xin = xin.contiguous(memory_format=torch.channels_last).requires_grad_()
        ins = [xin, weight.clone().requires_grad_(), gamma.clone().requires_grad_(),
               beta.clone().requires_grad_()]
        with torch.backends.cudnn.flags(allow_tf32=False):
            out = fn(*ins, dt)
            out.backward(go.to(out.dtype))
        results[name] = [out.detach()] + [t.grad if t.grad is not None else torch.zeros(0)
                                          for t in ins]
    for i, what in enumerate(("output", "grad_x", "grad_weight", "grad_gamma", "grad_beta")):
        if not prologue and what in ("grad_gamma", "grad_beta"):
            continue
        assert_close_rule(results["fused"][i], results["torch"][i], results["ref"][i], dtype,
                          f"{shape_id(shape)} {what}", mask_flips=i > 0)
