"""fastres.train: He et al. (2015) training recipes for fastres models.

    fastres-train [--recipe cifar|imagenet] [--model resnet20] [--data digits] ...
    python -m fastres.train ...         # the same
    fastres-eval CHECKPOINT --data SPEC --crop center|10crop|multiscale
    fastres-plot RUN [RUN ...] --out curves.png

Programmatic use: ``fastres.train.cli.parse_args(argv)`` then ``fastres.train.train(args)``.
"""
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .trainer import TrainingDiverged, UsageError, train

__all__ = ["CheckpointError", "TrainingDiverged", "UsageError", "load_checkpoint",
           "save_atomic", "train"]
