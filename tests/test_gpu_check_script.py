"""scripts/gpu_check.sh's first-contact and second stages, run on CPU with a stand-in python
and nvidia-smi: which steps run, in which order, with which settings, that a failing step does
not stop the next ones (a failing build does), and that a call leaves at most 8 files (what
the GPU machine's tool brings back). GPU time is scarce: the script must be right before it
gets there."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r'''#!{python}
"""Stands in for python3 on a GPU machine: logs every call, answers the script's questions,
fakes builds, tests and the headline; runs fastres.bench.gpu_status for real."""
import json, os, runpy, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(os.environ.get("FASTRES_CONV_AUTOTUNE", "-") + " | " + " ".join(args) + "\n")
if args[0] == "-c":
    code = args[1]
    if "sys.exit(0 if fastres.build_info()" in code:  # built?
        sys.exit(int(os.environ.get("FAKE_NOT_BUILT", "0")))
    print("fake: " + code[:40])
    sys.exit(0)
module = args[1]
if module == "pip":
    print("fastres: building CUDA kernels (fake)")
    sys.exit(int(os.environ.get("FAKE_BUILD_FAIL", "0")))
if module == "pytest":
    target = args[2]
    if target in os.environ.get("FAKE_FAIL", "").split(","):
        print(f"FAILED {target}::test_x - AssertionError: boom")
        print("1 failed, 2 passed in 1.00s")
        sys.exit(1)
    print("3 passed, 1 skipped in 1.00s")
    sys.exit(0)
if module == "fastres.bench.first_contact":
    out = args[args.index("--out") + 1]
    name = args[args.index("--name") + 1] if "--name" in args else "first.json"
    doc = {"kind": "first-contact",
           "environment": {"date": "2026-12-01T10:00:00+00:00", "device": "NVIDIA H200",
                           "torch": "2.11.0", "triton": "3.6.0"},
           "settings": {"batch_size": 256, "image_size": 224, "dtype": "AMP bf16",
                        "layout": "channels_last", "warmup": 3, "iters": 10,
                        "conv_autotune": os.environ.get("FASTRES_CONV_AUTOTUNE", "1")},
           "copy_bandwidth": 4.3e12, "ops": [],
           "models": [{"model": "resnet50", "mode": "train", "variant": "torchvision eager",
                       "images_per_s": 1000.0, "peak_gib": 10.0, "first_step_s": 2.0},
                      {"model": "resnet50", "mode": "train", "variant": "fastres (cudnn conv)",
                       "images_per_s": 1500.0, "peak_gib": 7.0, "first_step_s": 3.0}]}
    with open(os.path.join(out, name), "w") as f:
        json.dump(doc, f)
    print("headline (fake)")
    sys.exit(0)
if module == "fastres.kernels.report":
    print("warmed Triton's cache (fake)")
    sys.exit(0)
if module == "fastres.bench.gpu_status":
    sys.argv = [module] + args[2:]
    runpy.run_module(module, run_name="__main__")
    sys.exit(0)
print("fake: unexpected call " + " ".join(args))
sys.exit(3)
'''


@pytest.fixture
def fake_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    for f in (python, smi):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    log = tmp_path / "calls.log"

    def run(stage, **env):
        full = dict(os.environ, OUT=str(out), PYTHON=str(python), FAKE_LOG=str(log),
                    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    PYTHONPATH=str(ROOT), FASTRES_GPU_CHECK_SECONDS="540", **env)
        full.pop("FASTRES_CONV_AUTOTUNE", None)
        done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), stage], env=full,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        calls = log.read_text().splitlines() if log.exists() else []
        return done, calls, out

    return run


def _stages(out: Path):
    return [line.split(":")[0][3:] for line in (out / "stages.txt").read_text().splitlines()
            if line.startswith("== ")]


def _files(out: Path):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_first_runs_every_step_in_order_within_eight_files(fake_machine):
    done, calls, out = fake_machine("first")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _stages(out) == ["build", "warm", "test_bn", "test_conv", "test_cudnn_fused", "headline",
                            "first"]
    files = _files(out)
    assert len(files) <= 8, files
    assert {"first.json", "first.md", "stages.txt", "build.log", "tests.log",
            "headline.log"} <= set(files)
    by_kind = {}
    for line in calls:
        autotune, cmd = line.split(" | ", 1)
        by_kind.setdefault(cmd.split()[1] if cmd.startswith("-m") else cmd[:2], []).append(
            (autotune, cmd))
    # the build is sm_90 on the GPU machine's own torch, no isolation, no downloads
    assert any("--no-build-isolation --no-deps" in c for _, c in by_kind["pip"])
    # the Triton convolution tests, the cache warm-up and the headline run untuned
    tests = {cmd.split()[2]: autotune for autotune, cmd in by_kind["pytest"]}
    assert tests == {"tests/test_gpu.py": "-", "tests/test_gpu_conv.py": "0",
                     "tests/test_gpu_cudnn_fused.py": "-"}
    (autotune, warm), = by_kind["fastres.kernels.report"]
    assert autotune == "0" and "--warm-cache" in warm and "--arch sm90" in warm
    (autotune, headline), = by_kind["fastres.bench.first_contact"]
    assert autotune == "0" and "--budget" in headline
    budget = int(headline.split("--budget ")[1].split()[0])
    assert 0 < budget < 540
    # the summary merged the stage times and the test counts into the one JSON
    doc = json.loads((out / "first.json").read_text())
    assert [s["stage"] for s in doc["stages"]][:6] == ["build", "warm", "test_bn", "test_conv",
                                                       "test_cudnn_fused", "headline"]
    assert doc["tests"]["tests/test_gpu.py"]["passed"] == 3
    assert doc["tests"]["tests/test_gpu_conv.py"]["skipped"] == 1
    md = (out / "first.md").read_text()
    assert "NVIDIA H200" in md and "1.50x" in md  # fastres / torchvision eager from the JSON


def test_first_goes_on_after_a_failing_step(fake_machine):
    done, calls, out = fake_machine("first", FAKE_FAIL="tests/test_gpu.py")
    assert done.returncode != 0
    assert _stages(out) == ["build", "warm", "test_bn", "test_conv", "test_cudnn_fused", "headline",
                            "first"]
    doc = json.loads((out / "first.json").read_text())
    assert doc["tests"]["tests/test_gpu.py"]["failed"] == 1
    assert doc["tests"]["tests/test_gpu.py"]["failures"] == [
        "FAILED tests/test_gpu.py::test_x - AssertionError: boom"]
    assert "test_x" in (out / "first.md").read_text()


def test_first_stops_when_the_build_fails(fake_machine):
    done, calls, out = fake_machine("first", FAKE_BUILD_FAIL="1")
    assert done.returncode != 0
    assert not any(" pytest " in f" {c} " for c in calls)
    assert _stages(out)[0] == "build"
    assert "headline" not in _stages(out)


def test_second_builds_only_when_needed(fake_machine):
    done, calls, out = fake_machine("second")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any("-m pip" in c for c in calls)
    assert _stages(out) == ["warm", "headline", "warm_conv", "bench_conv", "suite", "second"]
    assert len(_files(out)) <= 8, _files(out)
    assert any("--models resnet18,resnet152" in c for c in calls)
    done, calls, out = fake_machine("second", FAKE_NOT_BUILT="1")
    assert any("-m pip" in c for c in calls)


def test_unknown_stage_is_refused(fake_machine):
    done, _, _ = fake_machine("bogus")
    assert done.returncode == 2 and "unknown stage 'bogus'" in done.stdout
