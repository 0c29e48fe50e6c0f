"""Loading the compiled extension fusedtune._C. Import never fails: what went wrong is recorded
and shown by fusedtune.doctor()."""
from __future__ import annotations

import glob
import json
import os

import torch

from ._env import env_flag

_state = {"loaded": False, "error": None, "path": None, "info": {}}
BUILD_HINT = ("build it from a source checkout with `pip install --no-build-isolation --no-deps --force-reinstall .`, "
              "or in place for an editable checkout with `python setup.py build_ext --inplace` (a CUDA toolkit adds "
              "the CUDA kernels; FUSEDTUNE_CUDA_ARCHS picks the targets)")


def _load():
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not paths:
        _state["error"] = ("fusedtune._C is not built (pure-Python install, or FUSEDTUNE_SKIP_CUDA=1); " + BUILD_HINT)
        return
    _state["path"] = paths[0]
    try:
        torch.ops.load_library(paths[0])
        _state["info"] = json.loads(torch.ops.fusedtune.build_info())
        _state["loaded"] = True
    except Exception as e:  # noqa: BLE001 - recorded for doctor()
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        _state["error"] = (f"fusedtune._C at {paths[0]} did not load: {type(e).__name__}: {e}{cause}; it must be built "
                           f"against the torch that runs it (torch {torch.__version__} here): " + BUILD_HINT)


if not env_flag("FUSEDTUNE_DISABLE_EXTENSION", False):   # read at import
    _load()
else:
    _state["error"] = f"disabled by FUSEDTUNE_DISABLE_EXTENSION={os.environ['FUSEDTUNE_DISABLE_EXTENSION']}"


def loaded() -> bool:
    return _state["loaded"]


def with_cuda() -> bool:
    return _state["loaded"] and bool(_state["info"].get("with_cuda"))


def cuda_archs() -> list[str]:
    return [a for a in _state["info"].get("cuda_archs", "").split(";") if a] if with_cuda() else []


def error() -> str | None:
    return _state["error"]


def info() -> dict:
    return dict(_state["info"], path=_state["path"], loaded=_state["loaded"], error=_state["error"])


def serves_device(device: torch.device) -> tuple[bool, str]:
    """Can the extension's CUDA kernels run on this GPU? (built for a matching arch)"""
    if not with_cuda():
        return False, "fusedtune._C was built without CUDA kernels" if loaded() else (error() or "not built")
    major, minor = torch.cuda.get_device_capability(device)
    for a in cuda_archs():
        ptx = a.endswith("+PTX")
        base = a[:-4] if ptx else a
        specific = base[-1] in "af"  # arch-specific cubins (sm_90a) run on that exact chip only
        am, an = (int(v) for v in base.rstrip("af").split("."))
        ok = (am, an) == (major, minor) if specific else (am == major and an <= minor)
        if ok or (ptx and (am, an) <= (major, minor)):
            return True, ""
    return False, f"fusedtune._C has no code for sm_{major}{minor} (built for {';'.join(cuda_archs())})"
