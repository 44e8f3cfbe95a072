"""fastres.fuse on the ResNets people use: timm's resnet18/34/50/101/152, resnet50d,
resnext50_32x4d, seresnet50, wide_resnet50_2 (the fx pattern pass, fastres._fuse_fx) and
torchvision's resnext50_32x4d / wide_resnet50_2 (the class rules); the fx pass on small
hand-made modules (what it fuses, what it leaves and why); ``fastres-train --model timm:NAME``.

Numerics: every model in float64 on the CPU, fused against the unconverted deep copy, in train
and eval mode: outputs, input and parameter gradients and running statistics agree to 1e-9
relative (the fp64 kernels are exact to rounding; measured ~1e-11). Inputs are 40x40 so that
the last stage still has 2x2 pixels: at 32x32 a batch of 2 leaves 2 values per channel there,
and the train-mode BatchNorm of 2 values amplifies rounding by orders of magnitude (in the
unfused model as much as in the fused one).

timm is optional: its tests skip, naming the package, where it is not installed.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.fuse import FusedReLU, count_fused_batch_norms, fuse, unfuse
from fastres.nn import BatchNormAddReLU2d, BatchNormReLU2d

# model -> (BatchNorms fused, BatchNorms in the model), shown in pytest's terminal summary
FUSED_COUNTS = {}

MODELS = ["timm:resnet18", "timm:resnet34", "timm:resnet50", "timm:resnet101", "timm:resnet152",
          "timm:resnet50d", "timm:resnext50_32x4d", "timm:seresnet50", "timm:wide_resnet50_2",
          "tv:resnext50_32x4d", "tv:wide_resnet50_2"]
IMAGE = (2, 3, 40, 40)
TOL = 1e-9


def build(spec: str) -> nn.Module:
    lib, name = spec.split(":")
    if lib == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10)
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(num_classes=10)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm parameters and statistics (timm zero-initialises the last BN of
    each block, which would hide that branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(c, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)


def expected_fused(model: nn.Module) -> int:
    """The BatchNorms of a ResNet that a ReLU (or an add and a ReLU) follows: all but the
    shortcut's, and in SE blocks all but the last of the block (the SE module sits between it
    and the add)."""
    n = 0
    for name, m in model.named_modules():
        if type(m) is not nn.BatchNorm2d or "downsample" in name:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        se = getattr(parent, "se", None)
        if se is not None and not isinstance(se, nn.Identity):
            bns = [k for k, c in parent.named_children() if isinstance(c, nn.BatchNorm2d)]
            if name.rsplit(".", 1)[-1] == bns[-1]:
                continue
        n += 1
    return n


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(fused: nn.Module, ref: nn.Module, x: torch.Tensor, mode: str, what: str) -> None:
    fused.train(mode == "train")
    ref.train(mode == "train")
    for m in (fused, ref):
        m.zero_grad(set_to_none=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), fused(x2)
    w = torch.randn(y1.shape, dtype=y1.dtype, generator=torch.Generator().manual_seed(1))
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert rel_err(y2, y1) < TOL, f"{what} {mode}: outputs differ by {rel_err(y2, y1):.2e}"
    assert rel_err(x2.grad, x1.grad) < TOL, f"{what} {mode}: input gradients differ"
    for (name, p1), (_, p2) in zip(ref.named_parameters(), fused.named_parameters()):
        assert p2.grad is not None, (what, mode, name)
        assert rel_err(p2.grad, p1.grad) < TOL, f"{what} {mode}: gradient of {name} differs " \
                                                f"by {rel_err(p2.grad, p1.grad):.2e}"
    for (name, b1), (_, b2) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.equal(b1, b2) if b1.dtype == torch.long else rel_err(b2, b1) < TOL, \
            f"{what} {mode}: buffer {name} differs"


@pytest.mark.parametrize("spec", MODELS)
def test_model_fuses_exactly(spec):
    torch.manual_seed(0)
    ref = build(spec).double()
    randomize_bn(ref)
    total = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    expected = expected_fused(ref)
    model = copy.deepcopy(ref)
    before = model.state_dict(keep_vars=True)
    types = {n: type(m) for n, m in ref.named_modules()}
    out, report = fuse(model, report=True, warn=False)
    assert out is model
    FUSED_COUNTS[spec] = (report.fused_bn, total)
    # every BN a ReLU (or add + ReLU) follows is fused, and nothing else
    assert report.fused_bn == count_fused_batch_norms(model) == expected > 0, report
    if spec.startswith("timm:"):
        # the shortcut BNs (no ReLU after them) are left and listed
        assert len(report.skipped) == total - expected, report
        assert sum("fx" in d for _, d in report.fused) > 0  # found by pattern
    else:
        # torchvision blocks become fastres blocks, which fold the shortcut BN themselves
        assert report.skipped == [], report
    if "seresnet" in spec:  # the SE blocks' last BN stays, with the reason
        assert any(n.endswith("bn3") and "followed by SEModule" in why
                   for n, why in report.skipped)
    # the very tensors under the same keys, in the same order; checkpoints load strictly
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compare(model, ref, x, "train", spec)
    compare(model, ref, x, "eval", spec)
    with torch.no_grad():
        # fastres blocks (the torchvision models) fold BN into the convolution here, with the
        # folded weights computed in fp32 (README, "Inference: BatchNorm folding")
        tol = TOL if spec.startswith("timm:") else 1e-6
        assert rel_err(model(x), ref(x)) < tol
    # unfuse: the original module types, the same tensors, no rewritten forward left
    back = unfuse(model, inplace=False, warn=False)
    assert {n: type(m) for n, m in back.named_modules()} == types
    assert not any("forward" in m.__dict__ or "_fastres_fx" in m.__dict__
                   for m in back.modules())
    assert list(back.state_dict()) == list(before)
    for k, v in back.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_model_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces a model whose blocks fuse() rewrote (train mode,
    forward and backward, against eager)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model = fuse(copy.deepcopy(ref), warn=False)
    x = torch.randn(IMAGE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    expected = ref(x)
    expected.sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    g1, g2 = model.conv1.weight.grad, ref.conv1.weight.grad
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-3 * g2.abs().max().item())


def test_timm_model_fuse_is_idempotent_and_copies():
    timm = pytest.importorskip("timm")
    model = fuse(timm.create_model("resnet18", pretrained=False, num_classes=10), warn=False)
    n = count_fused_batch_norms(model)
    _, again = fuse(model, report=True, warn=False)
    assert again.fused == [] and again.fused_bn == n
    twin = copy.deepcopy(model)
    assert twin.layer1[0].forward.module is twin.layer1[0]  # the copy runs its own modules
    x = torch.randn(2, 3, 40, 40)
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(model)


# ------------------------------------------------------------------ the fx pass on small modules

class Functional(nn.Module):
    """BN -> F.relu, BN -> torch.add -> relu_, BN -> (+= broadcast) -> ReLU module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn3, self.act = nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = torch.add(self.bn2(self.conv2(y)), x).relu_()
        z = self.bn3(y)
        z += self.scale  # broadcast: the fused node falls back to the unfused ops
        return self.act(z)


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y) + y


class TrainDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(x))  # needs a rewritten forward, which would fix the branch below
        if self.training:
            y = y * 2
        return y


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            x = -x
        return F.relu(self.bn(self.seq(x)))


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.gelu(self.bn(x) + x)


def _exact(model, ref, x):
    for mode in (True, False):
        model.train(mode), ref.train(mode)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1), model(x2)
        w = torch.randn(y1.shape, dtype=y1.dtype, generator=torch.Generator().manual_seed(3))
        (y1 * w).sum().backward()  # (a plain sum has a zero gradient through a train-mode BN)
        (y2 * w).sum().backward()
        assert rel_err(y2, y1) < TOL and rel_err(x2.grad, x1.grad) < TOL


def test_fx_fuses_functional_and_add_patterns():
    torch.manual_seed(0)
    ref = Functional().double()
    randomize_bn(ref)
    model, report = fuse(copy.deepcopy(ref), report=True, warn=False)
    assert type(model.bn1) is BatchNormReLU2d
    assert type(model.bn2) is BatchNormAddReLU2d and type(model.bn3) is BatchNormAddReLU2d
    assert type(model.act) is nn.ReLU  # dropped from the rewritten forward, kept as a module
    assert type(model) is Functional and "forward" in model.__dict__
    assert report.fused_bn == 3 and report.skipped == []
    _exact(model, ref, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    back = unfuse(model, warn=False)
    assert "forward" not in back.__dict__
    assert [type(m) for m in back.children()] == [type(m) for m in ref.children()]
    _exact(back, ref, torch.randn(2, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("cls, reason", [
    (UsedTwice, "its output is used 2 times"),
    (TrainDependent, "traces differently in train and eval mode"),
    (Gelu, "followed by gelu"),
])
def test_fx_leaves_what_could_change_meaning(cls, reason):
    torch.manual_seed(0)
    ref = cls().double()
    randomize_bn(ref)
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=reason):
        _, report = fuse(model, report=True)
    assert type(model.bn) is nn.BatchNorm2d and "forward" not in model.__dict__
    assert report.fused_bn == 0 and reason in dict(report.skipped)["bn"]
    _exact(model, ref, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_fx_leaves_hooked_batch_norm():
    model = Functional()
    model.bn2.register_forward_hook(lambda m, i, o: None)
    _, report = fuse(model, report=True, warn=False)
    assert type(model.bn2) is nn.BatchNorm2d and "has hooks" in dict(report.skipped)["bn2"]
    assert type(model.bn1) is BatchNormReLU2d and type(model.bn3) is BatchNormAddReLU2d


def test_untraceable_forward_falls_back_to_class_rules():
    torch.manual_seed(0)
    ref = Untraceable().double()
    randomize_bn(ref)
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="cannot be traced by torch.fx"):
        _, report = fuse(model, report=True)
    assert type(model.seq[1]) is BatchNormReLU2d and type(model.seq[2]) is FusedReLU
    assert type(model.bn) is nn.BatchNorm2d and "forward" not in model.__dict__
    assert "cannot be traced by torch.fx" in dict(report.skipped)["bn"]
    _exact(model, ref, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_fx_can_be_switched_off():
    model = Functional()
    _, report = fuse(model, report=True, warn=False, fx=False)
    assert report.fused_bn == 0 and len(report.skipped) == 3
    assert all("does not know" in why for _, why in report.skipped)


# -------------------------------------------------------------------------- fastres-train timm:

def test_train_and_eval_timm_model(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("fastres.data")
    from fastres.train import cli, evaluate

    out = tmp_path / "timm"
    assert cli.main(["--model", "timm:resnet18", "--data", "digits", "--iterations", "3",
                     "--batch-size", "16", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm:resnet18 (fused)" in printed
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["args"]["model"] == "timm:resnet18"
    # the checkpoint holds timm's keys, and fastres-eval rebuilds and fuses the model
    model, _ = evaluate.model_from_checkpoint(str(out / "last.pt"))
    assert count_fused_batch_norms(model) == 17
    assert evaluate.main([str(out / "last.pt"), "--data", "digits"]) == 0
    assert "top-1 error" in capsys.readouterr().out


def test_timm_model_without_timm_names_the_package(monkeypatch, tmp_path, capsys):
    import sys

    from fastres.train import cli

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    assert cli.main(["--model", "timm:resnet18", "--out", str(tmp_path / "x")]) == 2
    assert "pip install timm" in capsys.readouterr().err
    with pytest.raises(ImportError, match="pip install timm"):
        fastres.models.get_model("timm:resnet18")


def test_unknown_timm_model_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("timm")
    from fastres.train import cli

    assert cli.main(["--model", "timm:resnet_nonexistent", "--out", str(tmp_path / "x")]) == 2
    assert "unknown timm model 'resnet_nonexistent'" in capsys.readouterr().err


def test_torchvision_block_subclass_is_fused_by_pattern():
    """A torchvision BasicBlock subclass with its own forward (the class rules leave it): the
    fx pass fuses bn1 + ReLU and leaves bn2, which a multiplication follows."""
    tvr = pytest.importorskip("torchvision.models.resnet")

    class ScaledBasicBlock(tvr.BasicBlock):
        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(0.5 * out + x)

    torch.manual_seed(0)
    ref = ScaledBasicBlock(4, 4).double()
    randomize_bn(ref)
    model, report = fuse(copy.deepcopy(ref), report=True, warn=False)
    assert type(model) is ScaledBasicBlock
    assert type(model.bn1) is BatchNormReLU2d and type(model.bn2) is nn.BatchNorm2d
    assert "followed by mul" in dict(report.skipped)["bn2"]
    _exact(model, ref, torch.randn(2, 4, 6, 6, dtype=torch.float64))
