"""Backend selection: per call (backend=...), per scope (use_backend) or per process
(FUSEDTUNE_BACKEND). 'auto' takes the CUDA extension for GPU tensors when it is built for the GPU,
else Triton on a GPU, else the reference; on CPU tensors the C++ CPU kernels when built, else the
reference. A fused path that cannot serve an input says why, once; nothing falls back silently.
A per-call backend= that cannot serve raises. A scope or process-wide choice applies to the ops that
have that backend (raising where it cannot run); ops without it choose automatically, said once."""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from . import _ext
from ._env import interpreting  # TRITON_INTERPRET as Triton reads it (1/true/yes/on/y, any case)

BACKENDS = ("reference", "cpu", "cuda", "triton")
CHOICES = ("auto",) + BACKENDS
# The innermost use_backend() of this thread. A threading.local, not a ContextVar: torch.compile
# (dynamo) traces reads of it and guards on them on every torch we support, while it cannot trace
# ContextVar.get on torch 2.11 (fullgraph compiles of our layers failed there; 2.14 traces it).
_scope = threading.local()
_warned: set = set()
_memo: dict = {}   # resolve()'s answers that warned about nothing


class BackendError(RuntimeError):
    """A backend was asked for that cannot serve this call."""


def _check_name(name: str, what: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """with fusedtune.use_backend("triton"): ... -- every op in the scope uses that backend."""
    prev = getattr(_scope, "name", None)
    _scope.name = _check_name(name, "use_backend")
    try:
        yield
    finally:
        _scope.name = prev


def requested(backend: str | None = None) -> str:
    if backend is not None:
        return _check_name(backend, "backend=")
    scoped = getattr(_scope, "name", None)
    if scoped is not None:
        return scoped
    return _check_name(os.environ.get("FUSEDTUNE_BACKEND", "auto"), "FUSEDTUNE_BACKEND")


def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"triton is not importable ({e})"
    if interpreting():
        return True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (Triton kernels need one, or TRITON_INTERPRET=1)"
    return True, ""


def backends() -> dict[str, dict]:
    """What is available in this process, and why not where it is not."""
    gpu = torch.cuda.is_available()
    out = {"reference": {"available": True, "why": "pure PyTorch, any device"}}
    out["cpu"] = {"available": _ext.loaded(), "why": "C++ CPU kernels" if _ext.loaded() else _ext.error()}
    if not _ext.with_cuda():
        why = _ext.error() if not _ext.loaded() else "fusedtune._C was built without CUDA kernels"
        out["cuda"] = {"available": False, "why": why}
    elif not gpu:
        out["cuda"] = {"available": False, "why": f"built for {';'.join(_ext.cuda_archs())}, but no CUDA GPU"}
    else:
        ok, why = _ext.serves_device(torch.device("cuda"))
        out["cuda"] = {"available": ok, "why": why or f"built for {';'.join(_ext.cuda_archs())}"}
    ok, why = triton_status()
    out["triton"] = {"available": ok, "why": why}
    return out


def warn_once(key, message: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def can_serve(name: str, device: torch.device, has: frozenset) -> tuple[bool, str]:
    """Can backend `name` run an op (which implements the backends in `has`) on `device`?"""
    if name not in has:
        return False, f"the op has no {name} implementation"
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {device.type}"
        return (True, "") if _ext.loaded() else (False, _ext.error())
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device.type}"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        return _ext.serves_device(device)
    ok, why = triton_status()
    if not ok:
        return False, why
    if device.type == "cpu" and not interpreting():
        return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if device.type not in ("cpu", "cuda"):
        return False, f"Triton kernels do not run on {device.type}"
    return True, ""


def _wanted(op: str, has: frozenset, backend: str | None, warn: bool) -> str:
    """The request that applies to this op. A scope or FUSEDTUNE_BACKEND naming a backend the op does
    not have at all (FUSEDTUNE_BACKEND=cuda and a Triton-only op) leaves the op on 'auto', said once;
    a per-call backend= is always taken at its word."""
    want = requested(backend)
    if backend is None and want != "auto" and want not in has:
        if warn:
            warn_once((op, "no such backend", want),
                      f"fusedtune: {op} has no {want!r} backend (it has {', '.join(sorted(has))}); the "
                      f"process- or scope-wide choice {want!r} does not apply to it, it chooses automatically")
        return "auto"
    return want


_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None)     # CPython's store behind os.environ (kept current by its writes)
try:
    _ENV_KEYS = tuple(_ENVIRON.encodekey(k) for k in ("FUSEDTUNE_BACKEND", "TRITON_INTERPRET"))
