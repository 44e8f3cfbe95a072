"""NaN and inf propagate through fastres exactly as through plain PyTorch: the fused ops on
every backend (the cases of issue 12, spelled out; tests/test_fuzz.py fuzzes the rest), a
fused ResNet-20's loss and running statistics, and fastres-train, which stops with its
divergence message when a NaN pixel reaches the loss and keeps the last good checkpoint."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import fastres
import fastres.models
from fastres.functional import batch_norm_add_relu, batch_norm_relu
from fastres.train import load_checkpoint
from fastres.train import cli
from fastres.train import trainer as trainer_mod
from backend_cases import (HAS_CUDA, HAS_TRITON, INTERPRET, backend_params, gpu,
                           require_backend)

NAN, INF = float("nan"), float("inf")
# NaN and inf inputs are the point: numpy's warnings about them (Triton's interpreter) are noise
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _same_special_values(a, b):
    """Equal NaN, +inf and -inf positions."""
    return (torch.equal(torch.isnan(a), torch.isnan(b))
            and torch.equal(a == INF, b == INF) and torch.equal(a == -INF, b == -INF))


# ---------------------------------------------------------------------------------------------
# The fused ops: the cases of the issue
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("special", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_one_special_value_spreads_as_in_pytorch(backend, device, special, training, residual):
    """One NaN/inf in a (4, 3, 3, 3) batch: in training it reaches its channel's statistics
    (PyTorch: 36 NaNs for a NaN), in eval only its own output; the fused op gives the same
    values at the same positions, the same running statistics and the same gradients."""
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 3, 3, generator=g)
    x[1, 2, 0, 1] = special
    r = torch.randn(4, 3, 3, 3, generator=g) if residual else None
    w = torch.tensor([1.5, -0.7, 0.9])
    b = torch.tensor([0.1, 0.2, -0.3])
    grad = torch.randn(4, 3, 3, 3, generator=g)
    results = []
    for fused in (True, False):
        xs = x.to(device).requires_grad_()
        rs = r.to(device).requires_grad_() if r is not None else None
        ws, bs = w.to(device).requires_grad_(), b.to(device).requires_grad_()
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        if fused:
            with fastres.backend(backend):
                y = batch_norm_relu(xs, rm, rv, ws, bs, training) if rs is None else \
                    batch_norm_add_relu(xs, rs, rm, rv, ws, bs, training)
        else:
            y = F.batch_norm(xs, rm, rv, ws, bs, training)
            y = F.relu(y if rs is None else y + rs)
        inputs = [t for t in (xs, rs, ws, bs) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad.to(device))
        results.append([y.detach(), rm, rv, *grads])
    names = ["output", "running_mean", "running_var", "grad_input"] + \
        (["grad_residual"] if residual else []) + ["grad_weight", "grad_bias"]
    for name, f, p in zip(names, *results):
        assert _same_special_values(f, p), f"{name}: fused {f.flatten().tolist()} vs " \
                                           f"PyTorch {p.flatten().tolist()}"
        ok = torch.isfinite(p)
        torch.testing.assert_close(f[ok], p[ok], rtol=1e-4, atol=1e-5, msg=name)
    if special != special and training:  # the count: the NaN fills its channel
        assert int(torch.isnan(results[0][0]).sum()) == 36


@pytest.mark.parametrize("backend,device", backend_params())
def test_gradient_passes_where_the_output_is_nan(backend, device):
    """threshold_backward(grad, out, 0) is 0 only where out <= 0: where the output is NaN the
    gradient goes through (eval: grad_input = grad * w * invstd, finite)."""
    require_backend(backend)
    x = torch.tensor([[1.0, -1.0], [NAN, -2.0], [0.5, 3.0]], device=device, requires_grad=True)
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    w = torch.tensor([2.0, 1.0], device=device)
    with fastres.backend(backend):
        y = batch_norm_relu(x, rm, rv, w, None, False, eps=0.0)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.isnan(y[1, 0]) and y[0, 1] == 0
    assert gx.tolist() == [[2.0, 0.0], [2.0, 0.0], [2.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# A fused ResNet-20 against the plain one
# ---------------------------------------------------------------------------------------------
def _pair(seed=0):
    torch.manual_seed(seed)
    fused = fastres.models.resnet20()
    plain = fastres.models.resnet20(fused=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _batch(special=None, size=16, n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    if special is not None:
        x[2, 1, 5, 7] = special
    return x, torch.randint(0, 10, (n,), generator=g)


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


# The Triton convolution runs slowly under the interpreter: one case, a small batch
TRAIN_CASES = [pytest.param(None, "cudnn", 16, id="clean-cudnn"),
               pytest.param(NAN, "cudnn", 16, id="nan-cudnn"),
               pytest.param(INF, "cudnn", 16, id="inf-cudnn"),
               pytest.param(NAN, "triton", 8, id="nan-triton", marks=pytest.mark.triton)]


def _need_triton_conv(conv):
    if conv == "triton" and not (HAS_TRITON and (INTERPRET or HAS_CUDA)):
        pytest.skip("the Triton convolution needs triton (and a GPU or TRITON_INTERPRET=1)")


@pytest.mark.parametrize("special,conv,size", TRAIN_CASES)
def test_resnet20_training_loss_is_nan_exactly_when_the_plain_models_is(special, conv, size):
    """Train mode: one NaN (or inf) pixel makes the fused model's loss NaN, as the plain
    model's; the logits, every gradient and the BatchNorm running statistics have NaN/inf at
    the same places. A clean batch keeps everything finite in both."""
    _need_triton_conv(conv)
    fused, plain = _pair()
    x, y = _batch(special, size=size, n=6 if size > 8 else 4)
    losses, logits, grads = [], [], []
    for model, backend in ((fused, conv), (plain, "cudnn")):
        model.train()
        with fastres.conv_backend(backend):
            out = model(x)
        loss = F.cross_entropy(out, y)
        model.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        logits.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert math.isnan(losses[0].item()) == math.isnan(losses[1].item()) == (special is not None)
    assert _same_special_values(logits[0], logits[1])
    for name, g in grads[1].items():
        assert _same_special_values(grads[0][name], g), f"gradient of {name}"
    bf, bp = _buffers(fused), _buffers(plain)
    for name in bp:
        assert _same_special_values(bf[name], bp[name]), f"buffer {name}"
    if special is not None:  # the corrupt pixel reached the running statistics of both
        assert torch.isnan(bp["bn1.running_mean"]).any()


EVAL_CASES = [pytest.param(NAN, "cudnn", id="nan-cudnn"),
              pytest.param(INF, "cudnn", id="+inf-cudnn"),
              pytest.param(-INF, "cudnn", id="-inf-cudnn"),
              pytest.param(NAN, "triton", id="nan-triton", marks=pytest.mark.triton),
              pytest.param(INF, "triton", id="+inf-triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("special,conv", EVAL_CASES)
def test_resnet20_eval_logits_match_plain_special_values(special, conv):
    """Eval (BatchNorm folded into the convolutions): the corrupt image's logits are NaN in
    both models, the other images' are finite in both."""
    _need_triton_conv(conv)
    fused, plain = _pair()
    for m in (fused, plain):  # non-trivial running statistics
        m.train()
        m(_batch()[0])
        m.eval()
    x, y = _batch(special)
    with torch.no_grad(), fastres.conv_backend(conv):
        out_f, out_p = fused(x), plain(x)
    assert _same_special_values(out_f, out_p)
    assert not torch.isfinite(out_p[2]).all() and torch.isfinite(out_p[[0, 1, 3, 4, 5]]).all()
    assert math.isnan(F.cross_entropy(out_f, y).item())
    ok = torch.isfinite(out_p)
    torch.testing.assert_close(out_f[ok], out_p[ok], rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_resnet20_nan_pixel_on_gpu(backend):
    """The same on a GPU, training and folded eval, for each BatchNorm backend (cuDNN's own
    fused conv + ReLU, which would turn the NaN into 0, is not used)."""
    require_backend(backend)
    fused, plain = _pair()
    fused.cuda(), plain.cuda()
    x, y = _batch(NAN)
    x, y = x.cuda(), y.cuda()
    with fastres.backend(backend):
        for train in (True, False):
            outs = []
            for m in (fused, plain):
                m.train(train)
                with torch.set_grad_enabled(train):
                    outs.append(m(x))
            assert _same_special_values(outs[0].detach(), outs[1].detach()), f"train={train}"
            assert math.isnan(F.cross_entropy(outs[0], y).item())


# ---------------------------------------------------------------------------------------------
# fastres-train stops on it
# ---------------------------------------------------------------------------------------------
class PoisonedImages(Dataset):
    """Random images; the `poison_at`-th image fetched (counting from 0, over all epochs) has
    one NaN pixel. The trainer loads with --workers 0, so fetches are in order."""

    def __init__(self, n, size, poison_at, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 3, size, size, generator=g) + self.y[:, None, None, None] * 0.5
        self.poison_at, self.fetched = poison_at, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i].clone()
        if self.fetched == self.poison_at:
            img[0, 3, 4] = NAN
        self.fetched += 1
        return img, int(self.y[i])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_fastres_train_stops_on_a_nan_pixel_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys, fused):
    """48 training images in batches of 16: epoch 1 is clean (3 iterations, checkpoint), the
    first image of epoch 2 has a NaN pixel. fastres-train exits with its divergence message at
    iteration 3, fused or not, and last.pt is epoch 1's, with finite weights and statistics."""
    data = SimpleNamespace(train=PoisonedImages(48, 8, poison_at=48),
                           val=PoisonedImages(24, 8, poison_at=-1, seed=1), test=None,
                           num_classes=4, image_size=8, name="poisoned", mean=torch.zeros(3, 8, 8))
    monkeypatch.setattr(trainer_mod, "_build_data", lambda args: data)
    out = tmp_path / "run"
    argv = ["--data", "synthetic:48", "--out", str(out), "--quiet", "--device", "cpu",
            "--workers", "0", "--epochs", "3", "--batch-size", "16"]
    rc = cli.main(argv + ([] if fused else ["--no-fused"]))
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "loss is nan at iteration 3" in err and "training diverged" in err, err
    assert str(out / "last.pt") in err
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["epoch"] == 1 and ck["iteration"] == 3
    for name, t in ck["model"].items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"checkpoint tensor {name} is not finite"
