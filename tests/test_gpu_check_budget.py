"""bench/gpu_check.sh runs as one call on a borrowed GPU that allows 600 s a command: its deadline, plus
a step's kill grace and the last archive, must end inside that (tests/test_gpu_check_flow.py checks
that the deadline holds)."""
import os
import re

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
CALL_LIMIT_S = 600
GRACE_S = 30     # timeout's --kill-after (15 s), the summary and the last archive, with room


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
    header = re.search(r"all of them together (\d+) s", text)
    assert header and int(header.group(1)) == total, f"the script's header states another total than {total}"
    deadline = int(re.search(r"DEADLINE=\$\{GPU_CHECK_DEADLINE:-(\d+)\}", text).group(1))
    assert deadline + GRACE_S <= CALL_LIMIT_S, deadline
    assert re.search(r"--kill-after=15 \"\$limit\"", text), "the step's kill grace changed: update GRACE_S"


def test_every_gpu_test_file_has_a_step():
    text = open(SCRIPT).read()
    here = os.path.dirname(__file__)
    gpu_files = sorted(f for f in os.listdir(here) if f.startswith("test_")
                       and "pytest.mark.gpu" in open(os.path.join(here, f)).read() and f != os.path.basename(__file__))
    assert gpu_files
    for f in gpu_files:
        assert f"tests/{f}" in text, f"{f} has GPU tests that gpu_check.sh does not run"


def test_test_files_split_across_families_lose_no_test():
    """A GPU test file run by several families (-k expressions, '@' for a space) is covered whole, once."""
    import json
    import shlex
    import subprocess
    import sys
    text = open(SCRIPT).read()
    body = text[text.index('for spec in "zo tests'):text.index("; do", text.index('for spec in "zo tests'))]
    specs = [shlex.split(s.replace("@", "\\ ")) for s in re.findall(r'"([^"]+)"', body)]
    by_file = {}
    for spec in specs:
        if "-k" in spec:
            k = spec[spec.index("-k") + 1].replace("\\", "")
            for f in (a for a in spec[1:] if a.startswith("tests/")):
                by_file.setdefault(f, []).append(k)
    assert by_file, "no family uses -k"
    root = os.path.join(os.path.dirname(__file__), "..")

    # one process collects every (file, -k) pair: pytest.main per pair, the imports made once (a process per pair
    # took ~20 s of CI)
    runs = [[f] for f in by_file] + [[f, "-k", k] for f, ks in by_file.items() for k in ks]
    code = ("import json, sys, pytest\n"
            "class Ids:\n"
            "    def pytest_collection_finish(self, session):\n"
            "        self.ids = [item.nodeid for item in session.items]\n"
            "out = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    ids = Ids()\n"
            "    pytest.main(['--co', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', *args], plugins=[ids])\n"
            "    out.append(ids.ids)\n"
            "print('\\nIDS ' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("IDS ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = dict(zip(map(tuple, runs), json.loads(line[4:])))
    for f, ks in by_file.items():
        every = got[(f,)]
        parts = [got[(f, "-k", k)] for k in ks]
        assert every and sorted(sum(parts, [])) == sorted(every), (f, ks, [len(p) for p in parts], len(every))
