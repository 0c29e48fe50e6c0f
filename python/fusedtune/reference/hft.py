"""Pure-PyTorch reference of the half-fine-tuning family: the specification.

row_grad: the weight gradient of a linear layer restricted to some output rows,
    G[r, :] = sum_t dy[t, rows[r]] * x[t, :]   (float32; no dense dW is formed by the kernels)
masked_adamw: one AdamW step, operation for operation as csrc/include/fusedtune/hft_math.h, so the
    C++ CPU and CUDA kernels are bit-identical to it; for a row-master parameter it also writes the
    updated rows, rounded once, into the layer's full weight.
"""
from __future__ import annotations

import torch

from .adamw import adamw_, adamw_constants  # noqa: F401  (adamw_constants: re-exported)


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    ct = torch.float64 if torch.float64 in (dy.dtype, x.dtype) else torch.float32   # (float64 masters: exact)
    return (dy2.index_select(1, rows).t().to(ct) @ x2.to(ct)).to(out_dtype)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, targets, rows, c: dict) -> None:
    """In place. targets[i] is the full weight a row master writes back to (or an empty tensor)."""
    for p, g, m, v, tgt, r in zip(params, grads, exp_avgs, exp_avg_sqs, targets, rows):
        pf = adamw_(p, g, m, v, c)
        p.copy_(pf)
        if tgt.numel():
            tgt.index_copy_(0, r, pf.to(tgt.dtype))
