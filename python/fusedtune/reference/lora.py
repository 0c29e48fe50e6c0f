"""Pure-PyTorch reference of the LoRA family: the specification (docs/lora.md).

One general form covers a single adapter, several active adapters and mixed-adapter batches: the
adapters' A matrices are stacked along the rank, A [R, K], their B matrices along the rank,
B [N, R], and a scale table S [G, R] says, for each row group g, the factor of every rank column
(the adapter's scale on its own columns, 0 elsewhere). Row m of the batch belongs to group gid[m]
(-1: no adapter; gid None: every row is group 0).

    t  = (dropout(x) . A^T) * S[gid]                     float32 [M, R]  ("shrink")
    y  = x . W^T + t . B^T + bias                        one rounding to x's dtype
    u  = (dy . B) * S[gid]                               float32 [M, R]
    dX = dy . W + keep/(1-p) * (u . A)                   dW = dy^T . x only when W trains
    dB = dy^T . t        dA = u^T . dropout(x)

Dropout acts on the LoRA branch only and is regenerated from a seed, never stored: element (m, k) of x
is kept iff word k mod 4 of Philox4x32-10(key=seed, counter=(k div 4, m, 0, 2)) >= thresh,
thresh = floor(p * 2^32); kept values are multiplied by 1/(1-p) (float32). One Philox call serves four
neighbouring columns, and the mask of a row does not depend on the other rows or on the tiling.
"""
from __future__ import annotations

import torch

from .zo import MASK32, philox4x32_10

DROPOUT_STREAM = 2


def dropout_threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    return min(int(p * 2.0**32), 2**32 - 1)


def keep_scale(p: float) -> float:
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def dropout_mask(rows: int, cols: int, seed: int, p: float, device="cpu") -> torch.Tensor:
    """bool [rows, cols]: which elements of a [rows, cols] input the LoRA branch keeps."""
    groups = (cols + 3) // 4
    j = torch.arange(groups, dtype=torch.int64, device=device).repeat(rows)
    m = torch.arange(rows, dtype=torch.int64, device=device).repeat_interleave(groups)
    zero = torch.zeros_like(j)
    u = philox4x32_10(int(seed) & ((1 << 64) - 1), j & MASK32, m & MASK32, zero, zero + DROPOUT_STREAM)
    words = torch.stack(u, dim=1).reshape(rows, groups * 4)[:, :cols]
    return words >= dropout_threshold(p)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """float32 copy of the 2-D input with the LoRA dropout applied (p = 0: just the float32 copy)."""
    ct = compute_dtype(x2)
    xf = x2.to(ct)
    if p == 0.0:
        return xf
    keep = dropout_mask(x2.shape[0], x2.shape[1], seed, p, x2.device)
    return torch.where(keep, xf * keep_scale(p), torch.zeros((), dtype=ct, device=x2.device))


def row_scales(S: torch.Tensor, gid: torch.Tensor | None, M: int, ct=torch.float32) -> torch.Tensor:
    """float32 [M, R]: the scale of every rank column for every row."""
    if gid is None:
        return S[0].to(ct).expand(M, -1)
    g = gid.long()
    out = S.to(ct)[g.clamp_min(0)]
    return torch.where((g >= 0)[:, None], out, torch.zeros((), dtype=ct, device=S.device))


def shrink(x2, A, S, gid, p: float, seed: int) -> torch.Tensor:
    ct = compute_dtype(x2)
    return (dropout(x2, p, seed) @ A.to(ct).t()) * row_scales(S, gid, x2.shape[0], ct)


def _product(x2, weight, A, B, S, gid, p: float, seed: int):
    """(x W^T + t B^T unrounded, t)."""
    ct = compute_dtype(x2)
    t = shrink(x2, A, S, gid, p, seed)
    return x2.to(ct) @ weight.to(ct).t() + t @ B.to(ct).t(), t


def forward(x2, weight, A, B, bias, S, gid, p: float, seed: int):
    """(y [M, N] in x's dtype, t float32 [M, R]; float64 throughout for float64 x)."""
    y, t = _product(x2, weight, A, B, S, gid, p, seed)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype), t


