#!/usr/bin/env bash
# What a GPU machine runs, in ONE call of about 5 minutes including the install:
#
#   benchmarks/gpu_suite.sh OUT COMMIT            # on the GPU machine (no .git there: COMMIT names the code)
#   benchmarks/gpu_suite.sh --dry-run OUT [COMMIT] # anywhere, on the CPU: every part with tiny settings (CI)
#
# Parts, in priority order, each under its own time limit (and all under GPU_SUITE_SECONDS, default 300 s on a
# GPU); a part the remaining time cannot hold is SKIPPED, a failing or hanging one does not stop the rest:
#   install        pip install --no-build-isolation . (CUDA kernels for this GPU's architecture)
#   gpu tests      pytest -q -m gpu: the compiled Triton kernels, CUDA kernels, CUDA graphs
#   capture        whole-loop and one-step graphs of the CIFAR U-Net: capture time, graph memory, 100 and 1000 steps;
#                  one graph serving every chunk (benchmarks/bench_capture.py)
#   sampling       the CIFAR U-Net at n = 1 and 128, bf16 and fp32, vs eager and the whole-step torch.compile
#                  variants, and ddpm_fast + compile in the whole-loop graph (compiled only where it matters:
#                  each compile costs tens of seconds)
#   groupnorm      GroupNorm+SiLU forward/backward vs eager and torch.compile: GB/s and % of copy bandwidth
#   train          the training step, one ddpm_fast piece at a time (benchmarks/bench_train.py)
#   sample-to-dir  evaluation-run images/s of the CIFAR U-Net per batch size (benchmarks/bench_sample_to_dir.py)
#   guidance       classifier-free guidance of a class-conditional CIFAR U-Net: ddpm_fast (one 2B call, the
#                  combine in the fused step, one graph) vs the plain two-call and one-2B-call loops
#                  (benchmarks/bench_guidance.py)
# The whole CPU-side test suite runs before a GPU attempt, on the dev machine in the GPU machine's own software
# stack (benchmarks/device_stack.sh), not here. Nothing downloads (the GPU machine has no network).
#
# OUT receives 3 files (a GPU machine returns at most 8): gpu_suite.json (every part's status and results),
# gpu_suite.log (everything printed), summary.md (statuses and the tables). Exit status 1 if any part failed.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 [--dry-run] OUT COMMIT   (COMMIT: the sha of the code copied here; optional with --dry-run)" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
COMMIT=${2:-}
if [ -z "$COMMIT" ]; then
  COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null) || true
  [ -n "$COMMIT" ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] \
    && COMMIT="$COMMIT+dirty"
fi
if [ -z "$COMMIT" ]; then echo "$0: no COMMIT given and no git repository to read it from" >&2; exit 2; fi
export DDPM_FAST_GIT_COMMIT=$COMMIT   # every benchmark JSON records it (bench/common.py: provenance)
PY=${PYTHON:-python}
LOG="$OUT/gpu_suite.log"
START=$(date +%s)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/parts"
cd "$REPO" || exit 1
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( START + DEADLINE - $(date +%s) )); }

# part NAME BUDGET_S MIN_S CMD...: runs CMD (stdout+stderr to the log and to parts/NAME.out) with a limit of
# min(BUDGET_S, time left); skipped when less than MIN_S is left. Records NAME's status in parts/NAME.status.
part() {
  local name=$1 budget=$(( $2 * SCALE )) min=$3; shift 3
  local remaining limit t0 rc took status
  remaining=$(left)
  limit=$(( budget < remaining ? budget : remaining ))
  if [ "$limit" -lt "$min" ]; then
    echo "SKIPPED: ${remaining}s left, needs ${min}s" > "$SCRATCH/parts/$name.status"
    say "=== $name: SKIPPED (${remaining}s left)"; return
  fi
  say "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$SCRATCH/parts/$name.out" >> "$LOG"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then status="ok"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"; FAILED=1
  else status="FAILED rc=$rc"; FAILED=1; fi
  echo "$status (${took}s of ${limit}s)" > "$SCRATCH/parts/$name.status"
  say "=== $name: $status in ${took}s"
  # A failure's own words reach whoever reads only the console (CI), not just the log.
  [ "$status" = "ok" ] || tail -n 25 "$SCRATCH/parts/$name.out" | sed "s/^/  $name | /"
}

FAILED=0
HAS_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_GPU" != "1" ] && [ $DRY -eq 0 ]; then
  say "no CUDA GPU here: running as --dry-run (CPU, tiny settings)"; DRY=1
fi
# 300 s: the call itself, inside a 15-minute device budget that also pays the machine's start and a rerun.
DEADLINE=${GPU_SUITE_SECONDS:-$([ $DRY -eq 1 ] && echo 3600 || echo 300)}
SCALE=$([ $DRY -eq 1 ] && echo 8 || echo 1)   # budgets x8 for a dry run on 2 shared CPU cores
say "gpu_suite: commit $COMMIT, repo $REPO, out $OUT, dry_run=$DRY, $(date -u '+%Y-%m-%d %H:%M UTC'), deadline ${DEADLINE}s"
{ nvidia-smi 2>/dev/null || echo "nvidia-smi: none"; $PY -c 'import sys, torch; print(sys.version.split()[0],
"torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  $PY -c 'import triton; print("triton", triton.__version__)' 2>&1; command -v nvcc && nvcc --version | tail -1
} >> "$LOG" 2>&1

