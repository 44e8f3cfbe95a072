"""The README's demo and the op and model benchmarks run end to end on CPU (small sizes)."""
import json

from fastres import demo
from fastres.bench import op_benchmark


def test_demo_fused_block_agrees_with_plain_block(capsys):
    assert demo.main(["--batch-size", "4", "--channels", "8", "--size", "6", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK: fused and plain blocks agree" in out


def test_op_benchmark_small_cpu_run(tmp_path):
    path = tmp_path / "bench.json"
    rows = op_benchmark.main(["--device", "cpu", "--batch-size", "2", "--max-hw", "7",
                              "--no-compile", "--reps", "1", "--warmup", "0", "--json", str(path)])
    assert [r["op"] for r in rows] == ["bn_relu", "bn_add_relu"]
    data = json.loads(path.read_text())
    assert data["rows"][0]["ms"]["fastres cpu"] > 0
    assert 0 < data["rows"][0]["bandwidth_fraction"]["unfused eager"] < 100
    assert data["copy_bandwidth_bytes_per_s"] > 0
    assert data["rows"][1]["shape"] == [2, 2048, 7, 7]


def test_run_models_small_cpu_run():
    import torch
    from fastres.bench.model_benchmark import run_models

    seen = []
    rows = run_models(["resnet18"], ["train", "infer"], ["torchvision", "fastres"],
                      batch_size=2, image_size=32, dtype=torch.float32, channels_last=True,
                      device="cpu", warmup=0, iters=1, progress=seen.append)
    assert seen == [f"resnet18 {m} {v}" for m in ("train", "infer")
                    for v in ("torchvision", "fastres")]
    assert [(r["model"], r["mode"], r["variant"]) for r in rows] == [
        tuple(s.split()) for s in seen]
    assert all("error" not in r and r["images_per_s"] > 0 for r in rows)
