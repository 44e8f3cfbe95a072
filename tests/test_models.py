"""fastres.models: fused vs unfused for every family (numerics rule), torchvision
compatibility (keys, parameter counts, checkpoints both ways), the paper's CIFAR nets and
shortcut options, weights= loading and its errors, the model registry."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fastres.models
from fastres.nn import BasicBlock, BatchNormAddReLU2d, BatchNormReLU2d, Bottleneck, ShortcutA

from numerics import assert_rms_rule, reference_dtype, rms

IMAGENET_DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

# (model name, constructor kwargs, input size): every family the package builds
FAMILIES = [
    ("resnet18", {}, 64),                      # BasicBlock, shortcut B
    ("resnet50", {}, 64),                      # Bottleneck v1.5, shortcut B (at 32 pixels its
    # last stage is 1x1: BatchNorm over 4 values a channel, and fp32 and fused gradients differ
    # from float64 by 3-30% depending on summation order, e.g. one thread against two)
    ("plain18", {}, 64),                       # no shortcuts
    ("resnet18", {"shortcut": "C"}, 64),       # projection on every block
    ("resnet20", {}, 32),                      # CIFAR, option A
    ("plain20", {}, 32),                       # CIFAR plain
    ("resnet20", {"shortcut": "B"}, 32),       # CIFAR, option B
]
FAMILY_IDS = [f"{n}-{''.join(f'{k}{v}' for k, v in kw.items()) or 'default'}"
              for n, kw, _ in FAMILIES]


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def calibrate(model, x):
    """Running statistics of `model` = the batch statistics of `x` (a train-mode pass with
    cumulative averaging), so that eval-mode activations stay normalised in deep nets."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def trio(name, kwargs):
    """(fused, unfused, fp64 unfused reference) with the same weights."""
    torch.manual_seed(0)
    fused = fastres.models.get_model(name, fused=True, **kwargs)
    randomize_bn(fused)
    plain = fastres.models.get_model(name, fused=False, **kwargs)
    plain.load_state_dict(fused.state_dict())
    ref = copy.deepcopy(plain)
    return fused, plain, ref


# Whole-model gradients get one more allowance than single ops: a ReLU whose input lies
# within rounding of zero may switch on in one model and off in another (fused, unfused and
# the reference all differ in the last bits), and in a small late layer (2x2 maps, a few
# values per channel) one such flip moves every upstream gradient by up to about 1%. The
# exact per-element rule is enforced op by op (test_batch_norm_act.py) and block by block
# (test_modules.py); logits have no such discontinuity and get no allowance.
MASK_FLIP_ALLOWANCE = 1.5e-2  # relative RMS, gradients only


def check_rule(fused, same_dtype, reference, dtype, what, mask_flips=False):
    """The numerics rule (tests/numerics.py) on RMS error, for whole-model results."""
    allowance = MASK_FLIP_ALLOWANCE * rms(reference.double()) if mask_flips else 0.0
    assert_rms_rule(fused, same_dtype, reference, dtype, what, allowance)


def compare_train_step(fused, plain, ref, x, dtype):
    """Forward + backward in train mode: logits and every parameter gradient of the fused model
    within the numerics rule of the unfused one against the high-precision reference."""
    target = torch.arange(x.shape[0]) % 10
    outs, grads = [], []
    for model, run_dtype in ((fused, dtype), (plain, dtype), (ref, reference_dtype(dtype))):
        model.train()
        model.zero_grad(set_to_none=True)
        if run_dtype in (torch.float32, torch.float64):
            model.to(run_dtype)
            out = model(x.to(run_dtype))
        else:  # low precision: autocast, as users run it (parameters stay fp32)
            with torch.autocast("cpu", dtype=run_dtype):
                out = model(x)
            assert out.dtype == run_dtype
        F.cross_entropy(out.float(), target).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    check_rule(*outs, dtype, "logits")
    for name in grads[2]:
        assert grads[0][name] is not None, f"no gradient for {name}"
        check_rule(grads[0][name], grads[1][name], grads[2][name], dtype, f"grad of {name}",
                   mask_flips=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=FAMILY_IDS)
