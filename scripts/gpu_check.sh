#!/usr/bin/env bash
# GPU checks for a machine without internet (the project's H200: one command may run at most
# 10 minutes, and a session has about 15 minutes of device time in all). Results go under
# ${OUT:-gpu_results}/ (at most 8 files per call), to be committed under docs/gpu/.
#
#   bash scripts/gpu_check.sh first    # first contact, one call of at most 9 minutes
#   bash scripts/gpu_check.sh second   # the rest, right after (same warm machine), <= 9 minutes
#   bash scripts/gpu_check.sh build gputests ...   # single stages, see below
#
# first:  build for sm_90 with all cores; nvidia-smi; warm Triton's cache in parallel with the
#         convolutions the headline runs; the GPU tests of the fused BatchNorm ops on every
#         backend (tests/test_gpu.py) and of the Triton convolutions (tests/test_gpu_conv.py,
#         FASTRES_CONV_AUTOTUNE=0), each file under a time limit; the headline measurement
#         (python -m fastres.bench.first_contact: ResNet-50 batch 256 bf16 channels_last,
#         torchvision eager / fastres cuDNN convs / fastres Triton convs / fastres cudnn-fused
#         convs / torchvision torch.compile, training and inference images/s, peak memory; the fused BN+add+ReLU's
#         bandwidth against a measured device copy); then first.json + first.md
#         (python -m fastres.bench.gpu_status summarize). Files: first.json, first.md,
#         stages.txt, build.log, tests.log, headline.log, cudnn_fused_support.jsonl.
# second: builds only if needed; ResNet-18/152 headline (second.json); Triton's cache warmed for
#         the autotuned ResNet-50 convolutions, then the per-layer convolution benchmark
#         (benchmarks/test_bench_conv.py, autotuned) and the pytest-benchmark suite.
#         Files: second.json, second.md, stages.txt, bench_conv.json, benchmarks.json,
#         bench.txt (+ build.log when it built).
# Every step runs even when an earlier one failed (but a failed build ends the call); each
# is timed (stages.txt) and bounded by what is left of the call's FASTRES_GPU_CHECK_SECONDS
# (default 540).
#
# Single stages (each assumes the build is there): build, gputests (tests/test_gpu*.py), tests
# (the whole suite), ops (op benchmark), models (python -m fastres.bench), conv (Triton
# convolutions: GPU tests, per-layer benchmark, ResNet-50 with each conv backend), cudnn-fused
# (cuDNN graph-API fusions: GPU tests, ResNet-50 fp16/bf16 table), suite
# (pytest benchmarks/ but test_bench_conv.py), train (synthetic run), demo, report (static
# kernel report of the installed triton).
# data (not in the default list: image-folder input pipeline, GPU data tests + data benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 8)
export MAX_JOBS=${MAX_JOBS:-$NPROC} PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + ${FASTRES_GPU_CHECK_SECONDS:-540}))
STAGES=("$@")
ALL_STAGES=(build gputests tests ops models conv cudnn-fused suite train demo report)
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
rc=0

left() { echo $((DEADLINE - SECONDS)); }

# bounded CMD...: run CMD with the time left minus a reserve ($RESERVE, default 30 s) as limit
bounded() {
  local limit=$(( $(left) - ${RESERVE:-30} ))
  if [ "$limit" -lt 10 ]; then echo "skipped (no time left): $*"; return 124; fi
  timeout --kill-after=10 "$limit" "$@"
}

build_fastres() {  # sm_90 only on a GPU machine (setup.py builds for the visible GPU)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | sed 's/^/# nvidia-smi: /' | tee -a "$OUT/stages.txt"
  $PY -c "import torch, triton; print('# torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/stages.txt"
  # the cuDNN frontend (headers only) for the cudnn-fused conv backend: no internet here, so
  # its wheel comes in the run's carried .whl/ folder (README, "cudnn-fused"); without it the
  # extension builds without that backend (fastres.build_info()['cudnn_fused_why'])
  if ls .whl/nvidia_cudnn_frontend-*.whl > /dev/null 2>&1; then
    $PY -m pip install --no-deps --no-index .whl/nvidia_cudnn_frontend-*.whl 2>&1 | tail -1
  fi
  RESERVE=60 bounded $PY -m pip install -e . --no-build-isolation --no-deps -v \
    > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; return 1; }
  grep -E "^fastres: building|ninja: build stopped|error" "$OUT/build.log" | head -5
  $PY -c "import fastres; print('# fastres', fastres.build_info(), fastres.available_backends())" \
    | tee -a "$OUT/stages.txt"
}

built() {
  $PY -c "import fastres, sys; sys.exit(0 if fastres.build_info()['cuda'] else 1)" 2>/dev/null
}

# run_pytest FILE [ARGS...]: one test file under the time left, appended to tests.log
run_pytest() {
  local file=$1; shift
  local start=$SECONDS status
  echo "== pytest $file" >> "$OUT/tests.log"
  bounded $PY -m pytest "$file" -q -rfE -p no:cacheprovider "$@" >> "$OUT/tests.log" 2>&1
  status=$?
  echo "== pytest $file: exit $status, $((SECONDS - start)) s" >> "$OUT/tests.log"
  tail -3 "$OUT/tests.log"
  return "$status"
}

warm_triton_cache() {  # compile (16 processes) what the Triton convolutions will launch
  bounded $PY -m fastres.kernels.report --warm-cache --arch sm90 --jobs "$NPROC" \
    --kernels conv "$@" 2>&1 | tail -5
}

