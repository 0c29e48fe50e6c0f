"""Shared LoRA test cases: an fp64 computation of the LoRA linear straight from its definition (not from
fusedtune's reference), used by the CPU, interpreter and GPU tests."""
from __future__ import annotations

import torch
from torch import nn


def exact64(x, W, As, Bs, scales, bias=None, keep=None, p=0.0, rows_adapter=None, dy=None):
    """fp64 y (and, with dy, the grads of x and every A and B) of
    y = x W^T + sum_a s_a (drop(x) A_a^T) B_a^T + b, row m using only adapter rows_adapter[m] when given
    (-1: none), else all adapters. keep: bool mask [M, K] of the dropout (kept elements scaled 1/(1-p))."""
    x2 = x.reshape(-1, x.shape[-1]).double().detach().requires_grad_(dy is not None)
    A64 = [a.double().detach().requires_grad_(dy is not None) for a in As]
    B64 = [b.double().detach().requires_grad_(dy is not None) for b in Bs]
    xd = x2 if keep is None else torch.where(keep, x2 / (1.0 - p), torch.zeros((), dtype=torch.float64))
    y = x2 @ W.double().t()
    for i, (a, b, s) in enumerate(zip(A64, B64, scales)):
        term = s * (xd @ a.t()) @ b.t()
        if rows_adapter is not None:
            term = term * (rows_adapter.reshape(-1, 1) == i).double()
        y = y + term
    if bias is not None:
        y = y + bias.double()
    if dy is None:
        return y.detach()
    grads = torch.autograd.grad(y, [x2] + A64 + B64, dy.reshape(y.shape).double())
    return y.detach(), [g.detach() for g in grads]


def rand_adapter(r, K, N, gen, scale_b=0.1):
    return (torch.randn(r, K, generator=gen) / K ** 0.5, torch.randn(N, r, generator=gen) * scale_b)


def layer_outputs(layer, x, dy, adapter="default"):
    """[y, dx, dA, dB] of one forward+backward of a LoRA layer (peft's or ours) at x with upstream dy."""
    xi = x.clone().requires_grad_()
    y = layer(xi)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return [y] + list(torch.autograd.grad(y, [xi, A, B], dy))


class SeededDropout(nn.Module):
    """peft's dropout slot filled with fusedtune's seeded rule (the mask our layer regenerates)."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        from fusedtune.reference.lora import dropout
        return dropout(x.reshape(-1, x.shape[-1]), self.p, self.seed).reshape(x.shape).to(x.dtype)


def norm64(W, A, B, s):
    """||W + s B A|| per row, fp64, from the definition."""
    return torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)


def dora64(x, W, A, B, s, m, bias, dy, keep=None, p=0.0):
    """fp64 [y, dx, dA, dB, dm] of peft's DoRA: y = x W^T + (g-1) (d(x) W^T) + g s (d(x) A^T) B^T + b,
    g = m / ||W + s B A|| with the norm detached (d = dropout with the boolean mask `keep`)."""
    x2 = x.reshape(-1, x.shape[-1]).double().detach().requires_grad_()
    A64, B64, m64 = (t.double().detach().requires_grad_() for t in (A, B, m))
    W64 = W.double()
    g = m64 / norm64(W, A, B, s)
    xd = x2 if keep is None else torch.where(keep, x2 / (1.0 - p), torch.zeros((), dtype=torch.float64))
    y = x2 @ W64.t() + (g - 1) * (xd @ W64.t()) + g * s * ((xd @ A64.t()) @ B64.t())
    if bias is not None:
        y = y + bias.double()
    grads = torch.autograd.grad(y, [x2, A64, B64, m64], dy.reshape(y.shape).double())
    return [y.detach()] + [t.detach() for t in grads]


def dora_outputs(layer, x, dy, name="default"):
    xi = x.clone().requires_grad_()
    y = layer(xi)
    ps = [layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight]
    return [y] + list(torch.autograd.grad(y, [xi] + ps, dy))


def tma_direct(config, q_t, dropout, M, K, N, R, dtype, device, programs, seed=0):
    """(C from one direct launch of lora_gemm_tma_kernel with `config` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages,
    EPI_SPLIT),
    its float64 reference): C = P . Q^T + keep/(1-p) (T . E^T) + bias, Q = q (q_t False, with a bias) or q^T
    (q_t True), dropout 0.25 over C's [M, N] when asked (the dX orientation's mask); the GPU and interpreter
    tests of every config share it, so a change of the kernel's signature fails both."""
    from fusedtune.reference.lora import dropout_mask
    from fusedtune.triton_kernels import lora as tk
    from fusedtune.triton_kernels import lora_tma
    m, n, k, w, s, split = config
    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(M, K, device=device, generator=g).to(dtype)
    q = torch.randn(K, N, device=device, generator=g) if q_t else torch.randn(N, K, device=device, generator=g)
    q = (q / K ** 0.5).to(dtype)
    t = torch.randn(M, R, device=device, generator=g)
    e = torch.randn(N, R, device=device, generator=g) * 0.1
    bias = None if dropout else torch.randn(N, device=device, generator=g).to(dtype)
    drop = tk.Dropout(0.25, 77) if dropout else tk._NO_DROP
    c = torch.empty(M, N, device=device, dtype=dtype)
    lora_tma._ensure_allocator()
    lora_tma.lora_gemm_tma_kernel.fn[(programs,)](
        p, q, t, e, c if bias is None else bias, c, c, c, M, N, K, R, K, N if q_t else K, R, 1, N,
        drop.seed, drop.thresh, drop.scale, programs, Q_T=q_t, HAS_LORA=True, HAS_BIAS=bias is not None,
        DROPOUT=dropout, COL_SCALE=False, EPI_PREC="tf32" if device != "cpu" else "ieee", BLOCK_R=16, GROUP_M=8,
        BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, EPI_SPLIT=split, num_warps=w, num_stages=s)
    Q = q.double().t() if q_t else q.double()
    lo = t.double() @ e.double().t()
    if dropout:
        lo = torch.where(dropout_mask(M, N, 77, 0.25, device), lo / 0.75, 0.0)
    return c, p.double() @ Q.t() + lo + (0.0 if bias is None else bias.double())
