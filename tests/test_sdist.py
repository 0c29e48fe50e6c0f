"""The sdist carries every source whatever the environment that makes it (MANIFEST.in), and setup.py stops
with a clear message on an incomplete tree or an empty target list instead of building an extension that
lacks kernels. Made from a copy of the tracked files (a leftover egg-info's SOURCES.txt would add files)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_copy(dest) -> str:
    if not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed")
    tree = _tracked_copy(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("sdist")
    env = dict(os.environ, FUSEDTUNE_SKIP_CUDA="1")   # the environment that used to drop csrc/ from the sdist
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("fusedtune-*.tar.gz")
    with tarfile.open(path) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    return tree, names


def test_the_sdist_holds_every_source_whatever_made_it(sdist):
    tree, names = sdist
    want = {os.path.relpath(os.path.join(d, f), tree) for sub in ("csrc", "triton_kernels", "tests")
            for d, _, fs in os.walk(os.path.join(tree, sub)) for f in fs if "__pycache__" not in d}
    assert any(n.endswith(".cu") for n in want) and "csrc/ops.cpp" in want
    assert want <= names, sorted(want - names)[:20]
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "requirements-dev.txt"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def _setup_py(tree, env_extra, *args):
    env = dict(os.environ, **env_extra)
    for k in ("FUSEDTUNE_SKIP_CUDA", "FUSEDTUNE_NO_CUDA"):
        env.pop(k, None) if k not in env_extra else None
    return subprocess.run([sys.executable, "setup.py", *args], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_incomplete_tree_or_an_empty_target_list_stops_the_build(tmp_path):
    tree = _tracked_copy(tmp_path / "tree")
    p = _setup_py(tree, {"FUSEDTUNE_CUDA_ARCHS": ""}, "--name")
    if "no CUDA toolkit" in p.stdout or "no bin/nvcc" in p.stdout:
        pytest.skip("no CUDA toolkit here: the target list is not read")
    assert p.returncode != 0 and "FUSEDTUNE_CUDA_ARCHS is empty" in p.stderr, p.stdout + p.stderr
    shutil.rmtree(os.path.join(tree, "csrc", "cpu"))
    p = _setup_py(tree, {"FUSEDTUNE_NO_CUDA": "1"}, "--name")
    assert p.returncode != 0 and "incomplete source tree" in p.stderr and "csrc/cpu/*.cpp" in p.stderr, p.stderr
    p = _setup_py(tree, {"FUSEDTUNE_SKIP_CUDA": "1"}, "--name")      # pure Python needs none of it
    assert p.returncode == 0 and p.stdout.strip().endswith("fusedtune"), p.stdout + p.stderr


def test_the_torch_pin_takes_the_build_torch_and_its_prereleases():
    from packaging.requirements import Requirement
    from setup_py import function
    pin = function("torch_pin")
    for built, ok, refused in (
            ("2.14.1+cu130", ["2.14.0", "2.14.1", "2.14.9+cu126", "2.14.0a0+ecf3bae40a.nv25.01", "2.14.0rc1",
                              "2.14.0.dev20260101+cu130"], ["2.13.1", "2.15.0", "2.15.0a0+git1234"]),
            ("2.15.0a0+git1234abc", ["2.15.0a0+git1234abc", "2.15.0", "2.15.2"], ["2.14.1", "2.16.0.dev20270101"]),
            ("10.0.0", ["10.0.3"], ["9.9.0", "10.1.0"])):
        spec = Requirement(pin(built)).specifier
        assert all(spec.contains(v, prereleases=True) for v in ok), (built, pin(built))
        assert not any(spec.contains(v, prereleases=True) for v in refused), (built, pin(built))


def test_the_torch_requirement_follows_the_build(tmp_path):
    """A build with the extension requires the torch minor version it was built against (the extension's
    C++ ABI); a pure-Python build the supported range."""
    import torch
    from setup_py import function
    tree = _tracked_copy(tmp_path / "tree")
    for env, want in (({"FUSEDTUNE_SKIP_CUDA": "1"}, "torch>=2.11"),
                      ({"FUSEDTUNE_NO_CUDA": "1"}, function("torch_pin")(torch.__version__))):
        base = tmp_path / ("egg" + str(len(env) + len(want)))
        base.mkdir()
        p = _setup_py(tree, env, "-q", "egg_info", "--egg-base", str(base))
        assert p.returncode == 0, p.stdout + p.stderr
        (req,) = base.glob("*.egg-info/requires.txt")
        first = req.read_text().split("\n[")[0].split()
        from packaging.requirements import Requirement
        assert Requirement(want).specifier in [Requirement(r).specifier for r in first if r.startswith("torch")], first
        assert "numpy" in first and "safetensors" in first, first
