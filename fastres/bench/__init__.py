"""Benchmark helpers. `python -m fastres.bench.op_benchmark` times the fused ops."""