def backward(dy2, x2, weight, A, B, t, S, gid, p: float, seed: int, need_dx=True, need_dA=True, need_dB=True,
             dy_base=None):
    """(dX [M, K] in x's dtype, dA float32 [R, K], dB float32 [N, R]); None where not needed. dy_base: what
    the base's dy . W reads in dy's place (None: dy)."""
    ct = compute_dtype(x2)
    dyf = dy2.to(ct)
    u = (dyf @ B.to(ct)) * row_scales(S, gid, dy2.shape[0], ct)
    dx = dA = dB = None
    if need_dx:
        lora = u @ A.to(ct)
        if p != 0.0:
            keep = dropout_mask(x2.shape[0], x2.shape[1], seed, p, x2.device)
            lora = torch.where(keep, lora * keep_scale(p), torch.zeros((), dtype=ct, device=x2.device))
        dyb = dyf if dy_base is None else dy_base.to(ct)
        dx = (dyb @ weight.to(ct) + lora).to(x2.dtype)
    if need_dA:
        dA = u.t() @ dropout(x2, p, seed)
    if need_dB:
        dB = dyf.t() @ t
    return dx, dA, dB


def dora_weight_norm(weight, A, B, scale: float) -> torch.Tensor:
    """DoRA's column norm (peft's get_weight_norm): ||W + scale * B . A|| of every output row, from the dense
    sum, float32 (float64 for float64 weights). The specification of fusedtune.ops.dora_weight_norm."""
    ct = compute_dtype(weight)
    return torch.linalg.vector_norm(weight.to(ct) + scale * (B.to(ct) @ A.to(ct)), dim=1)


def dora_dy(dy, F, g):
    """DoRA's backward prologue: with d = dy in float32, (dF = d * g, dF rounded to dy's dtype (the model's),
    sum over rows of d * F, sum over rows of d). F is the model's dtype, or float32 (with dropout)."""
    d = dy.to(g.dtype)
    dF = d * g
    return dF, dF.to(dy.dtype, copy=True), (d * F.to(g.dtype)).sum(0), d.sum(0)  # (a copy: op outputs never alias)


def forward_scaled(x2, weight, A, B, bias, S, gid, p: float, seed: int, g):
    """DoRA's fused forward: (y = g * F + bias, t, F) with F = x W^T + t B^T before any rounding; y and F
    rounded once to x's dtype (float64 throughout for float64 x)."""
    acc, t = _product(x2, weight, A, B, S, gid, p, seed)
    y = acc * g.to(acc.dtype)
    if bias is not None:
        y = y + bias.to(acc.dtype)
    return y.to(x2.dtype), t, acc.to(x2.dtype)


def forward_dropped(x2, weight, A, B, bias, S, gid, p: float, seed: int, g):
    """DoRA's forward with dropout (peft's extra base term of the dropped input): (y, t, G) with
    G = drop(x) W^T + t B^T in float32, unrounded (what the magnitude's gradient reads, dy/dg), and
    y = x W^T + t B^T + bias + (g - 1) * G rounded once to x's dtype. G's base product is taken as
    ((keep * x) W^T) / (1 - p): keep * x is exact in x's dtype, so a 16-bit GEMM with float32 accumulation
    (the Triton schedule) gives it to float32 accuracy; rounding G, or dropout(x) - x, to a 16-bit dtype
    costs the magnitude's gradient ~2^-9 of relative accuracy, which peft's float32 DoRA branch does not."""
    ct = compute_dtype(x2)
    M, K = x2.shape
    xf = x2.to(ct)
    zero = torch.zeros((), dtype=ct, device=x2.device)
    keep = dropout_mask(M, K, seed, p, x2.device)
    t = (torch.where(keep, xf * keep_scale(p), zero) @ A.to(ct).t()) * row_scales(S, gid, M, ct)   # = shrink()
    W = weight.to(ct)
    tB = t @ B.to(ct).t()
    G = torch.addmm(tB, torch.where(keep, xf, zero), W.t(), alpha=keep_scale(p))
    y = torch.addmm(tB, xf, W.t())
    if bias is not None:
        y = y + bias.to(ct)
    y = torch.addcmul(y, G, g.to(ct) - 1.0)
    return y.to(x2.dtype), t, G
