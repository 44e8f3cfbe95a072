"""fastres-eval --data-backend (issue 17): the evaluation views of an image folder (center,
10-crop, multi-scale) read by the reference, cpu and gpu pipelines (the gpu backend's code on
CPU tensors, as in tests/test_data_pipelines.py) give the same views within interpolation
rounding and the same reported errors and loss; DALI missing and an unknown backend are the
errors fastres-train gives. A tiny generated folder and a random resnet20 (unfused: plain
PyTorch)."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("PIL")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

import fastres.models  # noqa: E402
from fastres.data import build_eval_data  # noqa: E402
from fastres.data.cpu_pipeline import CPUBatchLoader  # noqa: E402
from fastres.data.gpu_pipeline import GPUBatchLoader  # noqa: E402
from fastres.data.make_imagefolder import make_image, make_imagefolder  # noqa: E402
from fastres.train import cli as train_cli  # noqa: E402
from fastres.train import evaluate as E  # noqa: E402
from fastres.train.checkpoint import FORMAT, save_atomic  # noqa: E402

TOL_MAX = 1.5 / 255   # interpolation rounding (tests/test_data_pipelines.py)
TOL_MEAN = 0.5 / 255
LOSS_RTOL = 2e-3      # the reported loss; the backends differ by ~2e-4 relative on this folder
LINE = re.compile(r"\((\w+), (\w+), (\d+) images, data backend (\w+)\): top-1 error "
                  r"([\d.]+)%, top-5 error ([\d.]+)%, loss ([\d.]+)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes, 2 train images each; val: one landscape image per class and a portrait."""
    root = tmp_path_factory.mktemp("evalbackend") / "imgs"
    make_imagefolder(str(root), classes=2, train_per_class=2, val_per_class=1, size=(240, 200),
                     seed=3)
    Image.fromarray(make_image(200, 262, np.random.default_rng(9))).save(
        root / "val" / "n00000000" / "portrait.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def checkpoint(folder):
    """A fastres-train checkpoint of a random resnet20 for the folder's 2 classes (the last
    layer scaled so that the loss depends visibly on the input)."""
    torch.manual_seed(0)
    model = fastres.models.get_model("resnet20", fused=False, num_classes=2)
    state = model.state_dict()
    state["fc.weight"] = state["fc.weight"] * 30
    path = folder.parent / "ck.pt"
    save_atomic({"format": FORMAT, "model": state, "epoch": 1, "iteration": 1, "num_classes": 2,
                 "args": {"model": "resnet20", "fused": False, "recipe": "imagenet",
                          "data": f"imagefolder:{folder}"}}, str(path))
    return path


def _close(a, b, tol_max=TOL_MAX, tol_mean=TOL_MEAN):
    d = (a.float() - b.float()).abs()
    assert a.shape == b.shape
    assert float(d.max()) <= tol_max, f"max diff {float(d.max()) * 255:.2f} grey levels"
    assert float(d.mean()) <= tol_mean, f"mean diff {float(d.mean()) * 255:.3f} grey levels"


def _eval(capsys, checkpoint, *args):
    rc = E.main([str(checkpoint), "--device", "cpu", "--batch-size", "2", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = LINE.search(out)
    assert m, out
    split, crop, n, backend, top1, top5, loss = m.groups()
    return {"crop": crop, "n": int(n), "backend": backend, "top1": float(top1),
            "top5": float(top5), "loss": float(loss)}


# ------------------------------------------------------------------- the views themselves
@pytest.mark.parametrize("crop", ["10crop", "multiscale"])
def test_cpu_and_gpu_views_match_the_reference(folder, crop):
    """The loaders behind --data-backend cpu/gpu build the reference's views: same count and
    order (corners, center, flips; scales each followed by its flip), same sizes, same pixels
    within interpolation rounding, same labels."""
    ds, _ = build_eval_data(f"imagefolder:{folder}", recipe="imagenet", crop=crop)
    ref = [ds[i] for i in range(len(ds))]
    bs = 1 if crop == "multiscale" else 2
    for loader in (CPUBatchLoader(ds, bs, "cpu", channels_last=False),
                   GPUBatchLoader(ds, bs, "cpu", channels_last=False)):
        got = [(v, int(t)) for x, y in loader for v, t in zip(x, y)]
        assert [t for _, t in got] == [t for _, t in ref]
        for (views, _), (want, _) in zip(got, ref):
            if crop == "10crop":
                assert views.shape == want.shape == (10, 3, 224, 224)
                _close(views, want)
            else:
                assert [tuple(v.shape) for v in views] == [tuple(v.shape) for v in want]
                assert len(views) == 10
                for a, b in zip(views, want):
                    _close(a, b, tol_max=2 / 255)


# ------------------------------------------------------------------------ fastres-eval
@pytest.mark.parametrize("crop", ["center", "10crop"])
def test_fastres_eval_backends_report_the_same_numbers(capsys, checkpoint, crop):
    res = {b: _eval(capsys, checkpoint, "--crop", crop, "--data-backend", b)
           for b in ("reference", "cpu", "gpu")}
    ref = res["reference"]
    assert ref["n"] == 3 and ref["crop"] == crop
    for b, r in res.items():
        assert r["backend"] == b
        # exact: the images, and the decisions (none is near a tie on this folder)
        assert (r["n"], r["top1"], r["top5"]) == (ref["n"], ref["top1"], ref["top5"]), b
        assert r["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), b
    # the default (auto) on a CPU device is the cpu backend
    assert _eval(capsys, checkpoint, "--crop", crop)["backend"] == "cpu"


def test_fastres_eval_with_dali_where_installed(capsys, checkpoint):
    """Where NVIDIA DALI is installed (on the CPU: DALI's CPU-only mode), its center crops give
    the reference's numbers."""
    pytest.importorskip("nvidia.dali")
    ref = _eval(capsys, checkpoint, "--crop", "center", "--data-backend", "reference")
    r = _eval(capsys, checkpoint, "--crop", "center", "--data-backend", "dali")
    assert r["backend"] == "dali"
    assert (r["n"], r["top1"], r["top5"]) == (ref["n"], ref["top1"], ref["top5"])
    assert r["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)


def test_multiscale_through_each_backend(folder):
    """fastres-eval's evaluation function for multi-scale views (10 views of up to 768x640 per
    image: a small convolutional model instead of resnet20, same numbers across backends)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 2))  # 2x2 cells: flips matter
    with torch.no_grad():
        model[-1].weight.mul_(30)
    ds, _ = build_eval_data(f"imagefolder:{folder}", recipe="imagenet", crop="multiscale")
    res = {b: E.evaluate_with_backend(model, ds, b, "multiscale", batch_size=2, device="cpu")
           for b in ("reference", "cpu", "gpu")}
    ref = res["reference"]
    assert ref["n"] == 3
    for b, r in res.items():
        assert (r["n"], r["top1_err"], r["top5_err"]) == (ref["n"], ref["top1_err"],
                                                          ref["top5_err"]), b
        assert r["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), b
    # the tolerance tells views apart: the center crops give another loss
    center, _ = build_eval_data(f"imagefolder:{folder}", recipe="imagenet", crop="center")
    other = E.evaluate_with_backend(model, center, "reference", "center", device="cpu")["loss"]
    assert abs(other - ref["loss"]) > 10 * LOSS_RTOL * ref["loss"]


# ------------------------------------------------------------------------------ errors
def _error(capsys, main, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err.split("error: ", 1)[1].strip()


def test_dali_missing_is_the_trainers_error(capsys, folder, checkpoint, tmp_path):
    try:
        import nvidia.dali  # noqa: F401
        pytest.skip("NVIDIA DALI is installed")
    except ImportError:
        pass
    data = f"imagefolder:{folder}"
    msg = _error(capsys, E.main, [str(checkpoint), "--device", "cpu", "--data-backend", "dali"])
    assert "pip install nvidia-dali" in msg and "--data-backend gpu" in msg
    train = _error(capsys, train_cli.main,
                   ["--data", data, "--recipe", "imagenet", "--model", "resnet20", "--device",
                    "cpu", "--data-backend", "dali", "--iterations", "1", "--quiet", "--out",
                    str(tmp_path / "run")])
    assert msg == train


def test_unknown_backend_is_the_trainers_error(capsys, checkpoint):
    msg = _error(capsys, E.main, [str(checkpoint), "--data-backend", "nvjpeg"])
    assert "invalid choice: 'nvjpeg'" in msg
    assert all(b in msg for b in ("auto", "reference", "cpu", "gpu", "dali"))
    assert msg == _error(capsys, train_cli.main, ["--data-backend", "nvjpeg"])


def test_dali_only_builds_center_crops(capsys, checkpoint, monkeypatch):
    """Where DALI is installed (faked here: the backend is resolved), 10crop is refused with
    the reason, not run through another pipeline."""
    import fastres.train.evaluate as ev
    monkeypatch.setattr(ev, "cli_data_backend", lambda name, ds, device: name)
    import fastres.data.dali_pipeline as dp
    monkeypatch.setattr(dp, "require_dali", lambda: None)
    msg = _error(capsys, E.main, [str(checkpoint), "--device", "cpu", "--data-backend", "dali",
                                  "--crop", "10crop"])
    assert "--crop 10crop" in msg and "'train' and 'center'" in msg
