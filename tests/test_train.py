"""fastres.train: the trainer loop, resume, checkpoints, logs, fastres-plot and fastres-eval.

CPU only and tiny: most tests train fused CIFAR ResNets on stand-in data (scikit-learn's 8x8
digits as 3x8x8 tensors, or small random tensors), injected into ``fastres.train.train``; the
command-line tests use ``fastres.data`` ("digits", "synthetic:N") where it is needed.
"""
import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from fastres.train import CheckpointError, TrainingDiverged, load_checkpoint, save_atomic, train
from fastres.train import checkpoint as ckpt_mod
from fastres.train import cli, evaluate as eval_mod, plot as plot_mod
from fastres.train.schedule import LRSchedule, resolve_milestones


# ---------------------------------------------------------------------------------------------
# stand-in data
# ---------------------------------------------------------------------------------------------
class TensorImages(Dataset):
    """(image, label) pairs; ``flip`` applies a random horizontal flip drawn from torch's
    global RNG (so resuming must restore it)."""

    def __init__(self, x, y, flip=False):
        self.x, self.y, self.flip = x, y, flip

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i]
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, int(self.y[i])


def digits8(flip=False):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    x = x - x[:1497].mean(0, keepdim=True)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return SimpleNamespace(train=TensorImages(x[:1497], y[:1497], flip), val=TensorImages(
        x[1497:], y[1497:]), test=None, num_classes=10, image_size=8, name="digits8x8",
        mean=torch.zeros(3, 8, 8))


def synthetic(n=48, n_val=24, size=8, flip=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n + n_val,), generator=g)
    x = torch.randn(n + n_val, 3, size, size, generator=g) + y[:, None, None, None] * 0.5
    return SimpleNamespace(train=TensorImages(x[:n], y[:n], flip), val=TensorImages(
        x[n:], y[n:]), test=None, num_classes=4, image_size=size, name="synthetic-test",
        mean=torch.zeros(3, size, size))


def args_for(out, *extra):
    return cli.parse_args(["--out", str(out), "--quiet", "--device", "cpu", "--workers", "0",
                           *map(str, extra)])


def rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# a short real run, shared by several tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "resnet20-digits"
    torch.manual_seed(0)
    res = train(args_for(out, "--epochs", 3, "--batch-size", 64), data=digits8())
    return out, res


