#!/usr/bin/env bash
# The one script to run on a GPU machine: install, GPU tests, then a trimmed matrix of every benchmark (sampling,
# training step, fused ops), all under ~8 minutes on one H100/H200, everything written under OUTDIR.
#
#   benchmarks/gpu_suite.sh [OUTDIR]          # default OUTDIR: benchmarks/results/
#   benchmarks/gpu_suite.sh --dry-run [OUTDIR] # on a machine without a GPU: every part with tiny CPU settings
#
# Without a GPU it runs as --dry-run by itself: the same parts, same commands, on the CPU with tiny settings and
# no install (a wheel is built into a temp dir instead), so a GPU run cannot fail on a typo.
# Each part has a time budget enforced with `timeout` (and a global deadline, GPU_SUITE_SECONDS, default 450 s),
# so one hang cannot eat the machine; parts run in priority order (a part the deadline leaves no time for is
# listed as SKIPPED); a failing part does not stop the others; the exit status is 1 when any part failed or
# timed out. OUTDIR receives at most 7 files: gpu_suite.log, the sampling JSON and PNG
# (<device>-<date>.*), train-<device>-<date>.json, group_norm_silu-cuda.json, diffusion_ops-cuda.json.
# The machine has no network: nothing here downloads (pip install --no-build-isolation --no-deps).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$REPO/benchmarks/results}" && cd "${1:-$REPO/benchmarks/results}" && pwd)
PY=${PYTHON:-python}
LOG="$OUT/gpu_suite.log"
START=$(date +%s)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
declare -a SUMMARY=()
FAILED=0
cd "$REPO" || exit 1
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# part NAME BUDGET_S CMD...: runs CMD with a timeout of min(BUDGET_S, time left before the deadline).
# Python runs with -P (no cwd on sys.path) so the INSTALLED ddpm_fast is imported, not the source tree's.
part() {
  local name=$1 budget=$(( $2 * SCALE )); shift 2
  local left=$(( START + DEADLINE - $(date +%s) ))
  local limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 15 ]; then
    SUMMARY+=("$name: SKIPPED (deadline)"); say "=== $name: skipped, ${left}s left"; return
  fi
  say "=== $name (limit ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then SUMMARY+=("$name: ok (${took}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then SUMMARY+=("$name: TIMED OUT after ${took}s"); FAILED=1
  else SUMMARY+=("$name: FAILED rc=$rc (${took}s)"); FAILED=1; fi
  say "=== $name: rc=$rc in ${took}s"
}

left() { echo $(( START + DEADLINE - $(date +%s) )); }

