"""GPU check of the Triton convolutions: every distinct convolution layer of ResNet-18 and
ResNet-50 (224x224 input) in bf16, channels-last, forward and all gradients against an fp32
reference, with the project's numerics rule; and whole-model training/inference with
``fastres.set_conv_backend("triton")`` against the cuDNN path. Skipped without a CUDA device
(run by ``bash scripts/gpu_check.sh conv``)."""
import pytest
import torch
import torch.nn.functional as F

import fastres
from gpu_helpers import check_layer_forward_and_gradients, resnet_conv_shapes, shape_id

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

SHAPES = resnet_conv_shapes() if torch.cuda.is_available() else []


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_layer_bf16_forward_and_gradients(shape):
    cin, _, _, _, _, stride, padding = shape
    prologue = cin > 3  # the stem reads the image: no BatchNorm before it

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

    check_layer_forward_and_gradients(shape, torch.bfloat16, fused)


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
