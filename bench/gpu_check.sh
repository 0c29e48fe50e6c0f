#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and no network:
#
#   bash bench/gpu_check.sh OUTDIR
#
# Uses the python/torch/triton already installed there (no pip download): prints the environment,
# builds fusedtune._C in place for the local GPU plus sm_90a, runs the GPU tests, the kernel report
# and every benchmark, and writes logs, kernels.json and the benchmark CSV/PNG files to OUTDIR.
# Every step has a time limit (all of them together 565 s); what a step leaves unused is added to the
# next step's limit. A deadline caps them all: no step runs past GPU_CHECK_DEADLINE seconds (default 565)
# from the script's start, and a step with under 5 s left is skipped, so the script ends, archive
# written, inside a device call's timeout (run it with a timeout_s of 600). A failed step is logged and
# the script goes on; it exits non-zero at the end if any step failed. Benchmarks append each section's
# rows as it ends, so a step stopped at its limit keeps what it measured. After every step OUTDIR/all.tgz
# (every log, CSV, PNG and kernels.json; not the extension) and summary.txt are rewritten, and copied to
# GPU_CHECK_SNAPSHOT when set (the device's $OUT: what a killed call leaves still comes back).
# Copy OUTDIR/*.csv to bench/results/.
#
# Environment: PYTHON (interpreter), FUSEDTUNE_CUDA_ARCHS (default: local arch + 9.0a), MAX_JOBS
# (default 16), GPU_CHECK_SKIP_BUILD=1 (keep the extension as built), GPU_CHECK_DEADLINE,
# GPU_CHECK_SNAPSHOT, FUSEDTUNE_COMMIT (the commit the rows name; pass it where the machine's copy of .git
# may be stale). A later, narrower call (with the
# extension and Triton cache of an earlier one carried back) sets GPU_CHECK_TESTS (pytest arguments run
# instead of every family's GPU tests, no warm-ups, no kernel report or sanitizer), GPU_CHECK_BENCHES (FAMILY [--quick], ';' between,
# instead of every benchmark; none: no benchmark) and GPU_CHECK_PROFILE=1 (bench/host_profile.py: where host time per call goes).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SNAP=${GPU_CHECK_SNAPSHOT:-}
if [ -n "$SNAP" ]; then mkdir -p "$SNAP" && SNAP=$(cd "$SNAP" && pwd); fi   # (resolved before the cd)
cd "$REPO"
PY=${PYTHON:-$(command -v python || command -v python3)}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=()
SKIPPED=()
T0=$SECONDS
BANK=0   # seconds the steps so far left unused, given to the next step
DEADLINE=${GPU_CHECK_DEADLINE:-565}
ARCHIVE_S=8   # kept back from the deadline for the last archive

# snapshot: OUT/all.tgz and summary.txt as they stand (and a copy in GPU_CHECK_SNAPSHOT), written whole
# then renamed, so a call killed at any point leaves the last complete one
snapshot() {
  local rc=0
  # (tar exits 1 when a file changed while read, e.g. a log still written: the archive is still whole)
  tar czf "$OUT/.all.tgz.part" -C "$OUT" --warning=no-file-changed --exclude='./_C*.so' --exclude='./.all.tgz.part' \
    --exclude='./.summary.txt.part' --exclude='./all.tgz' . 2>/dev/null || rc=$?
  if [ "$rc" -le 1 ]; then mv -f "$OUT/.all.tgz.part" "$OUT/all.tgz" || true; else rm -f "$OUT/.all.tgz.part"; fi
  if [ -n "$SNAP" ] && [ "$SNAP" != "$OUT" ]; then   # (|| true: a failed copy must not stop the script, set -e)
    { cp "$OUT/all.tgz" "$SNAP/.all.tgz.part" && mv -f "$SNAP/.all.tgz.part" "$SNAP/all.tgz"; } 2>/dev/null || true
    { cp "$SUMMARY" "$SNAP/.summary.txt.part" && mv -f "$SNAP/.summary.txt.part" "$SNAP/summary.txt"; } 2>/dev/null || true
  fi
  return 0
}

# unfail NAME: a step's failure that turned out not to be one (a fallback worked, a tool refused the machine)
unfail() {
  local keep=() f
  for f in "${FAILED[@]+"${FAILED[@]}"}"; do [ "$f" = "$1" ] || keep+=("$f"); done
  FAILED=("${keep[@]+"${keep[@]}"}")
}

