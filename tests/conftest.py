"""Test configuration.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter,
which must be switched on before triton is imported anywhere.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (CI runs `-n 2`), each worker takes its share of the cores, so that two
# workers do not run four OpenMP threads on two cores (OMP_NUM_THREADS, if set, wins)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def _run_summary():
    """What this process ran: {"fused": {model: (fused, total)}, "fuzz": {key: n}}."""
    import sys

    fuse_models, fuzzing = sys.modules.get("test_fuse_models"), sys.modules.get("fuzzing")
    return {"fused": {m: list(v) for m, v in (fuse_models.FUSED_COUNTS.items()
                                              if fuse_models else ())},
            "fuzz": dict(fuzzing.SUMMARY) if fuzzing else {},
            "fuzz_setup": ([fuzzing.SEED, fuzzing.BN_CASES, fuzzing.CONV_CASES]
                           if fuzzing else None)}


_FROM_WORKERS = []  # the summaries the xdist workers sent back


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the summary to the controller
        workeroutput["fastres_summary"] = _run_summary()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    summary = getattr(node, "workeroutput", {}).get("fastres_summary")
    if summary:
        _FROM_WORKERS.append(summary)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many BatchNorms fuse() fused per model (tests/test_fuse_models.py) and how many cases
    the differential fuzzer (tests/test_fuzz.py) ran, per op and backend; under pytest-xdist
    summed over the workers."""
    from collections import Counter

    fused, fuzz, setup = {}, Counter(), None
    for part in [_run_summary(), *_FROM_WORKERS]:
        fused.update(part["fused"])
        fuzz.update(part["fuzz"])
        setup = setup or part["fuzz_setup"]
    if fused:
        terminalreporter.section("fastres fuse: BatchNorms fused per model")
        for model, (n, total) in sorted(fused.items()):
            terminalreporter.write_line(f"{model}: {n} of {total} BatchNorm2d fused")
    if not fuzz:
        return
    terminalreporter.section("fastres fuzz")
    seed, bn_cases, conv_cases = setup
    terminalreporter.write_line(
        f"seed {seed}; budget {bn_cases} BatchNorm cases "
        f"(FASTRES_FUZZ_CASES), {conv_cases} convolution cases "
        f"(FASTRES_FUZZ_CONV_CASES), each through every backend here")
    for key, n in sorted(fuzz.items()):
        terminalreporter.write_line(f"{key}: {n}")
