"""Sparse-delta family, Triton kernel: SDDMM, the weight gradient at k flat row-major indices only,
g[i] = sum_t dy[t, r_i] * x[t, c_i] (float32), streaming the tokens in tiles; no dense dW.

The kernel reads dy and x transposed ([out, T] and [in, T], rows zero-padded to a multiple of 64
tokens), so each index reads two runs of BLOCK_T contiguous tokens (16-byte vector loads, whole
sectors) instead of one 2-byte value per token from a row of x. With row-major x, a block of 128
random columns touches ~40% of the 32-byte sectors of every x row for 256 useful bytes: ~12x the
bytes this layout moves (at 1% density on 4096 x 4096 and 4096 tokens, ~17 GB against ~1.4 GB).
The transposes cost one extra read and write of dy and x. (Traffic arithmetic; unmeasured on a GPU.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import autotune, cdiv
from .launch import fast
from .registry import KernelSpec, register

_INTERP = interpreting()
_CONFIGS = [(128, 32, 4), (64, 64, 4), (256, 32, 8), (128, 64, 8)]  # (BLOCK_I, BLOCK_T, num_warps)
if _INTERP:
    _CONFIGS = [(32, 16, 4)]
T_PAD = 64   # the transposed rows' length is a multiple of every BLOCK_T: no token mask in the loop


@autotune(configs=[triton.Config({"BLOCK_I": i, "BLOCK_T": t}, num_warps=w) for i, t, w in _CONFIGS],
          key=["K", "TP", "IN"])
@triton.jit
def sddmm_kernel(dyt_ptr, xt_ptr, idx_ptr, out_ptr, TP, K, IN, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = offs_i < K
    flat = tl.load(idx_ptr + offs_i, mask=ok, other=0)
    offs_t = tl.arange(0, BLOCK_T)
    # 32-bit offsets (the launcher refuses 2**31 elements or more); rows of TP tokens, TP % 64 == 0
    a_ptrs = dyt_ptr + ((flat // IN) * TP)[:, None] + offs_t[None, :]
    b_ptrs = xt_ptr + ((flat % IN) * TP)[:, None] + offs_t[None, :]
    acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for t0 in range(0, TP, BLOCK_T):
        a = tl.load(a_ptrs + t0, mask=ok[:, None], other=0.0).to(tl.float32)
        b = tl.load(b_ptrs + t0, mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + offs_i, acc, mask=ok)


def _transposed(a: torch.Tensor, tp: int) -> torch.Tensor:
    """a [T, n] -> [n, tp] with a.t() in the first T columns and zeros after."""
    T, n = a.shape
    out = torch.empty((n, tp), dtype=a.dtype, device=a.device)
    out[:, :T].copy_(a.t())
    out[:, T:].zero_()
    return out


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """dy [T, out], x [T, in] (same dtype), indices int32 [k] -> float32 [k]."""
    T, IN, K = x.shape[0], x.shape[1], indices.numel()
    TP = cdiv(max(T, 1), T_PAD) * T_PAD
    if max(dy.shape[1], IN) * TP >= 2**31:
        raise ValueError(f"sddmm: the Triton kernel indexes with 32 bits; got dy {tuple(dy.shape)}, "
                         f"x {tuple(x.shape)} (split the tokens into chunks below 2**31 elements)")
    out = torch.empty(K, dtype=torch.float32, device=x.device)
    if K == 0:
        return out
    if T == 0:
        return out.zero_()
    grid = lambda meta: (cdiv(K, meta["BLOCK_I"]),)  # noqa: E731
    fast(sddmm_kernel)[grid](_transposed(dy, TP), _transposed(x, TP), indices, out, TP, K, IN)
    return out


_SIG = {"dyt_ptr": "*bf16", "xt_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*fp32", "TP": "i32", "K": "i32",
        "IN": "i32"}
register(KernelSpec(
    family="sparse_delta", name="sddmm_kernel", fn=sddmm_kernel.fn, signature=_SIG,
    configs=[{"constexprs": dict(BLOCK_I=i, BLOCK_T=t), "num_warps": w, "num_stages": 1,
              "aligned": ["dyt_ptr", "xt_ptr", "idx_ptr", "out_ptr", "TP"]} for i, t, w in _CONFIGS]))
