"""Benchmarks of fastres against eager PyTorch and torch.compile.

    python -m fastres.bench                 # whole models (also: fastres-bench); cli.py
    python -m fastres.bench.op_benchmark    # the fused BatchNorm ops on ResNet-50 shapes
    pytest benchmarks/ --benchmark-only     # ops, blocks and models with pytest-benchmark

timing.py measures (CUDA events, peak memory, copy bandwidth), workloads.py builds what is
timed, model_benchmark.py runs the model comparison, report.py writes table, JSON and chart.
"""
