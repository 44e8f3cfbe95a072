"""Reports of a model benchmark run: markdown table, JSON and a bar chart (PNG).

Rows are the dicts of ``fastres.bench.model_benchmark.run_models``; ``meta`` describes the run
(device, versions, settings) and heads every report.
"""
import datetime
import json
import os
import platform
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["environment", "markdown_table", "write_json", "bar_chart", "cpu_suite_markdown"]


def environment(device) -> dict:
    """Device, software versions and date of a run."""
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import fastres
    env["fastres"] = fastres.__version__
    env["cpu_kernels"] = fastres.build_info().get("cpu_kernels")
    return env


def _groups(rows: List[dict]) -> Dict[Tuple[str, str], Dict[str, dict]]:
    groups: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["mode"]), {})[row["variant"]] = row
    return groups


def _ips(row: Optional[dict]) -> Optional[float]:
    return None if row is None or "error" in row else row["images_per_s"]


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _label(variant: str, rows: List[dict]) -> str:
    """The variant's name, with the conv backend its rows ran ("fastres (triton conv)")."""
    convs = list(dict.fromkeys(r["conv_backend"] for r in rows
                               if r["variant"] == variant and r.get("conv_backend")))
    return f"{variant} ({'/'.join(convs)} conv)" if convs else variant


def _cell(row: dict) -> str:
    if "error" in row:
        return f"failed ({row['error'][:60]})"
    peak = row.get("peak_gib")
    return f"{row['images_per_s']:,.0f}" + (f" ({peak:.2f})" if peak is not None else "")