except Exception:  # noqa: BLE001 -- another os.environ: read it by name
    _ENV_DATA = None


def _env_state() -> tuple:
    """FUSEDTUNE_BACKEND and TRITON_INTERPRET as resolve()'s memo key sees them: read from os.environ's
    own dictionary by their encoded names (~0.1 us; os.environ.get encodes and decodes, ~1 us each)."""
    if _ENV_DATA is not None and os.environ is _ENVIRON and _ENVIRON._data is _ENV_DATA:
        return _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1])
    return os.environ.get("FUSEDTUNE_BACKEND"), os.environ.get("TRITON_INTERPRET")


def resolve(op: str, device: torch.device, has, backend: str | None = None) -> str:
    """The backend an op call takes. An explicit request that cannot be served raises; 'auto'
    falls back in DESIGN.md's order and says why, once per (op, reason). Outside torch.compile an
    answer that warned about nothing is kept for the same (op, device, request, scope, environment):
    this runs on every op call, and its checks cost more than a small kernel launch."""
    if torch.compiler.is_compiling():
        return _resolve(op, device, has, backend)[0]
    # the scope read through the thread's own dict: getattr(_scope, "name", None) raises and catches
    # AttributeError in a thread that never entered use_backend (~0.6 us)
    key = (op, device, has, backend, _scope.__dict__.get("name"), *_env_state())
    name = _memo.get(key)
    if name is None:
        name, quiet = _resolve(op, device, has, backend)
        if quiet:
            _memo[key] = name
    return name


def _resolve(op: str, device: torch.device, has, backend: str | None) -> tuple[str, bool]:
    """(the backend, whether choosing it said nothing)."""
    has = frozenset(has)
    want = _wanted(op, has, backend, warn=True)
    quiet = backend is not None or want == requested(None)
    if want != "auto":
        ok, why = can_serve(want, device, has)
        if not ok:
            raise BackendError(f"{op}: backend {want!r} cannot run here: {why}")
        return want, quiet
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    reasons = []
    for name in order:
        ok, why = can_serve(name, device, has)
        if ok:
            if reasons and name == "reference":
                warn_once((op, device.type, tuple(reasons)),
                          f"fusedtune: {op} on {device.type} runs the PyTorch reference: " + "; ".join(reasons))
                quiet = False
            return name, quiet
        reasons.append(f"{name}: {why}")
    raise BackendError(f"{op}: no backend can run on {device}: " + "; ".join(reasons))


def refuse_unservable(what: str, backend: str | None, device, ops, label: str) -> None:
    """Refuse, before anything is built or swapped, a per-call backend that is unknown or that cannot run every
    (op, has) of `ops` on `device` (the layer's first forward would fail after the model was changed)."""
    if backend is None:
        return
    device = torch.device(device)
    try:
        for op, has in ops:
            resolve(op, device, has, backend)
    except (ValueError, BackendError) as e:
        raise ValueError(f"{what}: backend {backend!r} cannot run {label} on {device} ({e}); nothing was "
                         "changed") from None


def explain(op: str, device: torch.device, has, backend: str | None = None) -> dict:
    """What resolve() would pick, without warnings: {'backend': ..., 'why_not': {...}}."""
    has = frozenset(has)
    want = _wanted(op, has, backend, warn=False)
    order = [want] if want != "auto" else (["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"])
    why_not = {}
    for name in order:
        ok, why = can_serve(name, device, has)
        if ok:
            return {"backend": name, "why_not": why_not}
        why_not[name] = why
    return {"backend": None, "why_not": why_not}
