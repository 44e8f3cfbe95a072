"""fastres.bench.heap (keeping freed memory in the process, counting page faults) and what the
CPU suite reports of it: the faults per step of measure_side_by_side, the op table's line, the
--keep-freed-memory flag."""
import os
import subprocess
import sys
import textwrap

import pytest

from fastres.bench import cli
from fastres.bench.heap import MAX_MMAP_THRESHOLD, keep_freed_memory, minor_page_faults
from fastres.bench.model_benchmark import measure_side_by_side
from fastres.bench.report import cpu_suite_markdown

# 20 tensors of 4 MiB, each freed before the next: the faults taken for them
FAULTS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fastres.bench.heap import keep_freed_memory, minor_page_faults
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.ones(2**20)
    before = minor_page_faults()
    for _ in range(20):
        torch.ones(2**20)
    print(minor_page_faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_keep_freed_memory_stops_faulting_outputs_in_again():
    # glibc told by the environment to unmap every block of 128 KiB and more on free: each new
    # 4 MiB tensor is faulted in page by page, unless keep_freed_memory() overrides it
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    pages = 20 * 4 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["default"] > pages // 2, faults
    assert faults["keep"] < pages // 4, faults  # one or two tensors faulted in, not 20


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": MAX_MMAP_THRESHOLD + 1},
                                    {"mmap_threshold": -1}, {"trim_threshold": 2**31},
                                    {"trim_threshold": 1.5}, {"mmap_threshold": True}])
def test_keep_freed_memory_rejects_bad_thresholds(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        keep_freed_memory(**kwargs)


def test_minor_page_faults_counts_touched_pages():
    import mmap
    before = minor_page_faults()
    buf = mmap.mmap(-1, 64 * mmap.PAGESIZE)
    for i in range(0, len(buf), mmap.PAGESIZE):
        buf[i] = 1
    assert minor_page_faults() - before >= 32
    buf.close()


def test_side_by_side_reports_each_steps_faults():
    count = [0]

    def faulting():
        count[0] += 6

    ms = measure_side_by_side({"a": faulting, "b": lambda: None}, warmup=2, iters=5,
                              faults=lambda: count[0])
    assert ms["a"].minor_faults == 6 and ms["b"].minor_faults == 0
    assert ms["a"].as_dict()["minor_faults"] == 6
    # no page-fault counter on this OS: no count rather than a wrong one
    ms = measure_side_by_side({"a": faulting}, warmup=0, iters=2, faults=lambda: None)
    assert ms["a"].minor_faults is None


def _op_row(shape, faults):
    ms = {impl: {"ms": 1.0, "minor_faults": f} for impl, f in faults.items()}
    return {"op": "bn_relu", "shape": shape, "count": 1, "layout": "NCHW", "ms": ms}


def test_op_table_gives_the_mean_faults_per_step():
    rows = [_op_row([2, 64, 56, 56], {"eager": 10, "fastres:cpu": 0}),
            _op_row([2, 64, 28, 28], {"eager": 30, "fastres:cpu": 4})]
    text = cpu_suite_markdown(rows, [], {"settings": {"freed memory": "kept (mallopt)"}})
    assert "freed memory kept (mallopt)" in text
    assert "Minor page faults per op step" in text and "eager 20, fastres 2" in text
    # rows without the count (older JSON) leave the line out instead of printing a wrong mean
    rows[1]["ms"]["eager"].pop("minor_faults")
    assert "Minor page faults" not in cpu_suite_markdown(rows, [], {})


def test_keep_freed_memory_flag_needs_the_cpu_suite(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--keep-freed-memory"])
    assert "--keep-freed-memory goes with --suite cpu" in capsys.readouterr().err
    assert cli.parse_args(["--suite", "cpu", "--keep-freed-memory"]).keep_freed_memory
    assert not cli.parse_args(["--suite", "cpu"]).keep_freed_memory