def test_fused_model_equals_unfused_train_and_eval(name, kwargs, size, dtype, channels_last):
    fused, plain, ref = trio(name, kwargs)
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for m in (fused, plain, ref):
            m.to(memory_format=torch.channels_last)
    compare_train_step(fused, plain, ref, x, dtype)

    # eval: running statistics; fused folds BN into the convolutions under no_grad
    outs = []
    for model, run_dtype in ((fused, dtype), (plain, dtype), (ref, reference_dtype(dtype))):
        model.eval()
        with torch.no_grad():
            if run_dtype in (torch.float32, torch.float64):
                outs.append(model.to(run_dtype)(x.to(run_dtype)))
            else:
                with torch.autocast("cpu", dtype=run_dtype):
                    outs.append(model(x))
    check_rule(*outs, dtype, "eval logits")
    if channels_last:
        assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def cifar_bottleneck(fused=True, **kwargs):
    """A small bottleneck network whose last maps are still 8x8 (ImageNet ResNet-50 on the
    tiny inputs a CPU test affords ends at 1x1 maps with 4 values per channel, where even
    fp32 vs fp64 PyTorch diverge within a few SGD steps)."""
    return fastres.models.CifarResNet(Bottleneck, [2, 2, 2], fused=fused, shortcut="B")


@pytest.mark.parametrize("build,size", [
    (lambda fused: fastres.models.resnet18(fused=fused), 64),
    (lambda fused: fastres.models.resnet20(fused=fused), 32),
    (cifar_bottleneck, 32),
], ids=["resnet18", "resnet20", "cifar-bottleneck"])
def test_running_statistics_equal_after_several_steps(build, size):
    """Three training steps (forward, loss, backward) on three batches: every running
    statistic of the fused model within the numerics rule of the unfused fp32 one against an
    fp64 run; num_batches_tracked identical.

    The weights stay as they are between the steps (no optimizer step): with SGD steps in
    between, one ReLU whose fp64 pre-activation lies within fp32 rounding of zero passes its
    gradient in one fp32 run and not in the other, and the next steps' weights, hence
    statistics, then differ by ~1e-5 with neither implementation in error (seen on an AMD
    AVX2 machine: resnet20's layer1.2.bn1 has a pre-activation under 2e-6 in the fp64 run,
    and exactly the parameters before it moved). Gradients are compared under the numerics
    rule, mask flips allowed for, by the op tests."""
    torch.manual_seed(0)
    fused = randomize_bn(build(True))
    plain = build(False)
    plain.load_state_dict(fused.state_dict())
    ref = copy.deepcopy(plain).double()
    models = (fused, plain, ref)
    torch.manual_seed(2)
    batches = [(torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))) for _ in range(3)]
    for x, t in batches:
        for model in models:
            model.zero_grad()
            dtype = next(model.parameters()).dtype
            F.cross_entropy(model(x.to(dtype)).float(), t).backward()
    sf, sp, sr = (m.state_dict() for m in models)
    assert list(sf) == list(sp) == list(sr)
    moved = 0
    for key in sf:
        if key.endswith("num_batches_tracked"):
            assert sf[key].item() == sp[key].item() == 3, key
        elif key.endswith(("running_mean", "running_var")):
            check_rule(sf[key], sp[key], sr[key], torch.float32, key)
            moved += not torch.equal(sf[key], torch.zeros_like(sf[key]))
    assert moved > 0


