"""Test helpers shared by every family: run an op on every backend that can serve a device and
hold it to the reference (bit-exact where the op promises it, else DESIGN.md's tolerance rule)."""
from __future__ import annotations

from typing import Callable

import torch

from . import backend as _backend


def available_backends(device, has=("reference", "cpu", "cuda", "triton")) -> list[str]:
    """Backends other than the reference that can run an op implementing `has` on `device`."""
    device = torch.device(device)
    return [b for b in _backend.BACKENDS
            if b != "reference" and _backend.can_serve(b, device, frozenset(has))[0]]


def _flat(x):
    if torch.is_tensor(x):
        return [x]
    out = []
    for v in x:
        out += _flat(v)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The storage bits of a floating tensor, for bitwise comparison (NaN == NaN of equal bits)."""
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


def assert_same_bits(got, want, what: str = "") -> None:
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want))):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        diff = bits(g).cpu() != bits(w).cpu()
        if diff.any():
            idx = diff.reshape(-1).nonzero()[0].item()
            raise AssertionError(f"{what}[{i}]: {int(diff.sum())} of {diff.numel()} elements differ in bits; "
                                 f"first at flat index {idx}: {g.reshape(-1)[idx].item()!r} vs "
                                 f"{w.reshape(-1)[idx].item()!r}")


def assert_within_rule(got, exact64, unfused, what: str = "", atol: float = 1e-6) -> None:
    """DESIGN.md: error of the fused result against the fp64 reference at most 2x the error of the
    unfused same-precision PyTorch computation, plus atol."""
    for i, (g, r, u) in enumerate(zip(_flat(got), _flat(exact64), _flat(unfused))):
        r = r.double().cpu()
        err = (g.double().cpu() - r).abs().max().item()
        base = (u.double().cpu() - r).abs().max().item()
        assert err <= 2 * base + atol, f"{what}[{i}]: error {err:.3e} > 2 x unfused error {base:.3e} + {atol}"


def check_backends(run: Callable[[str], object], device="cpu", *, exact: bool,
                   has=("reference", "cpu", "cuda", "triton"), exact64: Callable[[], object] | None = None,
                   unfused: Callable[[], object] | None = None, atol: float = 1e-6) -> list[str]:
    """run(backend) -> output(s). Compares every available backend with run('reference').
    Returns the backends checked (the caller may assert that the expected ones were among them)."""
    want = run("reference")
    checked = []
    for b in available_backends(device, has):
        got = run(b)
        if exact:
            assert_same_bits(got, want, f"backend {b}")
        else:
            assert exact64 is not None and unfused is not None, "inexact ops need exact64= and unfused="
            assert_within_rule(got, exact64(), unfused(), f"backend {b}", atol)
        checked.append(b)
    return checked
