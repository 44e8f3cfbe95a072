"""Tests of the data layer (fastres.data): digits, CIFAR-10 pickles, image folders, synthetic
data, the training augmentations and the evaluation crops. CPU only, no downloads."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from fastres.data import SPEC_HELP, DataBundle, build_data, build_eval_data
from fastres.data import datasets as D
from fastres.data import eval_crops as E
from fastres.data import transforms as T

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits():
    return build_data("digits")


def test_digits_bundle(digits):
    b = digits
    assert isinstance(b, DataBundle)
    assert (len(b.train), len(b.val), b.test) == (1497, 300, None)
    assert (b.num_classes, b.image_size, b.name) == (10, 32, "digits")
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    labels = b.train.labels.tolist() + b.val.labels.tolist()
    assert min(labels) == 0 and max(labels) == 9
    # stratified: every class in val with ~30 images
    counts = np.bincount(b.val.labels.numpy(), minlength=10)
    assert counts.min() >= 25 and counts.max() <= 35
    # train and val are disjoint and cover the 1797 images
    x_all, y_all = D.load_digits_tensors()
    assert x_all.shape == (1797, 3, 32, 32)
    assert 0.0 <= float(x_all.min()) and float(x_all.max()) <= 1.0
    assert torch.equal(x_all[:, 0], x_all[:, 2])  # replicated channels
    keys = {tuple(x.flatten()[::7].tolist()) for x in torch.cat([b.train.images, b.val.images])}
    assert len(keys) == len({tuple(x.flatten()[::7].tolist()) for x in x_all})


def test_digits_split_fixed_across_calls_and_seeds(digits):
    other = build_data("digits", seed=123)
    assert torch.equal(other.val.images, digits.val.images)
    assert torch.equal(other.train.labels, digits.train.labels)
    assert torch.equal(other.mean, digits.mean)


def test_digits_mean_and_val_deterministic(digits):
    b = digits
    assert b.mean.shape == (3, 32, 32)
    torch.testing.assert_close(b.mean, b.train.images.mean(0))
    assert float(b.mean.abs().sum()) > 0
    i = 17
    x1, y1 = b.val[i]
    x2, y2 = b.val[i]
    assert torch.equal(x1, x2) and y1 == y2 == int(b.val.labels[i])
    torch.testing.assert_close(x1, b.val.images[i] - b.mean)
    # the val images have the mean subtracted: their average is ~ the val-vs-train difference
    val_mean = torch.stack([b.val[j][0] for j in range(len(b.val))]).mean(0)
    torch.testing.assert_close(val_mean, b.val.images.mean(0) - b.mean)


def test_digits_train_augmentation_is_pad_crop_flip_of_centered(digits):
    b = digits
    base = b.train.images[5] - b.mean
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x, _ = b.train[5]
        match = None
        for top in range(9):
            for left in range(9):
                c = T.pad_crop(base, top, left, 4)
                if torch.equal(x, c):
                    match = (top, left, 0)
                elif torch.equal(x, torch.flip(c, [-1])):
                    match = (top, left, 1)
        assert match is not None
        seen.add(match)
    assert len(seen) > 5  # actually random
    assert any(m[2] for m in seen) and any(not m[2] for m in seen)


def test_dataloader_workers(digits):
    loader = torch.utils.data.DataLoader(digits.train, batch_size=32, num_workers=2,
                                         shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9


# ------------------------------------------------------------------------- transforms
def test_pad_crop_equals_slicing():
    img = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6) + 1
    padded = torch.zeros(2, 13, 14)
    padded[:, 4:9, 4:10] = img
    for top, left in [(0, 0), (4, 4), (8, 8), (3, 7), (8, 1)]:
        out = T.pad_crop(img, top, left, 4)
        assert out.shape == img.shape
        assert torch.equal(out, padded[:, top:top + 5, left:left + 6])
    assert torch.equal(T.pad_crop(img, 4, 4, 4), img)
    # (0,0): the top-left 4 rows/cols are zero padding
    out = T.pad_crop(img, 0, 0, 4)
    assert float(out[:, :4].abs().sum()) == 0 and torch.equal(out[:, 4, 4:], img[:, 0, :2])
    with pytest.raises(ValueError, match="out of range"):
        T.pad_crop(img, 9, 0, 4)


def test_random_pad_crop_generator_reproducible():
    img = torch.rand(3, 8, 8)
    a = T.random_pad_crop(img, 4, generator=torch.Generator().manual_seed(3))
    b = T.random_pad_crop(img, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_flip():
    img = torch.rand(3, 4, 5)
    assert torch.equal(T.hflip(img), torch.flip(img, [-1]))
    assert torch.equal(T.hflip(img)[:, :, 0], img[:, :, -1])
    assert torch.equal(T.random_hflip(img, p=1.0), torch.flip(img, [-1]))
    assert torch.equal(T.random_hflip(img, p=0.0), img)


def test_lighting():
    img = torch.rand(3, 4, 4)
    assert torch.equal(T.lighting(img, torch.zeros(3)), img)
    # alpha = (1, 0, 0): adds eigval[0] * eigvec[:, 0] = 0.2175 * (-0.5675, -0.5808, -0.5836)
    out = T.lighting(img, torch.tensor([1.0, 0.0, 0.0]))
    expected = torch.tensor([-0.5675, -0.5808, -0.5836]) * 0.2175
    torch.testing.assert_close(out - img, expected.view(3, 1, 1).expand(3, 4, 4))
    # general alpha: per channel constant eigvec @ (alpha * eigval)
    alpha = torch.tensor([0.1, -0.2, 0.3])
    out = T.lighting(img, alpha)
    ev = [0.2175, 0.0188, 0.0045]
    vec = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    for c in range(3):
        delta = sum(vec[c][j] * alpha[j].item() * ev[j] for j in range(3))
        torch.testing.assert_close(out[c] - img[c], torch.full((4, 4), delta))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(T.random_lighting(img, 0.1, g1), T.random_lighting(img, 0.1, g2))
    assert not torch.equal(T.random_lighting(img, 0.1), img)


def test_ten_crop_exact():
    img = torch.arange(1 * 4 * 5, dtype=torch.float32).view(1, 4, 5)
    out = E.ten_crop(img, 2)
    assert out.shape == (10, 1, 2, 2)
    expected = [img[:, 0:2, 0:2], img[:, 0:2, 3:5], img[:, 2:4, 0:2], img[:, 2:4, 3:5],
                img[:, 1:3, 1:3]]
    for k in range(5):
        assert torch.equal(out[k], expected[k]), k
        assert torch.equal(out[k + 5], torch.flip(expected[k], [-1])), k
    assert out[0].flatten().tolist() == [0, 1, 5, 6]
    assert out[4].flatten().tolist() == [6, 7, 11, 12]
    assert out[9].flatten().tolist() == [7, 6, 12, 11]


def test_padded_ten_crop_for_32x32():
    img = torch.rand(3, 32, 32) + 1
    out = E.padded_ten_crop(img, 4)
    assert out.shape == (10, 3, 32, 32)
    assert torch.equal(out[4], img)  # center = unpadded image
    assert torch.equal(out[0], T.pad_crop(img, 0, 0, 4))
    assert torch.equal(out[3], T.pad_crop(img, 8, 8, 4))
    assert torch.equal(out[1], T.pad_crop(img, 0, 8, 4))
    assert torch.equal(out[7], torch.flip(T.pad_crop(img, 8, 0, 4), [-1]))


def test_multiscale_views():
    img = torch.rand(3, 20, 30)
    mean = torch.rand(3, 8, 8)
    views = E.multiscale_views(img, (10, 20, 40), mean)
    assert [tuple(v.shape) for v in views] == [(3, 10, 15)] * 2 + [(3, 20, 30)] * 2 + \
        [(3, 40, 60)] * 2
    torch.testing.assert_close(views[2], img - T.resize_tensor(mean, (20, 30)))
    assert torch.equal(views[3], torch.flip(views[2], [-1]))


def _write_img(path, w, h, seed=0, fmt=None):
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def test_random_resize_shorter_pil(tmp_path):
    _write_img(tmp_path / "a.png", 300, 260)
    with Image.open(tmp_path / "a.png") as im:
        im = im.convert("RGB")
    g = torch.Generator().manual_seed(0)
    shorter = set()
    for _ in range(30):
        out = T.random_resize_shorter(im, 256, 480, generator=g)
        w, h = out.size
        assert 256 <= h <= 480 and h == min(w, h)
        assert abs(w / h - 300 / 260) < 0.01
        shorter.add(h)
    assert len(shorter) > 10
    assert T.resize_shorter(im, 130).size == (150, 130)
    x = T.pil_to_tensor(im)
    assert x.shape == (3, 260, 300) and 0 <= float(x.min()) and float(x.max()) <= 1


# ----------------------------------------------------------------------------- CIFAR-10
def _write_batch(path, n, seed, data=None, labels=None):
    rng = np.random.RandomState(seed)
    d = {b"batch_label": b"fake",
         b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
         b"labels": rng.randint(0, 10, n).tolist() if labels is None else labels}
    with open(path, "wb") as f:
        pickle.dump(d, f)


@pytest.fixture()
def fake_cifar(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _write_batch(root / f"data_batch_{i}", 20, i)
    _write_batch(root / "test_batch", 15, 9)
    return root


def test_cifar_split_mean_test(fake_cifar):
    for path in (fake_cifar, fake_cifar.parent):  # the batch folder or its parent
        b = build_data(f"cifar10:{path}")
        assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 15)  # 10% val as 5k/50k
        assert b.name == f"cifar10:{path}" and b.num_classes == 10 and b.image_size == 32
    # raw data in the file order
    raw = []
    for i in range(1, 6):
        with open(fake_cifar / f"data_batch_{i}", "rb") as f:
            raw.append(pickle.load(f)[b"data"])
    raw = torch.from_numpy(np.concatenate(raw)).view(-1, 3, 32, 32)
    all_imgs = torch.cat([b.train.images, b.val.images])
    assert sorted(map(bytes, all_imgs.flatten(1).numpy())) == \
        sorted(map(bytes, raw.flatten(1).numpy()))
    torch.testing.assert_close(b.mean, b.train.images.float().mean(0) / 255)
    x, y = b.val[3]
    torch.testing.assert_close(x, b.val.images[3].float() / 255 - b.mean)
    with open(fake_cifar / "test_batch", "rb") as f:
        t = pickle.load(f)
    x, y = b.test[4]
    assert y == t[b"labels"][4]
    torch.testing.assert_close(x, torch.from_numpy(t[b"data"][4]).view(3, 32, 32).float() / 255
                               - b.mean)
    # split fixed
    b2 = build_data(f"cifar10:{fake_cifar}", seed=5)
    assert torch.equal(b2.val.images, b.val.images)
    assert D.cifar_val_size(50000) == 5000 and D.cifar_val_size(60000) == 5000
    # eval data
    ds, n = build_eval_data(f"cifar10:{fake_cifar}", crop="10crop", split="test")
    assert n == 10 and len(ds) == 15 and ds[0][0].shape == (10, 3, 32, 32)
    torch.testing.assert_close(ds[0][0][4], b.test[0][0])
    ds, _ = build_eval_data(f"cifar10:{fake_cifar}", crop="center")
    assert len(ds) == 10 and ds[0][0].shape == (1, 3, 32, 32)


def test_cifar_errors(tmp_path, fake_cifar):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_data(f"cifar10:{missing}")
    os.remove(fake_cifar / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        build_data(f"cifar10:{fake_cifar}")
    _write_batch(fake_cifar / "data_batch_3", 4, 0,
                 data=np.zeros((4, 100), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"data_batch_3.*uint8 \[N, 3072\]"):
        build_data(f"cifar10:{fake_cifar}")
    _write_batch(fake_cifar / "data_batch_3", 4, 0, labels=[1, 2])
    with pytest.raises(ValueError, match="data_batch_3.*one label per image"):
        build_data(f"cifar10:{fake_cifar}")
    with open(fake_cifar / "data_batch_3", "wb") as f:
        pickle.dump({b"images": 1}, f)
    with pytest.raises(ValueError, match="data_batch_3.*missing key"):
        build_data(f"cifar10:{fake_cifar}")
    (fake_cifar / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="data_batch_3.*not a readable"):
        build_data(f"cifar10:{fake_cifar}")


# -------------------------------------------------------------------------- image folder
@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imnet"
    sizes = [(300, 260), (260, 300), (256, 256)]
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                w, h = sizes[k % 3]
                fmt = "JPEG" if k % 2 == 0 else "PNG"
                _write_img(d / f"{k}.{'jpg' if fmt == 'JPEG' else 'png'}", w, h,
                           seed=10 * c + k, fmt=fmt)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "train" / "notes.txt").write_text("ignored")
    return root


def test_imagefolder(image_folder, monkeypatch):
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        b = build_data(f"imagefolder:{image_folder}")
    assert b.num_classes == 2 and b.image_size == 224 and b.test is None
    assert b.train.classes == ["cat", "dog"]
    assert b.train.skipped == 1 and b.train.skipped_files[0].endswith("broken.jpg")
    assert (len(b.train), len(b.val), b.val.skipped) == (6, 4, 0)
    cache = image_folder / ".fastres_mean_224.pt"
    assert cache.is_file()
    # mean = average of the center crops (shorter side 256) of the readable train images
    crops = []
    for path, _ in b.train.samples:
        with Image.open(path) as im:
            crops.append(T.center_crop(T.pil_to_tensor(T.resize_shorter(im.convert("RGB"),
                                                                          256)), 224))
    torch.testing.assert_close(b.mean, torch.stack(crops).mean(0), atol=1e-5, rtol=0)
    x, y = b.val[0]
    assert x.shape == (3, 224, 224) and y == 0
    torch.manual_seed(0)
    x, y = b.train[4]
    assert x.shape == (3, 224, 224) and y == 1
    # second build reuses the cached mean
    mtime = cache.stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("mean recomputed")

    monkeypatch.setattr(D, "compute_imagefolder_mean", fail)
    with pytest.warns(RuntimeWarning, match="skipped 1"):
        b2 = build_data(f"imagefolder:{image_folder}")
    assert torch.equal(b2.mean, b.mean) and cache.stat().st_mtime_ns == mtime
    # eval crops
    ds, n = build_eval_data(f"imagefolder:{image_folder}", crop="10crop")
    assert n == 2 and len(ds) == 4 and ds[0][0].shape == (10, 3, 224, 224)
    x1, _ = build_eval_data(f"imagefolder:{image_folder}", crop="center")[0][0]
    assert x1.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x1[0], b.val[0][0])
    views, _ = build_eval_data(f"imagefolder:{image_folder}", crop="multiscale")[0][1]
    assert len(views) == 10
    assert [min(v.shape[-2:]) for v in views] == [224, 224, 256, 256, 384, 384, 480, 480,
                                                  640, 640]
    assert torch.equal(views[1], torch.flip(views[0], [-1]))


def test_imagefolder_cache_dir_and_unwritable(image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    with pytest.warns(RuntimeWarning):
        b = build_data(f"imagefolder:{image_folder}", cache_dir=str(cache_dir))
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("fastres_mean_224_")
    assert not (image_folder / ".fastres_mean_224.pt").exists()
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning) as rec:
        b2 = build_data(f"imagefolder:{image_folder}", cache_dir=str(blocker / "sub"))
    assert any("could not cache the mean image" in str(w.message) for w in rec)
    torch.testing.assert_close(b2.mean, b.mean)


def test_imagefolder_stale_cache_and_pickle(image_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build_data(f"imagefolder:{image_folder}")
    _write_img(image_folder / "train" / "cat" / "new.png", 256, 256, seed=99)
    with pytest.warns(RuntimeWarning) as rec:
        b2 = build_data(f"imagefolder:{image_folder}")
    assert any("stale" in str(w.message) for w in rec)
    assert len(b2.train) == 7 and not torch.equal(b2.mean, b.mean)
    # datasets are picklable (spawned DataLoader workers)
    for ds in (b2.train, b2.val):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds) and clone.skipped == ds.skipped
    assert torch.equal(pickle.loads(pickle.dumps(b2.val))[1][0], b2.val[1][0])


def test_imagefolder_training_views_vary(image_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build_data(f"imagefolder:{image_folder}")
    torch.manual_seed(1)
    xs = [b.train[0][0] for _ in range(3)]
    assert not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_ds"):
        build_data(f"imagefolder:{tmp_path / 'missing_ds'}")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        build_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "train" / "a").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_data(f"imagefolder:{tmp_path / 'empty'}")
    _write_img(tmp_path / "empty" / "train" / "a" / "x.png", 40, 40)
    with pytest.raises(FileNotFoundError, match="val"):
        build_data(f"imagefolder:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------- synthetic
def test_synthetic():
    b = build_data("synthetic")
    assert (len(b.train), len(b.val), b.num_classes, b.image_size) == (1024, 256, 10, 32)
    assert torch.equal(b.mean, torch.zeros(3, 32, 32))
    x, y = b.train[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert torch.equal(build_data("synthetic").train[3][0], x)  # deterministic
    assert not torch.equal(build_data("synthetic", seed=1).train[3][0], x)
    assert not torch.equal(b.val[3][0], x)
    b = build_data("synthetic:16", recipe="imagenet")
    assert (len(b.train), b.num_classes, b.image_size) == (16, 1000, 224)
    assert b.train[0][0].shape == (3, 224, 224)
    assert len(build_data("synthetic", synthetic_size=7).train) == 7
    ds, n = build_eval_data("synthetic", crop="multiscale")
    assert n == 10 and [v.shape[-1] for v in ds[0][0]] == [32, 32, 40, 40, 48, 48]


def test_digits_eval_crops(digits):
    ds, n = build_eval_data("digits", crop="center")
    assert n == 10 and len(ds) == 300
    x, y = ds[0]
    assert x.shape == (1, 3, 32, 32) and torch.equal(x[0], digits.val[0][0])
    x10, _ = build_eval_data("digits", crop="10crop")[0][0]
    assert x10.shape == (10, 3, 32, 32) and torch.equal(x10[4], digits.val[0][0])
    assert torch.equal(x10[9], torch.flip(x10[4], [-1]))
    views, _ = build_eval_data("digits", crop="multiscale")[0][0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 40, 40)] * 2 + \
        [(3, 48, 48)] * 2
    torch.testing.assert_close(views[0], digits.val[0][0])


def test_spec_errors():
    assert "cifar10:PATH" in SPEC_HELP and "synthetic:N" in SPEC_HELP
    with pytest.raises(ValueError, match="unknown dataset spec"):
        build_data("mnist")
    with pytest.raises(ValueError, match="needs a path"):
        build_data("cifar10")
    with pytest.raises(ValueError, match="unknown recipe"):
        build_data("digits", recipe="foo")
    with pytest.raises(ValueError, match="only the 'cifar' recipe"):
        build_data("digits", recipe="imagenet")
    with pytest.raises(ValueError, match="only for cifar10"):
        build_eval_data("digits", split="test")
    with pytest.raises(ValueError, match="unknown crop"):
        build_eval_data("digits", crop="5crop")