def test_short_run_learns_digits(digits_run):
    out, res = digits_run
    assert res["epochs"] == 3 and res["iterations"] == 3 * (1497 // 64)
    # 10 classes: chance is 90% error; three short epochs get far below it
    assert res["val_err"] < 0.35, res
    log = rows(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    # multistep milestones at 50% / 75% of the 69 iterations: lr ends at 0.001
    assert log[-1]["lr"] == pytest.approx(0.001)
    for key in ("iteration", "lr", "train_loss", "train_err", "val_loss", "val_err",
                "images_per_s", "epoch_time"):
        assert log[-1][key] is not None and math.isfinite(log[-1][key])
    with open(os.path.join(out, "log.csv")) as f:
        lines = f.read().strip().splitlines()
    assert lines[0].startswith("epoch,iteration,lr,train_loss") and len(lines) == 4
    png = os.path.join(out, "curves.png")
    assert os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"
    last, best = load_checkpoint(os.path.join(out, "last.pt")), load_checkpoint(
        os.path.join(out, "best.pt"))
    assert last["epoch"] == 3 and last["args"]["model"] == "resnet20"
    assert best["best_val_err"] == pytest.approx(min(r["val_err"] for r in log))
    # loadable with weights_only=True, and the args are a plain dict
    raw = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert isinstance(raw["args"], dict) and raw["args"]["batch_size"] == 64


def test_cli_defaults_and_recipes():
    a = cli.parse_args([])
    assert (a.model, a.batch_size, a.lr, a.momentum, a.weight_decay, a.schedule, a.fused) == (
        "resnet20", 64, 0.1, 0.9, 1e-4, "multistep", True)
    assert a.epochs == cli.DIGITS_EPOCHS and a.iterations is None
    assert cli.parse_args(["--epochs", "2"]).batch_size == 128  # the recipe's batch
    c = cli.parse_args(["--data", "cifar10:/x"])
    assert c.iterations == 64000 and resolve_milestones(c.milestones, 64000) == [32000, 48000]
    i = cli.parse_args(["--recipe", "imagenet", "--data", "imagefolder:/x"])
    assert (i.model, i.batch_size, i.schedule, i.weight_decay) == ("resnet50", 256, "plateau",
                                                                   1e-4)
    o = cli.parse_args(["--recipe", "imagenet", "--model", "plain34", "--lr", "0.05",
                        "--batch-size", "32", "--milestones", "100,200", "--no-fused"])
    assert (o.model, o.lr, o.batch_size, o.milestones, o.fused) == ("plain34", 0.05, 32,
                                                                     [100.0, 200.0], False)


def test_schedules():
    s = LRSchedule(0.1, "multistep", 100, [50, 75], warmup_iters=10, warmup_lr=0.01)
    assert s.lr_at(0) == pytest.approx(0.01) and s.lr_at(5) == pytest.approx(0.055)
    assert [s.lr_at(i) for i in (10, 49, 50, 75)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    c = LRSchedule(0.1, "cosine", 100)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(50) == pytest.approx(0.05)
    assert c.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    w = LRSchedule(0.1, "multistep", 100, [50], warmup_until_error=0.8)
    assert w.lr_at(3) == 0.01
    w.observe_train_error(0.85)
    assert w.lr_at(4) == 0.01
    w.observe_train_error(0.79)
    assert w.lr_at(5) == 0.1
    p = LRSchedule(0.1, "plateau", 100, patience=1)
    assert not p.step_epoch(0.5) and not p.step_epoch(0.5) and p.step_epoch(0.5)
    assert p.lr_at(0) == pytest.approx(0.01)
    q = LRSchedule(0.1, "plateau", 100, patience=1)
    q.load_state_dict(p.state_dict())
    assert q.lr_at(0) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    common = ["--epochs", 4, "--batch-size", 16, "--deterministic", "--seed", 3,
              "--ema", 0.9, "--label-smoothing", 0.1]
    full = tmp_path / "full"
    train(args_for(full, *common), data=synthetic())
    part = tmp_path / "part"
    r1 = train(args_for(part, *common, "--stop-after", 2), data=synthetic())
    assert r1["iterations"] == 6 and len(rows(part)) == 2
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts with
    train(args_for(part, *common, "--resume", "auto"), data=synthetic())
    a, b = rows(full), rows(part)
    assert len(a) == len(b) == 4
    for key in ("iteration", "lr", "train_loss", "train_err", "val_loss", "val_err",
                "ema_val_err"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    fa = load_checkpoint(str(full / "last.pt"))["model"]
    fb = load_checkpoint(str(part / "last.pt"))["model"]
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


# ---------------------------------------------------------------------------------------------
# checkpoint errors and atomicity
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    train(args_for(out, "--epochs", 1, "--batch-size", 16), data=synthetic())
    return out


def test_checkpoint_errors(small_run, tmp_path):
    good = small_run / "last.pt"
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*corrupt, truncated"):
        load_checkpoint(str(trunc))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt.*corrupt, truncated"):
        load_checkpoint(str(garbage))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt.*empty"):
        load_checkpoint(str(empty))
    other = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="weights.pt.*not a fastres-train checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="missing.pt.*does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    # a checkpoint of another model
    with pytest.raises(CheckpointError, match=r"last.pt.*holds model 'resnet20'.*'resnet32'"):
        train(args_for(tmp_path / "o", "--epochs", 2, "--batch-size", 16, "--model",
                       "resnet32", "--resume", good), data=synthetic())
    # ... and of the same model with another number of classes
    with pytest.raises(CheckpointError, match="last.pt.*4 classes.*10"):
        train(args_for(tmp_path / "c", "--epochs", 2, "--batch-size", 64, "--resume", good),
              data=digits8())
    # --resume of a missing file is an error; --resume auto without a checkpoint starts afresh
    with pytest.raises(CheckpointError, match="nope.pt"):
        train(args_for(tmp_path / "n", "--epochs", 1, "--resume", tmp_path / "nope.pt"),
              data=synthetic())


def test_atomic_save_survives_crash(small_run, tmp_path, monkeypatch):
    good = small_run / "last.pt"
    before = good.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_atomic({"x": 1}, str(good))
    # resuming training: the epoch-2 save crashes, the epoch-1 checkpoint stays
    with pytest.raises(OSError, match="simulated"):
        train(args_for(small_run, "--epochs", 2, "--batch-size", 16, "--resume", "auto"),
              data=synthetic())
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == before
    assert load_checkpoint(str(good))["epoch"] == 1
    assert not [p for p in os.listdir(small_run) if p.startswith(".tmp-")]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "nan"
    args = args_for(out, "--epochs", 3, "--batch-size", 16)
    args._inject_nan_at = 4  # second step of epoch 2 (3 steps per epoch)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at iteration 4.*last.pt"):
        train(args, data=synthetic())
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    assert len(rows(out)) == 1


def test_huge_lr_exits_nonzero_with_message(tmp_path, capsys):
    rc = cli.main(["--data", "synthetic:32", "--out", str(tmp_path / "huge"), "--quiet",
                   "--device", "cpu", "--epochs", "3", "--batch-size", "16", "--lr", "1e30",
                   "--momentum", "0", "--weight-decay", "0"])
    err = capsys.readouterr().err
    assert rc == 3 and "diverged" in err, err


# ---------------------------------------------------------------------------------------------
# command-line errors
# ---------------------------------------------------------------------------------------------
def test_argument_errors(tmp_path, capsys):
    assert cli.main(["--model", "resnet999", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet999'" in err and "resnet20" in err
    assert cli.main(["--data", "nonsense:xyz", "--out", str(tmp_path / "d"), "--quiet",
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--data 'nonsense:xyz'" in err and "unknown dataset spec" in err
    assert cli.main(["--data", "cifar10:/does/not/exist", "--out", str(tmp_path / "c"),
                     "--device", "cpu"]) == 2
    assert "/does/not/exist" in capsys.readouterr().err
    assert cli.main(["--lr", "-1"]) == 2
    assert cli.main(["--ema", "2"]) == 2
    assert cli.main(["--epochs", "0"]) == 2


def test_tensorboard_missing_is_not_fatal(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    train(args_for(tmp_path / "tb", "--epochs", 1, "--batch-size", 16, "--tensorboard"),
          data=synthetic())
    assert "TensorBoard is not installed" in capsys.readouterr().err
    assert len(rows(tmp_path / "tb")) == 1


# ---------------------------------------------------------------------------------------------
# fastres-plot and fastres-eval
# ---------------------------------------------------------------------------------------------
def test_plot_two_runs(digits_run, small_run, tmp_path, capsys):
    png = tmp_path / "fig" / "degradation.png"
    assert plot_mod.main([str(digits_run[0]), str(small_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    assert plot_mod.main([str(tmp_path / "no-run"), "--out", str(tmp_path / "x.png")]) == 1
    assert "no log entries" in capsys.readouterr().err


def test_evaluate_crops_standin(digits_run):
    model, ck = eval_mod.model_from_checkpoint(str(digits_run[0] / "best.pt"))
    val = digits8().val
    center = [(x.unsqueeze(0), y) for x, y in val]
    ten = [(torch.stack([x, x.flip(-1)] * 5), y) for x, y in val]
    multi = [([x, torch.nn.functional.interpolate(x[None], size=12)[0]], y) for x, y in val][:40]
    r1 = eval_mod.evaluate_crops(model, center, "center")
    r10 = eval_mod.evaluate_crops(model, ten, "10crop")
    rm = eval_mod.evaluate_crops(model, multi, "multiscale")
    assert r1["n"] == len(val) and r10["n"] == len(val) and rm["n"] == 40
    assert r1["top1_err"] == pytest.approx(digits_run[1]["best_val_err"], abs=1e-9)
    assert r10["top1_err"] < 0.5 and r1["top5_err"] <= r1["top1_err"]


def test_fastres_eval_cli(tmp_path, capsys):
    pytest.importorskip("fastres.data")
    out = tmp_path / "synth"
    assert cli.main(["--data", "synthetic:32", "--out", str(out), "--quiet", "--device", "cpu",
                     "--epochs", "1", "--batch-size", "16"]) == 0
    capsys.readouterr()
    for crop in ("center", "10crop"):
        assert eval_mod.main([str(out / "last.pt"), "--data", "synthetic:32", "--crop",
                              crop]) == 0
        printed = capsys.readouterr().out
        assert f"{crop}," in printed and "top-1 error" in printed and "top-5 error" in printed
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert eval_mod.main([str(bad), "--data", "synthetic:32"]) == 2
    assert "bad.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# distributed: 2 gloo processes == 1 process on the same global batch
# ---------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    train(args_for(out, *DDP_ARGS, "--sync-bn"), data=synthetic(flip=False))


DDP_ARGS = ["--epochs", 2, "--batch-size", 16, "--deterministic", "--no-shuffle"]


def test_ddp_two_processes_equal_single(tmp_path):
    # In float64 (model and data; the trainer's loss stays float32): in float32 the two runs
    # are each within rounding of the exact result, yet not of each other. On an AMD AVX2
    # machine the fused synchronised forward put one pre-activation of layer3.2.bn1, -1.0e-6
    # in float64, at +3.4e-7 (single process: 0 after the ReLU); that one ReLU flip, in a
    # BatchNorm of 64 values per channel, moved the first step's gradients by ~4e-2 and the
    # epoch losses by 4e-4. In float64 the two runs' parameters agree to ~1e-14 (measured
    # there), so a flip needs a pre-activation within ~1e-14 of 0, and the comparison checks
    # the distributed path itself (sampler, DDP, --sync-bn, logs, checkpoint), tighter. The
    # float32 numerics of the synchronised BatchNorm are tested in tests/test_distributed.py.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = tmp_path / "single"
        train(args_for(single, *DDP_ARGS), data=synthetic(flip=False))
    finally:
        torch.set_default_dtype(default)
    ddp = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    a, b = rows(single), rows(ddp)
    assert len(a) == len(b) == 2
    for key in ("train_loss", "train_err", "val_loss", "val_err"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-6,
                                                    abs=1e-7), key
    sa = load_checkpoint(str(single / "last.pt"))["model"]
    sb = load_checkpoint(str(ddp / "last.pt"))["model"]
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and (sa[k].dtype == torch.float64
                                               or not sa[k].is_floating_point()), k
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-10, atol=1e-12, msg=k)


# ---------------------------------------------------------------------------------------------
# the other options run through the loop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,lr_end", [
    (["--amp", "bf16", "--channels-last", "--schedule", "cosine", "--clip-grad", "1.0",
      "--no-fused"], None),
    (["--amp", "fp16", "--schedule", "plateau", "--warmup-until-error", "0.01",
      "--lr-scale-batch", "--ema", "0.5"], 0.01),
    (["--warmup-iters", "100", "--warmup-lr", "0.02", "--momentum", "0.5"], None),
])
def test_options_smoke(tmp_path, extra, lr_end):
    out = tmp_path / "opt"
    res = train(args_for(out, "--epochs", 2, "--batch-size", 16, *extra), data=synthetic())
    log = rows(out)
    assert len(log) == 2 and all(math.isfinite(r["train_loss"]) for r in log)
    assert 0 <= res["val_err"] <= 1
    if lr_end is not None:  # warm-up at 0.01 never ends: training error stays above 1%
        assert log[-1]["lr"] == pytest.approx(lr_end)
    if "--warmup-iters" in extra:
        # last step = iteration 5: linear from 0.02 towards the scheduled lr, which is
        # 0.1 / 100 after the milestones at 50% and 75% of the 6 iterations
        assert log[-1]["lr"] == pytest.approx(0.02 + (0.001 - 0.02) * 5 / 100)
    if "--ema" in extra:
        assert log[-1]["ema_val_err"] is not None


def test_console_scripts_are_installed():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert names.get("fastres-train") == "fastres.train.cli:main"
    assert names.get("fastres-eval") == "fastres.train.evaluate:main"
    assert names.get("fastres-plot") == "fastres.train.plot:main"
