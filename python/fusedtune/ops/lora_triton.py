"""The Triton schedule of the LoRA ops (fusedtune.triton_kernels.lora), same math as the reference."""
from __future__ import annotations

import torch

from ..triton_kernels import lora as tk

_NO_DROPOUT = tk.Dropout(0.0, 0)
# Products of at least this many multiply-adds (M * N * K) take the "cublas" schedule: the base GEMM through
# torch.mm (cuBLAS), then lora_expand_kernel adds the LoRA term (with the dropout mask in dX) and the bias in
# one more pass over the output (read and written once, the sum rounded once more). Smaller ones take the
# "fused" schedule: the LoRA term in the Triton GEMM's epilogue, one launch less. On an H200
# (bench/results/lora.csv, 2026-11-30, 4096 tokens, r 16) the cuBLAS composition (unsloth's addmm_) beat the
# fused GEMM at every Llama-3-8B shape: forward 0.214 / 0.745 / 0.739 ms against 0.269 / 0.885 / 0.869 at
# q / gate-up / down, backward 0.276 / 0.826 / 0.898 against 0.450 / 0.998 / 1.017; the q_proj call (4096^3
# = 2^36) was bound by host time there, which two more launches raise. The bench times both schedules.
CUBLAS_MIN_WORK = 2**37


def schedule(M: int, N: int, K: int, nf4, path: str) -> str:
    """'cublas' or 'fused' for a GEMM of M x N x K (CUBLAS_MIN_WORK); NF4 dequantized in the tile load is fused."""
    if nf4 is not None and path != "buffer":
        return "fused"
    return "cublas" if M * N * K >= CUBLAS_MIN_WORK else "fused"


def _dense(weight, nf4, path: str, N: int, K: int, dtype) -> torch.Tensor:
    """The base weight as a dense [N, K] matrix (a view of W, or NF4 dequantized into a buffer)."""
    return tk.nf4_dequant(nf4, (N, K), dtype) if nf4 is not None else weight


def _base(weight, nf4, path: str, N: int, K: int, dtype, transpose: bool):
    """(q, q_strides, nf4 state for the kernel) of the base weight, as Q[n, k] of C = P . Q^T:
    W itself (forward) or W^T (transpose, for dX = dy . W)."""
    if nf4 is not None and path == "buffer":
        weight, nf4 = _dense(weight, nf4, path, N, K, dtype), None
    if nf4 is not None:
        return nf4["q"], ((1, K) if transpose else (K, 1)), nf4
    s0, s1 = weight.stride()
    return weight, ((s1, s0) if transpose else (s0, s1)), None


def forward(x, weight, A, B, bias, S, gid, p, seed, nf4, path):
    return forward_scaled(x, weight, A, B, bias, S, gid, p, seed, nf4, path, None)[:2]


def forward_scaled(x, weight, A, B, bias, S, gid, p, seed, nf4, path, g):
    """(y, t, F). g None: y = x W^T + t B^T + bias, F None. DoRA (g float32 [N]): y = g * F + bias with
    F = x W^T + t B^T, both written by the same GEMM's epilogue."""
    N, K = B.shape[0], x.shape[1]
    t = tk.shrink(x, A, False, S, gid, tk.dropout(p, seed))
    if schedule(x.shape[0], N, K, nf4, path) == "cublas":
        y = torch.mm(x, _dense(weight, nf4, path, N, K, x.dtype).t())
        F = None if g is None else torch.empty_like(y)
        return tk.expand_(y, t, B, B.stride(), bias, _NO_DROPOUT, x.dtype, col_scale=g, f_out=F), t, F
    q, qs, nf = _base(weight, nf4, path, N, K, x.dtype, transpose=False)
    F = None if g is None else torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device)
    y = tk.gemm(x, q, qs, N, t, B, B.stride(), bias, x.dtype, _NO_DROPOUT, nf, col_scale=g, f_out=F)
    return y, t, F


def forward_dropped(x, weight, A, B, bias, S, gid, p, seed, nf4, path, g):
    """DoRA with dropout (reference.lora.forward_dropped): (y, t, G), G = drop(x) W^T + t B^T in float32 from
    the exact keep * x through the base GEMM (float32 accumulation and output) and a float32 t B^T,
    y = (x W^T + t B^T + bias) + (g - 1) * G rounded once to x's dtype."""
    N, K = B.shape[0], x.shape[1]
    drop = tk.dropout(p, seed)
    t = tk.shrink(x, A, False, S, gid, drop)
    q, qs, nf = _base(weight, nf4, path, N, K, x.dtype, transpose=False)
    y = tk.gemm(x, q, qs, N, t, B, B.stride(), bias, torch.float32, _NO_DROPOUT, nf)
    G = tk.gemm(tk.dropout_keep(x, drop), q, qs, N, None, None, (0, 0), None, torch.float32, _NO_DROPOUT, nf)
    G = G.addmm_(t, B.to(torch.float32).t(), beta=drop.scale)     # G * 1/(1-p) + t B^T
    return torch.addcmul(y, G, g - 1.0).to(x.dtype), t, G


def base_dgrad(d, x, weight, nf4, path):
    """d . W in d's dtype (the dense or NF4 base weight; x gives K)."""
    N, K = d.shape[1], x.shape[1]
    if d.dtype == x.dtype and schedule(d.shape[0], N, K, nf4, path) == "cublas":
        return torch.mm(d, _dense(weight, nf4, path, N, K, x.dtype))
    q, qs, nf = _base(weight, nf4, path, N, K, x.dtype, transpose=True)
    return tk.gemm(d, q, qs, K, None, None, (0, 0), None, d.dtype, _NO_DROPOUT, nf)


def backward(dy, x, weight, A, B, t, S, gid, p, seed, nf4, path, need_dx, need_dA, need_dB, dy_base=None):
    N, K = dy.shape[1], x.shape[1]
    drop = tk.dropout(p, seed)
    dx = dA = dB = None
    if not (need_dx or need_dA):
        return dx, dA, tk.wgrad(dy, t, _NO_DROPOUT) if need_dB else None
    if need_dB and B.stride(1) == 1 and tk.dy_fused(B.shape[1]):
        u, dB = tk.dy_products(dy, B, t, S, gid)                 # one read of dy for u and dB
    else:
        u = tk.shrink(dy, B, True, S, gid, _NO_DROPOUT)          # (dy . B) * S[gid]
        dB = tk.wgrad(dy, t, _NO_DROPOUT) if need_dB else None
    if need_dx:
        d = dy if dy_base is None else dy_base
        if d.dtype == x.dtype and schedule(dy.shape[0], N, K, nf4, path) == "cublas":
            dx = tk.expand_(torch.mm(d, _dense(weight, nf4, path, N, K, x.dtype)), u, A, (A.stride(1), A.stride(0)),
                            None, drop, x.dtype)
        else:
            q, qs, nf = _base(weight, nf4, path, N, K, x.dtype, transpose=True)
            dx = tk.gemm(d, q, qs, K, u, A, (A.stride(1), A.stride(0)), None, x.dtype, drop, nf)
    if need_dA:
        dA = tk.wgrad(x, u, drop, transpose=True)
    return dx, dA, dB
