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
    assert data["rows"][1]["shape"] == [2, 2048, 7, 7]


def test_model_benchmark_small_cpu_run(tmp_path):
    from fastres.bench import model_benchmark

    path = tmp_path / "models.json"
    rows = model_benchmark.main(["--device", "cpu", "--models", "resnet18", "--batch-size", "2",
                                 "--image-size", "32", "--no-compile", "--warmup", "0",
                                 "--iters", "1", "--json", str(path)])
    assert [(r["model"], r["mode"]) for r in rows] == [("resnet18", "train"),
                                                       ("resnet18", "infer")]
    data = json.loads(path.read_text())
    for row in data["rows"]:
        assert set(row["results"]) == {"torchvision eager", "fastres eager"}
        assert all(ips > 0 for ips, _ in row["results"].values())
