#!/usr/bin/env bash
# Developer entry point; the README's two quick-start commands are `bash tools/dev.sh demo` and
# `bash tools/dev.sh test`. Installs what is missing (pinned torch, the package in editable mode),
# builds fusedtune._C in place for FUSEDTUNE_CUDA_ARCHS (default 8.0;8.9;9.0a), then:
#   demo   python -m fusedtune demo (extra arguments are passed on)
#   test   the test suite: normal run, Triton interpreter run, kernel report
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
# torch picks CUDA archs from the GPUs unless told; a GPU-less build machine must tell it.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.9;9.0}

setup() {
  if ! $PY -c "import torch, pytest, xdist, transformers, scipy, ninja, accelerate, peft, bitsandbytes" 2>/dev/null || [ "${FUSEDTUNE_REINSTALL:-0}" = 1 ]; then
    $PY -m pip install -q -r requirements-dev.txt
  fi
  # Editable install of the Python package alone (seconds), then fusedtune._C built in place. The
  # objects stay in build/temp.*, so later builds -- and the wheel test's -- recompile only what changed
  # (pip's own editable build compiles into a throw-away folder, and the wheel test compiled it all again).
  local root=$PWD   # (expanded here: inside the subshell below $PWD is /tmp)
  if ! (cd /tmp && $PY -c "import os, sys, fusedtune; sys.exit(os.path.realpath(fusedtune.__file__) != os.path.realpath(sys.argv[1]))" \
        "$root/python/fusedtune/__init__.py") 2>/dev/null || [ "${FUSEDTUNE_REINSTALL:-0}" = 1 ]; then
    FUSEDTUNE_SKIP_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
  fi
  if [ "${FUSEDTUNE_SKIP_CUDA:-0}" != 1 ]; then
    $PY setup.py -q build_ext --inplace   # fusedtune._C, incremental
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  demo|test) setup ;;
  *) echo "usage: bash tools/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
case "$cmd" in
  demo)
    exec $PY -m fusedtune demo "$@" ;;
  test)
    $PY -m fusedtune doctor
    echo "== tests (normal run)"
    $PY -m pytest -q --durations=15 "$@"
    echo "== tests (Triton interpreter run)"
    # Interpreted kernels are single-threaded Python: two pytest-xdist workers take about 2/3 of the time
    # (measured 311 s -> 204 s on 2 cores). The normal run stays serial: its longest test (the kernel
    # report) already compiles in worker processes, and xdist measured no faster there.
    TRITON_INTERPRET=1 $PY -m pytest -q -m interp -n "${FUSEDTUNE_TEST_WORKERS:-2}" "$@"
    echo "== kernel report"
    $PY -m fusedtune kernels ;;
  *)
    echo "usage: bash tools/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
