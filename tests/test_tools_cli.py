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
