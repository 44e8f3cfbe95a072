"""Per-epoch training log: ``log.csv`` and ``log.jsonl`` in the run directory."""
import csv
import json
import math
import os
from typing import Dict, List

FIELDS = ["epoch", "iteration", "lr", "train_loss", "train_err", "val_loss", "val_err",
          "val_top5_err", "ema_val_err", "images_per_s", "epoch_time", "time"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    def __init__(self, out_dir: str, resume_epoch: int = 0):
        """``resume_epoch`` k: keep rows of epochs <= k (drops rows of an interrupted run's
        later epochs), otherwise start afresh."""
        self.csv_path = os.path.join(out_dir, "log.csv")
        self.jsonl_path = os.path.join(out_dir, "log.jsonl")
        rows = [r for r in read_jsonl(self.jsonl_path) if r.get("epoch", 0) <= resume_epoch] \
            if resume_epoch > 0 else []
        self.rows: List[Dict] = rows
        self._rewrite()

    def _rewrite(self):
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        with open(self.jsonl_path, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")

    def append(self, row: Dict) -> None:
        row = {k: _clean(row.get(k)) for k in FIELDS}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writerow(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_jsonl(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a half-written last line of a killed run
    return rows
