"""bench/gpu_check.sh runs as one call on a borrowed GPU that allows 600 s a command: the step limits
must add up to less than that, with room for the wheels, the environment log and the archive."""
import os
import re

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
CALL_LIMIT_S = 600
OVERHEAD_S = 45     # wheels install, env.log, imports between steps, kill-after grace, tar


def step_limits(text: str) -> dict:
    # the GPU tests are one step (the families run in parallel inside it)
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"run_step (\w+) (\d+) ", text)}
    # the benchmarks' steps: "FAMILY) limit=N ;;" entries of the loop over them
    limits.update({f"bench_{m.group(1)}": int(m.group(2)) for m in re.finditer(r"(\w+)\) limit=(\d+) ;;", text)})
    return limits


def test_step_limits_fit_one_device_call():
    text = open(SCRIPT).read()
    limits = step_limits(text)
    assert {"build", "doctor", "kernels", "pytest", "bench_zo",
            "bench_roste"} <= set(limits), sorted(limits)
    # build_pip shares the build's budget (its limit is what the build left), so it is not counted
    total = sum(v for k, v in limits.items() if k != "build_pip")
    assert total + OVERHEAD_S <= CALL_LIMIT_S, f"step limits add up to {total} s: {limits}"
    header = re.search(r"all of them together (\d+) s", text)
    assert header and int(header.group(1)) == total, "the script's header states another total"


def test_every_gpu_test_file_has_a_step():
    text = open(SCRIPT).read()
    here = os.path.dirname(__file__)
    gpu_files = sorted(f for f in os.listdir(here) if f.startswith("test_")
                       and "pytest.mark.gpu" in open(os.path.join(here, f)).read() and f != os.path.basename(__file__))
    assert gpu_files
    for f in gpu_files:
        assert f"tests/{f}" in text, f"{f} has GPU tests that gpu_check.sh does not run"
