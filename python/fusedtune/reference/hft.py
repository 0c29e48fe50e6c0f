"""Pure-PyTorch reference of the half-fine-tuning family: the specification.

row_grad: the weight gradient of a linear layer restricted to some output rows,
    G[r, :] = sum_t dy[t, rows[r]] * x[t, :]   (float32; no dense dW is formed by the kernels)
masked_adamw: one AdamW step, operation for operation as csrc/include/fusedtune/hft_math.h, so the
    C++ CPU and CUDA kernels are bit-identical to it; for a row-master parameter it also writes the
    updated rows, rounded once, into the layer's full weight.
"""
from __future__ import annotations

import torch


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return dy2.index_select(1, rows).t().float() @ x2.float()


def adamw_constants(lr, beta1, beta2, eps, weight_decay, step):
    """Host-side constants, rounded to float32 once, shared by every backend."""
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return dict(decay=f(1.0 - lr * weight_decay), beta1=f(beta1), omb1=f(1.0 - beta1), beta2=f(beta2),
                omb2=f(1.0 - beta2), sbc2=f(bc2 ** 0.5), eps=f(eps), step_size=f(lr / bc1))


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, targets, rows, c: dict) -> None:
    """In place. targets[i] is the full weight a row master writes back to (or an empty tensor)."""
    for p, g, m, v, tgt, r in zip(params, grads, exp_avgs, exp_avg_sqs, targets, rows):
        f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        pf, gf = p.float(), g.float()
        pf = pf * f32(c["decay"])
        m.copy_(f32(c["beta1"]) * m + f32(c["omb1"]) * gf)
        v.copy_(f32(c["beta2"]) * v + f32(c["omb2"]) * (gf * gf))
        # torch.sqrt on float32 CPU tensors is not correctly rounded; via float64 it is (53 >= 2*24+2).
        # A full-tensor divisor: ATen turns division by a scalar into a reciprocal multiply.
        denom = torch.sqrt(v.double()).float() / torch.full_like(v, c["sbc2"]) + f32(c["eps"])
        pf = pf - f32(c["step_size"]) * (m / denom)
        p.copy_(pf)
        if tgt.numel():
            tgt.index_copy_(0, r, pf.to(tgt.dtype))
