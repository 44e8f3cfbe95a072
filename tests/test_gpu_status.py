"""The README's GPU status section is generated from the GPU runs committed under docs/gpu/
(fastres.bench.gpu_status), never typed by hand: it must be current, and the generator must
pick the newest run and render its numbers."""
import json
from pathlib import Path

import pytest

from fastres.bench import gpu_status

ROOT = Path(__file__).resolve().parents[1]


def _doc(date, device="NVIDIA H200", train_ips=(1000.0, 1480.0)):
    return {"kind": "first-contact",
            "environment": {"date": date, "device": device, "torch": "2.11.0+cu130",
                            "triton": "3.6.0", "cuda": "13.0", "cudnn": 91900,
                            "python": "3.12.3", "fastres": "0.1.0"},
            "settings": {"batch_size": 256, "image_size": 224, "dtype": "AMP bf16",
                         "layout": "channels_last", "warmup": 3, "iters": 10,
                         "conv_autotune": "0"},
            "copy_bandwidth": 4.25e12,
            "ops": [{"op": "bn_add_relu-c256-56x56", "batch": 256, "backward": True,
                     "impl": "fastres:cuda", "ms": 1.234, "bytes_per_s": 3.4e12,
                     "copy_fraction": 0.8},
                    {"op": "bn_add_relu-c256-56x56", "batch": 256, "backward": True,
                     "impl": "fastres:triton", "error": "RuntimeError: boom"}],
            "models": [{"model": "resnet50", "mode": "train", "variant": "torchvision eager",
                        "images_per_s": train_ips[0], "peak_gib": 11.0, "first_step_s": 4.2},
                       {"model": "resnet50", "mode": "train", "variant": "fastres (cudnn conv)",
                        "images_per_s": train_ips[1], "peak_gib": 7.5, "first_step_s": 6.0},
                       {"model": "resnet50", "mode": "train", "variant": "torchvision compile",
                        "skipped": "time budget (300 s) spent"}],
            "stages": [{"stage": "build", "exit": 0, "seconds": 95}],
            "tests": {"tests/test_gpu.py": {"exit": 0, "passed": 24, "failed": 0, "errors": 0,
                                            "skipped": 0, "seconds": 40, "failures": []}}}


def test_readme_gpu_status_section_is_current():
    changed = gpu_status.update_readme(str(ROOT / "README.md"), str(ROOT / "docs" / "gpu"),
                                       check=True)
    assert not changed, "README.md's GPU status section is out of date: run " \
                        "python -m fastres.bench.gpu_status readme"


def test_without_runs_the_section_says_nothing_was_measured(tmp_path):
    assert gpu_status.latest_run(str(tmp_path)) is None
    assert gpu_status.readme_section(str(tmp_path)) == gpu_status.NOTHING_YET
    assert "Nothing has been measured on a GPU yet" in gpu_status.NOTHING_YET


def test_section_renders_the_newest_run(tmp_path):
    docs = tmp_path / "docs" / "gpu"
    for folder, date, ips in (("2026-12-01-first", "2026-12-01T10:00:00+00:00", (1000.0, 1480.0)),
                              ("2026-12-09-first", "2026-12-09T10:00:00+00:00", (1000.0, 2000.0)),
                              ("2026-11-30-first", "2026-11-30T10:00:00+00:00", (1000.0, 900.0))):
        (docs / folder).mkdir(parents=True)
        (docs / folder / "first.json").write_text(json.dumps(_doc(date, train_ips=ips)))
    text = gpu_status.readme_section(str(docs))
    assert "docs/gpu/2026-12-09-first/first.json" in text
    assert "2026-12-09T10:00:00" in text and "NVIDIA H200" in text
    assert "| resnet50 | train | fastres (cudnn conv) | 2,000 | 2.00x | - | 7.50 | 6.0 |" in text
    assert "time budget (300 s) spent" in text
    assert "| 3,400 | 80% |" in text and "RuntimeError: boom" in text
    assert "Device-to-device copy: 4,250 GB/s" in text
    assert "| tests/test_gpu.py | 0 | 24 | 0 | 0 | 0 | 40 |" in text
    assert "| build | 0 | 95 |" in text


