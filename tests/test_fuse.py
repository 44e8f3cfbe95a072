"""fastres.fuse: converting torchvision ResNets (and conv-BN-ReLU nn.Sequentials) to fastres'
fused modules and back, on CPU.

The reference for every numerical check is the unconverted model, deep-copied before fusing.
Outputs and running statistics are compared in float32 (train and eval mode). Parameter
gradients are compared in float64 (see assert_same_grads): in float32 the random-init ResNets'
train-mode backward is ill-conditioned (unfused PyTorch float32 is itself up to ~1e-2 relative
off float64 on some ResNet-50 parameters) and a single ReLU-mask flip moves gradients by
percents, so a float32 gradient comparison would be either loose or flaky.
"""
import copy
import functools
import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tvr  # noqa: E402
from torchvision.ops import Conv2dNormActivation  # noqa: E402

import fastres.nn as fnn  # noqa: E402
from fastres.fuse import FusedReLU, FuseReport, UnfuseReport, fuse, unfuse  # noqa: E402
from fastres.nn import BatchNormAddReLU2d, BatchNormReLU2d  # noqa: E402

IMAGE = (2, 3, 64, 64)


# ------------------------------------------------------------------------------------ helpers

def close(actual, expected, tol=1e-4, msg=None):
    """assert_close with rtol = tol and atol = tol x the magnitude of `expected`."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=None if msg is None else (lambda m: f"{msg}: {m}"))


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.6 - 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                    m.num_batches_tracked.fill_(3)


def prime(model: nn.Module, shape=IMAGE, seed: int = 0) -> nn.Module:
    """Random BN parameters/statistics, then one train-mode forward (updates running stats)."""
    randomize_bn(model, seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100)))
    return model


@functools.lru_cache(maxsize=None)
def _pristine(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return prime(getattr(torchvision.models, name)(num_classes=10), seed=seed)


def tv_model(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """A fresh copy of a primed torchvision model (built once per session)."""
    return copy.deepcopy(_pristine(name, seed))


def image(shape=IMAGE, seed: int = 1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fuse_quietly(model, **kwargs):
    """fuse() asserting that it emits no warning (everything converted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fuse(model, **kwargs)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * w).sum() + out.pow(2).mean()


def assert_same_grads(model, ref, x, x_ref=None, tol=1e-8):
    """Parameter gradients of model(x) and ref(x_ref) agree, by parameter name. Computed in
    float64 on copies (module training flags as they are): in float32 a pre-activation
    within rounding distance of zero (a few in a million) flips a ReLU mask and legitimately
    moves some gradients by percents, so a float32 comparison is either loose or flaky."""
    x_ref = x if x_ref is None else x_ref
    m64, r64 = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
    loss_of(m64(x.double())).backward()
    loss_of(r64(x_ref.double())).backward()
    grads = {n: p.grad for n, p in m64.named_parameters()}
    ref_grads = {n: p.grad for n, p in r64.named_parameters()}
    assert list(grads) == list(ref_grads)
    assert any(g is not None for g in ref_grads.values())
    for n, g in ref_grads.items():
        if g is None:
            assert grads[n] is None, n
        else:
            assert grads[n] is not None, n
            close(grads[n], g, tol, f"gradient of {n}")


def assert_same_outputs(model, ref, x, *, x_ref=None, train=True, steps=1, grads=True,
                        tol=1e-4):
    """model(x) and ref(x_ref) agree: if `train`, the float64 parameter gradients (`grads`)
    and, for `steps` train-mode steps, the float32 outputs and updated buffers; then the
    eval-mode outputs (no_grad, where fastres folds BN into the convolutions, and with grad
    enabled, where it does not).

    Train steps come before eval: an eval forward followed by a train step runs into the
    stale fold cache of test_eval_after_a_train_step_sees_the_new_running_stats."""
    x_ref = x if x_ref is None else x_ref
    if train:
        model.train(), ref.train()
        if grads:
            assert_same_grads(model, ref, x, x_ref)
        for step in range(steps):
            close(model(x), ref(x_ref), tol, f"train step {step}")
            assert_same_state(model, ref, tol)
    model.eval(), ref.eval()
    with torch.no_grad():
        close(model(x), ref(x_ref), tol, "eval, no_grad")
    close(model(x), ref(x_ref), tol, "eval, grad enabled")


def assert_same_state(model, ref, tol=1e-4):
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    for k, v in sd_ref.items():
        if v.is_floating_point():
            close(sd[k], v, tol, k)
        else:
            assert torch.equal(sd[k], v), k


def module_types(model):
    return [(n, type(m)) for n, m in model.named_modules()]


