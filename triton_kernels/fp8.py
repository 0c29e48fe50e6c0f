"""FP8 family, Triton kernels (the math of python/fusedtune/reference/fp8.py).

fp8_quant_rows_kernel   one read of a [128, 128] tile of x [M, K]: the 1x128 row-wise copy (scales per
                        row and 128 columns) and, with COL, the column-wise copy written transposed
                        [K, M] (scales per column and 128 rows)
fp8_quant_blocks_kernel 128x128 blocks of a weight, one scale per block (TRANS: the bytes also written
                        transposed, the K-major operand of the dX GEMM)
fp8_gemm_kernel         C = sum over 128-wide K blocks of (A_kb . B_kb^T) * a_scale * b_scale: each
                        block's FP8 tensor-core partial sum is promoted into the fp32 accumulator with
                        both scales (DeepGEMM's promotion); B's scales per row (1x128) or per 128 rows

The E4M3 conversion is done with integer operations (round to nearest even, saturation at 448, NaN,
subnormals), not with the hardware/interpreter cast, so that the bytes are identical on every target
and in the interpreter (whose fp8 cast drops subnormals and mangles NaN); the division x / s is
IEEE (div_rn). Quantized tensors are written through a uint8 view.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import autotune, gemm_tile, cdiv
from .launch import fast
from .registry import KernelSpec, register

_INTERP = interpreting()
TILE = 128
_CHUNK = 16 if _INTERP else 32   # rows of a quantizer tile converted at once
# the row quantizer's (CHUNK, num_warps), autotuned: at (32, 4) with the column copy it holds 221 registers
# a thread (2 CTAs an SM) and ran at 391 GB/s on an H200 (bench/results/fp8.csv)
_QUANT_CONFIGS = [(16, 4)] if _INTERP else [(32, 4), (32, 8), (16, 8)]
# with sm_90's E4M3 conversion (HW) the chunks can be larger without spills (sm_90a: (64, 8) 128 registers,
# (64, 16) 84, (128, 16) -- the whole tile at once -- 109)
_QUANT_HW_CONFIGS = _QUANT_CONFIGS + [(64, 8), (64, 16), (128, 16)]
_GEMM_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2)]
if _INTERP:
    _GEMM_CONFIGS = [(32, 32, 4, 1)]


@triton.jit
def _mag(x):
    """|x| with NaN as +inf: a block's max of it is inf exactly when the block holds an inf or a NaN, so one
    reduction gives both the amax and the non-finite flag."""
    return tl.where(x != x, float("inf"), tl.abs(x))


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    """Dequantization multiplier of a block from its max of _mag: amax / 448 (pow2: rounded up to a power of
    two); the next float32 up where a subnormal (or 0) one times 448 falls short of amax; 1 for an all-zero
    block; NaN when the block holds inf or NaN (amax = inf)."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        b = s.to(tl.int32, bitcast=True)
        up = (b & 0x7FFFFF) != 0
        b = tl.where(up, ((b >> 23) + 1) << 23, b)
        s = b.to(tl.float32, bitcast=True)
    up = (s < 1.1754943508222875e-38) & (s * 448.0 < amax)     # subnormal s rounded down: next float32 up
    s = tl.where(up, (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), s)
    s = tl.where(amax == 0.0, 1.0, s)
    return tl.where(amax == float("inf"), float("nan"), s)


@triton.jit
def _e4m3(v, HW: tl.constexpr):
    """float32 -> E4M3 bytes (uint8): sm_90's cvt.rn.satfinite.e4m3x2.f32 (HW; round to nearest even,
    saturation at 448, the same bytes as _e4m3_bits for every finite input), else the integer path (the
    interpreter, and sm_89, where Triton converts through a round-toward-zero fp16: double rounding)."""
    if HW:
        return v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    return _e4m3_bits(v).to(tl.uint8)


