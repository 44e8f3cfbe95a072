#!/usr/bin/env bash
# One command for a GPU machine without internet: build fastres against the installed torch,
# run the whole test suite (GPU tests included), the op and model benchmarks and the
# pytest-benchmark suite and a synthetic trainer throughput run.
#   bash scripts/gpu_check.sh            # results under ${OUT:-gpu_results}/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== build"
$PY -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; exit 1; }
$PY -c "import fastres, torch; print(fastres.build_info(), fastres.available_backends(), torch.__version__)" \
  | tee -a "$OUT/gpu.txt" || exit 1

echo "== tests"
$PY -m pytest tests/ -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}

echo "== op benchmark (ResNet-50 BatchNorm shapes, batch 256, bf16, channels_last)"
$PY -m fastres.bench.op_benchmark --json "$OUT/op_bench.json" 2>&1 | tee "$OUT/op_bench.md"
$PY -m fastres.bench.op_benchmark --forward-only --json "$OUT/op_bench_fwd.json" 2>&1 | tee "$OUT/op_bench_fwd.md"

echo "== model benchmark (ResNet-18/50/152, batch 256, AMP bf16, channels_last, train + infer)"
$PY -m fastres.bench --out "$OUT/model_bench" 2>&1 | tee "$OUT/model_bench.md"

echo "== benchmark suite (pytest-benchmark; FASTRES_BENCH_MODELS=resnet50 to shorten)"
FASTRES_BENCH_MODELS=${FASTRES_BENCH_MODELS:-resnet50} $PY -m pytest benchmarks/ --benchmark-only -q \
  -p no:cacheprovider --benchmark-json "$OUT/benchmarks.json" 2>&1 | tail -40 > "$OUT/benchmarks.txt"

echo "== trainer: synthetic ImageNet-size throughput (fused ResNet-50, AMP bf16, channels_last)"
$PY -m fastres.train --recipe imagenet --model resnet50 --data synthetic:2560 --iterations 30 \
  --batch-size 256 --amp bf16 --channels-last --workers 8 --out "$OUT/train_synthetic" 2>&1 \
  | tail -5 | tee "$OUT/train_synthetic.txt"

$PY -m fastres.demo --device cuda --dtype bf16 --batch-size 256 --channels 64 --size 56 2>&1 | tee "$OUT/demo.txt"
exit "$rc"
