"""fastres-eval CHECKPOINT --data SPEC --crop center|10crop|multiscale [--split val|test]
[--data-backend auto|reference|cpu|gpu|dali]

Top-1/top-5 error (and the cross-entropy of the averaged scores) of a fastres-train
checkpoint; the model name, fused flag and number of classes come from the checkpoint. Softmax
scores are averaged over the crops (10crop) or over crops and scales (multiscale, one image at
a time). Image folders are read by the --data-backend pipeline, as in fastres-train (auto: gpu
on CUDA, else cpu; dali: center crops only); other data sets by their own loader."""
import argparse
import sys
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .common import UsageError, add_data_backend_argument, cli_data_backend


def model_from_checkpoint(path: str, use_ema: bool = False, fused: Optional[bool] = None):
    import fastres.models

    ck = load_checkpoint(path)
    args = ck["args"]
    name = args.get("model")
    if not (isinstance(name, str) and name.startswith("timm:")) and \
            name not in fastres.models.list_models():
        raise CheckpointError(f"checkpoint {path!r} names unknown model {name!r}")
    num_classes = int(ck.get("num_classes") or args.get("num_classes") or 0)
    if num_classes <= 0:
        raise CheckpointError(f"checkpoint {path!r} does not record the number of classes")
    model = fastres.models.get_model(name, fused=args.get("fused", True) if fused is None
                                     else fused, num_classes=num_classes)
    if use_ema:
        if ck.get("ema") is None:
            raise CheckpointError(f"checkpoint {path!r} has no EMA weights (trained without "
                                  f"--ema)")
        state = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
        load_model_state(model, state, path, "EMA")
    else:
        load_model_state(model, ck["model"], path)
    return model, ck


def _collate_views(batch):
    """multiscale items (views, label) -> (a list of the images' views, labels [B])."""
    return [views for views, _ in batch], torch.tensor([int(y) for _, y in batch])


@torch.no_grad()
def evaluate_batches(model, batches: Iterable, crop: str = "center",
                     device="cpu") -> Dict[str, float]:
    """Top-1/top-5 error, ``loss`` (mean cross-entropy of the averaged softmax scores) and
    number of images ``n`` of ``model`` over ``batches`` of ``(x, y)``: for center/10crop
    ``x`` is [B, K, C, H, W] (K views per image; [B, C, H, W]: one), for multiscale a list of
    B images' views (a list of [C, H_s, W_s], or a tensor [V, C, H, W]), each run alone. Any
    data backend's loader (``fastres.data.loaders.make_loader``) gives such batches."""
    device = torch.device(device)
    model = model.to(device).eval()
    wrong1 = wrong5 = n = 0
    nll = 0.0

    def score(probs, y):
        nonlocal wrong1, wrong5, n, nll
        k = min(5, probs.shape[1])
        top = probs.topk(k, dim=1).indices
        hit = top == y[:, None]
        wrong1 += int((~hit[:, 0]).sum())
        wrong5 += int((~hit.any(1)).sum())
        n += y.numel()
        nll -= float(probs.gather(1, y[:, None]).double().clamp_min(1e-300).log().sum())

    for x, y in batches:
        y = y.to(device)
        if crop == "multiscale":
            probs = []
            for views in x:
                if torch.is_tensor(views):
                    views = list(views) if views.dim() == 4 else [views]
                p = 0
                for v in views:
                    p = p + F.softmax(model(v.unsqueeze(0).to(device)).float(), 1)
                probs.append(p / len(views))
            score(torch.cat(probs), y)
        else:
            if x.dim() == 4:  # a dataset giving single images
                x = x.unsqueeze(1)
            b, k = x.shape[:2]
            out = model(x.reshape(b * k, *x.shape[2:]).to(device)).float()
            score(F.softmax(out, 1).reshape(b, k, -1).mean(1), y)
    return {"top1_err": wrong1 / max(1, n), "top5_err": wrong5 / max(1, n),
            "loss": nll / max(1, n), "n": n}


def evaluate_crops(model, dataset, crop: str = "center", batch_size: int = 64,
                   device="cpu", workers: int = 0) -> Dict[str, float]:
    """``evaluate_batches`` over a DataLoader of ``dataset`` (the ``reference`` backend):
    items ([K,C,H,W], label) for center/10crop, (list of [C,H,W], label) for multiscale (one
    image per batch)."""
    if crop == "multiscale":
        loader = DataLoader(dataset, batch_size=1, num_workers=workers,
                            collate_fn=_collate_views)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return evaluate_batches(model, loader, crop, device)


def evaluate_with_backend(model, dataset, backend: str, crop: str = "center",
                          batch_size: int = 64, device="cpu",
                          workers: int = 0) -> Dict[str, float]:
    """``evaluate_batches`` over ``dataset`` (from ``fastres.data.build_eval_data``) read by
    the resolved data ``backend`` (``fastres.train.common.cli_data_backend``): ``reference``
    is ``evaluate_crops``; cpu/gpu/dali build the dataset's views (its ``mode``) in their
    batched pipelines (``fastres.data.loaders.make_loader``; multiscale one image per batch,
    as the reference). A view the backend cannot build raises ``UsageError``."""
    if backend == "reference":
        return evaluate_crops(model, dataset, crop, batch_size, device, workers)
    from fastres.data.loaders import make_loader
    try:
        loader = make_loader(dataset, backend, 1 if crop == "multiscale" else batch_size,
                             device, num_workers=workers, channels_last=False,
                             log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as e:
        raise UsageError(f"--data-backend {backend} --crop {crop}: {e}") from None
    return evaluate_batches(model, loader, crop, device)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastres-eval", description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None,
                   help="data spec (default: the --data the checkpoint was trained on)")
    p.add_argument("--crop", choices=["center", "10crop", "multiscale"], default="center")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--cache-dir", default=None)
    add_data_backend_argument(p)
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, ck = model_from_checkpoint(a.checkpoint, use_ema=a.ema)
    except CheckpointError as e:
        print(f"fastres-eval: error: {e}", file=sys.stderr)
        return 2
    spec = a.data or ck["args"].get("data", "digits")
    try:
        from fastres.data import build_eval_data
        dataset, nc = build_eval_data(spec, recipe=ck["args"].get("recipe"), crop=a.crop,
                                      split=a.split, cache_dir=a.cache_dir)
    except (ImportError, ValueError, FileNotFoundError, NotADirectoryError, KeyError,
            OSError) as e:
        print(f"fastres-eval: error: --data {spec!r}: {e}", file=sys.stderr)
        return 2
    if int(nc) != int(ck["num_classes"]):
        print(f"fastres-eval: error: --data {spec!r} has {nc} classes but the checkpoint "
              f"{a.checkpoint!r} was trained for {ck['num_classes']}", file=sys.stderr)
        return 2
    try:
        backend = cli_data_backend(a.data_backend, dataset, device)
        r = evaluate_with_backend(model, dataset, backend, a.crop, a.batch_size, device,
                                  a.workers)
    except UsageError as e:
        print(f"fastres-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{ck['args'].get('model')} {a.checkpoint} on {spec} ({a.split}, {a.crop}, "
          f"{r['n']} images, data backend {backend}): top-1 error {100 * r['top1_err']:.2f}%, "
          f"top-5 error {100 * r['top5_err']:.2f}%, loss {r['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
