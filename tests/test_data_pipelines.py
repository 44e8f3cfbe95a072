"""The image-folder input pipelines (issue 17): the batched augmentation against the per-image
reference, the draws' distributions, the cpu backend, the gpu backend's code run on a CPU device
(decoding with torchvision, CPU fallbacks, skipped files), backend selection, the trainer with
--data-backend, the data benchmark and the folder generator. Tiny folders in tmp_path."""
import io
import os
import warnings

import numpy as np
import pytest
import torch

from fastres.data import batched as B
from fastres.data import datasets as D
from fastres.data import eval_crops as E
from fastres.data import transforms as T
from fastres.data.make_imagefolder import IMAGENET_SIZES, make_image, make_imagefolder

PIL = pytest.importorskip("PIL")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from fastres.data import gpu_pipeline as G  # noqa: E402
from fastres.data.cpu_pipeline import CPUBatchLoader, FastImageFolderDataset  # noqa: E402
from fastres.data.loaders import resolve_data_backend  # noqa: E402

TOL_MAX = 1.5 / 255   # interpolation rounding: PIL keeps uint8 between its passes
TOL_MEAN = 0.5 / 255


def _pil(w, h, seed):
    return Image.fromarray(make_image(w, h, np.random.default_rng(seed)))


def _u8(im):
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _close(a, b, tol_max=TOL_MAX, tol_mean=TOL_MEAN):
    d = (a.float() - b.float()).abs()
    assert a.shape == b.shape
    assert float(d.max()) <= tol_max, f"max diff {float(d.max()) * 255:.2f} grey levels"
    assert float(d.mean()) <= tol_mean, f"mean diff {float(d.mean()) * 255:.3f} grey levels"


def _reference_train(im, s, top, left, flip, alpha, mean):
    x = T.crop(T.pil_to_tensor(T.resize_shorter(im, s)), top, left, 224, 224)
    if flip:
        x = T.hflip(x)
    return T.lighting(x, alpha) - mean


# ------------------------------------------------------------------ batched vs reference
@pytest.fixture(scope="module")
def pictures():
    # landscape, portrait, square, one smaller than the smallest scale (upsampled), one larger
    sizes = [(300, 225), (225, 300), (260, 260), (240, 180), (620, 410)]
    return [_pil(w, h, i) for i, (w, h) in enumerate(sizes)]


def test_batched_train_matches_reference_for_same_draws(pictures):
    hw = torch.tensor([[im.size[1], im.size[0]] for im in pictures])
    params = B.draw_train_params(hw, generator=torch.Generator().manual_seed(3))
    params.flip[:2] = torch.tensor([[True], [False]])  # both branches whatever the seed
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(1)) * 0.5
    out = B.augment_batch([_u8(im) for im in pictures], params, mean, channels_last=True)
    assert out.shape == (5, 3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i, im in enumerate(pictures):
        ref = _reference_train(im, int(params.scale[i, 0]), int(params.top[i, 0]),
                               int(params.left[i, 0]), bool(params.flip[i, 0]),
                               params.alpha[i, 0], mean)
        _close(out[i], ref)
    # a wrong draw is detected: the unflipped image differs from the flipped reference
    ref0 = _reference_train(pictures[0], int(params.scale[0, 0]), int(params.top[0, 0]),
                            int(params.left[0, 0]), False, params.alpha[0, 0], mean)
    assert float((out[0] - ref0).abs().mean()) > 10 * TOL_MEAN


def test_batched_fp16_compute_and_bf16_output(pictures):
    ims = [_u8(im) for im in pictures[:3]]
    hw = torch.tensor([[t.shape[1], t.shape[2]] for t in ims])
    params = B.draw_train_params(hw, generator=torch.Generator().manual_seed(0))
    ref = B.augment_batch(ims, params, None, channels_last=False)
    half = B.augment_batch(ims, params, None, out_dtype=torch.bfloat16,
                           compute_dtype=torch.float16)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    _close(half, ref, tol_max=3 / 255, tol_mean=0.5 / 255)


def test_batched_eval_views_match_reference(pictures):
    ims = [_u8(im) for im in pictures]
    hw = torch.tensor([[t.shape[1], t.shape[2]] for t in ims])
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(2)) * 0.5
    center = B.augment_batch(ims, B.center_params(hw), mean, channels_last=False)
    ten = B.augment_batch(ims, B.ten_crop_params(hw), mean, channels_last=False)
    assert ten.shape == (5, 10, 3, 224, 224)
    for i, im in enumerate(pictures):
        x = T.pil_to_tensor(T.resize_shorter(im, 256))
        _close(center[i], T.center_crop(x, 224) - mean)
        _close(ten[i], E.ten_crop(x, 224) - mean)
    scales = (224, 288)
    views = B.multiscale_views_batch(ims[:2], scales, mean)
    for im, got in zip(pictures[:2], views):
        ref = []
        for s in scales:
            v = T.pil_to_tensor(T.resize_shorter(im, s))
            v = v - T.resize_tensor(mean, v.shape[-2:])
            ref += [v, T.hflip(v)]
        assert [tuple(v.shape) for v in got] == [tuple(v.shape) for v in ref]
        for a, b in zip(got, ref):
            _close(a, b, tol_max=2 / 255)


