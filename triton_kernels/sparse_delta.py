"""Sparse-delta family, Triton kernel: SDDMM, the weight gradient at k flat row-major indices only,
g[i] = sum_t dy[t, r_i] * x[t, c_i] (float32), streaming the tokens in tiles; no dense dW."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import autotune
from .registry import KernelSpec, register

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [(128, 32, 4), (64, 64, 4), (256, 16, 8)]  # (BLOCK_I, BLOCK_T, num_warps)
if _INTERP:
    _CONFIGS = [(32, 16, 4)]


@autotune(configs=[triton.Config({"BLOCK_I": i, "BLOCK_T": t}, num_warps=w) for i, t, w in _CONFIGS],
          key=["K", "T", "IN"])
@triton.jit
def sddmm_kernel(dy_ptr, x_ptr, idx_ptr, out_ptr, T, K, IN, stride_dy, stride_x,
                 BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = offs_i < K
    flat = tl.load(idx_ptr + offs_i, mask=ok, other=0)
    r = flat // IN
    c = flat % IN
    offs_t = tl.arange(0, BLOCK_T)
    # 32-bit offsets formed in each tile (one add an element) instead of a [BLOCK_T, BLOCK_I] tile of
    # 64-bit pointers carried through the loop: that tile alone took 128 registers a thread and spilled
    # (ptxas 12.8, triton 3.6); the launcher refuses inputs of 2**31 elements or more
    row_dy = offs_t * stride_dy
    row_x = offs_t * stride_x
    acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        m = ((t0 + offs_t) < T)[:, None] & ok[None, :]
        a = tl.load(dy_ptr + (row_dy[:, None] + r[None, :]), mask=m, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + (row_x[:, None] + c[None, :]), mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
        dy_ptr += BLOCK_T * stride_dy
        x_ptr += BLOCK_T * stride_x
    tl.store(out_ptr + offs_i, acc, mask=ok)


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dy [T, out], x [T, in] (row-major, same dtype), indices int32 [k] -> float32 [k]."""
    T, IN, K = x.shape[0], x.shape[1], indices.numel()
    if max(dy.numel(), x.numel()) >= 2**31:
        raise ValueError(f"sddmm: the Triton kernel indexes with 32 bits; got dy {tuple(dy.shape)}, "
                         f"x {tuple(x.shape)} (split the tokens into chunks below 2**31 elements)")
    out = torch.empty(K, dtype=torch.float32, device=x.device)
    if K == 0:
        return out
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_I"]),)  # noqa: E731
    sddmm_kernel[grid](dy, x, indices, out, T, K, IN, dy.stride(0), x.stride(0))
    return out


_SIG = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*fp32", "T": "i32", "K": "i32",
        "IN": "i32", "stride_dy": "i32", "stride_x": "i32"}
register(KernelSpec(
    family="sparse_delta", name="sddmm_kernel", fn=sddmm_kernel.fn, signature=_SIG,
    configs=[{"constexprs": dict(BLOCK_I=i, BLOCK_T=t), "num_warps": w, "num_stages": 1} for i, t, w in _CONFIGS]))