# ------------------------------------------------- 1. torchvision ResNets: same numbers after fuse

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fuse_keeps_outputs_and_running_stats(name):
    ref = tv_model(name)
    model = fuse_quietly(copy.deepcopy(ref))
    x = image()
    model.train(), ref.train()
    for step in range(2):
        close(model(x), ref(x), 2e-4, f"train step {step}")
        assert_same_state(model, ref, 2e-4)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd["layer1.0.bn1.num_batches_tracked"].item() == 3 + 1 + 2
    # the statistics did move: the comparison above is not trivially satisfied
    assert not torch.equal(sd_ref["layer4.1.bn2.running_var"],
                           _pristine(name, 0).state_dict()["layer4.1.bn2.running_var"])
    model.eval(), ref.eval()
    with torch.no_grad():  # eval + no_grad: BN folded into the convolutions
        close(model(x), ref(x), 1e-4, "eval, no_grad")
    close(model(x), ref(x), 1e-4, "eval, grad enabled")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fuse_keeps_gradients(name):
    ref = tv_model(name)
    model = fuse_quietly(copy.deepcopy(ref))
    model.train(), ref.train()
    assert_same_grads(model, ref, image())


def test_fuse_keeps_gradients_with_frozen_batch_norm():
    """Fine-tuning with frozen BatchNorm statistics: model in train mode, every BN in eval."""
    ref = tv_model("resnet18")
    ref.train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model = fuse_quietly(copy.deepcopy(ref))
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training and model.layer1[0].training
    x = image()
    assert_same_grads(model, ref, x)
    close(model(x), ref(x), 1e-4)
    assert_same_state(model, ref, 0)  # eval-mode BNs: statistics untouched
    assert torch.equal(ref.state_dict()["bn1.running_mean"],
                       _pristine("resnet18", 0).state_dict()["bn1.running_mean"])


def test_eval_after_a_train_step_sees_the_new_running_stats():
    """The fastres block folds its shortcut's plain nn.BatchNorm2d into the 1x1 conv in eval and
    caches the result; nn.BatchNorm2d's train-mode update of the running statistics does not
    bump their _version, so the cache must notice the train step some other way."""
    ref = tv_model("resnet18")
    model = fuse_quietly(copy.deepcopy(ref))
    x = image()
    for m in (model, ref):
        m.eval()
        with torch.no_grad():
            m(x)  # eval: caches the folded conv + BN weights
        m.train()
        with torch.no_grad():
            m(x)  # train: updates every running mean / variance, the shortcut BNs' too
    assert_same_state(model, ref, 2e-4)
    model.eval(), ref.eval()
    with torch.no_grad():
        close(model(x), ref(x), 1e-4, "eval after a train step")


# ----------------------------------------------------------- 2. structure, state and identity

def test_fuse_module_types_resnet18():
    model = tv_model("resnet18")
    downsamples = {n: m.downsample for n, m in model.named_modules()
                   if isinstance(m, tvr.BasicBlock) and m.downsample is not None}
    assert set(downsamples) == {"layer2.0", "layer3.0", "layer4.0"}
    fuse_quietly(model)
    assert type(model) is tvr.ResNet
    assert type(model.bn1) is BatchNormReLU2d
    assert type(model.relu) is FusedReLU and model.relu.inplace
    blocks = [m for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
              for m in layer]
    assert len(blocks) == 8
    for b in blocks:
        assert type(b) is fnn.BasicBlock and b.fused and b.residual
        assert type(b.bn1) is BatchNormReLU2d and type(b.bn2) is BatchNormAddReLU2d
    for n, ds in downsamples.items():
        block = model.get_submodule(n)
        assert block.downsample is ds  # the very downsample object is reused
        assert type(ds[0]) is nn.Conv2d and type(ds[1]) is nn.BatchNorm2d
    assert not any(isinstance(m, (tvr.BasicBlock, tvr.Bottleneck, nn.ReLU))
                   for m in model.modules())


