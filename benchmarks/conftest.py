"""pytest configuration of the benchmark suite; settings and harness in harness.py."""
import pytest
import torch

from harness import GPU, SCALE


def pytest_report_header(config):
    where = torch.cuda.get_device_name(0) if GPU else "CPU (small sizes)"
    return f"fastres benchmarks on {where}: {SCALE}"


@pytest.fixture(autouse=True)
def _cudnn_benchmark():
    if GPU:
        torch.backends.cudnn.benchmark = True
    yield