HAS_GPU=$($PY -P -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_GPU" != "1" ] && [ $DRY -eq 0 ]; then
  say "no CUDA GPU found: running as --dry-run (CPU, tiny settings, no install)"; DRY=1
fi
# 450 s leaves the machine's start-up and the file transfer inside 8 minutes; a CPU dry run is slower, not shorter.
DEADLINE=${GPU_SUITE_SECONDS:-$([ $DRY -eq 1 ] && echo 2400 || echo 450)}
SCALE=$([ $DRY -eq 1 ] && echo 6 || echo 1)   # part budgets x6 on 2 CPU cores
say "gpu_suite: repo $REPO, out $OUT, dry_run=$DRY, $(date -u '+%Y-%m-%d %H:%M UTC'), deadline ${DEADLINE}s"
part "environment" 60 bash -c "nvidia-smi 2>/dev/null || echo 'nvidia-smi: none'; $PY -P -c 'import sys, torch; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())'; \
$PY -P -c 'import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -2; true"

# ---- 1. install (GPU) / build a wheel without installing (dry run) ----
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export DDPM_FAST_REQUIRE_EXT=1 DDPM_FAST_CUDA_ARCHS=${DDPM_FAST_CUDA_ARCHS:-${ARCH:-90}}
if [ $DRY -eq 0 ]; then
  part "install" 240 $PY -m pip install --no-build-isolation --no-deps .
else
  part "build wheel (dry run: not installed)" 300 env DDPM_FAST_CUDA=OFF \
    $PY -m pip wheel --no-build-isolation --no-deps -q -w "$SCRATCH/wheel" .
fi
part "import check" 60 bash -c "cd '$SCRATCH' && $PY -P -c 'import ddpm_fast, ddpm_fast._C as C; \
print(\"ddpm_fast from\", ddpm_fast.__file__, \"| _C with_cuda =\", C.with_cuda)'"

# ---- 2. GPU tests (Triton compiled, not interpreted) ----
# benchmarks/ holds GPU cases too, but its suites need pytest-benchmark (absent on some GPU machines).
BENCH_TESTS=$($PY -P -c "import pytest_benchmark" 2>/dev/null && echo "benchmarks --benchmark-disable")
[ -z "$BENCH_TESTS" ] && say "pytest-benchmark is not installed: GPU cases under benchmarks/ are not run"
part "GPU tests" 120 env DDPM_FAST_TEST_GPU_TRITON=1 $PY -P -m pytest -q -m gpu tests $BENCH_TESTS

# ---- 3. benchmarks ----
if [ $DRY -eq 0 ]; then
  DEV=cuda; Q=(); TH=()
  # The documented targets first: CIFAR U-Net, 100 steps, bf16 at batch 1 / 128 / 512; then fp32 and batch 16 while
  # the time budget lasts. torch.compile: reduce-overhead only (the faster mode at small batch), at 1 and 128.
  CASES=ddpm_cifar10:bf16:1:100,ddpm_cifar10:bf16:128:100,ddpm_cifar10:bf16:512:100,ddpm_cifar10:fp32:1:100
  CASES=$CASES,ddpm_cifar10:fp32:128:100,ddpm_cifar10:bf16:16:100
  SAMPLING=(--cases "$CASES" --variants eager,compile-ro,ddpm_fast-whole,ddpm_fast-step
            --compile-batches 1,128 --warmup 0)
  PROFILED=eager,ddpm_fast-step
  PROFILE=(--cases ddpm_cifar10:bf16:128:10 --variants "$PROFILED" --compile none)
else
  DEV=cpu; Q=(--quick); TH=(--threads 1)
  SAMPLING=(--cases tiny:fp32:1:3,tiny:fp32:2:3 --compile all --compile-batches 1
            --variants eager,compile,compile-ro,ddpm_fast)
  PROFILED=eager,ddpm_fast
  PROFILE=(--cases tiny:fp32:2:3 --variants "$PROFILED" --compile none)
fi
SAMPLE_LIMIT=$(( $(left) < 210 * SCALE ? $(left) : 210 * SCALE ))
# Cases not started within (limit - 80 s) are skipped, so the case in flight can finish inside the limit.
part "sampling benchmark" 210 $PY -P -m ddpm_fast bench --device $DEV "${SAMPLING[@]}" \
  --repeats 5 --out-dir "$OUT" --time-budget $(( SAMPLE_LIMIT > 110 ? SAMPLE_LIMIT - 80 : 30 )) "${TH[@]}" "${Q[@]}"
SAMPLING_JSON=$(ls -t "$OUT"/*.json 2>/dev/null | grep -v -e '/train-' -e '/diffusion_ops-' -e '/group_norm_silu-' \
  | head -1)
part "plot" 30 $PY -P benchmarks/plot.py "${SAMPLING_JSON:-no sampling JSON was written}"
part "training-step benchmark" 75 $PY -P benchmarks/bench_train.py --device $DEV --out-dir "$OUT" "${TH[@]}" "${Q[@]}"
part "sampling profile" 45 $PY -P -m ddpm_fast bench --device $DEV "${PROFILE[@]}" --repeats 1 \
  --profile "$PROFILED" --out-dir "$SCRATCH/profile" "${TH[@]}"
part "reverse-step benchmark" 40 $PY -P benchmarks/bench_diffusion_ops.py --device $DEV \
  --out "$OUT/diffusion_ops-$DEV.json" "${Q[@]}"
part "GroupNorm+SiLU benchmark" 75 $PY -P benchmarks/bench_group_norm_silu.py --device $DEV \
  --json "$OUT/group_norm_silu-$DEV.json" "${TH[@]}" "${Q[@]}"

# ---- 4. the whole test suite, if time is left (CPU paths, Triton interpreted) ----
if [ $DRY -eq 0 ] && [ "$(left)" -gt 90 ]; then
  part "whole test suite" $(( $(left) - 10 )) $PY -P -m pytest -q -p no:cacheprovider tests
else
  SUMMARY+=("whole test suite: not run ($([ $DRY -eq 1 ] && echo 'dry run' || echo "$(left)s left"))")
fi

say ""
say "=== summary ($(( $(date +%s) - START ))s, dry_run=$DRY)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
say "files in $OUT:"; ls -la "$OUT" | tee -a "$LOG"
exit $FAILED
