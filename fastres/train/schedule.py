"""Learning-rate schedules with warm-up, driven per iteration (and per epoch for plateau).

All state is plain Python (ints, floats, bools) so it goes into a ``weights_only`` checkpoint.

* ``multistep``: ``lr * gamma**k`` after the k-th milestone (milestones are iteration numbers;
  He et al. CIFAR: 32k and 48k of 64k iterations).
* ``cosine``: half-cosine from ``lr`` to ``min_lr`` over the run (after the linear warm-up).
* ``plateau``: ``lr * gamma`` whenever the validation error has not improved by ``threshold``
  (relative) for ``patience`` epochs (He et al. ImageNet: "divided by 10 when the error plateaus").

Warm-up: ``warmup_iters`` > 0 ramps linearly from ``warmup_lr`` to the scheduled lr;
``warmup_until_error`` E holds the lr at ``warmup_lr`` (default 0.01) until the running training
error drops below E (the paper's ResNet-110 trick: 0.01 until the error is below 80%).
"""
import math
from typing import List, Optional, Sequence

SCHEDULES = ("multistep", "cosine", "plateau")


class LRSchedule:
    def __init__(self, base_lr: float, kind: str = "multistep", total_iters: int = 1,
                 milestones: Sequence[int] = (), gamma: float = 0.1, warmup_iters: int = 0,
                 warmup_lr: Optional[float] = None, warmup_until_error: Optional[float] = None,
                 patience: int = 5, threshold: float = 1e-3, min_lr: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        if base_lr <= 0:
            raise ValueError(f"learning rate must be positive, got {base_lr}")
        self.base_lr = float(base_lr)
        self.kind = kind
        self.total_iters = max(1, int(total_iters))
        self.milestones: List[int] = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_until_error = warmup_until_error
        if warmup_lr is None:
            warmup_lr = 0.01 if warmup_until_error is not None else 0.1 * self.base_lr
        self.warmup_lr = float(warmup_lr)
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.min_lr = float(min_lr)
        # mutable state
        self.plateau_factor = 1.0
        self.best_val = math.inf
        self.bad_epochs = 0
        self.error_warmup_done = warmup_until_error is None

    # -- queries ---------------------------------------------------------------------------
    def scheduled_lr(self, it: int) -> float:
        """The lr at iteration ``it`` (0-based) ignoring warm-up."""
        if self.kind == "multistep":
            k = sum(1 for m in self.milestones if it >= m)
            return self.base_lr * self.gamma ** k
        if self.kind == "cosine":
            start = self.warmup_iters
            t = min(1.0, max(0, it - start) / max(1, self.total_iters - start))
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        return max(self.min_lr, self.base_lr * self.plateau_factor)

    def lr_at(self, it: int) -> float:
        lr = self.scheduled_lr(it)
        if not self.error_warmup_done:
            return self.warmup_lr
        if it < self.warmup_iters:
            return self.warmup_lr + (lr - self.warmup_lr) * it / self.warmup_iters
        return lr

    # -- updates ---------------------------------------------------------------------------
    def observe_train_error(self, running_error: float) -> None:
        """Called after each iteration with the running training error (fraction) of the epoch."""
        if not self.error_warmup_done and running_error < self.warmup_until_error:
            self.error_warmup_done = True

    def step_epoch(self, val_error: float) -> bool:
        """Called after each validation; returns True when the plateau schedule lowered the lr."""
        if self.kind != "plateau":
            return False
        if val_error < self.best_val * (1 - self.threshold):
            self.best_val = float(val_error)
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.plateau_factor *= self.gamma
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "best_val": float(self.best_val),
                "bad_epochs": self.bad_epochs, "error_warmup_done": self.error_warmup_done}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        self.best_val = float(state["best_val"])
        self.bad_epochs = int(state["bad_epochs"])
        self.error_warmup_done = bool(state["error_warmup_done"])


def resolve_milestones(milestones: Sequence[float], total_iters: int) -> List[int]:
    """Milestones given as fractions (all <= 1) are scaled to the run length; others are
    iteration numbers."""
    ms = [float(m) for m in milestones]
    if ms and all(0 < m <= 1 for m in ms):
        return [max(1, int(round(m * total_iters))) for m in ms]
    return [int(m) for m in ms]
