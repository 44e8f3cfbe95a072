"""GPU check of the Triton convolutions: every distinct convolution layer of ResNet-18 and
ResNet-50 (224x224 input) in bf16, channels-last, forward and all gradients against an fp32
reference, with the project's numerics rule; and whole-model training/inference with
``fastres.set_conv_backend("triton")`` against the cuDNN path. Skipped without a CUDA device
(run by ``bash scripts/gpu_check.sh conv``)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from numerics import assert_close_rule

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

EPS = 1e-5
BATCH = 8


def layer_shapes(arch):
    """Distinct (CIN, H, W, COUT, kernel, stride, padding) of the model's convolutions."""
    model = getattr(fastres.models, arch)().to("meta")
    seen = []

    def hook(conv, inputs, _out):
        _, c, h, w = inputs[0].shape
        key = (c, h, w, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        if key not in seen:
            seen.append(key)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), fastres.conv_backend("cudnn"):
        model.train()  # no folding on meta tensors
        model.conv1(torch.empty(1, 3, 224, 224, device="meta"))
        x = torch.empty(1, 64, 56, 56, device="meta")
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                x = _block_shapes(block, x)
    for h in handles:
        h.remove()
    return seen


def _block_shapes(block, x):
    """Run the block's convolutions only (BatchNorm on meta tensors is not needed)."""
    out = block.conv1(x)
    out = block.conv2(out)
    if hasattr(block, "conv3"):
        out = block.conv3(out)
    if isinstance(block.downsample, nn.Sequential):
        block.downsample[0](x)
    return out


SHAPES = sorted(set(layer_shapes("resnet18")) | set(layer_shapes("resnet50"))) \
    if torch.cuda.is_available() else []


def _ids(s):
    c, h, w, co, k, st, p = s
    return f"{c}x{h}x{w}-{co}-k{k}s{st}"


