"""fastres-plot RUN [RUN ...] --out FILE: overlay training (dashed) and validation (solid)
top-1 error curves of fastres-train runs (each RUN is a run directory holding log.jsonl, or the
log.jsonl itself), e.g. the paper's degradation figure from plain20/plain56/resnet20/resnet56."""
import argparse
import os
import sys
from typing import List, Optional, Sequence

from .metrics_log import read_jsonl


def _log_path(run: str) -> str:
    return run if run.endswith(".jsonl") else os.path.join(run, "log.jsonl")


def _label(run: str) -> str:
    run = os.path.dirname(run) if run.endswith(".jsonl") else run
    return os.path.basename(os.path.normpath(run)) or run


def plot_runs(runs: Sequence[str], out: str, x: str = "iteration",
              title: Optional[str] = None, labels: Optional[Sequence[str]] = None) -> str:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        rows = read_jsonl(_log_path(run))
        if not rows:
            raise ValueError(f"{_log_path(run)}: no log entries (not a fastres-train run?)")
        label = labels[i] if labels else _label(run)
        c = colors[i % len(colors)]
        xs = [r[x] for r in rows]
        tr = [100 * r["train_err"] if r.get("train_err") is not None else float("nan")
              for r in rows]
        va = [100 * r["val_err"] if r.get("val_err") is not None else float("nan")
              for r in rows]
        ax.plot(xs, tr, "--", color=c, label=f"{label} train")
        ax.plot(xs, va, "-", color=c, linewidth=2, label=f"{label} val")
    ax.set_xlabel("iterations" if x == "iteration" else "epochs")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastres-plot", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or log.jsonl files)")
    p.add_argument("--out", "-o", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--x", choices=["iteration", "epoch"], default="iteration",
                   help="x axis (default iteration)")
    p.add_argument("--title", default=None)
    p.add_argument("--labels", default=None, help="comma-separated legend labels")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(a.runs):
        print(f"fastres-plot: error: {len(labels)} labels for {len(a.runs)} runs", file=sys.stderr)
        return 2
    try:
        plot_runs(a.runs, a.out, a.x, a.title, labels)
    except (ValueError, OSError, KeyError) as e:
        print(f"fastres-plot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