def test_chunks_bound_memory_and_give_the_same_result(pictures):
    ims = [_u8(im) for im in pictures]
    hw = torch.tensor([[t.shape[1], t.shape[2]] for t in ims])
    params = B.draw_train_params(hw, generator=torch.Generator().manual_seed(5))
    big, small = B.AugmentStats(), B.AugmentStats()
    a = B.augment_batch(ims, params, budget_bytes=1 << 30, stats=big)
    budget = 8 << 20  # the largest image alone needs about 6 MB
    b = B.augment_batch(ims, params, budget_bytes=budget, stats=small)
    assert big.chunks == 1 and small.chunks >= 2
    assert small.peak_bytes <= budget < big.peak_bytes
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_batched_rejects_bad_input(pictures):
    ims = [_u8(pictures[0])]
    hw = torch.tensor([[ims[0].shape[1], ims[0].shape[2]]])
    p = B.center_params(hw)
    with pytest.raises(ValueError, match="parameters for 1"):
        B.augment_batch(ims * 2, p)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        B.augment_batch([ims[0][:1]], p)
    p.top += 100
    with pytest.raises(ValueError, match="outside"):
        B.augment_batch(ims, p)
    with pytest.raises(ValueError, match="below the crop size"):
        B.draw_train_params(hw, scale=(128, 480))


