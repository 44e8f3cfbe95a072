"""fastres-train: train a fastres ResNet with the recipes of He et al. (2015).

With no arguments: the CIFAR recipe (fused resnet20, lr 0.1, momentum 0.9, weight decay 1e-4,
lr / 10 at 50% and 75% of the run) on the small built-in "digits" data set, scaled down so it
finishes in about a minute on an idle 2-core CPU (8 epochs of batch 64 = 184 iterations, lr
drops after iterations 92 and 138; about 93% validation accuracy).

Recipes (every value can be overridden by its flag):

  cifar     resnet20, batch 128, lr 0.1, momentum 0.9, weight decay 1e-4, multistep lr / 10 at
            32k and 48k iterations, stop at 64k (the milestones are stored as 50% and 75% of
            the run, so --epochs/--iterations rescale them; --milestones sets them explicitly,
            as iteration numbers or as fractions <= 1 of the run).
  imagenet  resnet50, batch 256, lr 0.1, momentum 0.9, weight decay 1e-4, lr / 10 when the
            validation error plateaus (--patience epochs without improvement), 120 epochs.

On small data sets ("digits", "synthetic") and when neither --epochs nor --iterations is given,
the run is DIGITS_EPOCHS (8) epochs long instead of the recipe's length, and the batch is
DIGITS_BATCH (64) unless --batch-size is given (more updates in the same time); the cifar
milestones, stored as fractions 0.5 and 0.75 of the run (= 32k and 48k of 64k), scale with it.

Distributed: run under torchrun (``torchrun --nproc_per_node=N -m fastres.train ...``);
--batch-size is the global batch, split evenly over the processes.
"""
import argparse
import os
import sys
from typing import List, Optional

RECIPES = {
    "cifar": dict(model="resnet20", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                  schedule="multistep", iterations=64000, epochs=None,
                  milestones=[0.5, 0.75], patience=5),
    "imagenet": dict(model="resnet50", batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     schedule="plateau", iterations=None, epochs=120, milestones=[30, 60, 90],
                     patience=5),
}
SMALL_DATA = ("digits", "synthetic")
DIGITS_EPOCHS = 8
DIGITS_BATCH = 64


def _floats(s: str) -> List[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


def _nonneg_float(s):
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _pos_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .common import add_data_backend_argument

    p = argparse.ArgumentParser(prog="fastres-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="cifar",
                   help="hyper-parameter preset (default cifar)")
    g.add_argument("--model", default=None,
                   help="timm:NAME (a timm model, fused by fastres.fuse) or any "
                        "fastres.models.list_models() name (recipe default: resnet20 / "
                        "resnet50)")
    g.add_argument("--fused", dest="fused", action="store_true", default=True,
                   help="fastres fused BatchNorm kernels (default)")
    g.add_argument("--no-fused", dest="fused", action="store_false",
                   help="plain-PyTorch reference modules")
    g.add_argument("--data", default="digits",
                   help="data spec for fastres.data.build_data: digits (default), "
                        "cifar10:PATH, imagefolder:PATH, synthetic[:N]")
    g.add_argument("--cache-dir", default=None, help="data cache directory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_pos_int, default=None)
    g.add_argument("--iterations", type=_pos_int, default=None,
                   help="total iterations (takes precedence over --epochs)")
    g.add_argument("--batch-size", type=_pos_int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-scale-batch", action="store_true",
                   help="linear scaling: lr * batch-size / 256")
    g.add_argument("--momentum", type=_nonneg_float, default=None)
    g.add_argument("--weight-decay", type=_nonneg_float, default=None)
    g.add_argument("--schedule", choices=["multistep", "cosine", "plateau"], default=None)
    g.add_argument("--milestones", type=_floats, default=None,
                   help="comma-separated lr-drop iterations, or fractions <= 1 of the run")
    g.add_argument("--gamma", type=float, default=0.1, help="lr drop factor (default 0.1)")
    g.add_argument("--patience", type=int, default=None,
                   help="plateau schedule: epochs without improvement before a drop")
    g.add_argument("--warmup-iters", type=int, default=0,
                   help="linear warm-up from --warmup-lr over this many iterations")
    g.add_argument("--warmup-lr", type=float, default=None,
                   help="warm-up starting lr (default 0.1*lr, or 0.01 with "
                        "--warmup-until-error)")
    g.add_argument("--warmup-until-error", type=float, nargs="?", const=0.8, default=None,
                   metavar="ERR", help="He et al.'s ResNet-110 trick: keep lr at --warmup-lr "
                   "(0.01) until the training error is below ERR (default 0.8 = 80%%)")
    g.add_argument("--label-smoothing", type=_nonneg_float, default=0.0)
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default 0 on CPU, 4 with CUDA)")
    add_data_backend_argument(g)
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision (fp16 uses a GradScaler)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true",
                   help="synchronised BatchNorm across processes (torchrun)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-reproducible runs and resumes on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="run directory for logs, checkpoints, curves.png "
                        "(default runs/<model>-<timestamp>)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; auto = OUT/last.pt if present")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs as if interrupted (resume later)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--no-shuffle", action="store_true", help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill unset values from the recipe and check them."""
    import fastres.models

    recipe = RECIPES[args.recipe]
    explicit_len = args.epochs is not None or args.iterations is not None
    small = args.data.split(":", 1)[0] in SMALL_DATA
    if small and args.batch_size is None and not explicit_len:
        args.batch_size = DIGITS_BATCH
    for k, v in recipe.items():
        if k in ("epochs", "iterations"):
            continue
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not explicit_len:
        if small:
            args.epochs = DIGITS_EPOCHS
        else:
            args.epochs, args.iterations = recipe["epochs"], recipe["iterations"]
    names = fastres.models.list_models()
    if args.model.startswith("timm:"):
        from fastres.models.external import check_timm_name
        try:
            check_timm_name(args.model)
        except (ImportError, ValueError) as e:
            parser.error(f"--model {args.model}: {e}")
    elif args.model not in names:
        parser.error(f"unknown model {args.model!r}; choose one of: {', '.join(names)} "
                     f"(or timm:NAME, a timm model fused by fastres.fuse)")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.workers is None:
        args.workers = 4 if (args.device or "").startswith("cuda") or (
            args.device is None and _cuda()) else 0
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.ema is not None and not 0 < args.ema < 1:
        parser.error(f"--ema DECAY must be in (0, 1), got {args.ema}")
    if args.warmup_until_error is not None and not 0 < args.warmup_until_error <= 1:
        parser.error("--warmup-until-error must be a fraction in (0, 1], e.g. 0.8")
    if args.warmup_iters < 0:
        parser.error("--warmup-iters must be >= 0")
    return args


def _cuda():
    import torch
    return torch.cuda.is_available()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    return resolve(parser.parse_args(argv), parser)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    from .checkpoint import CheckpointError
    from .trainer import TrainingDiverged, UsageError, train
    try:
        train(args)
    except (UsageError, CheckpointError) as e:
        print(f"fastres-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"fastres-train: error: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("fastres-train: interrupted; continue with --resume auto --out "
              f"{args.out}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