# ---------------------------------------------------------------------------------------------
stage_first() {
  local status=0
  step build build_fastres || return 1
  FASTRES_CONV_AUTOTUNE=0 step warm warm_triton_cache --models resnet50 --dtypes bf16 \
    || status=1
  step test_bn run_pytest tests/test_gpu.py || status=1
  FASTRES_CONV_AUTOTUNE=0 step test_conv run_pytest tests/test_gpu_conv.py || status=1
  # cudnn-fused: every layer shape, models, fallbacks (at most 150 s; which layers cuDNN fused
  # goes to cudnn_fused_support.jsonl)
  FASTRES_CUDNN_FUSED_SUPPORT_LOG="$OUT/cudnn_fused_support.jsonl" \
    RESERVE=$(( $(left) - 150 )) step test_cudnn_fused run_pytest tests/test_gpu_cudnn_fused.py \
    || status=1
  FASTRES_CONV_AUTOTUNE=0 RESERVE=25 step headline bounded $PY -m fastres.bench.first_contact \
    --out "$OUT" --budget $(( $(left) - 60 )) > "$OUT/headline.log" 2>&1 || status=1
  tail -25 "$OUT/headline.log"
  $PY -m fastres.bench.gpu_status summarize "$OUT" > /dev/null || status=1
  return "$status"
}

stage_second() {
  local status=0
  if ! built; then step build build_fastres || return 1; fi
  step warm warm_triton_cache --models resnet18 --dtypes bf16 || status=1
  RESERVE=300 step headline bounded $PY -m fastres.bench.first_contact --out "$OUT" \
    --name second.json --models resnet18,resnet152 --no-ops --budget $(( $(left) - 330 )) \
    > "$OUT/bench.txt" 2>&1 || status=1
  step warm_conv warm_triton_cache --models resnet50 --dtypes bf16 || status=1
  RESERVE=150 step bench_conv bounded $PY -m pytest benchmarks/test_bench_conv.py \
    --benchmark-only -q -rs -p no:cacheprovider --benchmark-json="$OUT/bench_conv.json" \
    >> "$OUT/bench.txt" 2>&1 || status=1
  step suite bounded env FASTRES_BENCH_MODELS=resnet50 $PY -m pytest benchmarks/ \
    --ignore=benchmarks/test_bench_conv.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/benchmarks.json" >> "$OUT/bench.txt" 2>&1 || status=1
  tail -30 "$OUT/bench.txt"
  $PY -m fastres.bench.gpu_status summarize "$OUT" --name second > /dev/null || status=1
  return "$status"
}

# ---------------------------------------------------------------------------------------------
stage_build() { build_fastres; }

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

stage_cudnn-fused() {  # cuDNN graph-API fusions: GPU tests (support log), then ResNet-50 fp16
  # (cuDNN's documented type for its fused engines) and bf16, cudnn vs cudnn-fused side by side
  local status=0
  FASTRES_CUDNN_FUSED_SUPPORT_LOG="$OUT/cudnn_fused_support.jsonl" $PY -m pytest \
    tests/test_gpu_cudnn_fused.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/cudnn_fused_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  for dt in fp16 bf16; do
    $PY -m fastres.bench.first_contact --out "$OUT" --name "cudnn_fused_$dt.json" --dtype "$dt" \
      --variants cudnn,cudnn-fused,compile --no-ops 2>&1 | tail -12 | tee "$OUT/cudnn_fused_$dt.md"
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

stage_data() {  # the input pipeline (issue 17) on a generated image folder of ImageNet-like
  # JPEGs: GPU data tests, then python -m fastres.bench --data (gpu and cpu backends alone and
  # feeding a ResNet-50 bf16 training step at batch 256, against synthetic data). Files:
  # data_tests.log, data_bench/data_bench.{md,json}
  local dir=${FASTRES_DATA_DIR:-/tmp/fastres_imagefolder} status=0
  if [ ! -d "$dir/train" ]; then
    $PY -m fastres.data.make_imagefolder "$dir" --classes 16 --train-per-class 160 \
      --val-per-class 4 --size imagenet --jobs "$NPROC" || return 1
  fi
  bounded $PY -m pytest tests/test_gpu_data.py -q -rs -p no:cacheprovider \
    > "$OUT/data_tests.log" 2>&1 || status=1
  tail -3 "$OUT/data_tests.log"
  bounded $PY -m fastres.bench --data "imagefolder:$dir" --data-backend gpu,cpu \
    --workers $(( NPROC > 2 ? NPROC - 2 : 1 )) --iters 3 --data-batches 10 \
    --out "$OUT/data_bench" 2>&1 | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  return "$status"
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

stage_report() {  # the static kernel report, with this machine's triton, all cores
  $PY -m fastres.kernels.report --jobs "$NPROC" --dtypes bf16,fp16,fp32 \
    --json "$OUT/kernel_report.json" --markdown "$OUT/kernel_report.md" --quiet
}

# step NAME CMD...: run CMD, log its exit status and seconds to stages.txt
step() {
  local name=$1; shift
  local start=$SECONDS status
  echo "== $name (${SECONDS} s elapsed, $(left) s left)"
  "$@"
  status=$?
  echo "== $name: exit $status, $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
  return "$status"
}

for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" > /dev/null && [ "$s" != first ] && [ "$s" != second ]; then
    echo "unknown stage '$s' (first second ${ALL_STAGES[*]})"; exit 2
  fi
  if [ "$s" = first ] || [ "$s" = second ]; then
    "stage_$s"
    status=$?
    echo "== $s: exit $status, $SECONDS s" | tee -a "$OUT/stages.txt"
  else
    step "$s" "stage_$s"
    status=$?
  fi
  if [ "$status" -ne 0 ]; then
    rc=$status
    [ "$s" = build ] && exit "$rc"
  fi
done
exit "$rc"
