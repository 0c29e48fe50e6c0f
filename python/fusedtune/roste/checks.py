"""Argument checks shared by the model-level RoSTE API (clear errors, raised before anything changes)."""
from __future__ import annotations

from ..reference import hadamard as href


def check_bits(what: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        need = "None or an int in [2, 8]" if allow_none else "an int in [2, 8]"
        raise ValueError(f"{what}: {name} must be {need}, got {value!r}")


def check_clip(what: str, clip_ratio) -> None:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"{what}: clip_ratio must be a number in (0, 1], got {clip_ratio!r}")


def hadamard_ok(n: int) -> bool:
    """Whether a Hadamard matrix of order n is constructed (fusedtune.reference.hadamard.split_size)."""
    try:
        href.split_size(n)
    except ValueError:
        return False
    return True


def check_hadamard(what: str, role: str, n: int) -> None:
    """ValueError naming the role (e.g. "hidden size") and the supported sizes when n has no construction."""
    try:
        href.split_size(n)
    except ValueError as e:
        raise ValueError(f"{what}: the {role} {n} has no Hadamard construction here, so it cannot be rotated "
                         f"({e})") from None