# Python runs with -P (no script directory or cwd on sys.path): the INSTALLED ddpm_fast is measured on the GPU
# (a dry run without an install uses whatever PYTHONPATH gives, e.g. the source tree).
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export DDPM_FAST_REQUIRE_EXT=1 DDPM_FAST_CUDA_ARCHS=${DDPM_FAST_CUDA_ARCHS:-${ARCH:-90}}
if [ $DRY -eq 0 ]; then
  part install 110 30 $PY -m pip install -q --no-build-isolation --no-deps .
  B=(--allow-dirty); DEV=cuda
  CAPTURE=(--device cuda --cases 1:100,1:1000,64:100)
  SAMPLING=(--device cuda --cases ddpm_cifar10:bf16:1:100,ddpm_cifar10:bf16:128:100,ddpm_cifar10:fp32:1:100,ddpm_cifar10:fp32:128:100
            --variants eager,compile-step,compile-step-ro,ddpm_fast-whole,ddpm_fast-step,ddpm_fast-whole-compile
            --compile-where compile-step-ro:bf16:1,compile-step-ro:fp32:1,compile-step:bf16:128,ddpm_fast-whole-compile:bf16:1,ddpm_fast-whole-compile:bf16:128
            --repeats 3 --warmup 0)
  GROUPNORM=(--device cuda --dtype bfloat16 --batch 64 --shapes 128x1024,256x16 --repeats 10)
  TRAIN=(--device cuda --burst 3 --repeats 3 --warmup 1)
  TO_DIR=(--mode batches --device cuda --batch-sizes 128,256 --chunks 2 --repeats 1)
  GUIDANCE=(--device cuda --cases ddpm_cifar10:bf16:64:50 --repeats 3 --warmup 0)
else
  part install 110 30 env DDPM_FAST_CUDA=OFF $PY -m pip wheel -q --no-build-isolation --no-deps -w "$SCRATCH/wheel" .
  B=(--allow-dirty --threads 1); DEV=cpu
  CAPTURE=(--dry-run)
  SAMPLING=(--device cpu --quick --cases tiny:fp32:1:3,tiny:fp32:2:3
            --variants eager,compile-step,ddpm_fast,ddpm_fast-compile
            --compile-where compile-step:fp32:1,ddpm_fast-compile:fp32:1 --compile all --repeats 2 --threads 1)
  GROUPNORM=(--device cpu --quick --threads 1)
  TRAIN=(--device cpu --quick --batch 2 --burst 1 --repeats 1 --warmup 0)
  TO_DIR=(--mode batches --device cpu --quick --threads 1)
  GUIDANCE=(--device cpu --quick --threads 1)
fi
part gpu-tests 100 30 $PY -P -m pytest -q -p no:cacheprovider -m gpu tests
part capture 50 20 $PY -P benchmarks/bench_capture.py "${CAPTURE[@]}" --allow-dirty \
  --time-budget $(( $(left) > 80 ? 35 * SCALE : 5 )) --json "$SCRATCH/capture.json"
part sampling 130 40 $PY -P -m ddpm_fast bench "${SAMPLING[@]}" --allow-dirty --out-dir "$SCRATCH/sampling" \
  --time-budget $(( $(left) > 160 ? 90 * SCALE : 20 ))
part groupnorm 45 20 $PY -P benchmarks/bench_group_norm_silu.py "${GROUPNORM[@]}" --allow-dirty \
  --json "$SCRATCH/groupnorm.json"
part train 45 20 $PY -P benchmarks/bench_train.py "${TRAIN[@]}" "${B[@]}" --out-dir "$SCRATCH/train"
part sample-to-dir 40 25 $PY -P benchmarks/bench_sample_to_dir.py "${TO_DIR[@]}" --allow-dirty \
  --out-dir "$SCRATCH/sample-to-dir"
part guidance 40 20 $PY -P benchmarks/bench_guidance.py "${GUIDANCE[@]}" --allow-dirty --json "$SCRATCH/guidance.json"

# One JSON and one summary from the parts' statuses, outputs and result files.
$PY -P - "$SCRATCH" "$OUT" "$COMMIT" "$DRY" "$(( $(date +%s) - START ))" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
scratch, out, commit, dry, seconds = sys.argv[1:]
parts = {}
for name in ("install", "gpu-tests", "capture", "sampling", "groupnorm", "train", "sample-to-dir", "guidance"):
    status_file = os.path.join(scratch, "parts", name + ".status")
    status = open(status_file).read().strip() if os.path.exists(status_file) else "not run"
    text = open(os.path.join(scratch, "parts", name + ".out"), errors="replace").read() \
        if os.path.exists(os.path.join(scratch, "parts", name + ".out")) else ""
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(scratch, name, "*.json")) +
                                                  glob.glob(os.path.join(scratch, name + ".json")))]
    parts[name] = {"status": status, "results": results, "output_tail": text[-4000:]}
doc = {"commit": commit, "dry_run": dry == "1", "seconds": int(seconds), "parts": parts}
with open(os.path.join(out, "gpu_suite.json.tmp"), "w") as f:
    json.dump(doc, f, indent=1, default=str)
os.replace(os.path.join(out, "gpu_suite.json.tmp"), os.path.join(out, "gpu_suite.json"))
lines = [f"# GPU suite: commit {commit}, {seconds} s, dry run: {dry == '1'}", ""]
lines += [f"- {name}: {p['status']}" for name, p in parts.items()]
for name, p in parts.items():
    tail = p["output_tail"].strip().splitlines()[-40:]
    if tail:
        lines += ["", f"## {name}", "", "```", *tail, "```"]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines[:2 + len(parts)]))
EOF
say "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
