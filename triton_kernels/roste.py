"""RoSTE family, Triton kernel: the Hadamard transform of rows of n = m * 2^k elements as two small
tensor-core GEMMs per row. With n = A * P (P = min(2^k, 128), A = n / P <= 128), H_n = H_A (x) H_P and a
row viewed as X [A, P] transforms to H_A X H_P^T (H_A = H_m (x) H_{2^k / P}, a dense +-1 matrix zero-padded
to a power of two; H_P Sylvester, symmetric). Sizes with A > 128 (n > 16384, or 148 * 2^k > 16384) are
not served by this kernel (the op says so and runs the reference). 16-bit inputs only (float32 rows run
the reference): the first GEMM multiplies the 16-bit row by +-1 exactly into fp32; its result is split
into two 16-bit parts (hi + lo, about 2^-16 relative for bf16) for the second GEMM, fp32 accumulation.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .registry import KernelSpec, register

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SIDE = 128


@triton.jit
def hadamard_kernel(x_ptr, ha_ptr, hp_ptr, out_ptr, A, pre, scale, stride_x, stride_o,
                    AP: tl.constexpr, P: tl.constexpr, PH: tl.constexpr):
    row = tl.program_id(0)
    ia = tl.arange(0, AP)
    ip = tl.arange(0, P)
    ok = (ia < A)[:, None] & (ip < P)[None, :]
    offs = ia[:, None] * P + ip[None, :]
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=ok, other=0.0)
    ha = tl.load(ha_ptr + ia[:, None] * AP + ia[None, :])
    y = tl.dot(ha, x) * pre                             # exact products, fp32 sums; pre = 2^-k keeps fp16 in range
    y_hi = y.to(x.dtype)
    y_lo = (y - y_hi.to(tl.float32)).to(x.dtype)
    ih = tl.arange(0, PH)
    for h0 in tl.static_range(0, P, PH):          # the second GEMM in column slices: fewer live registers
        hp = tl.load(hp_ptr + ip[:, None] * P + (h0 + ih)[None, :])
        z = tl.dot(y_hi, hp)
        z = tl.dot(y_lo, hp, z) * scale
        tl.store(out_ptr + row.to(tl.int64) * stride_o + ia[:, None] * P + (h0 + ih)[None, :],
                 z.to(out_ptr.dtype.element_ty), mask=(ia < A)[:, None])


def _warps(AP: int, P: int) -> int:
    return 8 if AP * P >= 4096 else 4    # (16 warps cap registers at 128: the 128 x 128 tile spills)


def plan(n: int) -> tuple[int, int] | None:
    """(A, P) for a row of n elements, or None when this kernel cannot serve n."""
    from fusedtune.reference.hadamard import split_size
    m, p = split_size(n)
    P = min(p, MAX_SIDE)
    A = n // P
    return (A, P) if A <= MAX_SIDE else None


_MATS: dict = {}


def _mats(n: int, transpose: bool, device, dtype):
    key = (n, transpose, str(device), dtype)
    if key not in _MATS:
        from fusedtune.reference.hadamard import factor_matrix, hadamard_matrix, split_size
        A, P = plan(n)
        m, p = split_size(n)
        HA = torch.kron(factor_matrix(m), hadamard_matrix(p // P)) if m > 1 else hadamard_matrix(A)
        if transpose:
            HA = HA.t()
        AP = max(16, triton.next_power_of_2(A))
        pad = torch.zeros(AP, AP, dtype=torch.float32)
        pad[:A, :A] = HA.float()
        _MATS[key] = (pad.to(device, dtype), hadamard_matrix(P).to(device, dtype), AP)
    return _MATS[key]


def hadamard(x: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """x [..., n] contiguous -> x @ H_n^T * scale (transpose: x @ H_n * scale), in x's dtype."""
    n = x.shape[-1]
    A, P = plan(n)
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    if x2.shape[0] == 0:
        return out.reshape(x.shape)
    ha, hp, AP = _mats(n, transpose, x.device, x.dtype)
    pre = 2.0 ** -round(math.log2(AP) / 2)     # exact power of two: |H_A x| / sqrt(A) stays in the input's range
    hadamard_kernel[(x2.shape[0],)](x2, ha, hp, out, A, pre, float(scale) / pre, x2.stride(0), out.stride(0),
                                    AP=AP, P=P,
                                    PH=min(P, 64), num_warps=_warps(AP, P))
    return out.reshape(x.shape)


_SIG = {"x_ptr": "*bf16", "ha_ptr": "*bf16", "hp_ptr": "*bf16", "out_ptr": "*bf16", "A": "i32", "pre": "fp32",
        "scale": "fp32",
        "stride_x": "i32", "stride_o": "i32"}
register(KernelSpec(
    family="roste", name="hadamard_kernel", fn=hadamard_kernel, signature=_SIG, gemm=True,
    configs=[{"constexprs": dict(AP=ap, P=p, PH=min(p, 64)), "num_warps": _warps(ap, p),
              "num_stages": 1, "aligned": ["x_ptr", "ha_ptr", "hp_ptr", "out_ptr", "stride_x", "stride_o"]}
             for ap, p in ((32, 128), (128, 128), (128, 64))]))   # 4096, 14336 (112 x 128), 4864 (76 x 64)
