"""A wheel built for sm_80/sm_89/sm_90a on a machine without a GPU holds cubins for all three
targets and the Triton kernels, and imports (and runs a C++ CPU kernel) from the unpacked wheel.

Slow where build/ holds no objects for these targets: a full extension build
(python -m build --wheel --no-isolation); after tools/dev.sh has built fusedtune._C, a link."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from fusedtune.bench import kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = "8.0;8.9;9.0a"


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (pip install build)")
    if _nvcc() is None:
        pytest.skip("no CUDA toolkit (nvcc): the wheel would carry no cubins")
    if K.find_cuobjdump() is None:
        pytest.skip("no cuobjdump to list the cubins")
    out = tmp_path_factory.mktemp("wheel")
    # Built from this checkout, sharing build/temp.* with `tools/dev.sh`'s in-place build: ninja recompiles
    # what changed since (sources, headers, flags: its log keeps each object's command, so other targets
    # recompile), and the link runs afresh. The library setuptools last linked for a wheel is removed
    # first: setuptools would skip the link if the sources were older than it, whatever its targets.
    for old in glob.glob(os.path.join(ROOT, "build", "lib.*", "fusedtune", "_C*.so")):
        os.remove(old)
    env = dict(os.environ, FUSEDTUNE_CUDA_ARCHS=ARCHS, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("FUSEDTUNE_SKIP_CUDA", None)
    env.pop("FUSEDTUNE_NO_CUDA", None)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = glob.glob(str(out / "fusedtune-*.whl"))
    assert len(wheels) == 1, wheels
    unpacked = out / "unpacked"
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        z.extractall(unpacked)
    return wheels[0], names, unpacked


@pytest.mark.slow
def test_wheel_contents(wheel):
    _, names, _ = wheel
    for want in ("fusedtune/_C.so", "fusedtune/triton_kernels/zo.py", "fusedtune/triton_kernels/registry.py",
                 "fusedtune/__init__.py", "fusedtune/ops/zo.py", "fusedtune/bench/kernels.py"):
        assert want in names, f"{want} missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "bench/"))], "source-tree folders leaked in"


@pytest.mark.slow
def test_wheel_requires_the_torch_it_was_built_against(wheel):
    """The extension's C++ ABI is torch's: pip must not put the wheel beside another torch minor version."""
    import torch
    path, names, _ = wheel
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    with zipfile.ZipFile(path) as z:
        reqs = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")]
    from packaging.requirements import Requirement
    from setup_py import function
    want = Requirement(function("torch_pin")(torch.__version__)).specifier
    assert want in [Requirement(r).specifier for r in reqs if r.startswith("torch")], reqs


@pytest.mark.slow
def test_wheel_extension_has_all_cubins(wheel):
    _, _, unpacked = wheel
    so = str(unpacked / "fusedtune" / "_C.so")
    archs = K.cubin_archs(so)
    for want in ("sm_80", "sm_89", "sm_90a"):
        assert want in archs, f"no {want} cubin in the wheel's _C.so (has {archs}; elfs {K.list_elfs(so)})"
    rows = K.collect(include_triton=False, ext_path=so, cache_dir=K.default_cache_dir())
    assert {r["target"] for r in rows if "zo_apply_kernel" in r["kernel"]} >= {"sm_80", "sm_89", "sm_90a"}
    assert K.check(rows) == []


@pytest.mark.slow
def test_wheel_imports_without_a_gpu(wheel):
    _, _, unpacked = wheel
    code = (
        "import sys, json, torch, fusedtune, fusedtune.triton_kernels.registry as reg\n"
        "from fusedtune import _ext\n"
        "assert fusedtune.__file__.startswith(sys.argv[1]), fusedtune.__file__\n"
        "assert _ext.loaded() and _ext.with_cuda(), _ext.info()\n"
        "assert _ext.cuda_archs() == ['8.0', '8.9', '9.0a'], _ext.cuda_archs()\n"
        "t = torch.zeros(37, dtype=torch.bfloat16)\n"
        "fusedtune.ops.zo_apply_([t], [7], [1.0], backend='cpu')\n"
        "r = torch.zeros(37, dtype=torch.bfloat16)\n"
        "fusedtune.ops.zo_apply_([r], [7], [1.0], backend='reference')\n"
        "assert torch.equal(t.view(torch.int16), r.view(torch.int16)) and t.abs().sum() > 0\n"
        "assert any(s.name == 'zo_apply_kernel' for s in reg.all_kernels())\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(unpacked), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code, str(unpacked)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(unpacked))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
