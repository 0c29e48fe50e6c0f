"""Pure-PyTorch reference of the sparse-delta family: the specification.

Indices are flat row-major int32 positions r * in_features + c into a weight [out, in], sorted and
unique; deltas are float32.
sddmm: the delta gradient at the k indices, g[i] = sum_t dy[t, r_i] * x[t, c_i] (float32), which the
    kernels compute without a dense dW.
sparse_adamw_: AdamW on the deltas (the shared rule of reference/adamw.py), then the merged weight
    at each index is written as round(base + delta): the float32 delta stays the truth, so bf16
    rounding never loses an update, and writing base back reverts exactly. With per-element step
    counts (entries grown by regrowth), each entry's bias correction follows its own count.
"""
from __future__ import annotations

import torch

from .adamw import adamw_, own_bias

_CHUNK = 1 << 16


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    idx = indices.long()
    r, c = idx // x2.shape[1], idx % x2.shape[1]
    out = torch.empty(idx.numel(), dtype=torch.float32, device=x.device)
    for s in range(0, idx.numel(), _CHUNK):  # bounded memory: T x chunk products at a time
        e = s + _CHUNK
        out[s:e] = (dy2[:, r[s:e]].double() * x2[:, c[s:e]].double()).sum(0).float()
    return out


def sparse_adamw_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, c: dict, lr: float,
                  step: int) -> None:
    """steps[i]: None or the per-element step counts of tensor i (int32, incremented here); an entry
    whose count differs from `step` takes its own bias corrections (reference/adamw.py own_bias)."""
    for val, g, m, v, w, base, idx, st in zip(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps):
        sbc2 = step_size = None
        if st is not None and st.numel():
            st.add_(1)
            own = st != step
            if bool(own.any()):
                o2, os_ = own_bias(c, lr, st)
                sbc2 = torch.where(own, o2, torch.full_like(o2, c["sbc2"]))
                step_size = torch.where(own, os_, torch.full_like(os_, c["step_size"]))
        nv = adamw_(val, g, m, v, c, sbc2, step_size)
        val.copy_(nv)
        merged = base.float() + nv
        w.view(-1).index_copy_(0, idx.long(), merged.to(w.dtype))
