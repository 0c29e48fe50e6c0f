"""Developer tools and the bench CLI's labels, found by review (each test fails on the code before): tools/dev.sh
with an unknown command installs and builds nothing; bench rows of an installed copy are not labelled with the
commit of whatever repository it is installed in."""
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_dev_sh_refuses_an_unknown_command_before_it_installs_or_builds(tmp_path):
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 1\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", os.path.join(ROOT, "tools", "dev.sh"), "tset"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert out.returncode == 2 and "usage: bash tools/dev.sh demo|test" in out.stderr
    assert not log.exists()      # no python call: no pip install, no build


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_bench_commit_of_a_copy_inside_another_repository_is_the_version(tmp_path):
    import fusedtune
    proj = tmp_path / "userproj"
    dst = proj / "venv" / "site-packages" / "fusedtune" / "bench"
    dst.mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(fusedtune.__file__), "bench", "core.py"), dst / "core.py")
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x"]
    subprocess.run(git + ["init", "-q"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "user"], cwd=proj, check=True)
    spec = importlib.util.spec_from_file_location("copied_core", dst / "core.py")
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    env = os.environ.pop("FUSEDTUNE_COMMIT", None)
    try:
        assert core.git_commit() == f"v{fusedtune.__version__}"
    finally:
        if env is not None:
            os.environ["FUSEDTUNE_COMMIT"] = env


def test_doctor_passes_in_the_environment_ci_and_dev_sh_set(monkeypatch, capsys):
    """tools/dev.sh test runs `python -m fusedtune doctor` under set -e (an invalid setting stops it, exit 1):
    the variables .ci/run exports and the defaults dev.sh reads must not be refused."""
    import re
    import shlex
    from fusedtune.doctor import main as doctor_main
    for k in list(os.environ):
        if k.startswith("FUSEDTUNE_") or k == "TRITON_INTERPRET":
            monkeypatch.delenv(k)
    exports = re.findall(r"^export (.+)$", open(os.path.join(ROOT, ".ci", "run")).read(), re.M)
    pairs = [kv.split("=", 1) for line in exports for kv in shlex.split(line)]
    assert any(k == "FUSEDTUNE_CUDA_ARCHS" for k, _ in pairs)
    for k, v in pairs + [["FUSEDTUNE_TEST_WORKERS", "2"]]:
        monkeypatch.setenv(k, v)
    assert doctor_main([]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "FUSEDTUNE_CUDA_ARCHS" in out.out and "not read by fusedtune" not in out.out