@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_layer_bf16_forward_and_gradients(shape):
    cin, h, w, cout, k, stride, padding = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(BATCH, cin, h, w, device="cuda", generator=g) * 2 + 0.5)
    weight = torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5
    gamma = torch.rand(cin, device="cuda", generator=g) + 0.5
    beta = torch.randn(cin, device="cuda", generator=g) * 0.5
    prologue = cin > 3  # the stem reads the image: no BatchNorm before it

    def unfused(x, w, gm, bt, dtype):
        a = x
        if prologue:
            a = torch.relu(F.batch_norm(x.float(), None, None, gm, bt, True, 0.0, EPS))
        return F.conv2d(a.to(dtype).contiguous(memory_format=torch.channels_last),
                        w.to(dtype), None, stride, padding)

    def fused(x, w, gm, bt, dtype):
        kwargs = {}
        if prologue:
            xf = x.detach().float()
            kwargs = dict(in_weight=gm, in_bias=bt, in_mean=xf.mean((0, 2, 3)),
                          in_var=xf.var((0, 2, 3), unbiased=False))
        out, mean, var = fastres.ops.conv_bn(x, w.to(dtype), stride, padding, stats=True,
                                             **kwargs)
        of = out.detach().float()
        torch.testing.assert_close(mean, of.mean((0, 2, 3)), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(var, of.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)
        return out

    go = torch.randn(BATCH, cout, (h + 2 * padding - k) // stride + 1,
                     (w + 2 * padding - k) // stride + 1, device="cuda", generator=g)
    results = {}
    for name, fn, dtype in (("ref", unfused, torch.float32), ("torch", unfused, torch.bfloat16),
                            ("fused", fused, torch.bfloat16)):
        xin = x.to(torch.bfloat16)  # every variant sees the same (bf16-representable) input
        if name == "ref":
            xin = xin.float()
        xin = xin.contiguous(memory_format=torch.channels_last).requires_grad_()
        ins = [xin, weight.clone().requires_grad_(), gamma.clone().requires_grad_(),
               beta.clone().requires_grad_()]
        with torch.backends.cudnn.flags(allow_tf32=False):
            out = fn(*ins, dtype)
            out.backward(go.to(out.dtype))
        results[name] = [out.detach()] + [t.grad if t.grad is not None else torch.zeros(0)
                                          for t in ins]
    names = ("output", "grad_x", "grad_weight", "grad_gamma", "grad_beta")
    for i, what in enumerate(names):
        if not prologue and what in ("grad_gamma", "grad_beta"):
            continue
        assert_close_rule(results["fused"][i], results["torch"][i], results["ref"][i],
                          torch.bfloat16, f"{_ids(shape)} {what}", mask_flips=i > 0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_train_step_and_inference_match_cudnn(arch):
    torch.manual_seed(0)
    model = getattr(fastres.models, arch)().cuda().to(memory_format=torch.channels_last)
    twin = getattr(fastres.models, arch)().cuda().to(memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (16,), device="cuda")
    losses = []
    for m, conv in ((model, "triton"), (twin, "cudnn")):
        with fastres.conv_backend(conv), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), target)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * max(1.0, abs(losses[1])), losses
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        rel = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert rel < 0.1, (name, rel.item())
    for (name, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=2e-2, atol=2e-2, msg=name)
    model.eval()
    twin.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with fastres.conv_backend("triton"):
            a = model(x).float()
        with fastres.conv_backend("cudnn"):
            b = twin(x).float()
    assert (a - b).abs().max() < 5e-2 * b.abs().max(), (a - b).abs().max()


def test_compiled_bottleneck_with_triton_convs():
    """Inductor sees the triton_op kernels: fullgraph compile of a training step."""
    block = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    with fastres.conv_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
        compiled.float().sum().backward()
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_auto_conv_backend_measures_once_per_layer():
    block = fastres.nn.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    fastres.backends._conv_auto_choice.clear()
    with fastres.conv_backend("auto"), torch.autocast("cuda", dtype=torch.bfloat16):
        block(x).float().sum().backward()
        choices = dict(fastres.backends._conv_auto_choice)
        block(x).float().sum().backward()
    assert choices and set(choices.values()) <= {"triton", "cudnn"}
    assert fastres.backends._conv_auto_choice == choices


# every config of the autotune lists, not only the one autotuning picks on this GPU (Inductor's
# own Triton conv template was once wrong for some num_warps only: pytorch #173068)
CONFIG_CASES = [  # (N, CIN, H, W, COUT, kernel, stride, padding)
    (8, 64, 56, 56, 64, 3, 1, 1), (8, 256, 56, 56, 512, 1, 2, 0), (8, 3, 224, 224, 64, 7, 2, 3)]


def _config_ids():
    from fastres.kernels import conv as K

    tuners = (("_conv_fwd_kernel", K._FWD_SPACE, torch.bfloat16),
              ("_conv_fwd_fold_kernel", K._FOLD_SPACE, torch.bfloat16),
              ("_conv_dgrad_kernel", K._DGRAD_SPACE, torch.bfloat16),
              ("_conv_wgrad_kernel", K._WGRAD_SPACE, torch.bfloat16),
              ("_conv_fwd_kernel_fp32", K._FP32_SPACE, torch.float32),
              ("_conv_dgrad_kernel_fp32", K._FP32_SPACE, torch.float32),
              ("_conv_wgrad_kernel_fp32", K._FP32_SPACE, torch.float32))
    return [(attr, config, dtype) for attr, space, dtype in tuners for config in space]


@pytest.mark.parametrize("kernel,config,dtype",
                         _config_ids() if torch.cuda.is_available() else [], ids=str)
def test_every_autotune_config(kernel, config, dtype, monkeypatch):
    """The bf16 autotuners on bf16 tensors, the fp32 (TF32) ones on fp32 tensors, each config
    alone, against an fp32 reference of the same rounded inputs: output, data and weight
    gradients with the BatchNorm prologue."""
    import triton

    from fastres.kernels import conv as K
    from fastres.kernels.launch import record_launches

    tuner = getattr(K, kernel)
    n, k, warps, stages = config
    cfg = triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages,
                        maxnreg=K._MAXNREG)
    one = triton.autotune([cfg], key=tuner.keys)(tuner.fn)
    monkeypatch.setattr(K, kernel, one)
    cl = torch.channels_last
    cases = CONFIG_CASES[2:] if kernel == "_conv_fwd_fold_kernel" else CONFIG_CASES
    for nb, cin, h, w, cout, ks, s, p in cases:
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(nb, cin, h, w, device="cuda", generator=g).to(dtype)
        wt = (torch.randn(cout, cin, ks, ks, device="cuda", generator=g)
              / (cin * ks * ks) ** 0.5).to(dtype)
        scale = torch.rand(cin, device="cuda", generator=g) + 0.5
        shift = torch.randn(cin, device="cuda", generator=g)
        pre = (x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
        act = torch.relu(pre.float()).requires_grad_()
        wf = wt.float().requires_grad_()
        with torch.backends.cudnn.flags(allow_tf32=False):
            ref = F.conv2d(act, wf, None, s, p)
            go = torch.randn(ref.shape, device="cuda", generator=g).to(dtype)
            ref.backward(go.float())
        xc, wc, gc = (t.contiguous(memory_format=cl) for t in (x, wt, go))
        with record_launches(passthrough=True) as launches:
            out, _, _ = K.conv_forward(xc, wc, s, p, in_scale=scale, in_shift=shift, stats=True)
            gx, _, _ = K.conv_dgrad(gc, wc, xc, s, p, scale, shift, torch.zeros_like(scale))
            gw = K.conv_wgrad(gc, xc, wt.shape, s, p, scale, shift)
        assert any(launch.kernel is one for launch in launches), kernel
        gx_ref = torch.where(pre.float() <= 0, 0.0, act.grad)
        where = f"{kernel} {config} {(nb, cin, h, w, cout, ks, s, p)}"
        for got, want, what in ((out, ref, "out"), (gx, gx_ref, "grad_x"), (gw, wf.grad, "grad_w")):
            err = (got.float() - want).abs().max().item()
            assert err <= 2e-2 * want.abs().max().item() + 1e-3, f"{where} {what}: {err}"


def test_int64_offsets_on_a_tensor_over_2_31_elements():
    """x and out of 2**31+ elements (a 1x1 convolution of 1024 x 64 x 182 x 182 in bf16, 4.3 GB
    each): the launcher picks int64 offsets, and the last image's output is right."""
    from fastres.kernels import conv as K
    from fastres.kernels.launch import record_launches

    cl = torch.channels_last
    x = torch.empty(1024, 64, 182, 182, device="cuda", dtype=torch.bfloat16,
                    memory_format=cl)
    assert x.numel() > 2 ** 31
    x[:-1].zero_()
    x[-1].normal_()
    wt = torch.randn(64, 64, 1, 1, device="cuda").to(torch.bfloat16).contiguous(memory_format=cl)
    with record_launches(passthrough=True) as launches:
        out, _, _ = K.conv_forward(x, wt, 1, 0)
    assert [launch.kwargs["INT64"] for launch in launches] == [True]
    ref = F.conv2d(x[-1:].float(), wt.float())
    torch.testing.assert_close(out[-1:].float(), ref, rtol=2e-2, atol=2e-2)
    assert out[:-1].abs().max().item() == 0
