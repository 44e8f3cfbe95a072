"""python -m fastres.bench / fastres-bench on CPU: table, JSON and chart; argument errors;
the report helpers (failed variants, speed-ups)."""
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from fastres.bench import cli, report


def test_cli_cpu_run_writes_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["--device", "cpu", "--models", "resnet20", "--batch-size", "2",
                   "--image-size", "32", "--iters", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| resnet20 | train |" in printed and "| resnet20 | infer |" in printed
    assert (out / "results.md").read_text() in printed
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["settings"]["batch_size"] == 2
    assert data["meta"]["torch"] and data["meta"]["date"]
    rows = data["rows"]
    assert [(r["model"], r["mode"], r["variant"]) for r in rows] == [
        ("resnet20", m, v) for m in ("train", "infer") for v in ("torchvision", "fastres")]
    for r in rows:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["ms"] > 0 and r["timer"] == "perf_counter"
        assert r["peak_gib"] is None  # not measured on a CPU
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--models", "resnet19", "--device", "cpu"])
    assert e.value.code == 2
    assert "unknown model(s) ['resnet19']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--batch-size", "0"])
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--dtype", "int8"])


def test_cli_defaults_follow_the_device():
    a = cli.parse_args(["--device", "cpu"])
    assert (a.batch_size, a.image_size, a.dtype, a.channels_last, a.compile) == (
        4, 64, "fp32", False, False)
    a = cli.parse_args(["--device", "cpu", "--channels-last", "--compile", "--dtype", "bf16",
                        "--mode", "infer", "--models", "resnet50,resnet18"])
    assert a.channels_last and a.compile and a.dtype == "bf16" and a.mode == "infer"
    assert a.models == ["resnet50", "resnet18"]


def test_module_and_console_script_entry_points():
    names = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert names.get("fastres-bench") == "fastres.bench.cli:main"
    r = subprocess.run([sys.executable, "-m", "fastres.bench", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--channels-last" in r.stdout and "--compile" in r.stdout


def test_report_speedups_and_failed_variants(tmp_path):
    rows = [
        {"model": "resnet50", "mode": "train", "variant": "torchvision", "images_per_s": 100.0,
         "peak_gib": 10.0},
        {"model": "resnet50", "mode": "train", "variant": "fastres", "images_per_s": 150.0,
         "peak_gib": 7.5},
        {"model": "resnet50", "mode": "train", "variant": "torchvision compile",
         "images_per_s": 120.0, "peak_gib": 9.0},
        {"model": "resnet50", "mode": "train", "variant": "fastres compile",
         "error": "RuntimeError: compile failed"},
    ]
    meta = {"device": "test", "torch": "x", "settings": {"batch_size": 256}}
    table = report.markdown_table(rows, meta)
    line = next(l for l in table.splitlines() if l.startswith("| resnet50"))
    assert "150 (7.50)" in line and "failed (RuntimeError: compile failed)" in line
    assert line.endswith("| 1.50x | 1.25x |")
    report.write_json(str(tmp_path / "r.json"), rows, meta)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
    report.bar_chart(str(tmp_path / "r.png"), rows, meta)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_conv_backend(tmp_path, capsys, monkeypatch):
    assert cli.parse_args(["--device", "cpu"]).conv_backend == "cudnn"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU only in the interpreter
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--device", "cpu", "--conv-backend", "triton"])
    assert e.value.code == 2 and "--conv-backend triton" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--conv-backend", "cutlass"])
    capsys.readouterr()
    out = tmp_path / "res"
    rc = cli.main(["--device", "cpu", "--models", "resnet20", "--batch-size", "2",
                   "--image-size", "16", "--iters", "1", "--warmup", "0", "--mode", "infer",
                   "--conv-backend", "auto", "--no-plot", "--out", str(out)])
    assert rc == 0
    assert "fastres (auto conv) img/s" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["settings"]["conv_backend"] == "auto"
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["fastres"]["conv_backend"] == "auto" and "error" not in rows["fastres"]
    assert "conv_backend" not in rows["torchvision"]  # the conv backend is fastres' only