def markdown_table(rows: List[dict], meta: dict) -> str:
    """One line per (model, mode): images/s (peak GiB) of each variant (the fastres ones named
    with the conv backend they ran, when the rows say), and the speed-up of fastres over
    torchvision eager and over torchvision compile."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    settings = meta.get("settings", {})
    lines = [f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
             f"CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, {meta.get('date', '')}",
             ", ".join(f"{k} {v}" for k, v in settings.items()), "",
             "| model | mode | " + " | ".join(f"{_label(v, rows)} img/s (peak GiB)"
                                              for v in variants)
             + " | fastres vs torchvision eager | fastres vs torchvision compile |",
             "|---" * (len(variants) + 4) + "|"]
    for (model, mode), by_variant in _groups(rows).items():
        fastres_ips = _ips(by_variant.get("fastres"))
        lines.append(f"| {model} | {mode} | "
                     + " | ".join(_cell(by_variant[v]) if v in by_variant else "-"
                                  for v in variants)
                     + f" | {_ratio(fastres_ips, _ips(by_variant.get('torchvision')))}"
                     + f" | {_ratio(fastres_ips, _ips(by_variant.get('torchvision compile')))} |")
    return "\n".join(lines) + "\n"


def write_json(path: str, rows: List[dict], meta: dict) -> None:
    """Write {"meta": ..., "rows": ...}; the file is replaced atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def bar_chart(path: str, rows: List[dict], meta: dict) -> None:
    """One panel per model (each with its own scale): grouped bars of images/s of each variant
    for each mode, with the speed-up of fastres over torchvision eager above the fastres bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    models = list(dict.fromkeys(model for model, _ in groups))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / max(1, len(variants))
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0, 3.6 * len(models)), 4.2),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        modes = [mode for m, mode in groups if m == model]
        for i, variant in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(modes))]
            heights = [_ips(groups[(model, mode)].get(variant)) or 0.0 for mode in modes]
            bars = ax.bar(xs, heights, width, label=_label(variant, rows))
            if variant != "fastres":
                continue
            for bar, mode in zip(bars, modes):
                by_variant = groups[(model, mode)]
                ratio = _ratio(_ips(by_variant.get("fastres")), _ips(by_variant.get("torchvision")))
                if ratio != "-":
                    ax.annotate(ratio, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("images / s")
    axes[0][0].legend(fontsize=7)
    settings = meta.get("settings", {})
    fig.suptitle(f"{meta.get('device', '')}: batch {settings.get('batch_size')}, "
                 f"{settings.get('dtype')}, {settings.get('layout')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The CPU suite (fastres.bench.model_benchmark.run_cpu_suite / run_cpu_op_suite)
# ---------------------------------------------------------------------------------------------
_OP_LABELS = {"eager": "eager", "compile": "torch.compile", "fastres:cpu": "fastres"}


def _x(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def cpu_suite_markdown(op_rows: List[dict], model_rows: List[dict], meta: dict) -> str:
    """The CPU suite as markdown: the op table (ms of forward+backward per implementation,
    speed-up of fastres over eager and over torch.compile, and a ResNet-50 total weighted by how
    often each shape occurs) and the model table (images/s per variant, speed-up of fastres
    over plain PyTorch, torchvision and torch.compile). Times are medians of side-by-side runs."""
    settings = meta.get("settings", {})
    lines = [f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
             f"fastres CPU kernels {meta.get('cpu_kernels', '?')}, {meta.get('date', '')}",
             ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    if op_rows:
        impls = list(dict.fromkeys(i for r in op_rows for i in r["ms"]))
        lines += ["Ops: fused BatchNorm(+add)+ReLU forward+backward (training mode, fp32), every "
                  "BatchNorm shape of ResNet-50; ms (median)", "",
                  "| op | shape | layout | " + " | ".join(f"{_OP_LABELS.get(i, i)} ms"
                                                         for i in impls)
                  + " | fastres vs eager | fastres vs torch.compile |",
                  "|---" * (len(impls) + 5) + "|"]
        totals: Dict[Tuple[str, str], float] = {}
        for r in op_rows:
            ms = {i: r["ms"][i]["ms"] for i in r["ms"]}
            for i, v in ms.items():
                totals[(r["layout"], i)] = totals.get((r["layout"], i), 0.0) + v * r["count"]
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | "
                         + " | ".join(f"{ms[i]:.3f}" if i in ms else "-" for i in impls)
                         + f" | {_x(ms.get('eager'), ms.get('fastres:cpu'))}"
                         + f" | {_x(ms.get('compile'), ms.get('fastres:cpu'))} |")
        for layout in dict.fromkeys(r["layout"] for r in op_rows):
            t = {i: totals.get((layout, i)) for i in impls}
            lines.append(f"| all BN layers of ResNet-50 (x count) | | {layout} | "
                         + " | ".join(f"{v:.3f}" if v else "-" for v in t.values())
                         + f" | {_x(t.get('eager'), t.get('fastres:cpu'))}"
                         + f" | {_x(t.get('compile'), t.get('fastres:cpu'))} |")
        faults = {i: [r["ms"][i].get("minor_faults") for r in op_rows if i in r["ms"]]
                  for i in impls}
        if all(f and None not in f for f in faults.values()):
            lines += ["", "Minor page faults per op step (mean over the shapes; outputs faulted "
                      "in afresh on every call where freed memory went back to the kernel): "
                      + ", ".join(f"{_OP_LABELS.get(i, i)} {sum(f) / len(f):.0f}"
                                  for i, f in faults.items())]
        lines.append("")
    if model_rows:
        variants = list(dict.fromkeys(r["variant"] for r in model_rows))
        lines += ["Models: images/s (median step), fp32; training step = forward, cross-entropy, "
                  "backward, SGD; inference = no_grad forward", "",
                  "| model | batch @ px | layout | mode | "
                  + " | ".join(f"{v} img/s" for v in variants)
                  + " | fastres vs plain | vs torchvision | vs torch.compile |",
                  "|---" * (len(variants) + 7) + "|"]
        groups: Dict[tuple, Dict[str, dict]] = {}
        for r in model_rows:
            key = (r["model"], r["batch"], r["image_size"], r["layout"], r["mode"])
            groups.setdefault(key, {})[r["variant"]] = r
        for (model, batch, size, layout, mode), by in groups.items():
            ips = {v: _ips(by.get(v)) for v in variants}
            compiled = ips.get("torchvision compile") or ips.get("plain compile")
            lines.append(f"| {model} | {batch} @ {size} | {layout} | {mode} | "
                         + " | ".join(_cell(by[v]).split(" (")[0] if v in by else "-"
                                      for v in variants)
                         + f" | {_x(ips.get('fastres'), ips.get('plain'))}"
                         + f" | {_x(ips.get('fastres'), ips.get('torchvision'))}"
                         + f" | {_x(ips.get('fastres'), compiled)} |")
        lines.append("")
    return "\n".join(lines)
