"""The gpu data backend on a CUDA device (issue 17): nvJPEG batched decoding against the CPU
decoder, the batched augmentation on the GPU (fp16 matrix products) against the same code on
the CPU, the prefetching loader (its own stream, fallbacks, skips, bounded memory) and the
trainer's default backend on CUDA. Skipped without a GPU (marker gpu). Speed is measured by
``python -m fastres.bench --data``, not here."""
import io

import numpy as np
import pytest
import torch

from fastres.data import batched as B
from fastres.data import datasets as D
from fastres.data.make_imagefolder import make_image, make_imagefolder

pytestmark = pytest.mark.gpu
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


def _jpeg(w, h, seed, **kw):
    buf = io.BytesIO()
    Image.fromarray(make_image(w, h, np.random.default_rng(seed))).save(buf, "JPEG",
                                                                         quality=90, **kw)
    return buf.getvalue()


def test_nvjpeg_batch_decode_matches_cpu_decode():
    from fastres.data.gpu_pipeline import DEVICE_OK, decode_batch

    datas = [torch.frombuffer(bytearray(_jpeg(w, h, i)), dtype=torch.uint8)
             for i, (w, h) in enumerate([(500, 375), (375, 500), (333, 250), (640, 480)])]
    kinds = [DEVICE_OK] * len(datas)
    paths = [f"img{i}.jpg" for i in range(len(datas))]
    gpu, keep, events = decode_batch(datas, kinds, paths, "cuda")
    cpu, _, _ = decode_batch(datas, kinds, paths, "cpu")
    assert keep == [0, 1, 2, 3] and events == []
    for g, c in zip(gpu, cpu):
        assert g.device.type == "cuda" and g.dtype == torch.uint8 and g.shape == c.shape
        d = (g.cpu().float() - c.float()).abs()
        assert float(d.mean()) < 1.5 and float(d.max()) <= 40  # IDCT/upsampling differences


def test_augmentation_on_gpu_matches_cpu():
    ims = [torch.from_numpy(make_image(w, h, np.random.default_rng(i))).permute(2, 0, 1)
           .contiguous() for i, (w, h) in enumerate([(500, 375), (375, 500), (300, 240)])]
    hw = torch.tensor([[t.shape[1], t.shape[2]] for t in ims])
    params = B.draw_train_params(hw, generator=torch.Generator().manual_seed(0))
    mean = torch.rand(3, 224, 224) * 0.5
    cpu = B.augment_batch(ims, params, mean, channels_last=False)
    gpu = B.augment_batch([t.cuda() for t in ims], params, mean.cuda(),
                          out_dtype=torch.bfloat16)
    assert gpu.is_cuda and gpu.dtype == torch.bfloat16
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    d = (gpu.float().cpu() - cpu).abs()
    assert float(d.max()) <= 4 / 255 and float(d.mean()) <= 0.5 / 255
    ten = B.augment_batch([t.cuda() for t in ims], B.ten_crop_params(hw), mean.cuda())
    ten_cpu = B.augment_batch(ims, B.ten_crop_params(hw), mean)
    assert float((ten.cpu() - ten_cpu).abs().max()) <= 4 / 255


def test_gpu_loader_prefetches_falls_back_and_bounds_memory(tmp_path):
    from fastres.data.gpu_pipeline import GPUBatchLoader

    root = tmp_path / "f"
    make_imagefolder(str(root), classes=2, train_per_class=16, val_per_class=1, size=(500, 375))
    d = root / "train" / "n00000001"
    (d / "progressive.jpg").write_bytes(_jpeg(400, 300, 50, progressive=True))
    Image.fromarray(make_image(300, 260, np.random.default_rng(51))).save(d / "p.png")
    good = _jpeg(400, 300, 52)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    classes = D._list_classes(str(root / "train"))
    mean = torch.full((3, 224, 224), 0.4)
    base = D.ImageFolderDataset(str(root / "train"), classes, mean, "train")
    logs = []
    budget = 64 << 20
    loader = GPUBatchLoader(base, 8, "cuda", num_workers=2, shuffle=True,
                            generator=torch.Generator().manual_seed(0),
                            out_dtype=torch.bfloat16, budget_bytes=budget, log=logs.append)
    n = 0
    side = torch.cuda.Stream()
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        with torch.cuda.stream(side):  # consumed on another stream than it was made on
            assert torch.isfinite(x.float()).all()
        n += x.shape[0]
    st = loader.stats()
    assert n == len(base) - 1 and st["skipped"] == 1
    assert st["fallback"] >= 2 and st["decoded_on_device"] + st["fallback"] == n
    assert any("truncated.jpg" in m for m in logs)
    assert 0 < st["chunk_peak_bytes"] <= budget
    # the queue holds at most `prefetch` finished batches on top of the chunk buffers
    out_bytes = 8 * 3 * 224 * 224 * 2
    assert st["pipeline_peak_bytes"] <= budget + 4 * out_bytes + (16 << 20)


def test_center_views_on_gpu_match_the_reference(tmp_path):
    from fastres.data.gpu_pipeline import GPUBatchLoader

    root = tmp_path / "c"
    make_imagefolder(str(root), classes=1, train_per_class=1, val_per_class=6, size=(375, 500))
    mean = torch.rand(3, 224, 224) * 0.3
    base = D.ImageFolderDataset(str(root / "val"), ["n00000000"], mean, "center")
    x = torch.cat([b for b, _ in GPUBatchLoader(base, 4, "cuda", channels_last=False)])
    for i in range(len(base)):
        ref, _ = base[i]
        d = (x[i].cpu() - ref).abs()
        assert float(d.mean()) < 1.5 / 255 and float(d.max()) < 24 / 255  # nvJPEG vs libjpeg


def test_trainer_defaults_to_the_gpu_backend_on_cuda(tmp_path, capsys):
    from fastres.train import cli

    root = tmp_path / "t"
    make_imagefolder(str(root), classes=2, train_per_class=8, val_per_class=2, size=(500, 375))
    rc = cli.main(["--recipe", "imagenet", "--model", "resnet18", "--data", f"imagefolder:{root}",
                   "--device", "cuda", "--amp", "bf16", "--channels-last", "--quiet",
                   "--iterations", "2", "--batch-size", "8", "--workers", "2",
                   "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data backend: gpu" in out and "done: validation" in out
