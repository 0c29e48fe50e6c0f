"""DoRA's backward prologue (fusedtune.ops.dora): one pass over dy and F.

lora_dora_dy_kernel   from dy [M, N] (the output gradient) and F [M, N] (the product before DoRA's column
                      scale g, in the model's dtype; with dropout G = drop(x) W^T + t B^T in float32),
                      in float32: dF = dy * g, written in float32 (for the adapter gradients) and rounded
                      to dy's dtype (for dX's base GEMM), and per block of rows the column sums of dy * F
                      (the magnitude's gradient, times the norm) and of dy (a bias's gradient).
                      torch sums the [row blocks, N] partials: deterministic.

The unfused sequence reads and writes [M, N] float32 temporaries five times (about 38 bytes per element
for a bf16 model); this pass reads dy and F and writes the two dF copies (10 bytes per element).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv

from .launch import fast
from .lora import _INTERP, _check32
from .registry import KernelSpec, register


@triton.jit
def lora_dora_dy_kernel(dy_ptr, f_ptr, g_ptr, df_ptr, dlow_ptr, pg_ptr, pb_ptr, M, N, stride_dym, stride_fm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ok = (offs_m < M)[:, None] & n_ok[None, :]
    d = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs_m[:, None] * stride_fm + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    df = d * g[None, :]
    out = offs_m[:, None] * N + offs_n[None, :]
    tl.store(df_ptr + out, df, mask=ok)
    tl.store(dlow_ptr + out, df.to(dlow_ptr.dtype.element_ty), mask=ok)
    tl.store(pg_ptr + pid_m * N + offs_n, tl.sum(d * f, axis=0), mask=n_ok)
    tl.store(pb_ptr + pid_m * N + offs_n, tl.sum(d, axis=0), mask=n_ok)


def _blocks() -> tuple[int, int, int]:
    return (32, 32, 4) if _INTERP else (32, 128, 8)   # 16 elements a thread: ~93 registers (kernel report)


def dora_dy(dy: torch.Tensor, F: torch.Tensor, g: torch.Tensor):
    """(dF float32, dF in dy's dtype, sum over rows of dy * F, sum over rows of dy), all from float32 dy."""
    M, N = F.shape
    _check32("dora_dy", dy, F)
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    F = F if F.stride(1) == 1 else F.contiguous()
    BM, BN, warps = _blocks()
    rows = cdiv(M, BM)
    dF = torch.empty((M, N), dtype=torch.float32, device=F.device)
    low = torch.empty((M, N), dtype=dy.dtype, device=F.device)
    pg = torch.empty((rows, N), dtype=torch.float32, device=F.device)
    pb = torch.empty((rows, N), dtype=torch.float32, device=F.device)
    if M and N:
        fast(lora_dora_dy_kernel)[(rows, cdiv(N, BN))](dy, F, g.contiguous(), dF, low, pg, pb, M, N, dy.stride(0),
                                                        F.stride(0), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
    return dF, low, pg.sum(0), pb.sum(0)


register(KernelSpec(
    family="lora", name="lora_dora_dy_kernel", fn=lora_dora_dy_kernel,
    signature={"dy_ptr": "*bf16", "f_ptr": "*bf16", "g_ptr": "*fp32", "df_ptr": "*fp32", "dlow_ptr": "*bf16",
               "pg_ptr": "*fp32", "pb_ptr": "*fp32", "M": "i32", "N": "i32", "stride_dym": "i32", "stride_fm": "i32"},
    configs=[{"constexprs": dict(BLOCK_M=32, BLOCK_N=128), "num_warps": 8, "num_stages": 1}]))
