"""Autocast for fusedtune's fused linear ops. torch.autocast does not reach inside a custom op (its body
would see autocast on while its fake impl and backward would not), so a layer casts its inputs the way
autocast casts those of F.linear and calls the op with autocast off: the output is in the autocast
dtype, and the gradients flow back through the casts to the original dtypes."""
from __future__ import annotations

import contextlib

import torch

_TYPES = ("cuda", "cpu")
_NULL = contextlib.nullcontext()    # reusable
_any_on = torch._C._is_any_autocast_enabled     # one C call: the common case, autocast off everywhere


def linear_dtype(device) -> torch.dtype | None:
    """The dtype autocast runs F.linear in on this device, or None where autocast is off."""
    if not _any_on():
        return None
    t = torch.device(device).type
    if t in _TYPES and torch.is_autocast_enabled(t):
        return torch.get_autocast_dtype(t)
    return None


_CASTS = (torch.float32, torch.float16, torch.bfloat16)   # what autocast casts (float64 it leaves alone)


def cast(dtype: torch.dtype, *tensors):
    """The float32/16-bit tensors in dtype; None, float64 and integer tensors as they are (as autocast)."""
    return tuple(t.to(dtype) if t is not None and t.dtype in _CASTS and t.dtype != dtype else t
                 for t in tensors)


def off(device):
    """A scope with autocast off on `device`'s type (nothing to do, and no torch.autocast to enter, where it
    is off already)."""
    if not _any_on():
        return _NULL
    t = torch.device(device).type
    if t in _TYPES and not torch.is_autocast_enabled(t):
        return _NULL
    return torch.autocast(t, enabled=False)


def linear_call(fn, x: torch.Tensor, weight: torch.Tensor, bias):
    """fn(x, weight, bias) -- a fused linear op -- as autocast would run F.linear: in the autocast dtype
    when autocast is on for x's device (with autocast off inside), else as given."""
    dt = linear_dtype(x.device)
    if dt is None:
        return fn(x, weight, bias)
    x, weight, bias = cast(dt, x, weight, bias)
    with off(x.device):
        return fn(x, weight, bias)