def test_fused_models_use_fused_modules_and_unfused_do_not():
    fused = fastres.models.resnet50()
    plain = fastres.models.resnet50(fused=False)
    assert isinstance(fused.bn1, BatchNormReLU2d)
    assert isinstance(fused.layer1[0].bn1, BatchNormReLU2d)
    assert isinstance(fused.layer1[0].bn3, BatchNormAddReLU2d)
    assert type(fused.layer1[0].downsample[1]) is nn.BatchNorm2d  # no ReLU on the shortcut
    assert all(type(m) is nn.BatchNorm2d for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert isinstance(fused.layer1[0], Bottleneck)
    assert isinstance(fastres.models.resnet18().layer1[0], BasicBlock)


# ------------------------------------------------------------------ torchvision compatibility

@pytest.mark.parametrize("name", IMAGENET_DEPTHS)
def test_torchvision_state_dict_round_trip_both_ways(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    calibrate(randomize_bn(tv), torch.randn(8, 3, 64, 64))
    ours = getattr(fastres.models, name)(weights=tv.state_dict())
    assert num_params(ours) == num_params(tv)
    assert list(ours.state_dict()) == list(tv.state_dict())
    for (k, a), b in zip(ours.state_dict().items(), tv.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), k
    tv.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # fused eval: BN folded into the convolutions
        check_rule(ours(x), tv(x), copy.deepcopy(tv).double()(x.double()), torch.float32,
                   f"{name} logits, torchvision weights")

    # and back: a fastres model's state_dict loads strictly into torchvision
    torch.manual_seed(1)
    other = calibrate(randomize_bn(getattr(fastres.models, name)(), seed=1),
                      torch.randn(8, 3, 64, 64))
    back = getattr(torchvision.models, name)()
    back.load_state_dict(other.state_dict(), strict=True)
    other.eval(), back.eval()
    with torch.no_grad():
        check_rule(other(x), back(x), copy.deepcopy(back).double()(x.double()), torch.float32,
                   f"{name} logits, fastres weights in torchvision")


@pytest.mark.parametrize("name", IMAGENET_DEPTHS)
def test_plain_imagenet_nets_are_resnets_without_shortcuts(name):
    plain = fastres.models.get_model(name.replace("resnet", "plain"))
    res = fastres.models.get_model(name)
    assert all(b.downsample is None and not b.residual
               for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4)
               for b in layer)
    n_projection = sum(b.downsample[0].weight.numel() + 2 * b.downsample[1].num_features
                       for layer in (res.layer2, res.layer3, res.layer4, res.layer1)
                       for b in layer if b.downsample is not None)
    assert num_params(plain) == num_params(res) - n_projection
    last = type(plain.layer1[0]).__name__
    assert last in ("BasicBlock", "Bottleneck")
    last_bn = plain.layer1[0].bn2 if last == "BasicBlock" else plain.layer1[0].bn3
    assert type(last_bn) is BatchNormReLU2d  # ReLU but no add


def test_resnext_and_wide_resnet_options_load_torchvision_weights():
    for tv_fn, kw in ((torchvision.models.resnext50_32x4d, dict(groups=32, width_per_group=4)),
                      (torchvision.models.wide_resnet50_2, dict(width_per_group=128))):
        tv = tv_fn()
        ours = fastres.models.ResNet(Bottleneck, [3, 4, 6, 3], **kw)
        ours.load_state_dict(tv.state_dict(), strict=True)
        assert num_params(ours) == num_params(tv)


def test_zero_init_residual_and_imagenet_constructor_arguments():
    m = fastres.models.resnet50(zero_init_residual=True, num_classes=7)
    assert all(torch.all(b.bn3.weight == 0) for layer in (m.layer1, m.layer4) for b in layer)
    assert m.fc.out_features == 7
    m = fastres.models.resnet18(zero_init_residual=True)
    assert torch.all(m.layer2[1].bn2.weight == 0)
    with pytest.raises(ValueError, match="shortcut must be one of"):
        fastres.models.resnet18(shortcut="D")
    with pytest.raises(ValueError, match="zero_init_residual"):
        fastres.models.plain18(zero_init_residual=True)
    with pytest.raises(ValueError, match="norm_layer"):
        fastres.models.resnet18(norm_layer=nn.GroupNorm)


# ---------------------------------------------------------------------------- CIFAR (paper)

# table 6 of He et al. 2015: parameters of the CIFAR-10 nets with option A
PAPER_PARAMS = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                "resnet110": 1.7, "resnet1202": 19.4}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_cifar_resnets_match_the_paper(name):
    depth = int(name[len("resnet"):])
    n = (depth - 2) // 6
    with torch.device("meta"):
        model = fastres.models.get_model(name)
    digits = 1 if PAPER_PARAMS[name] >= 1 else 2
    assert round(num_params(model) / 1e6, digits) == PAPER_PARAMS[name]
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 * n + 2  # option A adds no weighted layers
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model.fc.out_features == 10
    shortcuts = [b.downsample for layer in (model.layer1, model.layer2, model.layer3)
                 for b in layer if b.downsample is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, ShortcutA) for s in shortcuts)


