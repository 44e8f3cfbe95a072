"""GPU model-level checks: fused ResNets against torchvision with the same weights, in AMP
bf16 channels_last, training step and folded inference, eager and torch.compile. Skipped
without CUDA; run by scripts/gpu_check.sh."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastres
import fastres.models

pytestmark = pytest.mark.gpu


def pair(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().cuda().to(memory_format=torch.channels_last)
    fr = fastres.models.get_model(name, fused=True).cuda().to(memory_format=torch.channels_last)
    fr.load_state_dict(tv.state_dict())
    return tv, fr


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_training_step_matches_torchvision(name, backend):
    if backend != "auto" and backend not in fastres.available_backends():
        pytest.skip(f"backend {backend} not available")
    tv, fr = pair(name)
    x = torch.randn(32, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (32,), device="cuda")
    tv32 = copy.deepcopy(tv)  # fp32 reference for the error budget
    with fastres.backend(backend):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lf = F.cross_entropy(fr(x), y)
            lt = F.cross_entropy(tv(x), y)
        lr = F.cross_entropy(tv32(x), y)
        lf.backward(), lt.backward(), lr.backward()
    for (n, pf), pt, pr in zip(fr.named_parameters(), tv.parameters(), tv32.parameters()):
        # fused bf16 may be at most 2x as far from fp32 as torchvision bf16 is, plus a floor
        assert rel_err(pf.grad, pr.grad) <= 2 * rel_err(pt.grad, pr.grad) + 2e-2, n
    for (n, bf), bt in zip(fr.named_buffers(), tv.buffers()):
        if bf.is_floating_point():
            torch.testing.assert_close(bf, bt, rtol=2e-2, atol=2e-2, msg=n)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet152"])
def test_folded_inference_matches_torchvision(name):
    tv, fr = pair(name)
    tv.eval(), fr.eval()
    x = torch.randn(16, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = tv(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_f, out_t = fr(x), tv(x)
    assert rel_err(out_f, ref) <= 2 * rel_err(out_t, ref) + 1e-2


def test_compile_fullgraph_resnet50_train_and_eval():
    torch._dynamo.reset()
    tv, fr = pair("resnet50")
    x = torch.randn(16, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fr, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x)
        ref = tv(x)
    out.float().sum().backward()
    assert rel_err(out, ref) < 5e-2
    fr.eval(), tv.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_err(compiled(x), tv(x)) < 5e-2
