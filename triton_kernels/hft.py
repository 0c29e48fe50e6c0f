"""Half-fine-tuning family, Triton kernel: the weight gradient of a linear layer for selected output
rows only, G[r, :] = sum_t dy[t, rows[r]] * x[t, :], as one GEMM whose A-tile load gathers the
selected columns of dy (no gathered copy of dy, no dense dW). fp32 accumulation; the output is fp32,
or bf16/fp16 rounded once from the fp32 sum in the store (HFT block granularity's gradient, in the
weight's dtype)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import autotune, cdiv
from .launch import fast
from .registry import KernelSpec, register

_INTERP = interpreting()
_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3),
]  # BLOCK_K 32: the gathered A-tile's per-element addresses spill at 64 (python -m fusedtune kernels)
_IEEE_CONFIGS = [  # fp32 operands on FMA units (IEEE): at BLOCK_K 32 every _CONFIGS entry spills on sm_80,
    (128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 128, 16, 4, 3), (64, 64, 16, 4, 3),
]  # and 128x128 (8 warps) or 128x64 (4 warps) spill 16-48 B under triton 3.6's ptxas
if _INTERP:  # the interpreter needs a single config
    _CONFIGS = _IEEE_CONFIGS = [(32, 32, 32, 4, 1)]


def _autotuned(configs):
    return autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                             for m, n, k, w, s in configs], key=["R", "N", "T"])


@_autotuned(_CONFIGS)
@triton.jit
def row_grad_kernel(dy_ptr, x_ptr, rows_ptr, out_ptr, T, R, N, stride_dy, stride_x,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < R
    n_ok = offs_n < N
    cols = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + offs_k[:, None] * stride_dy + cols[None, :]   # [K, M]: dy rows, gathered columns
    b_ptrs = x_ptr + offs_k[:, None] * stride_x + offs_n[None, :]   # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, T, BLOCK_K):
        k_ok = (k0 + offs_k) < T
        a = tl.load(a_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
        a_ptrs += BLOCK_K * stride_dy
        b_ptrs += BLOCK_K * stride_x
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


row_grad_ieee_kernel = _autotuned(_IEEE_CONFIGS)(row_grad_kernel.fn)   # same kernel, fp32 FMA configs


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """dy [T, out], x [T, in] (row-major, same dtype), rows int64 [R] -> out_dtype [R, in]."""
    T, N, R = x.shape[0], x.shape[1], rows.numel()
    if max(dy.numel(), x.numel(), R * N) >= 2**31:
        raise ValueError(f"hft row_grad: the Triton kernel indexes with 32 bits; got dy {tuple(dy.shape)}, "
                         f"x {tuple(x.shape)}, {R} rows (split the tokens into chunks below 2**31 elements)")
    out = torch.empty((R, N), dtype=out_dtype, device=x.device)
    if R == 0 or N == 0:
        return out
    if T == 0:
        return out.zero_()
    grid = lambda meta: (cdiv(R, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    ieee = x.dtype == torch.float32
    fast(row_grad_ieee_kernel if ieee else row_grad_kernel)[grid](dy, x, rows, out, T, R, N, dy.stride(0), x.stride(0),
                                                              IEEE=ieee)
    return out


_SIG = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "rows_ptr": "*i64", "out_ptr": "*fp32", "T": "i32", "R": "i32",
        "N": "i32", "stride_dy": "i32", "stride_x": "i32"}
register(KernelSpec(
    family="hft", name="row_grad_kernel", fn=row_grad_kernel.fn, signature=_SIG, gemm=True,
    configs=[{"constexprs": dict(IEEE=False, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), "num_warps": w, "num_stages": s,
              "signature": dict(_SIG, dy_ptr=f"*{dt}", x_ptr=f"*{dt}", out_ptr=f"*{ot}")}
             for m, n, k, w, s in _CONFIGS for dt, ot in (("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16"))]
    # fp32 operands: the IEEE (FMA) product, no tensor-core instruction by design; checked for spills
    + [{"constexprs": dict(IEEE=True, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), "num_warps": w, "num_stages": s,
        "signature": dict(_SIG, dy_ptr="*fp32", x_ptr="*fp32"), "gemm": False} for m, n, k, w, s in _IEEE_CONFIGS]))