# skip_step NAME WHY CMD...: reported in the summary, counted at the end, not a failure of the code
skip_step() {
  local name=$1 why=$2
  shift 2
  SKIPPED+=("$name")
  printf '%-10s %-28s %4ss  %s\n' "$name" "SKIPPED ($why)" 0 "$*" | tee -a "$SUMMARY"
  snapshot
}

# step_limit BASE_S: BASE_S + BANK, capped by what is left before the deadline (may be <= 0)
step_limit() {
  local limit=$(( $1 + BANK )) left=$(( DEADLINE - ARCHIVE_S - (SECONDS - T0) ))
  [ "$limit" -le "$left" ] || limit=$left
  echo "$limit"
}

# run_step NAME TIMEOUT_S CMD...  -> output on the terminal and in OUT/NAME.log; never stops the script.
# The step may run step_limit TIMEOUT_S seconds; what it leaves of that becomes the new BANK. A step with
# under 5 s before the deadline is skipped (reported, not a failure of the code).
run_step() {
  local name=$1 limit rc start=$SECONDS status
  limit=$(step_limit "$2")
  shift 2
  if [ "$limit" -lt 5 ]; then
    skip_step "$name" "deadline ${DEADLINE}s" "$@"
    return 0
  fi
  echo
  echo "=== $name (limit ${limit}s): $*"
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAILED+=("$name")
  BANK=$(( limit - (SECONDS - start) )); [ "$BANK" -gt 0 ] || BANK=0
  printf '%-10s %-28s %4ss  %s\n' "$name" "$status" "$((SECONDS - start))" "$*" | tee -a "$SUMMARY"
  snapshot
  return "$rc"
}

