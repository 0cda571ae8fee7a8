#!/usr/bin/env bash
# The GPU machine's software stack, rebuilt on a CPU machine, and the whole test suite plus the GPU suite's dry
# run in it: what to run before every GPU attempt, so that version differences fail here, not on the GPU.
#
#   benchmarks/device_stack.sh [PYTEST_ARGS...]        # from the repository root
#
# The GPU machine: Python 3.12, torch 2.11.0 (+cu130), Triton 3.6.0, NumPy 2.5.2, matplotlib, pytest-benchmark,
# pytest-timeout, no diffusers, no network; it installs the project with `pip install --no-build-isolation .`.
# Here: a Python 3.12 venv (DEVSTACK_VENV, default /tmp/devstack) with the same pins from PyPI (torch's PyPI wheel
# is the CUDA build, ~3 GB with its NVIDIA libraries; it runs on the CPU), the same install command, diffusers
# absent. The first run downloads (minutes); later runs reuse the venv. DEVSTACK_SKIP_SUITE=1 skips the dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${DEVSTACK_VENV:-/tmp/devstack}
PINS=("torch==2.11.0" "triton==3.6.0" "numpy==2.5.2")
TOOLS=(setuptools wheel pybind11 cmake ninja safetensors tqdm pillow matplotlib pytest pytest-benchmark
       pytest-timeout scipy scikit-learn)

find_python312() {
  local candidate
  for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" /root/.pyenv/versions/3.12*/bin/python; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
        2>/dev/null; then echo "$candidate"; return; fi
  done
  echo "device_stack: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$(find_python312)" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "${PINS[@]}" "${TOOLS[@]}"
"$VENV/bin/python" -m pip uninstall -q -y diffusers 2>/dev/null || true   # the GPU machine has none
"$VENV/bin/python" -c "import sys, torch, triton, numpy
print('device stack: python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,
      '| numpy', numpy.__version__)"

# The GPU machine's install command (its CUDA kernels too when nvcc is here).
DDPM_FAST_REQUIRE_EXT=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --force-reinstall --no-deps .

# The whole suite against the INSTALLED package: from outside the checkout, ./ddpm_fast (sources, no _C) would
# shadow it; --rootdir keeps the repository's pytest settings and markers. The installed copy has no .git: the
# benchmarks (and their smoke tests) are told the commit it was installed from.
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT+dirty"
export DDPM_FAST_GIT_COMMIT=$COMMIT
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT
(cd "$RUN" && env -u PYTHONPATH "$VENV/bin/python" -m pytest -q -c "$REPO/pyproject.toml" --rootdir "$REPO" \
  "$REPO/tests" "$@")
(cd "$RUN" && env -u PYTHONPATH "$VENV/bin/python" -m pytest -q -c "$REPO/pyproject.toml" --rootdir "$REPO" \
  "$REPO/benchmarks" --benchmark-disable)
if [ "${DEVSTACK_SKIP_SUITE:-0}" != "1" ]; then
  env -u PYTHONPATH PATH="$VENV/bin:$PATH" PYTHON="$VENV/bin/python" benchmarks/gpu_suite.sh --dry-run "$RUN/suite" \
    "$COMMIT"
fi
echo "device stack: all passed"
