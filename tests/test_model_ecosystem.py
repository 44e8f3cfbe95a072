"""Fused models with torch.compile (fullgraph, train and eval), autocast, channels_last and
torch.save/torch.load(weights_only=True), on CPU."""
import io

import pytest
import torch
import torch.nn.functional as F

import fastres.models


def cifar_pair(name="resnet20"):
    torch.manual_seed(0)
    fused = fastres.models.get_model(name, fused=True)
    plain = fastres.models.get_model(name, fused=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_no_graph_break(mode):
    torch._dynamo.reset()
    fused, plain = cifar_pair()
    getattr(fused, mode)(), getattr(plain, mode)()
    x = torch.randn(8, 3, 32, 32)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    if mode == "train":
        out = compiled(x)
        ref = plain(x)
        F.cross_entropy(out, torch.arange(8)).backward()
        F.cross_entropy(ref, torch.arange(8)).backward()
        for (n, a), b in zip(fused.named_parameters(), plain.parameters()):
            scale = max(1.0, b.grad.abs().max().item())
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=5e-5 * scale, msg=n)
    else:
        with torch.no_grad():
            out, ref = compiled(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compile_inductor_eval_cpu():
    torch._dynamo.reset()
    fused, plain = cifar_pair()
    fused.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), plain(x),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_channels_last_train_and_eval(dtype):
    fused, plain = cifar_pair()
    fused = fused.to(memory_format=torch.channels_last)
    plain = plain.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        out, ref = fused(x), plain(x)
    assert out.dtype == ref.dtype == dtype
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 5e-2
    F.cross_entropy(out.float(), torch.arange(8)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())
    assert fused.bn1.running_mean.dtype == torch.float32
    fused.eval(), plain.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out, ref = fused(x), plain(x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 5e-2


def test_save_load_weights_only_round_trip(tmp_path):
    fused, _ = cifar_pair("resnet32")
    fused(torch.randn(4, 3, 32, 32))  # move the running statistics
    path = tmp_path / "model.pt"
    torch.save(fused.state_dict(), path)
    loaded = fastres.models.get_model("resnet32", fused=True)
    loaded.load_state_dict(torch.load(path, weights_only=True))
    for (k, a), b in zip(fused.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    fused.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), loaded(x))


def test_compile_inductor_train_step_cpu():
    """A full training step (forward, backward, SGD) of a small fused network compiled by
    Inductor with fullgraph=True equals the eager unfused step."""
    from fastres.models import CifarResNet
    from fastres.nn import BasicBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = CifarResNet(BasicBlock, [1, 1, 1], fused=True)
    plain = CifarResNet(BasicBlock, [1, 1, 1], fused=False)
    plain.load_state_dict(fused.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, plain)]
    compiled = torch.compile(fused, fullgraph=True)
    x, t = torch.randn(8, 3, 32, 32), torch.arange(8)
    for _ in range(2):
        for model, opt in zip((compiled, plain), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            opt.step()
    for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