def test_fuse_module_types_resnet50():
    model = fuse_quietly(tv_model("resnet50"))
    blocks = [m for m in model.modules() if isinstance(m, (fnn.Bottleneck, tvr.Bottleneck))]
    assert len(blocks) == 16 and all(type(b) is fnn.Bottleneck for b in blocks)
    for b in blocks:
        assert (type(b.bn1), type(b.bn2), type(b.bn3)) == (
            BatchNormReLU2d, BatchNormReLU2d, BatchNormAddReLU2d)
    assert type(model.bn1) is BatchNormReLU2d and type(model.relu) is FusedReLU
    # the downsample BN stays a plain BatchNorm2d (run by the block as conv + BN)
    assert type(model.layer1[0].downsample[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fuse_keeps_state_dict_keys_and_tensor_identity(name):
    model = tv_model(name)
    model.layer1[0].conv1.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)
    before = model.state_dict(keep_vars=True)
    params = list(model.named_parameters())
    buffers = list(model.named_buffers())
    fuse_quietly(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k in before:
        assert after[k] is before[k], k
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in params]
    for (n, p), (_, q) in zip(model.named_parameters(), params):
        assert p is q, n
    for (n, b), (_, c) in zip(model.named_buffers(), buffers):
        assert b is c, n
    assert not model.layer1[0].conv1.weight.requires_grad
    assert not model.bn1.bias.requires_grad
    assert model.layer1[0].conv2.weight.requires_grad


def test_fuse_keeps_training_flags():
    model = tv_model("resnet18")
    model.train()
    model.layer2.eval()
    model.bn1.eval()
    model.layer3[1].bn1.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    fuse_quietly(model)
    seen = 0
    for n, m in model.named_modules():
        if n in flags:
            assert m.training == flags[n], n
            seen += 1
    assert seen >= 50
    assert not model.bn1.training and model.relu.training  # the FusedReLU follows the ReLU
    assert model.layer1[0].training and not model.layer2[0].training
    assert not model.layer3[1].bn1.training and model.layer3[1].bn2.training


def test_optimizer_created_before_fuse_keeps_working():
    ref = tv_model("resnet18")
    model = copy.deepcopy(ref)
    # a small learning rate: train-mode ResNets amplify rounding differences step by step
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = image()
    # a step before fusing: the momentum buffers must carry over too
    for m, o in ((model, opt), (ref, opt_ref)):
        o.zero_grad()
        loss_of(m(x)).backward()
        o.step()
    fuse_quietly(model)

    def step(frozen_bn=False):
        for m, o in ((model, opt), (ref, opt_ref)):
            m.train()
            if frozen_bn:
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.eval()
            o.zero_grad()
            loss_of(m(x)).backward()
            o.step()

    def compare():
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            close(p, q, 2e-4, n)
        assert_same_state(model, ref, 2e-4)
        model.eval(), ref.eval()
        with torch.no_grad():
            close(model(x), ref(x), 2e-4, "eval")

    weight = model.layer2[0].conv1.weight.detach().clone()
    step(), step()
    compare()
    assert (model.layer2[0].conv1.weight - weight).abs().max() > 1e-3  # the steps did move it
    # the eval forward above cached the folded weights; optimizer updates must invalidate them
    # (running statistics stay as they are here: frozen BatchNorm)
    step(frozen_bn=True)
    compare()
    assert opt.param_groups[0]["params"][0] is model.conv1.weight


def test_torchvision_state_dict_loads_strictly_into_fused_model():
    other = tv_model("resnet18", seed=1)
    model = fuse_quietly(tv_model("resnet18", seed=0))
    x = image()
    model.eval(), other.eval()
    with torch.no_grad():
        before = model(x)  # populates the fold caches with the old weights
        assert (before - other(x)).abs().max() > 1e-2  # different models
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        close(model(x), other(x))
    # and the other way round: a fused model's state_dict loads into plain torchvision
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        close(plain(x), other(x))


# ---------------------------------------------------------------- 3. report and idempotency

def test_report_lists_fused_modules_resnet18():
    model = tv_model("resnet18")
    out = fuse_quietly(model, report=True)
    assert isinstance(out, tuple) and len(out) == 2
    fused_model, report = out
    assert fused_model is model
    assert isinstance(report, FuseReport)
    assert report.skipped == []
    names = [n for n, _ in report.fused]
    assert names == ["bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    desc = dict(report.fused)
    assert "ReLU 'relu'" in desc["bn1"] and "BatchNormReLU2d" in desc["bn1"]
    assert "BasicBlock" in desc["layer1.0"] and "downsample" not in desc["layer1.0"]
    assert "downsample" in desc["layer2.0"]
    text = str(report)
    assert "9 module(s) fused, 0 left" in text and "layer4.1" in text


def test_report_lists_fused_modules_resnet50():
    model, report = fuse_quietly(tv_model("resnet50"), report=True)
    assert report.skipped == []
    desc = dict(report.fused)
    assert len(report.fused) == 1 + 16
    assert set(desc) == {"bn1"} | {n for n, m in model.named_modules()
                                   if isinstance(m, fnn.Bottleneck)}
    assert all("Bottleneck" in d for n, d in desc.items() if n != "bn1")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fuse_is_idempotent(name):
    model = fuse_quietly(tv_model(name))
    modules = list(model.named_modules())
    state = model.state_dict(keep_vars=True)
    x = image()
    model.eval()
    with torch.no_grad():
        out = model(x)
    again, report = fuse_quietly(model, report=True)
    assert again is model
    assert report.fused == [] and report.skipped == []
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules]
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_partially_converted_model_is_finished():
    ref = tv_model("resnet18")
    model = copy.deepcopy(ref)
    handle = model.layer1[0].bn2.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=re.escape("layer1.0.bn2")):
        model, report = fuse(model, report=True)
    assert type(model.layer1[0]) is tvr.BasicBlock
    assert type(model.layer1[1]) is fnn.BasicBlock
    assert [n for n, _ in report.skipped] == ["layer1.0.bn1", "layer1.0.bn2"]
    assert all("hooks" in r for _, r in report.skipped)
    handle.remove()
    model, report = fuse_quietly(model, report=True)
    assert [n for n, _ in report.fused] == ["layer1.0"]
    assert type(model.layer1[0]) is fnn.BasicBlock
    assert_same_outputs(model, ref, image(), grads=False)