@triton.jit
def _e4m3_bits(v):
    """float32 -> E4M3 (fn) bits as int32: round to nearest even, saturate at 448, NaN -> 0x7F (any sign)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    b = a_bits - (120 << 23)                              # rebias the exponent: 127 -> 7
    normal = (b + 0x7FFFF + ((b >> 20) & 1)) >> 20        # drop 20 mantissa bits, ties to even
    t = a * 512.0                                          # subnormals: m * 2^-9, m = rne(a * 2^9)
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.minimum(code, 0x7E)                          # saturate at 448 (also inf)
    return tl.where(a_bits > 0x7F800000, 0x7F, code | sign)   # NaN: 0x7F whatever its sign (fp8_math.h)


@autotune(configs=[triton.Config({"CHUNK": c}, num_warps=w, num_stages=1) for c, w in _QUANT_CONFIGS],
          key=["M", "K"])
@triton.jit
def fp8_quant_rows_kernel(x_ptr, qr_ptr, sr_ptr, qc_ptr, sc_ptr, M, K, stride_xm, KB, MB,
                          COL: tl.constexpr, POW2: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                          HW: tl.constexpr = False):
    """One [BLOCK, BLOCK] tile, walked in row chunks of CHUNK (the E4M3 conversion of a whole tile at once
    does not fit in registers): with COL, a first pass takes the column maxima, a second pass (the
    tile is in L2 by then) writes both copies."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    k_ok = offs_k < K
    if COL:   # column maxima: elementwise over the chunks, then one reduction across the chunk's rows
        mag = tl.zeros((CHUNK, BLOCK), tl.float32)
        for c0 in tl.static_range(0, BLOCK, CHUNK):
            offs_m = pid_m * BLOCK + c0 + tl.arange(0, CHUNK)
            ok = (offs_m < M)[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            mag = tl.maximum(mag, _mag(x))
        s_c = _scale(tl.max(mag, axis=0), POW2)
        tl.store(sc_ptr + offs_k * MB + pid_m, s_c, mask=k_ok)
    for c0 in tl.static_range(0, BLOCK, CHUNK):
        offs_m = pid_m * BLOCK + c0 + tl.arange(0, CHUNK)
        m_ok = offs_m < M
        ok = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        s_r = _scale(tl.max(_mag(x), axis=1), POW2)
        q_r = _e4m3(tl.math.div_rn(x, tl.broadcast_to(s_r[:, None], (CHUNK, BLOCK))), HW)
        tl.store(qr_ptr + offs_m[:, None] * K + offs_k[None, :], q_r.to(tl.uint8), mask=ok)
        tl.store(sr_ptr + offs_m * KB + pid_k, s_r, mask=m_ok)
        if COL:
            q_c = _e4m3(tl.math.div_rn(x, tl.broadcast_to(s_c[None, :], (CHUNK, BLOCK))), HW)
            tl.store(qc_ptr + offs_k[None, :] * M + offs_m[:, None], q_c.to(tl.uint8), mask=ok)


fp8_quant_rows_hw_kernel = autotune(   # the same kernel, run with HW=True on sm_90
    configs=[triton.Config({"CHUNK": c}, num_warps=w, num_stages=1) for c, w in _QUANT_HW_CONFIGS],
    key=["M", "K"])(fp8_quant_rows_kernel.fn)


@triton.jit
def fp8_quant_blocks_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, N, K, stride_wn, KB, POW2: tl.constexpr, TRANS: tl.constexpr,
                            BLOCK: tl.constexpr, CHUNK: tl.constexpr, HW: tl.constexpr = False):
    """One 128x128 block: its amax, then the E4M3 bytes, and with TRANS the same bytes written transposed
    into qt [K, N] (the K-major operand of dX = dy . W; the block's scale serves both)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    k_ok = offs_k < K
    mag = tl.zeros((CHUNK, BLOCK), tl.float32)
    for c0 in tl.static_range(0, BLOCK, CHUNK):
        offs_n = pid_n * BLOCK + c0 + tl.arange(0, CHUNK)
        ok = (offs_n < N)[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        mag = tl.maximum(mag, _mag(w))
    s = _scale(tl.max(tl.max(mag, axis=1), axis=0), POW2)
    tl.store(s_ptr + pid_n * KB + pid_k, s)
    for c0 in tl.static_range(0, BLOCK, CHUNK):
        offs_n = pid_n * BLOCK + c0 + tl.arange(0, CHUNK)
        ok = (offs_n < N)[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
        q = _e4m3(tl.math.div_rn(w, tl.full((CHUNK, BLOCK), 1.0, tl.float32) * s), HW)
        tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], q, mask=ok)
        if TRANS:
            tl.store(qt_ptr + offs_k[None, :] * N + offs_n[:, None], q, mask=ok)


@autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in _GEMM_CONFIGS], key=["M", "N", "K", "B_ROWS"])
@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB, stride_am, stride_bn, stride_bk, stride_cm,
                    B_ROWS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _, offs_m, offs_n, offs_k, m_ok, n_ok = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    # rows past the edge read row (m mod M): no load masks; they are discarded at the store
    am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + am[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + bn[None, :] * stride_bn + offs_k[:, None] * stride_bk
    # The hints above hold for the fp8 tiles, whose vector loads run along K (or along N when B is stored
    # [K, N], N % 16 == 0 then, so the wrap falls on a vector boundary). The scales index rows apart from
    # am / bn (multiple_of marks the op itself, so `offs_m % M` again would carry the hint): with KB == 1
    # (K <= 128, specialized to a constant) hinted scale rows become 8/16-byte loads across the wrap at
    # M, misaligned when M % 4 != 0. Clamped rows are as good as wrapped ones: both are discarded.
    as_ptrs = as_ptr + tl.minimum(offs_m, M - 1) * KB
    bs_ptrs = bs_ptr + (tl.minimum(offs_n, N - 1) // B_ROWS) * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (kb * BLOCK_K + offs_k) < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        part = tl.dot(a, b)
        acc += part * tl.load(as_ptrs + kb)[:, None] * tl.load(bs_ptrs + kb)[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------- launchers

def _check32(what, *tensors):
    if any(t.numel() >= 2**31 for t in tensors):
        raise ValueError(f"fp8 {what}: the Triton kernels index with 32 bits; split tensors of 2^31 elements or more")


def _hw_cvt(device) -> bool:
    """Whether the quantizers convert with the hardware's E4M3 instruction (sm_90+; _e4m3)."""
    return not _INTERP and _capability(device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    """The compute capability of CUDA device `index` (a CUDA tensor's device has one), read once: the
    quantizers ask on every call."""
    return torch.cuda.get_device_capability(index)


def quantize_rows(x: torch.Tensor, col: bool, pow2: bool):
    """x [M, K] (last dim contiguous) -> (q_row, s_row, q_col or None, s_col or None)."""
    M, K = x.shape
    _check32("quantize", x)
    KB, MB = cdiv(K, TILE), cdiv(M, TILE)
    dev = x.device
    q_r = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=dev)
    s_r = torch.empty((M, KB), dtype=torch.float32, device=dev)
    q_c = torch.empty((K, M), dtype=torch.float8_e4m3fn, device=dev) if col else None
    s_c = torch.empty((K, MB), dtype=torch.float32, device=dev) if col else None
    if M and K:
        hw = _hw_cvt(x.device)
        fast(fp8_quant_rows_hw_kernel if hw else fp8_quant_rows_kernel)[(MB, KB)](
            x, q_r.view(torch.uint8), s_r, q_c.view(torch.uint8) if col else q_r, s_c if col else s_r, M, K,
            x.stride(0), KB, MB, COL=col, POW2=pow2, HW=hw, BLOCK=TILE)
    return q_r, s_r, q_c, s_c


