#!/usr/bin/env bash
# GPU check for a machine without internet: build fastres against the installed torch, run
# the tests (GPU tests included), the op and model benchmarks, the Triton convolution checks
# and benchmarks, the pytest-benchmark suite and a synthetic trainer throughput run. Results go
# under ${OUT:-gpu_results}/.
#
#   bash scripts/gpu_check.sh                 # every stage, in order
#   bash scripts/gpu_check.sh build gputests  # some stages (e.g. one per call when a remote
#                                             # command may only run for a few minutes)
# Stages: build, gputests (tests/test_gpu*.py), tests (the whole suite), ops (op benchmark),
# models (python -m fastres.bench), conv (Triton convolutions: tests/test_gpu_conv.py,
# benchmarks/test_bench_conv.py, ResNet-50 with conv backend triton and cudnn), suite
# (pytest benchmarks/ but test_bench_conv.py), train (synthetic run), demo.
# Every stage after build assumes fastres is built (the build is kept between calls).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
STAGES=("$@")
ALL_STAGES=(build gputests tests ops models conv suite train demo)
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
rc=0

stage_build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  $PY -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; return 1; }
  $PY -c "import fastres, torch; print(fastres.build_info(), fastres.available_backends(), torch.__version__)" \
    | tee -a "$OUT/gpu.txt"
}

stage_gputests() {  # the GPU-only tests: ops on every backend, models against torchvision
  $PY -m pytest tests/test_gpu.py tests/test_gpu_models.py -q -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log"
  return "${PIPESTATUS[0]}"
}

stage_tests() {
  $PY -m pytest tests/ -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

stage_ops() {  # ResNet-50 BatchNorm shapes, batch 256, bf16, channels_last
  $PY -m fastres.bench.op_benchmark --json "$OUT/op_bench.json" 2>&1 | tee "$OUT/op_bench.md" \
    && $PY -m fastres.bench.op_benchmark --forward-only --json "$OUT/op_bench_fwd.json" 2>&1 \
    | tee "$OUT/op_bench_fwd.md"
}

stage_models() {  # ResNet-18/50/152, batch 256, AMP bf16, channels_last, train + infer
  $PY -m fastres.bench --out "$OUT/model_bench" ${FASTRES_BENCH_ARGS:-} 2>&1 | tee "$OUT/model_bench.md"
  return "${PIPESTATUS[0]}"
}

stage_conv() {  # Triton convolutions: GPU tests; per-layer benchmark (every ResNet-50 conv
  # shape, batch 256, bf16, channels_last: cuDNN, cuDNN + BN + ReLU, Triton conv_bn); ResNet-50
  # with conv backend triton, then cudnn to compare (no torch.compile: the models stage has it)
  local status=0
  # correctness with one config per kernel (no autotuning: compiles fast); the benchmarks tune
  FASTRES_CONV_AUTOTUNE=0 $PY -m pytest tests/test_gpu_conv.py -v -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_conv_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  $PY -m pytest benchmarks/test_bench_conv.py --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT/bench_conv.json" > "$OUT/bench_conv.txt" 2>&1 || status=1
  tail -5 "$OUT/bench_conv.txt"
  for conv in triton cudnn; do
    $PY -m fastres.bench --models resnet50 --conv-backend "$conv" --no-compile \
      --out "$OUT/model_bench_conv_$conv" ${FASTRES_BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/model_bench_conv_$conv.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  return "$status"
}

stage_suite() {  # pytest-benchmark; FASTRES_BENCH_MODELS picks the model-level models; the
  # per-layer convolution benchmark runs in the conv stage
  FASTRES_BENCH_MODELS=${FASTRES_BENCH_MODELS:-resnet50} $PY -m pytest benchmarks/ \
    --ignore=benchmarks/test_bench_conv.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/benchmarks.json" 2>&1 \
    | tail -60 > "$OUT/benchmarks.txt"
  return "${PIPESTATUS[0]}"
}

stage_train() {  # trainer throughput on synthetic ImageNet-size data (fused ResNet-50)
  $PY -m fastres.train --recipe imagenet --model resnet50 --data synthetic:2560 --iterations 30 \
    --batch-size 256 --amp bf16 --channels-last --workers 8 --quiet \
    --out "$OUT/train_synthetic" 2>&1 | tail -5 | tee "$OUT/train_synthetic.txt"
  return "${PIPESTATUS[0]}"
}

stage_demo() {
  $PY -m fastres.demo --device cuda --dtype bf16 --batch-size 256 --channels 64 --size 56 2>&1 \
    | tee "$OUT/demo.txt"
}

for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" > /dev/null; then
    echo "unknown stage '$s' (${ALL_STAGES[*]})"; exit 2
  fi
  echo "== $s"
  start=$SECONDS
  "stage_$s"
  status=$?
  echo "== $s: exit $status, $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
  if [ "$status" -ne 0 ]; then
    rc=$status
    [ "$s" = build ] && exit "$rc"
  fi
done
exit "$rc"