def test_draws_have_the_papers_distributions():
    n = 40000
    hw = torch.tensor([[375, 500], [500, 375]]).repeat(n // 2, 1)
    p = B.draw_train_params(hw, generator=torch.Generator().manual_seed(0))
    s = p.scale[:, 0]
    assert int(s.min()) == 256 and int(s.max()) == 480
    counts = torch.bincount(s - 256, minlength=225).double()
    expected = n / 225
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 225 + 6 * (2 * 224) ** 0.5  # 224 d.o.f., ~6 sigma
    assert abs(float(p.flip.double().mean()) - 0.5) < 0.01
    a = p.alpha.reshape(-1, 3)
    assert torch.allclose(a.std(0), torch.full((3,), 0.1), atol=0.003)
    assert torch.allclose(a.mean(0), torch.zeros(3), atol=0.003)
    nh, nw = B.resized_sizes(hw, p.scale)
    assert bool((p.top >= 0).all() and (p.top + 224 <= nh).all() and (p.left + 224 <= nw).all())
    u = (p.left.double() / (nw - 224).double()).reshape(-1)
    assert abs(float(u.mean()) - 0.5) < 0.01 and float(u.min()) == 0 and float(u.max()) == 1
    # lighting with the paper's eigenvalues: the same offset as transforms.lighting
    off = B.lighting_offsets(a[:4])
    for k in range(4):
        ref = T.lighting(torch.zeros(3, 1, 1), a[k]).reshape(3)
        torch.testing.assert_close(off[k], ref)
    assert torch.equal(B.IMAGENET_EIGVAL, torch.tensor([0.2175, 0.0188, 0.0045]))


# ------------------------------------------------------------------------ image folders
@pytest.fixture
def folder(tmp_path):
    """A folder of baseline JPEGs plus one of each special case in class 'b' of train."""
    root = tmp_path / "imgs"
    make_imagefolder(str(root), classes=2, train_per_class=3, val_per_class=2, size=(300, 225),
                     seed=1)
    d = root / "train" / "n00000001"
    _pil(280, 240, 10).save(d / "progressive.jpg", quality=85, progressive=True)
    _pil(260, 230, 11).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    _pil(270, 230, 12).save(d / "png_image.png")
    _pil(300, 240, 13).convert("L").save(d / "gray.jpg", quality=90)
    good = io.BytesIO()
    _pil(300, 240, 14).save(good, "JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return root


def _dataset(root, mode, mean=None):
    classes = D._list_classes(str(root / "train"))
    split = "train" if mode == "train" else "val"
    return D.ImageFolderDataset(str(root / split), classes, mean, mode)


def test_jpeg_info_routes_what_the_device_decoder_cannot_take(folder):
    d = folder / "train" / "n00000001"
    info = {f: G.jpeg_info((d / f).read_bytes()) for f in os.listdir(d)}
    plain = [f for f in info if f.startswith("train_")]
    assert plain and all(info[f] == (G.DEVICE_OK, "") for f in plain)
    assert info["gray.jpg"] == (G.DEVICE_OK, "")
    assert info["progressive.jpg"] == (G.FALLBACK, "progressive JPEG")
    assert info["cmyk.jpg"][0] == G.FALLBACK and "4 components" in info["cmyk.jpg"][1]
    assert info["png_image.png"] == (G.FALLBACK, "not a JPEG")
    assert info["truncated.jpg"][0] == G.FALLBACK and "truncated" in info["truncated.jpg"][1]
    assert G.jpeg_info(b"\xff\xd8\xff")[0] == G.FALLBACK


def test_gpu_backend_on_cpu_falls_back_and_skips_with_the_path(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _dataset(folder, "train", torch.full((3, 224, 224), 0.25))
    n = len(base)
    assert n == 11  # 6 + 5 special files (the truncated one has a readable header)
    logs = []
    loader = G.GPUBatchLoader(base, 4, "cpu", generator=torch.Generator().manual_seed(0),
                              out_dtype=torch.bfloat16, log=logs.append)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (n - 1, 3, 224, 224) and x.dtype == torch.bfloat16
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in xs)
    st = loader.stats()
    assert (st["decoded_on_device"], st["fallback"], st["skipped"]) == (7, 3, 1)
    skipped = [m for m in logs if m.startswith("skipped")]
    assert len(skipped) == 1 and "truncated.jpg" in skipped[0]
    assert sum("decoded on the CPU" in m for m in logs) == 1  # reported once
    assert sorted(y.tolist()) == sorted(t for p, t in base.samples if "truncated" not in p)
    assert 0 < st["chunk_peak_bytes"] <= B.default_budget("cpu")


def test_gpu_backend_on_cpu_center_matches_reference(folder):
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(4)) * 0.4
    base = _dataset(folder, "center", mean)
    loader = G.GPUBatchLoader(base, 3, "cpu", channels_last=False, num_workers=0)
    got = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert got.shape[0] == len(base)
    for i in range(len(base)):
        ref, label = base[i]
        _close(got[i], ref)
        assert int(labels[i]) == label


def test_gpu_backend_seeded_and_with_workers(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _dataset(folder, "train")

    def run(workers, seed):
        ld = G.GPUBatchLoader(base, 5, "cpu", num_workers=workers, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), log=lambda m: None)
        return torch.cat([x for x, _ in ld]), torch.cat([y for _, y in ld])

    a, ya = run(0, 7)
    b, yb = run(2, 7)
    c, _ = run(0, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(ya, yb)
    assert float((a - c).abs().mean()) > 0.01  # another seed, other draws


def test_gpu_loader_stops_cleanly_when_abandoned(folder):
    base = _dataset(folder, "center")
    loader = G.GPUBatchLoader(base, 1, "cpu", prefetch=1)
    it = iter(loader)
    next(it)
    it.close()  # the producer thread must end (finally: stop + drain + join)
    import threading
    assert not any(t.name == "fastres-gpu-data" and t.is_alive() for t in threading.enumerate())


# ------------------------------------------------------------------------ cpu backend
def test_cpu_backend_draws_what_the_reference_draws(folder):
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(6)) * 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _dataset(folder, "train", mean)
    fast = FastImageFolderDataset(base)
    for i in range(len(base)):
        if "truncated" in base.samples[i][0]:
            continue
        torch.manual_seed(100 + i)
        ref, label = base[i]
        torch.manual_seed(100 + i)
        u8, alpha, label2 = fast[i]
        assert u8.dtype == torch.uint8 and u8.shape == (224, 224, 3) and label2 == label
        x = B.finish_batch(u8[None].permute(0, 3, 1, 2), alpha[None], mean,
                           channels_last=False)[0]
        _close(x, ref)


def test_cpu_backend_draft_decoding_of_large_jpegs(tmp_path):
    """A 1200x900 JPEG resized to a shorter side of 256-300 is decoded at half size (JPEG DCT
    scaling): close to the full decode (which matches the reference, test above), and the
    drafted decode is really smaller."""
    d = tmp_path / "big" / "train" / "a"
    d.mkdir(parents=True)
    _pil(1200, 900, 3).save(d / "big.jpg", quality=92)
    base = D.ImageFolderDataset(str(d.parent), ["a"], None, "train", scale=(256, 300))
    fast = FastImageFolderDataset(base)
    slow = FastImageFolderDataset(base, draft=False)
    from fastres.data.cpu_pipeline import open_draft
    with Image.open(d / "big.jpg") as im:
        assert open_draft(im, 342, 256).size == (600, 450)
    for seed in range(3):
        torch.manual_seed(seed)
        a, _, _ = fast[0]
        torch.manual_seed(seed)
        b, _, _ = slow[0]
        diff = (a.float() - b.float()).abs()
        assert float(diff.mean()) < 2.0 and float(diff.max()) < 60  # grey levels


def test_cpu_loader_batches_and_skips_with_the_path(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _dataset(folder, "train", torch.zeros(3, 224, 224))
    loader = CPUBatchLoader(base, 4, "cpu", out_dtype=torch.bfloat16, channels_last=True,
                            generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="truncated.jpg"):
        batches = list(loader)
    assert len(batches) == len(loader) == 3
    x = batches[0][0]
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert loader.stats()["skipped"] == 1
    with pytest.raises(ValueError, match="the cpu backend builds the views"):
        FastImageFolderDataset(base, mode="five_crop")
    with pytest.raises(ValueError, match="the gpu backend builds the views"):
        G.GPUBatchLoader(base, 4, "cpu", mode="five_crop")


# ------------------------------------------------------------------ selection, trainer
def test_backend_selection_and_errors(folder):
    base = _dataset(folder, "center")
    assert resolve_data_backend("auto", base, "cpu") == "cpu"
    assert resolve_data_backend("gpu", base, "cpu") == "gpu"
    digits = D.TensorImageDataset(torch.zeros(2, 3, 4, 4), [0, 1], torch.zeros(3, 4, 4))
    assert resolve_data_backend("auto", digits, "cpu") == "reference"
    with pytest.raises(ValueError, match="image folders"):
        resolve_data_backend("gpu", digits, "cpu")
    with pytest.raises(ValueError, match="unknown data backend"):
        resolve_data_backend("nvjpeg", base, "cpu")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        from fastres.data.dali_pipeline import DaliUnavailable
        with pytest.raises(DaliUnavailable, match="pip install nvidia-dali-cuda130"):
            resolve_data_backend("dali", base, "cuda")


def test_trainer_with_the_gpu_backend_on_cpu(tmp_path, capsys):
    from fastres.train import cli

    root = tmp_path / "tiny"
    make_imagefolder(str(root), classes=2, train_per_class=2, val_per_class=1, size=(240, 200))
    common = ["--recipe", "imagenet", "--model", "resnet20", "--data", f"imagefolder:{root}",
              "--device", "cpu", "--quiet", "--iterations", "1", "--batch-size", "4",
              "--workers", "0"]
    rc = cli.main(common + ["--data-backend", "gpu", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data backend: gpu" in out and "done: validation" in out
    rc = cli.main(["--data", "digits", "--data-backend", "gpu", "--device", "cpu",
                   "--quiet", "--iterations", "1", "--out", str(tmp_path / "run2")])
    assert rc == 2
    assert "image folders" in capsys.readouterr().err


def test_data_benchmark_cli(tmp_path, capsys):
    from fastres.bench.cli import main

    root = tmp_path / "bench"
    make_imagefolder(str(root), classes=2, train_per_class=4, val_per_class=1, size=(240, 200))
    rc = main(["--data", f"imagefolder:{root}", "--data-backend", "reference,cpu,gpu",
               "--device", "cpu", "--batch-size", "4", "--iters", "2", "--data-batches", "1",
               "--threads", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    md = (tmp_path / "out" / "data_bench.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "backend" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == ["reference", "cpu", "gpu"]
    assert "synthetic step" not in md  # no model on a CPU unless asked
    import json
    data = json.loads((tmp_path / "out" / "data_bench.json").read_text())
    for r in data["rows"]:
        assert r["pipeline_images_per_s"] > 0 and len(r["pipeline_rounds"]) == 2
        assert r["per_core_images_per_s"] == r["pipeline_images_per_s"]  # 0 workers, 1 thread
    # the training columns: a synthetic-data step and the same step fed by the pipeline
    rc = main(["--data", f"imagefolder:{root}", "--data-backend", "gpu", "--device", "cpu",
               "--batch-size", "2", "--iters", "1", "--data-batches", "1", "--warmup", "1",
               "--models", "resnet20", "--out", str(tmp_path / "out3")])
    assert rc == 0
    row = json.loads((tmp_path / "out3" / "data_bench.json").read_text())["rows"][0]
    assert row["model"] == "resnet20"
    assert row["synthetic_step_images_per_s"] > 0 and row["fed_step_images_per_s"] > 0
    assert "fed / synthetic" in (tmp_path / "out3" / "data_bench.md").read_text()
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:  # DALI missing: a usage error naming it
        rc = main(["--data", f"imagefolder:{root}", "--data-backend", "dali", "--device", "cpu",
                   "--out", str(tmp_path / "out2")])
        assert rc == 2 and "dali" in capsys.readouterr().err.lower()


def test_make_imagefolder(tmp_path, capsys):
    from fastres.data.make_imagefolder import main

    assert main([str(tmp_path / "a"), "--classes", "2", "--train-per-class", "3",
                 "--val-per-class", "1", "--size", "imagenet", "--seed", "4"]) == 0
    assert "wrote 8 JPEGs" in capsys.readouterr().out
    files = sorted((tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 8
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size in IMAGENET_SIZES
    assert main([str(tmp_path / "b"), "--classes", "2", "--train-per-class", "3",
                 "--val-per-class", "1", "--size", "imagenet", "--seed", "4", "--jobs", "2"]) == 0
    again = sorted((tmp_path / "b").rglob("*.JPEG"))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]
    b = D.build_data(f"imagefolder:{tmp_path / 'a'}")
    assert (len(b.train), len(b.val), b.num_classes) == (6, 2, 2)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "c"), "--size", "12by5"])


# ------------------------------------------------------------------------------- DALI
# Where NVIDIA DALI is installed (CI installs it in its first environment): on a CUDA device if
# there is one, else in DALI's CPU-only mode, the same pipeline with CPU operators.
def _dali_device():
    pytest.importorskip("nvidia.dali")
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_dali_center_view_matches_the_reference(folder):
    device = _dali_device()
    from fastres.data.dali_pipeline import DaliBatchLoader
    mean = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(5)) * 0.5
    val = folder / "val" / "n00000001"
    # besides the 300x225 files: portrait, odd margins both ways, a square of the test size
    for i, (w, h) in enumerate([(225, 301), (257, 333), (256, 256)]):
        _pil(w, h, 20 + i).save(val / f"extra_{i}.JPEG", quality=90)
    base = _dataset(folder, "center", mean)
    loader = DaliBatchLoader(base, 3, device, mode="center", drop_last=False, num_workers=1)
    assert len(loader) == 3  # 7 files, batches of 3, the last one partial
    xs, ys = zip(*[(x.float().cpu(), y.cpu()) for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (len(base), 3, 224, 224) and xs[0].device.type == device
    assert xs[0].is_contiguous(memory_format=torch.channels_last)
    for i in range(len(base)):  # in file order: the center view does not shuffle
        ref, label = base[i]
        assert int(y[i]) == label
        # the same sizes and crop; DALI's linear resize against PIL's bilinear: rounding
        _close(x[i], ref, tol_max=TOL_MAX, tol_mean=TOL_MEAN)


def test_dali_train_view(folder):
    device = _dali_device()
    from fastres.data.dali_pipeline import DaliBatchLoader
    base = _dataset(folder, "train", torch.zeros(3, 224, 224))
    # every kind of file but the truncated one (DALI stops with an error on a corrupt file)
    base.samples = [s for s in base.samples if "truncated" not in s[0]]
    loader = DaliBatchLoader(base, 2, device, mode="train", drop_last=True, num_workers=1,
                             seed=3, out_dtype=torch.bfloat16)
    assert len(loader) == len(base.samples) // 2

    def epoch():
        out = [(x.cpu(), y.cpu()) for x, y in loader]
        return torch.cat([x for x, _ in out]).float(), torch.cat([y for _, y in out])

    x1, y1 = epoch()
    x2, y2 = epoch()
    assert x1.shape == (2 * len(loader), 3, 224, 224) and torch.isfinite(x1).all()
    # [0, 1] pixels plus the lighting offset (alphastd 0.1 on eigenvalues below 0.23)
    assert float(x1.min()) > -0.2 and float(x1.max()) < 1.2 and float(x1.std()) > 0.05
    assert len(base.samples) % 2 == 0  # so the epoch holds every file once
    labels = sorted(int(t) for _, t in base.samples)
    assert sorted(y1.tolist()) == labels and sorted(y2.tolist()) == labels
    assert not torch.equal(x1, x2)  # new draws (order, scale, crop, flip, lighting) per epoch


def test_trainer_with_the_dali_backend(tmp_path, capsys):
    device = _dali_device()
    from fastres.train import cli

    root = tmp_path / "tiny"
    make_imagefolder(str(root), classes=2, train_per_class=2, val_per_class=1, size=(240, 200))
    rc = cli.main(["--recipe", "imagenet", "--model", "resnet20", "--data",
                   f"imagefolder:{root}", "--device", device, "--quiet", "--iterations", "1",
                   "--batch-size", "2", "--workers", "1", "--data-backend", "dali",
                   "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data backend: dali" in out and "done: validation" in out
