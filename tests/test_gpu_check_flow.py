"""bench/gpu_check.sh's control flow on a machine without a GPU: a stand-in interpreter (each step a short
sleep) takes python's place. A device call killed at its timeout returns only what lies in $OUT, so the
script must keep a complete archive there after every step and end inside its deadline."""
import os
import shutil
import subprocess
import tarfile
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")

FAKE_PY = r"""#!/usr/bin/env bash
# stand-in for python: every step sleeps STEP_S and writes what the real one would
S=${STEP_S:-1}
case "$1" in
  -) cat > /dev/null; echo "python (stand-in)"; exit 0 ;;
  -c) exit 0 ;;
  setup.py) sleep "$S"; echo built; exit 0 ;;
  -m)
    case "$2" in
      pytest) sleep "$S"
        for a in "$@"; do case " ${FAKE_FAIL:-} " in *" $a "*)
          echo "$a::t FAILED"; echo "===== 1 failed in ${S}s ====="; exit 1 ;; esac; done
        for a in "$@"; do echo "arg[$a]"; done
        echo "tests/test_x_gpu.py::t PASSED"; echo "===== 1 passed in ${S}s ====="; exit 0 ;;
      fusedtune)
        case "$3" in
          bench)
            out=bench/results; prev=
            for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
            case $4 in zo|hft|lora|fp8|sparse_delta|roste) ;; *) echo "unknown family $4" >&2; exit 2 ;; esac
            sleep "$S"; echo "skip=${FUSEDTUNE_BENCH_SKIP:-}"; echo "kernel,time_ms" >> "$out/$4.csv"; exit 0 ;;
          kernels) prev=; for a in "$@"; do [ "$prev" = --json ] && echo '{}' > "$a"; prev=$a; done; exit 0 ;;
          *) exit 0 ;;
        esac ;;
    esac ;;
esac
exit 0
"""

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout") and shutil.which("tar")),
                                reason="needs bash, timeout and tar")


def _run(tmp_path, env_extra, kill_after=None, reuse=False):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out, snap = tmp_path / "gc", tmp_path / "snap"
    out.mkdir(exist_ok=reuse)
    (out / "_C.fake.so").write_bytes(b"\0" * 1024)    # the extension as built: never archived
    env = dict(os.environ, PYTHON=str(fake), GPU_CHECK_CAP="9.0", GPU_CHECK_SKIP_BUILD="1",
               GPU_CHECK_SNAPSHOT=str(snap), FUSEDTUNE_COMMIT="test", **env_extra)
    env.pop("PYTHONPATH", None)
    cmd = ["bash", SCRIPT, str(out)]
    if kill_after is not None:
        cmd = ["timeout", "-s", "KILL", str(kill_after)] + cmd
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return p, time.monotonic() - t0, out, snap


def _members(path):
    with tarfile.open(path) as t:
        return {os.path.normpath(n) for n in t.getnames()}


def test_a_deadline_skips_the_steps_it_cannot_fit_and_the_archive_is_complete(tmp_path):
    p, took, out, snap = _run(tmp_path, {"STEP_S": "2", "GPU_CHECK_DEADLINE": "20"})
    summary = (snap / "summary.txt").read_text()
    assert "SKIPPED (deadline 20s)" in summary, p.stdout[-3000:]
    assert took < 20 + 5, (took, summary)
    names = _members(snap / "all.tgz")
    assert {"summary.txt", "env.log", "doctor.log"} <= names, names
    assert not any(n.endswith(".so") for n in names), names
    assert (out / "_C.fake.so").exists()        # kept in OUTDIR for a later call to carry back


def test_a_call_killed_midway_leaves_the_finished_steps_in_the_snapshot(tmp_path):
    p, took, out, snap = _run(tmp_path, {"STEP_S": "3"}, kill_after=8)
    assert p.returncode in (137, -9), (p.returncode, p.stdout[-2000:])   # (timeout kills its group)
    names = _members(snap / "all.tgz")
    assert {"env.log", "doctor.log", "summary.txt"} <= names, names
    assert "doctor" in (snap / "summary.txt").read_text()


def test_an_unknown_or_empty_benchmark_entry_fails_or_skips_that_entry_only(tmp_path):
    p, took, out, snap = _run(tmp_path, {"STEP_S": "0", "GPU_CHECK_BENCHES": "nosuch;;zo; ;roste",
                                         "GPU_CHECK_TESTS": "tests/test_x_gpu.py"})
    summary = (out / "summary.txt").read_text()
    assert p.returncode == 1 and "bench_nosuch" in summary and "FAILED (exit 2)" in summary, p.stderr + summary
    assert "bench_zo" in summary and "bench_roste" in summary and (out / "roste.csv").exists(), summary
    assert "all.tgz" in os.listdir(snap)


def test_a_deadline_inside_the_test_step_skips_it_rather_than_running_unlimited(tmp_path):
    """The GPU test families get the step's limit less 10 s: when the deadline leaves less than that, the step
    is skipped (timeout 0 means no limit, and a negative one is an error that read as failed tests)."""
    p, took, out, snap = _run(tmp_path, {"STEP_S": "0", "GPU_CHECK_DEADLINE": "18", "GPU_CHECK_BENCHES": "none"})
    summary = (out / "summary.txt").read_text()
    assert "pytest     SKIPPED (deadline 18s)" in summary, summary
    assert p.returncode == 0 and "SKIPPED: pytest" in p.stdout and "gpu_tests -" not in p.stdout, p.stdout[-2000:]


def test_an_opt_in_kernel_whose_tests_failed_is_left_out_of_the_benchmarks(tmp_path):
    p, took, out, snap = _run(tmp_path, {"STEP_S": "0", "FAKE_FAIL": "tests/test_lora_tma_gpu.py",
                                         "GPU_CHECK_BENCHES": "lora --quick;roste --quick"})
    summary = (out / "summary.txt").read_text()
    assert "FUSEDTUNE_BENCH_SKIP=fused-tma " in summary, summary
    assert "skip=fused-tma" in (out / "bench_lora.log").read_text()
    (tmp_path / "again").mkdir()
    p, took, out, snap = _run(tmp_path / "again", {"STEP_S": "0", "GPU_CHECK_BENCHES": "roste --quick"})
    assert "FUSEDTUNE_BENCH_SKIP" not in (out / "summary.txt").read_text()
    assert "skip=\n" in (out / "bench_roste.log").read_text()
    # a later, narrower call into the same OUTDIR does not read the earlier call's test logs
    (out / "pytest_lora_tma.log").write_text("tests/test_lora_tma_gpu.py::t FAILED\n")
    p, took, out, snap = _run(tmp_path / "again", {"STEP_S": "0", "GPU_CHECK_BENCHES": "lora --quick",
                                                   "GPU_CHECK_TESTS": "tests/test_x_gpu.py"}, reuse=True)
    assert "skip=\n" in (out / "bench_lora.log").read_text()


def test_a_test_file_split_across_families_gets_its_k_expression_whole(tmp_path):
    p, took, out, snap = _run(tmp_path, {"STEP_S": "0", "GPU_CHECK_BENCHES": "none"})
    assert "arg[not triton_within_rule]" in (out / "pytest_lora_more.log").read_text()
    assert "arg[triton_within_rule]" in (out / "pytest_lora.log").read_text()