# ---------------------------------------------------------------------------- 4. inplace=False

def test_fuse_not_inplace_leaves_original_untouched():
    model = tv_model("resnet18")
    types = module_types(model)
    ids = [id(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = image()
    new, report = fuse_quietly(model, inplace=False, report=True)
    assert new is not model
    assert module_types(model) == types
    assert [id(m) for m in model.modules()] == ids
    assert type(model.layer1[0]) is tvr.BasicBlock and type(model.bn1) is nn.BatchNorm2d
    assert type(new.layer1[0]) is fnn.BasicBlock and type(new.bn1) is BatchNormReLU2d
    assert len(report.fused) == 9
    new_tensors = {id(t) for t in new.state_dict(keep_vars=True).values()}
    assert not new_tensors & {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert new.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    ref = copy.deepcopy(model)
    assert_same_outputs(new, ref, x, grads=False)
    # training the copy did not touch the original
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------------- 5. unfuse

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_unfuse_restores_torchvision_model(name):
    ref = tv_model(name)
    model = copy.deepcopy(ref)
    tensors = model.state_dict(keep_vars=True)
    fuse_quietly(model)
    model.eval()
    with torch.no_grad():
        model(image())  # populates the fold caches on the downsample BNs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back, report = unfuse(model, report=True)
    assert back is model
    assert isinstance(report, UnfuseReport) and report.skipped == []
    n_blocks = sum(isinstance(m, (tvr.BasicBlock, tvr.Bottleneck)) for m in ref.modules())
    assert len(report.unfused) == 1 + n_blocks
    assert module_types(back) == module_types(ref)
    assert back.relu.inplace
    after = back.state_dict(keep_vars=True)
    assert list(after) == list(tensors)
    assert all(after[k] is v for k, v in tensors.items())
    assert not any("_fastres_folded" in m.__dict__ for m in back.modules())
    assert_same_outputs(back, ref, image(), grads=name == "resnet18", tol=2e-4)


def test_unfuse_not_inplace_and_sequentials():
    model = nn.Sequential(Conv2dNormActivation(3, 8, 3, inplace=False),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    prime(model, (2, 3, 16, 16))
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    assert type(model[0][1]) is BatchNormReLU2d and not model[0][2].inplace
    back, report = unfuse(model, inplace=False, report=True)
    assert back is not model and type(model[2]) is BatchNormReLU2d  # original still fused
    assert module_types(back) == module_types(ref)
    assert back[0][2].inplace is False and back[3].inplace is True
    assert report.unfused == [
        ("2", "BatchNormReLU2d + FusedReLU '3' -> BatchNorm2d + ReLU"),
        ("0.1", "BatchNormReLU2d + FusedReLU '0.2' -> BatchNorm2d + ReLU")]
    assert report.skipped == []
    assert_same_outputs(back, ref, image((2, 3, 16, 16)))


def test_unfuse_native_fastres_blocks():
    model = nn.Sequential(
        fnn.BasicBlock(8, 16, 2),                # shortcut B: conv1x1 + BN
        fnn.BasicBlock(16, 16, shortcut="C"),
        fnn.Bottleneck(16, 4),                   # identity shortcut
        fnn.BasicBlock(16, 32, 2, shortcut="A"),  # parameter-free shortcut
    )
    shape = (2, 8, 16, 16)
    prime(model, shape)
    ref = copy.deepcopy(model)
    shortcut_a = model[3].downsample
    # the torchvision block runs the ShortcutA module as its downsample; being a fastres
    # module, it is reported as left
    with pytest.warns(UserWarning, match=r"3\.downsample: fastres ShortcutA"):
        back, report = unfuse(model, report=True)
    assert [type(m) for m in back] == [tvr.BasicBlock, tvr.BasicBlock, tvr.Bottleneck,
                                       tvr.BasicBlock]
    assert back[3].downsample is shortcut_a
    assert [n for n, _ in report.unfused] == ["0", "1", "2", "3"]
    assert [n for n, _ in report.skipped] == ["3.downsample"]
    assert list(back.state_dict()) == list(ref.state_dict())
    assert_same_outputs(back, ref, image(shape))
    # and back again
    again, report = fuse_quietly(back, report=True)
    assert [type(m) for m in again] == [fnn.BasicBlock, fnn.BasicBlock, fnn.Bottleneck,
                                        fnn.BasicBlock]
    assert len(report.fused) == 4


def test_unfuse_leaves_what_has_no_torchvision_equivalent():
    model = nn.Sequential(fnn.BasicBlock(8, 8, residual=False),
                          nn.Conv2d(8, 8, 1), BatchNormReLU2d(8), nn.Conv2d(8, 8, 1))
    shape = (2, 8, 8, 8)
    prime(model, shape)
    ref = copy.deepcopy(model)
    plain_block, bn = model[0], model[2]
    with pytest.warns(UserWarning, match=r"(?s)fastres\.unfuse.*  0: .*residual=False.*  2: "):
        back, report = unfuse(model, report=True)
    assert back[0] is plain_block and back[2] is bn and type(bn) is BatchNormReLU2d
    skipped = dict(report.skipped)
    assert "0" in skipped and "2" in skipped and report.unfused == []
    assert_same_outputs(back, ref, image(shape))


# ------------------------------------------------------------- 6. unsupported patterns are left

class ScaledBasicBlock(tvr.BasicBlock):
    """A torchvision BasicBlock subclass whose forward differs from torchvision's."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(0.5 * out + x)


def _seq(*mods):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *mods)


def _case_no_relu():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), ["1"], []


def _case_bn_then_conv():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1),
                      nn.BatchNorm2d(8), nn.ReLU())
    return m, ["1"], ["3"]


def _case_gelu():
    return _seq(nn.BatchNorm2d(8), nn.GELU()), ["1"], []


def _case_cna_silu():
    m = nn.Sequential(Conv2dNormActivation(3, 8, 3, activation_layer=nn.SiLU),
                      Conv2dNormActivation(8, 8, 3))
    return m, ["0.1"], ["1.1"]


def _case_relu_subclass():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return F.relu(x - 0.1)
    return _seq(nn.BatchNorm2d(8), MyReLU()), ["1"], []


def _case_bn_subclass():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 1.5
    return _seq(MyBN(8), nn.ReLU()), ["1"], []


def _case_batchnorm_as_model_child():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) - 0.2)
    return Net(), ["bn"], []


def _case_subclass_block():
    return _seq(nn.BatchNorm2d(8), nn.ReLU(), ScaledBasicBlock(8, 8)), ["3.bn1", "3.bn2"], ["1"]


def _case_hooked_bn():
    m = _seq(nn.BatchNorm2d(8), nn.ReLU())
    m[1].register_forward_hook(lambda mod, inp, out: out - 0.5)
    return m, ["1"], []


def _case_pre_hooked_bn():
    m = _seq(nn.BatchNorm2d(8), nn.ReLU())
    m[1].register_forward_pre_hook(lambda mod, inp: (inp[0] * 3,))
    return m, ["1"], []


def _case_hooked_relu():
    m = _seq(nn.BatchNorm2d(8), nn.ReLU())
    m[2].register_forward_pre_hook(lambda mod, inp: (inp[0] - 0.5,))
    return m, ["1"], []


def _case_hooked_bn_in_block():
    m = _seq(nn.BatchNorm2d(8), nn.ReLU(), tvr.BasicBlock(8, 8))
    m[3].bn1.register_forward_hook(lambda mod, inp, out: out + 0.3)
    return m, ["3.bn1", "3.bn2"], ["1"]


def _case_hooked_conv_in_block():
    m = _seq(nn.BatchNorm2d(8), nn.ReLU(), tvr.BasicBlock(8, 8))
    m[3].conv2.register_forward_hook(lambda mod, inp, out: out * 0.5)
    return m, ["3.bn1", "3.bn2"], ["1"]


def _case_hooked_downsample_bn():
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    m = _seq(nn.BatchNorm2d(8), nn.ReLU(), tvr.BasicBlock(8, 16, 2, downsample=ds))
    ds[1].register_forward_hook(lambda mod, inp, out: out * 0.5)
    return m, ["3.bn1", "3.bn2", "3.downsample.1"], ["1"]


def _case_parametrized_bn():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w
    m = _seq(nn.BatchNorm2d(8), nn.ReLU())
    parametrize.register_parametrization(m[1], "weight", Scale())
    return m, ["1"], []


def _case_shared_bn():
    bn = nn.BatchNorm2d(8)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn, nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), bn, nn.ReLU())
    return m, ["1"], []


def _case_shared_block():
    block = tvr.BasicBlock(8, 8)
    return _seq(nn.BatchNorm2d(8), nn.ReLU(), block, block), ["3.bn1", "3.bn2"], ["1"]


def _case_block_conv_with_bias():
    block = tvr.BasicBlock(8, 8)
    block.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    return _seq(nn.BatchNorm2d(8), nn.ReLU(), block), ["3.bn1", "3.bn2"], ["1"]


def _case_block_conv_padding_mode():
    block = tvr.BasicBlock(8, 8)
    block.conv2.padding_mode = "circular"
    return _seq(nn.BatchNorm2d(8), nn.ReLU(), block), ["3.bn1", "3.bn2"], ["1"]


def _case_downsample_bn_subclass():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 1.5
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), MyBN(16))
    m = _seq(nn.BatchNorm2d(8), nn.ReLU(), tvr.BasicBlock(8, 16, 2, downsample=ds))
    return m, ["3.bn1", "3.bn2", "3.downsample.1"], ["1"]


def _case_block_extra_norm_type():
    class MyBN(nn.BatchNorm2d):
        pass
    return _seq(nn.BatchNorm2d(8), nn.ReLU(), tvr.BasicBlock(8, 8, norm_layer=MyBN)), \
        ["3.bn1", "3.bn2"], ["1"]


def _case_resnet_subclass_stem():
    class MyResNet(tvr.ResNet):
        def forward(self, x):  # bn1 without the ReLU
            return torch.flatten(self.avgpool(self.bn1(self.conv1(x))), 1)
    return MyResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=4), ["bn1"], []


LEFT_CASES = {
    "sequential_bn_without_relu": _case_no_relu,
    "bn_followed_by_conv": _case_bn_then_conv,
    "bn_followed_by_gelu": _case_gelu,
    "conv_norm_activation_silu": _case_cna_silu,
    "relu_subclass": _case_relu_subclass,
    "batchnorm_subclass": _case_bn_subclass,
    "bn_called_by_custom_forward": _case_batchnorm_as_model_child,
    "torchvision_block_subclass": _case_subclass_block,
    "bn_forward_hook": _case_hooked_bn,
    "bn_forward_pre_hook": _case_pre_hooked_bn,
    "relu_hook": _case_hooked_relu,
    "bn_hook_inside_block": _case_hooked_bn_in_block,
    "conv_hook_inside_block": _case_hooked_conv_in_block,
    "downsample_bn_hook": _case_hooked_downsample_bn,
    "parametrized_bn": _case_parametrized_bn,
    "shared_bn": _case_shared_bn,
    "shared_block": _case_shared_block,
    "block_conv_with_bias": _case_block_conv_with_bias,
    "block_conv_padding_mode": _case_block_conv_padding_mode,
    "downsample_bn_subclass": _case_downsample_bn_subclass,
    "block_norm_layer_subclass": _case_block_extra_norm_type,
    "resnet_subclass_stem": _case_resnet_subclass_stem,
}


@pytest.mark.parametrize("case", list(LEFT_CASES))
def test_unsupported_patterns_are_left_and_reported(case):
    torch.manual_seed(0)
    model, left, fused = LEFT_CASES[case]()
    shape = (2, 3, 16, 16)
    prime(model, shape)
    ref = copy.deepcopy(model)
    before = dict(model.named_modules())
    slots = {n: [(id(p), k) for p in model.modules() for k, c in p._modules.items()
                 if c is before[n]] for n in left}
    # fx=False: the class rules alone (the fx pass fuses the block subclass's bn1 by pattern,
    # tests/test_fuse_models.py)
    fx = case != "torchvision_block_subclass"
    with pytest.warns(UserWarning) as record:
        model2, report = fuse(model, report=True, fx=fx)
    assert model2 is model
    messages = "\n".join(str(w.message) for w in record
                         if "fastres.fuse" in str(w.message))
    skipped = dict(report.skipped)
    for name in left:
        m = model.get_submodule(name)
        assert m is before[name], name  # the very same object ...
        assert type(m) is type(before[name]), name  # ... of the same type
        # ... still in every slot that held it
        assert [(id(p), k) for p in model.modules() for k, c in p._modules.items()
                if c is m] == slots[name], name
        for i in range(1, name.count(".") + 1):  # and so are the modules around it
            parent = name.rsplit(".", i)[0]
            assert model.get_submodule(parent) is before[parent], parent
            assert type(before[parent]).__module__.split(".")[0] != "fastres", parent
        assert name in skipped and skipped[name], name
        assert re.search(rf"^  {re.escape(name)}: ", messages, re.M), (name, messages)
    assert sorted(skipped) == sorted(left)
    for name in fused:
        assert type(model.get_submodule(name)) is BatchNormReLU2d, name
    assert all(n in dict(report.fused) for n in fused)
    assert sum(isinstance(m, FusedReLU) for m in model.modules()) == len(fused)
    assert_same_outputs(model, ref, image(shape))
    # the report and the warning agree, and warn=False silences the warning only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = fuse(model, report=True, warn=False, fx=fx)
    assert sorted(n for n, _ in again.skipped) == sorted(left)
    assert again.fused == []


def test_hook_still_fires_after_fuse():
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          tvr.BasicBlock(8, 8))
    model[3].bn2.register_forward_hook(lambda m, i, o: calls.append(1))
    model[1].register_forward_hook(lambda m, i, o: calls.append(2))
    with pytest.warns(UserWarning, match=r"(?s)  1: .*has hooks.*3\.bn2"):
        fuse(model)
    model(image((2, 3, 16, 16)))
    assert sorted(calls) == [1, 2]


def test_warning_names_every_left_module_and_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.BatchNorm2d(8))
    with pytest.warns(UserWarning) as record:
        _, report = fuse(model, report=True)
    msgs = [str(w.message) for w in record if "fastres.fuse" in str(w.message)]
    assert len(msgs) == 1  # one warning for all of them
    assert "2 BatchNorm module(s) left unfused" in msgs[0]
    assert "  1: followed by GELU '2', not by nn.ReLU" in msgs[0]
    assert "  3: last module of its nn.Sequential" in msgs[0]
    assert dict(report.skipped)["1"] == "followed by GELU '2', not by nn.ReLU"
    assert "left: 3" in str(report)


def test_model_that_is_a_batch_norm():
    bn = nn.BatchNorm2d(4)
    with pytest.warns(UserWarning, match="<model>"):
        out, report = fuse(bn, report=True)
    assert out is bn and type(out) is nn.BatchNorm2d
    assert report.skipped == [("", "the model itself is a BatchNorm")]


# ------------------------------------------- 7. conv-BN-ReLU sequences, mixed and custom models

@pytest.mark.parametrize("bn_kwargs", [
    {}, {"momentum": None}, {"eps": 1e-3, "momentum": 0.3}, {"affine": False},
    {"track_running_stats": False}],
    ids=["default", "cumulative", "eps_momentum", "no_affine", "no_running_stats"])
def test_sequential_and_conv_norm_activation_are_fused(bn_kwargs):
    norm = partial(nn.BatchNorm2d, **bn_kwargs)
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dNormActivation(3, 8, 3, norm_layer=norm),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(inplace=True)),
        Conv2dNormActivation(8, 8, 3, stride=2, norm_layer=norm, inplace=False),
        nn.Conv2d(8, 8, 1, bias=False), norm(8), nn.ReLU(),
    )
    shape = (2, 3, 16, 16)
    prime(model, shape)
    ref = copy.deepcopy(model)
    cna = model[0]
    model, report = fuse_quietly(model, report=True)
    assert model[0] is cna and type(cna) is Conv2dNormActivation
    for bn_name, relu_name, inplace in (("0.1", "0.2", True), ("1.1", "1.2", True),
                                        ("2.1", "2.2", False), ("4", "5", False)):
        bn, relu = model.get_submodule(bn_name), model.get_submodule(relu_name)
        assert type(bn) is BatchNormReLU2d and type(relu) is FusedReLU, bn_name
        assert relu.inplace is inplace
        old = ref.get_submodule(bn_name)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(bn, attr) == getattr(old, attr), attr
    assert [n for n, _ in report.fused] == ["4", "0.1", "1.1", "2.1"]
    assert dict(report.fused)["4"] == "BatchNorm2d + ReLU '5' -> BatchNormReLU2d + FusedReLU"
    assert list(model.state_dict()) == list(ref.state_dict())
    x = image(shape)
    assert_same_outputs(model, ref, x, steps=2)  # two steps: cumulative statistics
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_mixed_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Conv2dNormActivation(3, 16, 3)
            self.block = tvr.BasicBlock(16, 16)
            ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
            self.body = nn.ModuleDict({"down": tvr.Bottleneck(16, 8, 2, downsample=ds)})
            self.head_bn = nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, 5)

        def forward(self, x):
            x = self.body["down"](self.block(self.stem(x)))
            x = F.relu(self.head_bn(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    shape = (2, 3, 16, 16)
    model = prime(Net(), shape)
    ref = copy.deepcopy(model)
    ds = model.body["down"].downsample
    with pytest.warns(UserWarning, match=r"head_bn: called by Net\.forward"):
        fuse(copy.deepcopy(model), fx=False)  # the class rules alone leave head_bn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, report = fuse(model, report=True)
    assert type(model.stem[1]) is BatchNormReLU2d and type(model.stem[2]) is FusedReLU
    assert type(model.block) is fnn.BasicBlock
    assert type(model.body["down"]) is fnn.Bottleneck and model.body["down"].downsample is ds
    assert type(model.head_bn) is BatchNormReLU2d  # F.relu after it: the fx pass
    assert report.skipped == []
    assert sorted(n for n, _ in report.fused) == ["block", "body.down", "head_bn", "stem.1"]
    assert_same_outputs(model, ref, image(shape))
    back = unfuse(model)
    assert module_types(back) == module_types(ref)


def test_shared_sequential_is_fused_once():
    """A conv-BN-ReLU nn.Sequential used twice: converting its children changes both uses
    alike, so it is fused (the BatchNorm itself has one parent)."""
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 8, 1), block, block)
    shape = (2, 3, 16, 16)
    prime(model, shape)
    ref = copy.deepcopy(model)
    model, report = fuse_quietly(model, report=True)
    assert model[1] is model[2] is block and type(block[1]) is BatchNormReLU2d
    assert [n for n, _ in report.fused] == ["1.1"]
    assert_same_outputs(model, ref, image(shape))


def test_model_that_is_a_torchvision_block():
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    torch.manual_seed(0)
    shape = (2, 16, 8, 8)
    block = prime(tvr.Bottleneck(16, 8, 2, downsample=ds), shape)
    ref = copy.deepcopy(block)
    new, report = fuse_quietly(block, report=True)
    assert type(new) is fnn.Bottleneck and new is not block and new.downsample is ds
    assert report.fused[0][0] == "" and len(report.fused) == 1
    assert_same_outputs(new, ref, image(shape))
    old = unfuse(new)
    assert type(old) is tvr.Bottleneck and module_types(old) == module_types(ref)


def _no_affine(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.affine, m.weight, m.bias = False, None, None


@pytest.mark.parametrize("config", [
    dict(block=tvr.BasicBlock),
    dict(block=tvr.Bottleneck, groups=4, width_per_group=8),
    dict(block=tvr.Bottleneck, width_per_group=128),
    dict(block=tvr.Bottleneck, replace_stride_with_dilation=[False, True, True]),
    dict(block=tvr.BasicBlock, norm_layer=partial(nn.BatchNorm2d, momentum=None, eps=1e-3)),
    dict(block=tvr.Bottleneck, post=_no_affine),
    dict(block=tvr.BasicBlock, norm_layer=partial(nn.BatchNorm2d, track_running_stats=False)),
], ids=["basic", "resnext", "wide", "dilated", "cumulative_eps", "no_affine",
        "no_running_stats"])
def test_fuse_small_resnet_configurations(config):
    config = dict(config)
    block, post = config.pop("block"), config.pop("post", None)
    torch.manual_seed(0)
    shape = (2, 3, 64, 64)  # layer4 at 2x2: train-mode BN over 8 values per channel
    ref = tvr.ResNet(block, [1, 1, 1, 1], num_classes=7, **config)
    if post is not None:
        post(ref)
    ref = prime(ref, shape)
    model, report = fuse_quietly(copy.deepcopy(ref), report=True)
    assert report.skipped == [] and len(report.fused) == 5
    kind = fnn.Bottleneck if block is tvr.Bottleneck else fnn.BasicBlock
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        new, old = model.get_submodule(layer)[0], ref.get_submodule(layer)[0]
        assert type(new) is kind
        for name in ("conv1", "conv2", "conv3"):
            if hasattr(old, name):
                c, d = getattr(new, name), getattr(old, name)
                assert (c.stride, c.padding, c.dilation, c.groups, c.weight.shape) == \
                    (d.stride, d.padding, d.dilation, d.groups, d.weight.shape), (layer, name)
    assert_same_outputs(model, ref, image(shape), steps=2)
    assert module_types(unfuse(model)) == module_types(ref)


# ----------------------------------------------------------------------------- 8. channels_last

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_channels_last(name):
    ref = tv_model(name)  # contiguous torchvision model, run on a contiguous input
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    model = fuse_quietly(copy.deepcopy(ref_cl))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    x = image()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for m in (model, ref, ref_cl):
        m.train()
    if name == "resnet18":
        assert_same_grads(model, ref_cl, x_cl)
    out = model(x_cl)
    close(out, ref_cl(x_cl), 2e-4, "train, channels_last torchvision")
    close(out, ref(x), 2e-4, "train, contiguous torchvision")
    assert_same_state(model, ref_cl, 2e-4)
    assert_same_state(model, ref, 2e-4)
    for m in (model, ref, ref_cl):
        m.eval()
    with torch.no_grad():
        out = model(x_cl)
        close(out, ref_cl(x_cl), 1e-4, "eval, channels_last torchvision")
        close(out, ref(x), 1e-4, "eval, contiguous torchvision")


def test_channels_last_sequential():
    torch.manual_seed(0)
    shape = (2, 3, 16, 16)
    model = prime(nn.Sequential(Conv2dNormActivation(3, 8, 3), Conv2dNormActivation(8, 8, 3)),
                  shape).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = image(shape).contiguous(memory_format=torch.channels_last)
    assert_same_outputs(model, ref, x)


# ------------------------------------------------------------------------------- meta device

def test_fuse_meta_device_model():
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
    model, report = fuse(model, report=True, warn=False)
    assert report.skipped == []
    assert type(model.layer1[0]) is fnn.BasicBlock
    assert model.layer1[0].conv1.weight.is_meta


def test_fused_relu_marker():
    r = FusedReLU(inplace=False)
    x = torch.randn(3, 4)
    assert r(x) is x  # identity
    assert not r.inplace and "inplace=False" in repr(r)
    assert FusedReLU().inplace
