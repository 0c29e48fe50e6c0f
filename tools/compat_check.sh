#!/usr/bin/env bash
# Check the committed HEAD against the borrowed GPU machine's stack on a CPU machine, before spending
# device time on it:
#
#   bash tools/compat_check.sh [WORKDIR]        (default /tmp/fusedtune-compat; ~15 min on 2 cores
#                                                once the venv is there: 5 GB, made on the first run)
#
# That machine runs python 3.12 with torch 2.11 + triton 3.6 + transformers 5.17
# (/work/.library/device/KINDS.md), not the pinned dev versions. This makes a python 3.12 venv with
# those versions from PyPI (and the dev pins of the rest), installs the wheels that
# tools/device_wheels.sh carries there, clones HEAD, builds fusedtune._C for sm_90a against torch 2.11
# with the same command gpu_check.sh uses, then runs the normal tests, the Triton interpreter tests
# (triton 3.6) and the kernel report (every Triton kernel compiled ahead of time by triton 3.6 for
# sm_80/89/90, and the cubins just built). Exits non-zero if any step failed.
# Settings: COMPAT_PYTHON (an interpreter), COMPAT_TORCH, COMPAT_TRITON, COMPAT_TRANSFORMERS, COMPAT_NUMPY.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/fusedtune-compat}
TORCH_V=${COMPAT_TORCH:-2.11.0}
TRITON_V=${COMPAT_TRITON:-3.6.0}
TRANSFORMERS_V=${COMPAT_TRANSFORMERS:-5.17.0}
# triton 3.6's interpreter passes scalar arguments as 1-element arrays that range() turns into ints,
# which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"): its interpreter runs need
# an older numpy (the GPU machine's numpy 2.5 does not matter there: it runs no interpreter)
NUMPY_V=${COMPAT_NUMPY:-2.3.5}
# the GPU machine's python is 3.12: the first of these that runs (a pyenv shim may not)
BASE_PY=${COMPAT_PYTHON:-}
if [ -z "$BASE_PY" ]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    if "$c" -c "pass" 2>/dev/null; then BASE_PY=$c; break; fi
  done
fi
PY_V=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV=$WORK/venv
PY=$VENV/bin/python
mkdir -p "$WORK"
FAILED=()
step() {   # step NAME CMD...: run, log to WORK/NAME.log, remember a failure, go on
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*"
  "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 3 "$WORK/$name.log"
  echo "--- $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || FAILED+=("$name")
  return "$rc"
}

if ! "$PY" -c "import torch, triton, transformers, numpy, sys; sys.exit(0 if ['%d.%d' % sys.version_info[:2], torch.__version__.split('+')[0], triton.__version__, transformers.__version__, numpy.__version__] == sys.argv[1:6] else 1)" \
     "$PY_V" "$TORCH_V" "$TRITON_V" "$TRANSFORMERS_V" "$NUMPY_V" 2>/dev/null; then
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV" || exit 1
  # what the GPU machine's image has besides (pytest, peft, bitsandbytes, setuptools come from .whl/
  # as they do there), at the dev pins; PIP_CONSTRAINT= : this machine's pip constraints cap torch to
  # its local disk copies
  OTHERS=$(grep -E '^(safetensors|accelerate|scipy|matplotlib|tqdm|ninja|build|packaging)==' "$REPO/requirements-dev.txt")
  step venv env PIP_CONSTRAINT= "$PY" -m pip install -q --index-url https://pypi.org/simple \
    "torch==$TORCH_V" "triton==$TRITON_V" "transformers==$TRANSFORMERS_V" "numpy==$NUMPY_V" $OTHERS wheel || exit 1
fi

[ -d "$REPO/.whl" ] || bash "$REPO/tools/device_wheels.sh" > "$WORK/device_wheels.log" 2>&1 || exit 1
rm -rf "$WORK/site" "$WORK/src"
step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$REPO"/.whl/*.whl || exit 1
git clone -q "$REPO" "$WORK/src" || exit 1
ln -s ../../triton_kernels "$WORK/src/python/fusedtune/triton_kernels"   # the installed layout
export PYTHONPATH="$WORK/src/python:$WORK/site" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2}
cd "$WORK/src"
FUSEDTUNE_CUDA_ARCHS=9.0a TORCH_CUDA_ARCH_LIST=9.0a step build "$PY" setup.py build_ext --inplace || exit 1
step import "$PY" -c "import fusedtune, fusedtune.triton_kernels as t, torch, triton; from fusedtune import _ext
assert fusedtune.__file__.startswith('$WORK/src') and t.__file__.startswith('$WORK/src'), (fusedtune.__file__, t.__file__)
assert _ext.with_cuda(), _ext.info(); print(torch.__version__, triton.__version__, _ext.info())" || exit 1
# Deselected: what depends on the dev toolchain rather than on the code. The extension is built for
# 9.0a only here; triton 3.6's cuobjdump (CUDA 12.8) names sm_90a cubins "sm_90"; and whether a
# kernel spills is ptxas's call -- the kernel step below lists spills without failing on them.
step tests "$PY" -m pytest -q -p no:cacheprovider tests \
  --deselect tests/test_kernels_report.py::test_extension_has_all_targets_and_the_zo_kernel \
  --deselect tests/test_wheel.py::test_wheel_extension_has_all_cubins \
  --deselect tests/test_kernels_report.py::test_every_registered_kernel_compiles_for_its_targets_without_spills
TRITON_INTERPRET=1 step tests_interp "$PY" -m pytest -q -p no:cacheprovider -m interp tests
"$PY" -m fusedtune kernels --json "$WORK/kernels.json" > "$WORK/kernels_report.log" 2>&1
step kernels "$PY" -c '
import json, sys
from fusedtune.bench.kernels import defects
data = json.load(open(sys.argv[1]))
rows = data["rows"] if isinstance(data, dict) else data
found = [d for r in rows for d in defects(r)]
bad = [d for d in found if "spills" not in d]
print(f"{len(rows)} rows; {len(bad)} defect(s) other than spills; {len(found) - len(bad)} spilling row(s)")
print("\n".join(("DEFECT " if d in bad else "SPILL ") + d for d in found))
sys.exit(1 if bad or not rows else 0)' "$WORK/kernels.json"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "compat_check: FAILED: ${FAILED[*]} (logs in $WORK)"
  exit 1
fi
echo "compat_check: python $PY_V, torch $TORCH_V + triton $TRITON_V + transformers $TRANSFORMERS_V (numpy $NUMPY_V): all steps passed"
