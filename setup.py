"""Build fusedtune: pure Python package + the fusedtune._C extension (C++ CPU kernels, and CUDA
kernels whenever a CUDA toolkit is found -- a GPU is not needed to build).

Environment:
  FUSEDTUNE_CUDA_ARCHS  ';'-separated targets, default "8.0;8.9;9.0a" ("X.Y+PTX" adds PTX); fusedtune's
                        kernels are built for these (TORCH_CUDA_ARCH_LIST is not read for them)
  FUSEDTUNE_SKIP_CUDA=1 pure-Python install (no extension at all)
  FUSEDTUNE_NO_CUDA=1   build only the C++ CPU kernels even if a toolkit is present
  MAX_JOBS              parallel compile jobs (ninja)

A wheel with the extension requires the torch minor version it was built against (the extension's C++
ABI is torch's); a pure-Python one any torch >= 2.11. Build with `--no-build-isolation` so that the
torch it is built against is the one you run.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.9;9.0a"
TORCH_RANGE = "torch>=2.11"   # tested: 2.11 (tools/compat_check.sh) and 2.14 (CI)
REQUIRES = ["numpy", "safetensors"]   # safetensors: sparse_delta.save/load


def _env_flag(name, default):
    """A switch, by the package's rule (python/fusedtune/_env.py; tests/test_env_flags.py keeps the two
    the same): 1/true/yes/on or 0/false/no/off in any case, unset or empty the default, else a stop."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return default if not value else value in ("1", "true", "yes", "on")
    raise SystemExit(f"fusedtune: {name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off (any case), "
                     "or unset")


def _gencode(archs):
    if not archs.strip():
        raise SystemExit("FUSEDTUNE_CUDA_ARCHS is empty; give targets such as 8.0;8.9;9.0a, or unset it for "
                         f"the default ({DEFAULT_ARCHS}); FUSEDTUNE_NO_CUDA=1 builds the CPU kernels alone")
    flags = []
    for a in [x.strip() for x in archs.split(";") if x.strip()]:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", a)
        if not m:
            raise SystemExit(f"FUSEDTUNE_CUDA_ARCHS: cannot read {a!r}; expected e.g. 8.0;8.9;9.0a")
        cc = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
        major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
        return int(major) * 1000 + int(minor) * 10
    except Exception:  # noqa: BLE001 - only informational
        return 0


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a symlinked nvcc (/usr/local/bin) misleads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def torch_pin(version: str) -> str:
    """The requirement of a build with the extension: the torch minor version it was built against, its
    pre-releases and local builds included (2.14.0a0+git..., 2.14.0rc1, NGC's 2.14.0a0+....nv25.01)."""
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", version).groups())
    return f"torch>={major}.{minor}.0.dev0,<{major}.{minor + 1}.0.dev0"


def _sources(pattern, what):
    """The files of a glob (relative to this folder), or a clear stop: a tree or sdist without them would
    build an extension that lacks kernels (and, for the CUDA ones, says it has them)."""
    found = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, pattern)))
    if not found:
        raise SystemExit(f"fusedtune: no {what} ({pattern}) under {ROOT}: an incomplete source tree or sdist; "
                         "build from a git checkout or a complete sdist (FUSEDTUNE_SKIP_CUDA=1: pure Python)")
    return found


def extensions():
    """(ext_modules, cmdclass, install_requires)."""
    if _env_flag("FUSEDTUNE_SKIP_CUDA", False):
        print("fusedtune: FUSEDTUNE_SKIP_CUDA=1 -> pure-Python install, no extension")
        return [], {}, [TORCH_RANGE] + REQUIRES
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    no_nvcc = cuda_home is not None and not os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if no_nvcc:      # a CUDA runtime image: libraries, no compiler
        print(f"fusedtune: {cuda_home} has no bin/nvcc -> C++ CPU kernels only")
    with_cuda = cuda_home is not None and not no_nvcc and not _env_flag("FUSEDTUNE_NO_CUDA", False)
    archs = os.environ.get("FUSEDTUNE_CUDA_ARCHS", DEFAULT_ARCHS)
    cxx = ["-O3", "-ffp-contract=off", "-fvisibility=hidden"]
    defines = [f'-DFT_TORCH_VERSION="{torch.__version__}"']
    sources = _sources("csrc/ops.cpp", "extension entry point") + _sources("csrc/cpu/*.cpp", "C++ CPU kernels")
    # the headers as depends: setuptools skips an extension whose sources are older than the built
    # library, and a change to a header alone would otherwise leave a stale one (ninja tracks them too)
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")],
                  depends=sorted(glob.glob("csrc/include/fusedtune/*")))
    if with_cuda:
        # torch derives arch flags from the visible GPUs unless told; our -gencode flags take over,
        # and the variable keeps torch from querying a GPU that a build machine does not have.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs.replace("a", ""))
        defines += [f'-DFT_CUDA_ARCHS="{archs}"', "-DFT_WITH_CUDA", f"-DFT_CUDA_VERSION={_nvcc_version(cuda_home)}"]
        sources += _sources("csrc/cuda/*.cu", "CUDA kernels") + _sources("csrc/cuda/*_dispatch.cpp", "CUDA dispatch")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + _gencode(archs) + defines
        ext = cpp_extension.CUDAExtension(
            "fusedtune._C", sources, extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc}, **kwargs)
        print(f"fusedtune: building CUDA + CPU kernels for {archs} with {cuda_home}")
    else:
        ext = cpp_extension.CppExtension("fusedtune._C", sources, extra_compile_args={"cxx": cxx + defines}, **kwargs)
        print("fusedtune: no CUDA toolkit found (or FUSEDTUNE_NO_CUDA=1) -> C++ CPU kernels only")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=True)
    return [ext], {"build_ext": build_ext}, [torch_pin(torch.__version__)] + REQUIRES   # it loads only there


ext_modules, cmdclass, install_requires = extensions()

setup(
    package_dir={"fusedtune": "python/fusedtune", "fusedtune.triton_kernels": "triton_kernels"},
    packages=["fusedtune"] + ["fusedtune." + p for p in find_packages("python/fusedtune")]
    + ["fusedtune.triton_kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
)