def test_cifar_output_shapes_and_feature_map_sizes():
    model = fastres.models.resnet20().eval()
    sizes = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(
        lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for i in (1, 2, 3)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize("shortcut,projections", [("A", 0), ("B", 2), ("C", 9)])
def test_cifar_shortcut_options(shortcut, projections):
    model = fastres.models.resnet20(shortcut=shortcut)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    found = sum(isinstance(b.downsample, nn.Sequential) for b in blocks)
    assert found == projections
    base = num_params(fastres.models.resnet20())
    extra = sum(num_params(b.downsample) for b in blocks if b.downsample is not None)
    assert num_params(model) == base + extra
    assert (extra == 0) == (shortcut == "A")


@pytest.mark.parametrize("name", ["plain20", "plain32", "plain44", "plain56", "plain110"])
def test_cifar_plain_nets(name):
    with torch.device("meta"):
        plain = fastres.models.get_model(name)
        res = fastres.models.get_model(name.replace("plain", "resnet"))
    assert num_params(plain) == num_params(res)  # option A shortcuts have no parameters
    assert all(b.downsample is None and not b.residual
               for layer in (plain.layer1, plain.layer2, plain.layer3) for b in layer)


def test_cifar_plain_net_has_no_identity_path():
    """A plain block with its convolutions zeroed outputs relu(bn bias), not the input."""
    block = fastres.models.plain20().layer1[0].eval()
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn2.bias.fill_(-1.0)
        out = block(torch.randn(1, 16, 8, 8).abs() + 1)
    assert torch.all(out == 0)


# ----------------------------------------------------------------------------- weights=

def test_weights_from_path_state_dict_and_checkpoint_layouts(tmp_path):
    torch.manual_seed(0)
    src = randomize_bn(fastres.models.resnet20())
    sd = src.state_dict()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "epoch": 3}, ckpt)
    ddp = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ddp)
    for weights in (sd, path, str(path), ckpt, ddp):
        m = fastres.models.resnet20(weights=weights)
        for (k, a), b in zip(m.state_dict().items(), sd.values()):
            assert torch.equal(a, b), (weights if isinstance(weights, str) else type(weights), k)


def test_weights_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.2\.conv1\.weight") as e:
        fastres.models.resnet34(weights=path)
    assert "r18.pt" in str(e.value)
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv1\.weight"):
        fastres.models.resnet50(weights=path)
    with pytest.raises(ValueError, match=r"fc\.weight \(1000, 512\) vs model \(10, 512\)"):
        fastres.models.resnet18(weights=path, num_classes=10)
    with pytest.raises(ValueError, match="(?s)unexpected keys: .*shape mismatches: conv1"):
        fastres.models.resnet20(weights=path)


def test_weights_missing_corrupt_or_wrong_type_files(tmp_path):
    model = fastres.models.resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="does-not-exist.pt"):
        fastres.models.resnet20(weights=tmp_path / "does-not-exist.pt")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="truncated.pt.*not a valid checkpoint"):
        fastres.models.resnet20(weights=truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pt.*not a valid checkpoint"):
        fastres.models.resnet20(weights=garbage)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(TypeError, match="does not hold a state_dict"):
        fastres.models.resnet20(weights=listing)
    with pytest.raises(TypeError, match="weights must be None, a path"):
        fastres.models.resnet20(weights=3)
    # a failed load never touches an existing model: load_weights checks before copying
    with pytest.raises(ValueError):
        fastres.models.load_weights(model, torchvision.models.resnet18().state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- registry

def test_list_models_and_get_model():
    names = fastres.models.list_models()
    expected = {f"resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202)} | \
        {f"plain{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110)}
    assert set(names) == expected and names == sorted(names)
    m = fastres.models.get_model("ResNet20", fused=False, num_classes=100)
    assert isinstance(m, fastres.models.CifarResNet) and m.fc.out_features == 100
    assert not m.fused
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
        fastres.models.get_model("resnet19")
    assert fastres.models.get_model_builder("resnet50") is fastres.models.resnet50


# ------------------------------------------------------------------ folded inference cache

def test_folded_inference_never_uses_stale_weights():
    """Eval under no_grad folds BN into the convolutions and caches the folded weights; any
    change of parameters or statistics (SGD step, load_state_dict, in-place edit) is seen."""
    torch.manual_seed(0)
    fused = randomize_bn(fastres.models.resnet20())
    plain = fastres.models.resnet20(fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 32, 32)

    def agree():
        fused.eval(), plain.eval()
        with torch.no_grad():
            a, b = fused(x), plain(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        return a

    first = agree()
    assert "_fastres_folded" in fused.layer1[0].bn1.__dict__  # the folded path ran
    # a training step changes weights and running statistics
    for model in (fused, plain):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        F.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
    second = agree()
    assert not torch.allclose(first, second)
    # load_state_dict and an in-place edit of one BatchNorm
    other = randomize_bn(fastres.models.resnet20(), seed=5)
    fused.load_state_dict(other.state_dict())
    plain.load_state_dict(other.state_dict())
    agree()
    with torch.no_grad():
        for model in (fused, plain):
            model.layer2[0].bn2.running_var.mul_(4)
            model.layer3[1].conv1.weight.neg_()
    agree()