def quantize_blocks(w: torch.Tensor, pow2: bool, trans: bool = False):
    """w [N, K] -> (q [N, K], s [N/128, K/128], q^T [K, N] contiguous or None)."""
    N, K = w.shape
    _check32("quantize", w)
    NB, KB = cdiv(N, TILE), cdiv(K, TILE)
    q = torch.empty((N, K), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((NB, KB), dtype=torch.float32, device=w.device)
    qt = torch.empty((K, N), dtype=torch.float8_e4m3fn, device=w.device) if trans else None
    if N and K:
        fast(fp8_quant_blocks_kernel)[(NB, KB)](w, q.view(torch.uint8), s, qt.view(torch.uint8) if trans else q.view(
            torch.uint8), N, K, w.stride(0), KB, POW2=pow2, TRANS=trans, HW=_hw_cvt(w.device), BLOCK=TILE,
            CHUNK=16 if trans else _CHUNK,
            num_warps=4)   # (the transposed store at CHUNK 32 spills on sm_80: python -m fusedtune kernels)
    return q, s, qt


def gemm(a_q, a_s, b_q, b_s, b_rows: int, out_dtype, b_transposed: bool = False):
    """C [M, N] = A . B^T with block promotion. b_q is [N, K] (b_transposed: stored [K, N]); b_s is
    [N rows or N/128 blocks, K/128] either way."""
    M, K = a_q.shape
    N = b_q.shape[1] if b_transposed else b_q.shape[0]
    _check32("gemm", a_q, b_q)
    if M * N >= 2**31:
        raise ValueError(f"fp8 gemm: an output of {M}x{N} needs 64-bit indexing (split the tokens)")
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    from . import fp8_tma
    if fp8_tma.usable(a_q, b_q, c, b_transposed):     # sm_90, opted in: TMA loads on a persistent grid
        return fp8_tma.gemm(a_q, a_s, b_q, b_s, c, b_rows)
    sbn, sbk = (1, b_q.stride(0)) if b_transposed else (b_q.stride(0), 1)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    fast(fp8_gemm_kernel)[grid](a_q, a_s, b_q, b_s, c, M, N, K, cdiv(K, TILE), a_q.stride(0), sbn, sbk, c.stride(0),
                          B_ROWS=b_rows, GROUP_M=8, BLOCK_K=TILE, EVEN_K=K % TILE == 0)
    return c


# ---------------------------------------------------------------------------------------- kernel report

_Q_SIG = {"x_ptr": "*bf16", "qr_ptr": "*u8", "sr_ptr": "*fp32", "qc_ptr": "*u8", "sc_ptr": "*fp32", "M": "i32",
          "K": "i32", "stride_xm": "i32", "KB": "i32", "MB": "i32"}
_Q_ALIGNED = [k for k, t in _Q_SIG.items() if t.startswith("*")] + ["M", "K", "stride_xm"]
register(KernelSpec(family="fp8", name="fp8_quant_rows_kernel", fn=fp8_quant_rows_kernel.fn, signature=_Q_SIG,
                    configs=[{"constexprs": dict(COL=c, POW2=p, BLOCK=TILE, CHUNK=ch), "num_warps": w, "num_stages": 1,
                              "aligned": _Q_ALIGNED}
                             for c, p, cfgs in ((True, False, _QUANT_CONFIGS), (False, True, _QUANT_CONFIGS[:1]))
                             for ch, w in cfgs]))   # every config of the heavier variant (the column copy)
register(KernelSpec(family="fp8", name="fp8_quant_rows_kernel", fn=fp8_quant_rows_kernel.fn, signature=_Q_SIG,
                    targets=(90,),   # sm_90's E4M3 conversion instruction (HW): what an H100/H200 runs
                    configs=[{"constexprs": dict(COL=True, POW2=False, BLOCK=TILE, CHUNK=ch, HW=True), "num_warps": w,
                              "num_stages": 1, "aligned": _Q_ALIGNED} for ch, w in _QUANT_HW_CONFIGS]))
register(KernelSpec(family="fp8", name="fp8_quant_blocks_kernel", fn=fp8_quant_blocks_kernel, targets=(90,),
                    signature={"w_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "qt_ptr": "*u8", "N": "i32",
                               "K": "i32", "stride_wn": "i32", "KB": "i32"},
                    configs=[{"constexprs": dict(POW2=False, TRANS=True, BLOCK=TILE, CHUNK=16, HW=True), "num_warps": 4,
                              "num_stages": 1, "aligned": ["w_ptr", "q_ptr", "s_ptr", "qt_ptr", "N", "K", "stride_wn"]}]))
register(KernelSpec(family="fp8", name="fp8_quant_blocks_kernel", fn=fp8_quant_blocks_kernel,
                    signature={"w_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "qt_ptr": "*u8", "N": "i32",
                               "K": "i32", "stride_wn": "i32", "KB": "i32"},
                    configs=[{"constexprs": dict(POW2=False, TRANS=t, BLOCK=TILE, CHUNK=16 if t else 32), "num_warps": 4,
                              "num_stages": 1, "aligned": ["w_ptr", "q_ptr", "s_ptr", "qt_ptr", "N", "K", "stride_wn"]}
                             for t in (False, True)]))
_G_SIG = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16",
          "M": "i32", "N": "i32", "K": "i32", "KB": "i32", "stride_am": "i32", "stride_cm": "i32"}
register(KernelSpec(
    family="fp8", name="fp8_gemm_kernel", fn=fp8_gemm_kernel.fn, signature=_G_SIG, gemm=True, targets=(89, 90),
    requires={89: "QMMA", 90: "QGMMA"},   # FP8 tensor cores: Ada's mma.sync, Hopper's wgmma
    configs=[{"constexprs": dict(B_ROWS=br, GROUP_M=8, BLOCK_K=TILE, EVEN_K=True, BLOCK_M=m, BLOCK_N=n, **consts),
              "signature": sig, "num_warps": w, "num_stages": s,   # runtime strides of LLM shapes are 16-aligned
              "aligned": [k for k, t in _G_SIG.items() if t.startswith("*")] + ["N", "K", "stride_am", "stride_cm"]
              + list(sig)}
             for m, n, w, s in _GEMM_CONFIGS
             for br, consts, sig in ((128, {"stride_bk": 1}, {"stride_bn": "i32"}),
                                     (1, {"stride_bk": 1}, {"stride_bn": "i32"}),
                                     (128, {"stride_bn": 1}, {"stride_bk": "i32"}))][: 3 * len(_GEMM_CONFIGS)]))
