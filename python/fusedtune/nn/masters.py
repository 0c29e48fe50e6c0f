"""Float32 masters under dtype conversions: `model.to(torch.bfloat16)`, `.half()` and the like cast every
floating Parameter, and would round the float32 truth of a fusedtune layer (SparseDeltaLinear's deltas,
RowMaskedLinear's row masters) to the model's dtype, losing exactly what the master exists to keep.
Layers route nn.Module._apply through keep_dtype: masters (and their gradients) follow device moves and
keep their dtype."""
from __future__ import annotations

from typing import Callable

import torch


def keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], masters) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn for nn.Module._apply that applies fn to everything, except that a master in `masters` (or its
    .grad) comes out in its own dtype, on the device fn chose."""
    keep = {id(t) for p in masters if p is not None for t in (p, p.grad) if t is not None}

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if id(t) in keep and out.dtype != t.dtype:
            out = t.to(device=out.device)
        return out
    return apply