# ---------------------------------------------------------------- carried wheels
# tools/device_wheels.sh puts pytest, peft and bitsandbytes in .whl/ for a machine that lacks them;
# they go to a private folder ahead of the installed packages (no network, no resolver).
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d)/site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
       "$REPO"/.whl/*.whl > "$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: carried wheels installed in $SITE: $(cd "$REPO/.whl" && echo *.whl)" | tee -a "$SUMMARY"
  else
    echo "wheels     FAILED: the carried wheels did not install (see wheels.log)" | tee -a "$SUMMARY"
    FAILED+=("wheels")
  fi
fi

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "repo: $REPO  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi || echo "nvidia-smi: not found or no answer in 30 s"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  timeout 90 "$PY" - <<'EOF'
import sys, platform
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(), "capability %d.%d" % torch.cuda.get_device_capability())
except Exception as e:
    print("torch: not importable:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for m in ("pytest", "ninja", "matplotlib", "numpy", "scipy", "transformers", "peft", "bitsandbytes"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception:
        print(m, "MISSING")
EOF
} 2>&1 | tee "$OUT/env.log"
snapshot   # (the probes above are time-limited: a wedged GPU still leaves env.log in the archive)

CAP=${GPU_CHECK_CAP:-}   # (set only to test this script on a machine without a GPU)
[ -n "$CAP" ] || CAP=$(timeout 90 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability()) if torch.cuda.is_available() else print('')" 2>/dev/null || true)
if [ -z "$CAP" ]; then
  echo "gpu_check: torch sees no CUDA GPU here; this script is for a GPU machine" | tee -a "$SUMMARY"
  exit 1
fi
# the local arch plus sm_90a (an H100 needs only 9.0a: its sm_90a cubin is the fast one)
if [ "$CAP" = "9.0" ]; then ARCHS="9.0a"; else ARCHS="$CAP;9.0a"; fi
export FUSEDTUNE_CUDA_ARCHS=${FUSEDTUNE_CUDA_ARCHS:-$ARCHS}
export MAX_JOBS=${MAX_JOBS:-16}
# The commit the CSV rows and logs name. A copy of the working tree can carry an older .git than its files
# (a device machine's copy once named the session's first commit for a tree three commits later): a tree
# whose tracked files differ from HEAD is recorded as HEAD+modified, and said so.
if [ -z "${FUSEDTUNE_COMMIT:-}" ]; then
  FUSEDTUNE_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$FUSEDTUNE_COMMIT" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "gpu_check: tracked files differ from commit $FUSEDTUNE_COMMIT: recorded as $FUSEDTUNE_COMMIT+modified" \
      "(set FUSEDTUNE_COMMIT to name the code)" | tee -a "$SUMMARY"
    FUSEDTUNE_COMMIT="$FUSEDTUNE_COMMIT+modified"
  fi
fi
export FUSEDTUNE_COMMIT
export MPLBACKEND=Agg PYTHONUNBUFFERED=1   # unbuffered: a step stopped at its limit keeps its last lines

# ---------------------------------------------------------------- build (limit 80 s in all)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
BUILD_T0=$SECONDS
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "gpu_check: GPU_CHECK_SKIP_BUILD=1: using the extension as it is" | tee -a "$SUMMARY"
elif ! run_step build 80 "$PY" setup.py build_ext --inplace; then
  left=$((80 - (SECONDS - BUILD_T0)))
  [ "$left" -lt 30 ] && left=30
  BANK=0   # the fallback's limit is what the build left of its 80 s
  echo "gpu_check: in-place build failed; trying pip install --no-build-isolation --no-deps -e ."
  if run_step build_pip "$left" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    unfail build   # the fallback worked: the in-place failure stays in build.log only
  fi
fi

# How to import this checkout: PYTHONPATH=python when fusedtune and its triton_kernels both come from here, an
# editable install of this checkout, else a staged copy laid out as a wheel installs it.
CHECK='import os, sys, fusedtune, fusedtune.triton_kernels.registry as r; here = os.path.realpath(sys.argv[1]); sys.exit(0 if all(os.path.realpath(m.__file__).startswith(here) for m in (fusedtune, r)) else 3)'
if PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" timeout 90 "$PY" -c "$CHECK" "$REPO" 2>/dev/null; then
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: importing fusedtune from $REPO/python"
elif timeout 90 "$PY" -c "$CHECK" "$REPO" 2>/dev/null; then
  echo "gpu_check: importing fusedtune from the editable install of $REPO"
else
  STAGE=$(mktemp -d)/stage
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  cp -r "$REPO/python/fusedtune" "$STAGE/fusedtune"
  rm -rf "$STAGE/fusedtune/triton_kernels" && cp -r "$REPO/triton_kernels" "$STAGE/fusedtune/triton_kernels"
  export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: importing fusedtune from a staged copy in $STAGE (python/fusedtune + triton_kernels)"
fi
timeout 90 "$PY" -c "import fusedtune, json; from fusedtune import _ext; print('fusedtune', fusedtune.__file__); print(json.dumps(_ext.info(), indent=1))" 2>&1 | tee -a "$OUT/build.log" || true

# the extension as built, for a later call to carry back (GPU_CHECK_SKIP_BUILD=1 skips the build)
cp "$REPO"/python/fusedtune/_C*.so "$OUT/" 2>/dev/null || true
if ! timeout 90 "$PY" -c "import sys, fusedtune._ext as e; sys.exit(0 if e.with_cuda() else 1)"; then
  echo "build  FAILED: fusedtune._C has no CUDA kernels (CPU-only build or not loadable; see build.log)" | tee -a "$SUMMARY"
  FAILED+=("build_cuda")
fi
run_step doctor 15 "$PY" -m fusedtune doctor || true
# fusedtune's fast Triton launch (triton_kernels/launch.py) first, alone: if it launches wrong here, every
# later step runs with Triton's own launch path instead, and the summary says so
if "$PY" -c "import pytest" 2>/dev/null && ! run_step fast_launch 10 "$PY" -m pytest -q -p no:cacheprovider \
     tests/test_triton_launch_gpu.py -k computes_what_triton; then
  export FUSEDTUNE_FAST_LAUNCH=0
  echo "fast_launch: FAILED -- the remaining steps run with FUSEDTUNE_FAST_LAUNCH=0" | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- GPU tests
# Every family at once, each in its own process: the tests' time goes mostly to compiling Triton
# kernels on the CPU (16 cores there) and they check results, not times, so they need no GPU to
# themselves. FUSEDTUNE_AUTOTUNE=one: every kernel variant runs one config, untimed (correctness needs
# no tuning; a variant compiles once, not once per config; the benchmarks below autotune). -v: one line
# a test as it ends (PYTHONUNBUFFERED), so a family stopped at its limit still shows which tests passed;
# --durations names the slow (compiling) tests. Logs: OUT/pytest_<family>.log.
# Beside them, each benchmark below runs once with its output thrown away (OUT/warm_<family>.log): its
# Triton kernels, every autotune config, compile now, in parallel, into the cache that the timed runs
# then read, so those spend their limits timing rather than compiling. All stop at LIMIT_S.
gpu_tests() {   # gpu_tests LIMIT_S: the families in parallel, each stopped at LIMIT_S
  local limit=$1 rc=0 i r a spec specs args pids=() fams=() warm=() scratch
  scratch=$(mktemp -d)
  IFS=';' read -ra specs <<< "$BENCHES"
  for spec in "${specs[@]}"; do
    [ -n "${spec// /}" ] && [ "$spec" != none ] || continue
    timeout --kill-after=5 "$limit" "$PY" -m fusedtune bench $spec --out "$scratch" > "$OUT/warm_${spec%% *}.log" 2>&1 &
    warm+=($!)
  done
  for spec in "zo tests/test_zo_gpu.py tests/test_bench.py tests/test_triton_launch_gpu.py" "hft tests/test_hft_gpu.py" \
              "sparse_delta tests/test_sparse_delta_gpu.py" "fp8 tests/test_fp8_gpu.py" \
              "lora tests/test_lora_gpu.py -k triton_within_rule" "lora_more tests/test_lora_gpu.py -k not@triton_within_rule" \
              "lora_dora tests/test_lora_dora_gpu.py tests/test_lora_graph_gpu.py" \
              "lora_tma tests/test_lora_tma_gpu.py" "roste tests/test_roste_gpu.py" "roste_mma tests/test_roste_mma_gpu.py" \
              "fp8_tma tests/test_fp8_tma_gpu.py"; do
    # (test_lora_gpu.py in two processes: it used 136 of its 154 s in run 3; '@' stands for a space in -k)
    set -- $spec
    fams+=("$1")
    shift
    args=(); for a in "$@"; do args+=("${a//@/ }"); done
    timeout --kill-after=5 "$limit" env FUSEDTUNE_AUTOTUNE=one "$PY" -m pytest -m gpu -v --durations=8 \
      -p no:cacheprovider "${args[@]}" > "$OUT/pytest_${fams[-1]}.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    r=0; wait "${pids[$i]}" || r=$?
    [ "$r" = 0 ] || rc=1
    case $r in 124|137) echo "pytest_${fams[$i]}: TIMED OUT after ${limit}s ($(grep -cE '::\S+ PASSED' \
      "$OUT/pytest_${fams[$i]}.log") passed, $(grep -cE '::\S+ (FAILED|ERROR)' "$OUT/pytest_${fams[$i]}.log") failed by then)" \
      | tee -a "$SUMMARY" ;; esac
    echo "pytest_${fams[$i]} (exit $r): $(grep -E '^=+ .* in [0-9.]+s' "$OUT/pytest_${fams[$i]}.log" | tail -n 1)" | tee -a "$SUMMARY"
  done
  for i in "${warm[@]}"; do wait "$i" || true; done   # a warm-up's result is not a check
  return "$rc"
}
export -f gpu_tests
# the benchmarks' arguments (FAMILY [--quick]; ';' between), the same for the warm-ups and the timed runs
BENCHES=${GPU_CHECK_BENCHES:-"zo;hft;lora --quick;fp8 --quick;sparse_delta --quick;roste --quick"}
export OUT PY SUMMARY BENCHES
if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "pytest     FAILED: pytest is not installed here, the GPU tests were NOT run" | tee -a "$SUMMARY" "$OUT/pytest.log"
  FAILED+=("pytest")
elif [ -n "${GPU_CHECK_TESTS:-}" ]; then
  run_step pytest 120 env FUSEDTUNE_AUTOTUNE=one "$PY" -m pytest -m gpu -v -p no:cacheprovider $GPU_CHECK_TESTS || true
else
  # the families' own limit stays under the step's, so each family reports how it ended
  inner=$(( $(step_limit 120) - 10 ))
  if [ "$inner" -lt 5 ]; then
    skip_step pytest "deadline ${DEADLINE}s" gpu_tests
  else
    run_step pytest 120 bash -c "gpu_tests $inner" || true
    # An opt-in kernel whose GPU tests failed or did not finish is left out of the benchmarks
    # (FUSEDTUNE_BENCH_SKIP): a kernel that faults leaves the process's CUDA context unusable, and its
    # family's later sections would be lost with it.
    SKIP_KERNELS=()
    for pair in "lora_tma:fused-tma" "roste_mma:cuda-mma" "fp8_tma:fp8-tma"; do
      grep -qE "^pytest_${pair%%:*} \(exit [1-9]" "$SUMMARY" && SKIP_KERNELS+=("${pair#*:}")
    done
    if [ "${#SKIP_KERNELS[@]}" -gt 0 ]; then
      FUSEDTUNE_BENCH_SKIP=$(IFS=,; echo "${SKIP_KERNELS[*]}")
      export FUSEDTUNE_BENCH_SKIP
      echo "gpu_check: FUSEDTUNE_BENCH_SKIP=$FUSEDTUNE_BENCH_SKIP (their GPU tests failed or did not finish: not benchmarked)" \
        | tee -a "$SUMMARY"
    fi
  fi
fi

# ---------------------------------------------------------------- kernel report and benchmarks
# the extension's cubins as built here (the Triton AOT report for every target runs in CI, no GPU needed)
NARROW=${GPU_CHECK_TESTS:+1}   # a narrower call skips the kernel report and compute-sanitizer
[ -n "$NARROW" ] || run_step kernels 20 "$PY" -m fusedtune kernels --no-triton --json "$OUT/kernels.json" || true
if [ "${GPU_CHECK_PROFILE:-0}" = 1 ]; then
  run_step profile 30 "$PY" bench/host_profile.py "$OUT/host_profile.txt" || true
fi
# one step per family, so that a slow family cannot starve the next one
IFS=';' read -ra specs <<< "$BENCHES"
for spec in "${specs[@]}"; do   # limit: the benchmark's seconds (its Triton kernels compiled above)
  [ "$spec" != none ] || continue   # GPU_CHECK_BENCHES=none: no benchmark
  [ -n "${spec// /}" ] || continue   # (an empty entry: "zo;;roste")
  set -- $spec
  case $1 in zo) limit=30 ;; hft) limit=45 ;; lora) limit=75 ;; fp8) limit=40 ;; sparse_delta) limit=50 ;; roste) limit=40 ;;
    *) limit=30 ;;   # (an unknown family: the CLI says so in bench_<name>.log)
  esac
  run_step "bench_$1" "$limit" "$PY" -m fusedtune bench $spec --out "$OUT" || true
done

# ---------------------------------------------------------------- compute-sanitizer (last: it gets what is left)
# racecheck (shared-memory hazards) and memcheck over a small run of each of fusedtune._C's CUDA kernels,
# each checked against its CPU kernel (bench/sanitize_cuda.py).
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -n "$NARROW" ]; then
  :
elif [ -x "$SAN" ]; then
  if ! run_step sanitize 10 bash -c "'$SAN' --tool racecheck --error-exitcode 9 \
    '$PY' bench/sanitize_cuda.py && '$SAN' --tool memcheck --error-exitcode 9 \
    '$PY' bench/sanitize_cuda.py" && grep -q "Device not supported" "$OUT/sanitize.log" 2>/dev/null; then
    unfail sanitize   # a sandboxed machine (gVisor) refuses the sanitizer: no kernel was checked, none failed
    echo "sanitize   skipped: compute-sanitizer does not support this machine's device (see sanitize.log)" | tee -a "$SUMMARY"
  fi
else
  echo "sanitize   skipped: compute-sanitizer not found" | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- summary
echo
echo "=== gpu_check summary ($((SECONDS - T0)) s; outputs in $OUT)"
cat "$SUMMARY"
ls -1 "$OUT" | sed 's/^/  /'
# one archive of everything but the extension, for tools that bring back only a few files
snapshot
if [ "${#FAILED[@]}" -gt 0 ] && [ -n "${FAILED[*]}" ]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]}"
  exit 1
fi
if [ "${#SKIPPED[@]}" -gt 0 ]; then
  echo "gpu_check: every step that ran passed; SKIPPED: ${SKIPPED[*]}"
else
  echo "gpu_check: all steps passed"
fi