def test_update_readme_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gpu_status.BEGIN}\nold text\n{gpu_status.END}\noutro\n")
    docs = tmp_path / "docs" / "gpu"
    docs.mkdir(parents=True)
    assert gpu_status.update_readme(str(readme), str(docs), check=True)
    assert "old text" in readme.read_text()  # --check changes nothing
    assert gpu_status.update_readme(str(readme), str(docs))
    assert readme.read_text() == (f"intro\n{gpu_status.BEGIN}\n{gpu_status.NOTHING_YET}\n"
                                  f"{gpu_status.END}\noutro\n")
    assert not gpu_status.update_readme(str(readme), str(docs))


def test_update_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no GPU status markers"):
        gpu_status.update_readme(str(readme), str(tmp_path))
    assert gpu_status.main(["readme", "--readme", str(readme), "--docs", str(tmp_path)]) == 2


def test_pytest_logs_are_counted_per_file():
    log = "\n".join([
        "== pytest tests/test_gpu.py",
        "....F.s",
        "FAILED tests/test_gpu.py::test_resnet50_shapes[cuda] - AssertionError: rms",
        "1 failed, 5 passed, 1 skipped in 12.34s",
        "== pytest tests/test_gpu.py: exit 1, 13 s",
        "== pytest tests/test_gpu_conv.py",
        "ERROR tests/test_gpu_conv.py::test_layers - RuntimeError: triton",
        "===== 2 errors, 3 passed in 4.00s =====",
        "== pytest tests/test_gpu_conv.py: exit 124, 240 s",
    ])
    got = gpu_status.parse_pytest_log(log)
    assert got["tests/test_gpu.py"] == {
        "passed": 5, "failed": 1, "errors": 0, "skipped": 1, "exit": 1, "seconds": 13,
        "failures": ["FAILED tests/test_gpu.py::test_resnet50_shapes[cuda] - AssertionError: rms"]}
    conv = got["tests/test_gpu_conv.py"]
    assert (conv["errors"], conv["passed"], conv["exit"], conv["seconds"]) == (2, 3, 124, 240)


def test_first_contact_runs_end_to_end_on_cpu(tmp_path):
    """fastres.bench.first_contact in its CPU smoke mode (tiny sizes): every measurement row is
    written, with numbers, and the summary renders them; the GPU run uses the same code."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fastres.bench.first_contact", "--device", "cpu", "--dtype",
         "fp32", "--models", "resnet20", "--variants", "eager,cudnn", "--batch-size", "2",
         "--image-size", "16", "--iters", "1", "--warmup", "0", "--op-shape", "8x4",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((tmp_path / "first.json").read_text())
    assert [(r["mode"], r["variant"]) for r in doc["models"]] == [
        ("train", "torchvision eager"), ("train", "fastres (cudnn conv)"),
        ("infer", "torchvision eager"), ("infer", "fastres (cudnn conv)")]
    assert all(r["images_per_s"] > 0 and r["first_step_s"] > 0 for r in doc["models"])
    assert [(r["backward"], r["impl"]) for r in doc["ops"]] == [
        (True, "eager"), (True, "fastres:cpu"), (False, "eager"), (False, "fastres:cpu")]
    assert all(r["bytes_per_s"] > 0 and 0 < r["copy_fraction"] for r in doc["ops"])
    assert doc["copy_bandwidth"] > 0 and doc["seconds"] > 0
    assert "| resnet20 | infer | fastres (cudnn conv) |" in done.stdout
    done = subprocess.run([sys.executable, "-m", "fastres.bench.first_contact", "--device", "cpu",
                           "--variants", "eager,bogus", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--variants takes" in done.stderr
