"""RoSTE family, Triton kernels of the exported layers' integer path (fusedtune.roste.QuantizedLinear);
the math is reference/roste.py's act_codes and integer_linear.

act_codes_kernel    per token: min/max, then the asymmetric codes of roste.py's fake quantization (same
                    helpers, so the same q bit for bit), stored centered as int8 c = q - 2^(bits-1), with
                    the row's scale, centered zero and sum of codes (roste.codes_row); with a rotation,
                    roste.hadamard_kernel's codes mode does the same in the rotation's launch
int_linear_kernel   y = (T * sx) * sw + bias, T = sum_k (cx - zx)(cw - zw) = acc - zw * sumx - zx * uw with
                    acc = cx . cw^T on int8 tensor cores (int32), uw = sum_k cw - K * zw per channel; the
                    weight tile load unpacks 4-bit codes (two per byte) itself; the epilogue runs in
                    float64, where every term is exact, then rounds to float32 and the output dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import autotune, gemm_tile, cdiv
from .launch import fast
from .registry import KernelSpec, register
from .roste import QB, _launch, codes_row, row_minmax

_INTERP = interpreting()
_CONFIGS = [(64, 128, 64, 8, 3), (128, 64, 32, 8, 3), (32, 64, 64, 4, 3), (16, 64, 128, 8, 3)]
# (the float64 epilogue doubles the output tile's registers: 128 x 128 and 64 x 64 with 4 warps spill)
if _INTERP:
    _CONFIGS = [(32, 32, 32, 4, 1)]


@triton.jit
def act_codes_kernel(y_ptr, c_ptr, sx_ptr, zx_ptr, sumx_ptr, n, clip, levels, center, stride_y,
                     QB: tl.constexpr):
    row = tl.program_id(0)
    src = y_ptr + row.to(tl.int64) * stride_y
    lo, hi, nan = row_minmax(src, n, QB)
    codes_row(src, c_ptr, sx_ptr, zx_ptr, sumx_ptr, row, n, lo, hi, nan, clip, levels, center, QB)


@autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in _CONFIGS], key=["M", "N", "K"])
@triton.jit
def int_linear_kernel(cx_ptr, qw_ptr, sx_ptr, zx_ptr, sumx_ptr, sw_ptr, zw_ptr, uw_ptr, bias_ptr, out_ptr,
                      M, N, K, stride_qw, wcenter,
                      PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _, offs_m, offs_n, offs_k, m_ok, n_ok = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(cx_ptr + offs_m.to(tl.int64)[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0)
        wm = k_ok[:, None] & n_ok[None, :]
        if PACKED:      # code k of a channel: byte k // 2, the even k in the low nibble
            byte = tl.load(qw_ptr + offs_n.to(tl.int64)[None, :] * stride_qw + (kk // 2)[:, None], mask=wm, other=0)
            code = (byte.to(tl.int32) >> ((kk[:, None] & 1) * 4)) & 0xF
        else:
            code = tl.load(qw_ptr + offs_n.to(tl.int64)[None, :] * stride_qw + kk[:, None], mask=wm,
                           other=0).to(tl.int32)
        b = tl.where(wm, code - wcenter, 0).to(tl.int8)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)   # triton 3.6 asserts acc dtype == out_dtype
    sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=1.0).to(tl.float64)
    zx = tl.load(zx_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float64)
    sumx = tl.load(sumx_ptr + offs_m, mask=m_ok, other=0).to(tl.float64)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float64)
    zw = tl.load(zw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)
    uw = tl.load(uw_ptr + offs_n, mask=n_ok, other=0.0)
    t = acc.to(tl.float64) - zw[None, :] * sumx[:, None] - zx[:, None] * uw[None, :]
    y = (t * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :]
    y = y.to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------- launchers

def act_codes(y: torch.Tensor, bits: int, clip_ratio: float, rotate: bool = False):
    """(cx int8 [M, K], sx float32 [M], zx float32 [M], sumx int32 [M]): reference act_codes of y [M, K],
    or with rotate of the orthonormal Hadamard rotation of y as roste.hadamard_kernel computes it, in the
    same launch (16-bit y of a size roste.plan serves)."""
    M, n = y.shape
    cx = torch.empty((M, n), dtype=torch.int8, device=y.device)
    sx = torch.empty(M, dtype=torch.float32, device=y.device)
    zx = torch.empty(M, dtype=torch.float32, device=y.device)
    sumx = torch.empty(M, dtype=torch.int32, device=y.device)
    if rotate:
        _launch(y, 1.0 / n ** 0.5, False, None, (cx, sx, zx, sumx, bits, clip_ratio))
    elif M:
        fast(act_codes_kernel)[(M,)](y, cx, sx, zx, sumx, n, float(clip_ratio), float(2 ** bits - 1),
                               float(2 ** (bits - 1)), y.stride(0), QB=QB, num_warps=4, num_stages=1,
                               enable_fp_fusion=False)
    return cx, sx, zx, sumx


def int_linear(cx, sx, zx, sumx, qweight, w_bits: int, sw, zw, uw, bias, out_dtype) -> torch.Tensor:
    """y [M, N] = (T * sx) * sw + bias (module docstring); qweight uint8 [N, ceil(K / 2)] (w_bits <= 4)
    or [N, K]; sw, zw float32 [N] (zw centered), uw float64 [N]."""
    M, K = cx.shape
    N = qweight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=cx.device)
    if M and N:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        fast(int_linear_kernel)[grid](cx, qweight, sx, zx, sumx, sw, zw, uw,
                                      out if bias is None else bias.contiguous(), out,   # (indexed as bias + n)
                                M, N, K, qweight.stride(0), 2 ** (w_bits - 1), PACKED=w_bits <= 4,
                                HAS_BIAS=bias is not None, GROUP_M=8, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------------------------------- kernel report

register(KernelSpec(
    family="roste", name="act_codes_kernel", fn=act_codes_kernel,
    signature={"y_ptr": "*bf16", "c_ptr": "*i8", "sx_ptr": "*fp32", "zx_ptr": "*fp32", "sumx_ptr": "*i32", "n": "i32",
               "clip": "fp32", "levels": "fp32", "center": "fp32", "stride_y": "i32"},
    configs=[{"constexprs": {"QB": QB}, "num_warps": 4, "num_stages": 1}], options={"enable_fp_fusion": False}))
register(KernelSpec(
    family="roste", name="int_linear_kernel", fn=int_linear_kernel.fn, gemm=True,
    signature={"cx_ptr": "*i8", "qw_ptr": "*u8", "sx_ptr": "*fp32", "zx_ptr": "*fp32", "sumx_ptr": "*i32",
               "sw_ptr": "*fp32", "zw_ptr": "*fp32", "uw_ptr": "*fp64", "bias_ptr": "*bf16", "out_ptr": "*bf16",
               "M": "i32", "N": "i32", "K": "i32", "stride_qw": "i32", "wcenter": "i32"},
    configs=[{"constexprs": {"PACKED": p, "HAS_BIAS": True, "GROUP_M": 8, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
              "num_warps": w, "num_stages": s} for m, n, k, w, s in _CONFIGS for p in (True, False)],
    options={"enable_fp_fusion": False}))
