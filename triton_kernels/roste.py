"""RoSTE family, Triton kernels.

hadamard_kernel: the Hadamard transform of rows of n = m * 2^k elements as two small tensor-core GEMMs
per row. With n = A * P (P = min(2^k, 128), A = n / P <= 256), H_n = H_A (x) H_P and a row viewed as X
[A, P] transforms to H_A X H_P^T (H_A = H_m (x) H_{2^k / P}, a dense +-1 matrix zero-padded to a power
of two AP; H_P Sylvester, symmetric); above AP = 128 the first GEMM runs in blocks of AB rows of H_A (64
on sm_90a, 32 for P = 128 on sm_80/89; blocks wholly past A skipped) (X re-read per block from L1/L2, so
that the sm_80/89 register file holds it without spills). Sizes with A > 256 (n > 32768) are not served
(the op says so and runs the reference). 16-bit rows: the first GEMM multiplies the 16-bit row by +-1
exactly into fp32; its result, scaled per block by a power of two that puts its largest value in
[2^14, 2^15) (no fp16 overflow, undone exactly after), is split into two 16-bit parts (hi + lo, about
2^-16 relative for bf16, 2^-22 for fp16) for the second GEMM, fp32 accumulation. float32 rows
(SPLIT3): the row, scaled by a power of two that puts its largest |x| in [2^14, 2^15), is split into
three fp16 parts (3 x 11 significant bits hold float32's 24), and so is the first GEMM's result: every
product is exact and only the fp32 sums round, as in a float32 GEMM; three times the tensor-core work
of a 16-bit row (still under the row's memory time: about 200-800 flops per 8 bytes moved). With QUANT the same launch fake-quantizes each rotated row (per
token): min/max (and whether a NaN is present) are taken as the row is stored, then one pass over the
row (still in L2) quantizes it in place with the reference's formulas (IEEE division, round half to even
with signed zeros, NaN-propagating clamp, no FMA contraction), so the result equals reference fake_quant
applied to this kernel's rotation, bit for bit.
fake_quant_kernel: the same per-row fake quantization without rotation (any float dtype).
fake_quant_cols_kernel: per-column (channel) fake quantization: a program owns 64 columns, takes their
min/max over all rows, then quantizes them (the rotation, when asked for, is hadamard_kernel before it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting
from fusedtune._inference import cache_scope

from .common import cdiv, next_pow2

from .launch import fast
from .registry import KernelSpec, register

_INTERP = interpreting()
MAX_SIDE = 256    # A, the padded first-GEMM side (above 128: in row blocks of 64)
MAX_P = 128


@triton.jit
def _round_even(v):
    """Round half to even in fp32 (torch.round, signed zeros included): |v| < 2^23 rounds by adding and
    removing 2^23 with the sign of v (IEEE round-to-nearest-even does it); larger values are integers
    already; NaN stays NaN."""
    neg = v.to(tl.int32, bitcast=True) < 0                   # the sign bit: -0.0 and (-0.5, 0) give -0.0
    big = tl.where(neg, -8388608.0, 8388608.0)
    r = (v + big) - big
    # x * -1.0, not -x: triton 3.6 (unlike 3.8) lowers float negation to 0 - x, which turns -0.0 into +0.0
    r = tl.where(neg, tl.abs(r) * -1.0, r)
    return tl.where(tl.abs(v) < 8388608.0, r, v)


@triton.jit
def _clamp(v, lo, hi):
    """torch.clamp: NaN stays NaN."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant_params(lo, hi, clip, levels, SYM: tl.constexpr):
    """(lo, hi, scale, zero) of a group from its min and max: reference/roste.py's formulas, fp32, IEEE
    division (div_rn), no FMA contraction (the launch passes enable_fp_fusion=False)."""
    lo_c = lo * clip
    hi_c = hi * clip
    if SYM:
        lo = lo_c
        hi = hi_c
        amax = tl.maximum(tl.abs(hi), tl.abs(lo))
        scale = tl.math.div_rn(amax, levels)
        scale = tl.where(scale == 0.0, 1.0, scale)
        zero = 0.0
    else:
        scale = tl.math.div_rn(hi_c - lo_c, levels)
        const = scale == 0.0                  # a constant group: its unclipped min and max
        lo = tl.where(const, lo, lo_c)
        hi = tl.where(const, hi, hi_c)
        flat = tl.math.div_rn(tl.maximum(tl.abs(hi), tl.abs(lo)), levels)
        scale = tl.where(const, tl.where(flat == 0.0, 1.0, flat), scale)
        zero = _round_even(tl.math.div_rn(lo * -1.0, scale))   # -lo: see _round_even
    return lo, hi, scale, zero


@triton.jit
def _quant_values(y, lo, hi, scale, zero, levels, SYM: tl.constexpr):
    """(fake-quantized y, inside the clip range) for fp32 y with its group's (clipped) lo/hi, scale, zero."""
    if SYM:
        amax = tl.maximum(tl.abs(hi), tl.abs(lo))
        q = _clamp(_round_even(tl.math.div_rn(y, scale)), (levels + 1.0) * -1.0, levels)
        return q * scale, (y >= amax * -1.0) & (y <= amax)
    q = _asym_code(y, scale, zero, levels)
    return (q - zero) * scale, (y >= lo) & (y <= hi)


@triton.jit
def _asym_code(y, scale, zero, levels):
    """The asymmetric code of fp32 y (as an fp32 integer in [0, levels]; NaN stays NaN)."""
    return _clamp(_round_even(tl.math.div_rn(y, scale)) + zero, 0.0, levels)


@triton.jit
def _quant_row(src_ptr, dst_ptr, inside_ptr, n, lo, hi, clip, levels,
               SYM: tl.constexpr, CLIPPED: tl.constexpr, QB: tl.constexpr):
    """Fake-quantize the n values at src_ptr into dst_ptr (dst's dtype), with the group's min/max."""
    lo, hi, scale, zero = _quant_params(lo, hi, clip, levels, SYM)
    for c0 in range(0, n, QB):
        offs = c0 + tl.arange(0, QB)
        ok = offs < n
        y = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        out, inside = _quant_values(y, lo, hi, scale, zero, levels, SYM)
        tl.store(dst_ptr + offs, out.to(dst_ptr.dtype.element_ty), mask=ok)
        if CLIPPED:
            tl.store(inside_ptr + offs, inside.to(tl.int8), mask=ok)


@triton.jit
def codes_row(src, c_ptr, sx_ptr, zx_ptr, sumx_ptr, row, n, lo, hi, nan, clip, levels, center, QB: tl.constexpr):
    """Row `row`'s per-token asymmetric codes of the n values at src (min lo, max hi, NaN flag): centered
    int8 c = q - center into c_ptr's row, and the row's scale (NaN for a NaN row), centered zero and sum
    of codes (reference/roste.py: act_codes)."""
    lo, hi, scale, zero = _quant_params(lo, hi, clip, levels, False)
    dst = c_ptr + row.to(tl.int64) * n
    total = tl.zeros([QB], tl.int32)
    for c0 in range(0, n, QB):
        offs = c0 + tl.arange(0, QB)
        ok = offs < n
        y = tl.load(src + offs, mask=ok, other=0.0).to(tl.float32)
        c = tl.where(nan, 0.0, _asym_code(y, scale, zero, levels) - center).to(tl.int32)
        c = tl.where(ok, c, 0)
        tl.store(dst + offs, c.to(tl.int8), mask=ok)
        total += c
    tl.store(sx_ptr + row, tl.where(nan, float("nan"), scale))
    tl.store(zx_ptr + row, tl.where(nan, 0.0, zero - center))
    tl.store(sumx_ptr + row, tl.sum(total))


@triton.jit
def _pow2_shift(amax):
    """k such that amax * 2^-k lies in [2^14, 2^15) (k clamped to [-100, 100])."""
    return tl.minimum(tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 141, -100), 100)


@triton.jit
def _split3(v):
    """Three fp16 parts of fp32 v (|v| < 2^15) whose sum is v: 3 x 11 significant bits hold its 24 (below
    2^-14 the parts turn subnormal: an absolute error under 2^-25)."""
    a = v.to(tl.float16)
    r = v - a.to(tl.float32)
    b = r.to(tl.float16)
    return a, b, (r - b.to(tl.float32)).to(tl.float16)


@triton.jit
def _store_block(o_row, z, ib, cols, A, P: tl.constexpr, lo, hi, nan, QUANT: tl.constexpr):
    """Store a rotated block (rows ib, columns cols of the row as [A, P]); with QUANT, fold it into the
    row's running min / max / NaN flag."""
    live = (ib < A)[:, None]
    tl.store(o_row + ib[:, None] * P + cols[None, :], z, mask=live)
    if QUANT > 0:
        zf = z.to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(live, zf, float("inf"))))
        hi = tl.maximum(hi, tl.max(tl.where(live, zf, -float("inf"))))
        nan = tl.maximum(nan, tl.max(tl.where(live & (zf != zf), 1, 0)))
    return lo, hi, nan


@triton.jit
def _rotate_f32(x_row, ha_ptr, hp_ptr, o_row, A, scale, AP: tl.constexpr, AB: tl.constexpr, NB: tl.constexpr,
                P: tl.constexpr, PH: tl.constexpr, QUANT: tl.constexpr, QB: tl.constexpr):
    """hadamard_kernel's rotation of one float32 row (fp16 ha / hp), in loops rather than unrolled (six
    fp16 operands per block would spill): 2^-kx puts the row's largest |x| in [2^14, 2^15) (its fp16
    parts neither overflow nor flush); kx in [-141, 114] is applied as two exact power-of-two factors
    and undone so after the one rounding of the output (z * back). Returns the row's (min, max, NaN)."""
    amx = 0.0
    for c0 in range(0, A * P, QB):
        offs = c0 + tl.arange(0, QB)
        amx = tl.maximum(amx, tl.max(tl.abs(tl.load(x_row + offs, mask=offs < A * P, other=0.0))))
    kx = ((amx.to(tl.int32, bitcast=True) >> 23) & 255) - 141
    e1 = kx >> 1
    e2 = kx - e1
    s1 = ((127 - e1) << 23).to(tl.float32, bitcast=True)
    s2 = ((127 - e2) << 23).to(tl.float32, bitcast=True)
    u1 = ((127 + e1) << 23).to(tl.float32, bitcast=True)
    u2 = ((127 + e2) << 23).to(tl.float32, bitcast=True)
    ip = tl.arange(0, P)
    ik = tl.arange(0, AB)
    ih = tl.arange(0, PH)
    lo = float("inf")
    hi = -float("inf")
    nan = 0
    for a0 in range(0, NB * AB, AB):
        ib = a0 + tl.arange(0, AB)
        y = tl.zeros([AB, P], dtype=tl.float32)
        for k0 in range(0, NB * AB, AB):
            xk = tl.load(x_row + (k0 + ik)[:, None] * P + ip[None, :], mask=(k0 + ik < A)[:, None], other=0.0)
            ha = tl.load(ha_ptr + ib[:, None] * AP + (k0 + ik)[None, :])
            x1, x2, x3 = _split3(xk * s1 * s2)
            y = tl.dot(ha, x3, tl.dot(ha, x2, tl.dot(ha, x1, y)))
        k = _pow2_shift(tl.max(tl.max(tl.abs(y), 1), 0))
        y1, y2, y3 = _split3(y * ((127 - k) << 23).to(tl.float32, bitcast=True))
        back = scale * ((127 + k) << 23).to(tl.float32, bitcast=True)
        for h0 in tl.static_range(0, P, PH):
            hp = tl.load(hp_ptr + ip[:, None] * P + (h0 + ih)[None, :])
            z = tl.dot(y3, hp, tl.dot(y2, hp, tl.dot(y1, hp))) * back * u1 * u2
            lo, hi, nan = _store_block(o_row, z, ib, h0 + ih, A, P, lo, hi, nan, QUANT)
    return lo, hi, nan


@triton.jit
def hadamard_kernel(x_ptr, ha_ptr, hp_ptr, out_ptr, inside_ptr, A, scale, clip, levels, stride_x, stride_o,
                    c_ptr, sx_ptr, zx_ptr, sumx_ptr, center,
                    AP: tl.constexpr, AB: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, PH: tl.constexpr,
                    QUANT: tl.constexpr, SYM: tl.constexpr, CLIPPED: tl.constexpr, QB: tl.constexpr,
                    SPLIT3: tl.constexpr):
    """One row per program: out = H_A X H_P^T * scale (X the row as [A, P]). QUANT 1: the rotated row
    (rounded to the output dtype, as the reference) is then fake-quantized in place per row: min/max
    gathered while the rotation is stored, one more pass over the row (L2-resident) quantizes it.
    QUANT 2: that pass writes the row's asymmetric codes instead, centered int8 (act_codes_kernel's
    output, roste_int.py), and out is scratch. SPLIT3 (float32 rows): X, scaled by a power of two, is
    split into three fp16 parts for the first GEMM and its result into three for the second."""
    row = tl.program_id(0)
    ia = tl.arange(0, AP)
    ip = tl.arange(0, P)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    o_row = out_ptr + row.to(tl.int64) * stride_o
    if SPLIT3:
        lo, hi, nan = _rotate_f32(x_row, ha_ptr, hp_ptr, o_row, A, scale, AP, AB, NB, P, PH, QUANT, QB)
    else:
        if AB == AP:                           # the whole row as X [AP, P], loaded once
            x = tl.load(x_row + ia[:, None] * P + ip[None, :], mask=(ia < A)[:, None], other=0.0)
        ih = tl.arange(0, PH)
        lo = float("inf")
        hi = -float("inf")
        nan = 0
        for a0 in tl.static_range(0, NB * AB, AB):      # AP > 128: the first GEMM in row blocks of H_A ...
            ib = a0 + tl.arange(0, AB)
            if AB == AP:
                y = tl.dot(tl.load(ha_ptr + ib[:, None] * AP + ia[None, :]), x)
            else:                              # ... and K blocks of X (re-read from L1/L2): fewer live registers
                ik = tl.arange(0, AB)
                y = tl.zeros([AB, P], dtype=tl.float32)
                for k0 in tl.static_range(0, NB * AB, AB):
                    xk = tl.load(x_row + (k0 + ik)[:, None] * P + ip[None, :], mask=(k0 + ik < A)[:, None],
                                 other=0.0)
                    y = tl.dot(tl.load(ha_ptr + ib[:, None] * AP + (k0 + ik)[None, :]), xk, y)
            # exact products, fp32 sums; split into two 16-bit parts after scaling the block by 2^-k so that
            # its largest value lies in [2^14, 2^15): an fp16 part cannot overflow, small blocks keep precision
            k = _pow2_shift(tl.max(tl.max(tl.abs(y), 1), 0))
            y = y * ((127 - k) << 23).to(tl.float32, bitcast=True)
            back = scale * ((127 + k) << 23).to(tl.float32, bitcast=True)
            y_hi = y.to(x_ptr.dtype.element_ty)
            y_lo = (y - y_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
            for h0 in tl.static_range(0, P, PH):     # the second GEMM in column slices: fewer live registers
                hp = tl.load(hp_ptr + ip[:, None] * P + (h0 + ih)[None, :])
                z = tl.dot(y_hi, hp)
                z = (tl.dot(y_lo, hp, z) * back).to(out_ptr.dtype.element_ty)
                lo, hi, nan = _store_block(o_row, z, ib, h0 + ih, A, P, lo, hi, nan, QUANT)
    if QUANT == 1:
        lo = tl.where(nan > 0, float("nan"), lo)   # a NaN in the row: every output NaN (torch.amin / amax)
        hi = tl.where(nan > 0, float("nan"), hi)
        tl.debug_barrier()                       # the row's stores are visible to every thread of the program
        _quant_row(o_row, o_row, inside_ptr + row.to(tl.int64) * A * P, A * P, lo, hi, clip, levels,
                   SYM, CLIPPED, QB)
    if QUANT == 2:
        tl.debug_barrier()
        codes_row(o_row, c_ptr, sx_ptr, zx_ptr, sumx_ptr, row, A * P, lo, hi, nan > 0, clip, levels, center, QB)


@triton.jit
def row_minmax(src, n, QB: tl.constexpr):
    """(min, max, whether a NaN is present) of the n values at src, in fp32, QB at a time."""
    lo = tl.full([QB], float("inf"), tl.float32)
    hi = tl.full([QB], -float("inf"), tl.float32)
    for c0 in range(0, n, QB):
        offs = c0 + tl.arange(0, QB)
        y = tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(offs < n, y, float("inf")), propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, tl.where(offs < n, y, -float("inf")), propagate_nan=tl.PropagateNan.ALL)
    return tl.min(lo), tl.max(hi), tl.max(tl.where(lo != lo, 1, 0)) > 0


@triton.jit
def fake_quant_kernel(x_ptr, out_ptr, inside_ptr, n, clip, levels, stride_x, stride_o,
                      SYM: tl.constexpr, CLIPPED: tl.constexpr, QB: tl.constexpr):
    """Per-row fake quantization without rotation: a min/max pass and a quantizing pass over the row."""
    row = tl.program_id(0)
    src = x_ptr + row.to(tl.int64) * stride_x
    lo, hi, nan = row_minmax(src, n, QB)
    lo1 = tl.where(nan, float("nan"), lo)                    # a NaN in the row: every output NaN
    hi1 = tl.where(nan, float("nan"), hi)
    _quant_row(src, out_ptr + row.to(tl.int64) * stride_o, inside_ptr + row.to(tl.int64) * n, n, lo1, hi1, clip,
               levels, SYM, CLIPPED, QB)


def _warps(AP: int, P: int) -> int:
    return 8 if AP * P >= 4096 else 4    # (16 warps cap registers at 128: the 128 x 128 tile spills)


@triton.jit
def fake_quant_cols_kernel(x_ptr, out_ptr, inside_ptr, R, n, clip, levels, stride_x, stride_o,
                           SYM: tl.constexpr, CLIPPED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Per-column (channel) fake quantization of x [R, n]: a program owns BC columns, takes their min/max
    (and NaN flags) over all rows, then quantizes them: two reads of the block, one write."""
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    okc = cols < n
    lo = tl.full([BC], float("inf"), tl.float32)
    hi = tl.full([BC], -float("inf"), tl.float32)
    for r0 in range(0, R, BR):
        rows = r0 + tl.arange(0, BR)
        ok = (rows < R)[:, None] & okc[None, :]
        y = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        y = y.to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(ok, y, float("inf")), 0), propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, tl.max(tl.where(ok, y, -float("inf")), 0), propagate_nan=tl.PropagateNan.ALL)
        bad = tl.max(tl.where(ok & (y != y), 1, 0), 0)
        lo = tl.where(bad > 0, float("nan"), lo)
        hi = tl.where(bad > 0, float("nan"), hi)
    lo, hi, scale, zero = _quant_params(lo, hi, clip, levels, SYM)
    for r0 in range(0, R, BR):
        rows = r0 + tl.arange(0, BR)
        ok = (rows < R)[:, None] & okc[None, :]
        y = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        out, inside = _quant_values(y.to(tl.float32), lo[None, :], hi[None, :], scale[None, :], zero[None, :],
                                    levels, SYM)
        o = rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
        tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=ok)
        if CLIPPED:
            tl.store(inside_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :], inside.to(tl.int8), mask=ok)


def _ph(AP: int, P: int) -> int:
    return min(P, 64)                    # second-GEMM column slice


def _block(AP: int, P: int, major: int, split3: bool = False) -> int:
    """Rows of H_A per first-GEMM block: the whole AP up to 128, else 64 (wgmma's M on sm_90a), or 32
    for P = 128 on sm_80/89 (no spills with the mma operands in registers). float32 rows (three fp16
    parts per operand, _rotate_f32's loops): at most 64 rows for P <= 64; for P = 128, 16 rows above
    AP = 32 (no spills)."""
    if split3:
        return min(AP, 64) if P <= 64 else min(AP, 32) if AP <= 32 else 16
    return AP if AP <= 128 else (32 if P > 64 and major < 9 else 64)


def _major(device) -> int:
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 8


QB = 1024                                 # elements per step of the quantizing pass


def plan(n: int) -> tuple[int, int] | None:
    """(A, P) for a row of n elements, or None when this kernel cannot serve n."""
    from fusedtune.reference.hadamard import split_size
    m, p = split_size(n)
    P = min(p, MAX_P)
    A = n // P
    return (A, P) if A <= MAX_SIDE else None


_MATS: dict = {}


def _mats(n: int, transpose: bool, device, dtype):
    key = (n, transpose, str(device), dtype)
    if key not in _MATS:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"hadamard: the Triton rotation's matrices for n = {n} ({dtype}) are built and "
                               "copied to the GPU on first use, which a CUDA graph cannot capture; run one "
                               "call (a warm-up step) before capturing")
        from fusedtune.reference.hadamard import factor_matrix, hadamard_matrix, split_size
        A, P = plan(n)
        m, p = split_size(n)
        with cache_scope():   # (built once, off the per-launch path)
            HA = torch.kron(factor_matrix(m), hadamard_matrix(p // P)) if m > 1 else hadamard_matrix(A)
            if transpose:
                HA = HA.t()
            AP = max(16, next_pow2(A))
            pad = torch.zeros(AP, AP, dtype=torch.float32)
            pad[:A, :A] = HA.float()
            _MATS[key] = (pad.to(device, dtype), hadamard_matrix(P).to(device, dtype), AP)
    return _MATS[key]


def _constexprs(A: int, P: int, major: int, split3: bool = False) -> dict:
    """The shape constexprs of hadamard_kernel for A x P; NB blocks of AB rows cover A (blocks wholly
    past A are skipped). split3: float32 rows."""
    AP = max(16, next_pow2(A))
    AB = _block(AP, P, major, split3)
    return dict(AP=AP, AB=AB, NB=cdiv(A, AB), P=P, PH=_ph(AP, P), SPLIT3=split3)


def _levels(bits: int, symmetric: bool) -> float:
    return float(2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1)


def _launch(x: torch.Tensor, scale: float, transpose: bool, quant: tuple | None, codes: tuple | None = None):
    """quant (bits, symmetric, clip, clipped): fake quantization (QUANT 1); codes (cx, sx, zx, sumx, bits,
    clip): the activation codes into those tensors (QUANT 2)."""
    n = x.shape[-1]
    A, P = plan(n)
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    clipped = quant is not None and quant[3]
    inside = torch.empty(x2.shape, dtype=torch.bool, device=x.device) if clipped else None
    if x2.shape[0]:
        split3 = x.dtype == torch.float32         # three fp16 parts per operand, fp16 matrices
        ha, hp, AP = _mats(n, transpose, x.device, torch.float16 if split3 else x.dtype)
        bits, symmetric, clip = quant[:3] if quant else (codes[4], False, codes[5]) if codes else (8, False, 1.0)
        cx, sx, zx, sumx = codes[:4] if codes else (out,) * 4
        fast(hadamard_kernel)[(x2.shape[0],)](
            x2, ha, hp, out, inside.view(torch.int8) if clipped else out, A, float(scale), float(clip),
            _levels(bits, symmetric), x2.stride(0), out.stride(0), cx, sx, zx, sumx, float(2 ** (bits - 1)),
            **_constexprs(A, P, _major(x.device), split3), QUANT=1 if quant else 2 if codes else 0, SYM=bool(symmetric),
            CLIPPED=clipped, QB=QB, num_warps=_warps(AP, P), num_stages=1, enable_fp_fusion=False)
    return out.reshape(x.shape), (inside.reshape(x.shape) if clipped else None)


def hadamard(x: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """x [..., n] contiguous (float32, float16, bfloat16) -> x @ H_n^T * scale (transpose: x @ H_n * scale),
    in x's dtype."""
    return _launch(x, scale, transpose, None)[0]


def rotate_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool,
                      clipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row (token) fake quantization of x [..., n], rotated first by the orthonormal H_n when
    rotate (n served by plan); (out in x's dtype, inside mask when clipped else None)."""
    n = x.shape[-1]
    if rotate:
        return _launch(x, 1.0 / math.sqrt(n), False, (bits, symmetric, clip_ratio, clipped))
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    inside = torch.empty(x2.shape, dtype=torch.bool, device=x.device) if clipped else None
    if x2.shape[0] and n:
        fast(fake_quant_kernel)[(x2.shape[0],)](
            x2, out, inside.view(torch.int8) if clipped else out, n, float(clip_ratio), _levels(bits, symmetric),
            x2.stride(0), out.stride(0), SYM=bool(symmetric), CLIPPED=clipped, QB=QB, num_warps=4, num_stages=1,
            enable_fp_fusion=False)
    return out.reshape(x.shape), (inside.reshape(x.shape) if clipped else None)


def fake_quant_channels(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
                        clipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-column fake quantization of a 2-D x (any float dtype): (out in x's dtype, inside mask when
    clipped else None)."""
    R, n = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    inside = torch.empty(x.shape, dtype=torch.bool, device=x.device) if clipped else None
    if R and n:
        BC = 64
        fast(fake_quant_cols_kernel)[(cdiv(n, BC),)](
            x, out, inside.view(torch.int8) if clipped else out, R, n, float(clip_ratio), _levels(bits, symmetric),
            x.stride(0), out.stride(0), SYM=bool(symmetric), CLIPPED=clipped, BR=32, BC=BC, num_warps=4,
            num_stages=1, enable_fp_fusion=False)
    return out, inside


_SIG = {"x_ptr": "*bf16", "ha_ptr": "*bf16", "hp_ptr": "*bf16", "out_ptr": "*bf16", "inside_ptr": "*i8", "A": "i32",
        "scale": "fp32", "clip": "fp32", "levels": "fp32", "stride_x": "i32", "stride_o": "i32", "c_ptr": "*i8",
        "sx_ptr": "*fp32", "zx_ptr": "*fp32", "sumx_ptr": "*i32", "center": "fp32"}
_SHAPES = ((32, 128), (112, 128), (76, 64), (172, 64), (148, 128))   # (A, P): 4096, 14336, 4864, 11008, 18944
for _targets in ((80, 89), (90,)):
    register(KernelSpec(
        family="roste", name="hadamard_kernel", fn=hadamard_kernel, signature=_SIG, gemm=True, targets=_targets,
        options={"enable_fp_fusion": False},
        configs=[{"constexprs": dict(**_constexprs(a, p, _targets[0] // 10), QUANT=quant, SYM=False,
                                     CLIPPED=quant == 1, QB=QB),
                  "num_warps": _warps(max(16, triton.next_power_of_2(a)), p), "num_stages": 1,
                  "aligned": ["x_ptr", "ha_ptr", "hp_ptr", "out_ptr", "stride_x", "stride_o"]}
                 for a, p in _SHAPES for quant in (0, 1, 2)]))
_SIG32 = {**_SIG, "x_ptr": "*fp32", "ha_ptr": "*fp16", "hp_ptr": "*fp16", "out_ptr": "*fp32"}
# float32 rows (A, P, QUANT): 4096 and 18944 (the whole row, blocks of 16) both ways; 14336 and 11008 fused
_SHAPES32 = ((32, 128, 0), (32, 128, 1), (112, 128, 1), (172, 64, 1), (148, 128, 0), (148, 128, 1))
for _targets in ((80, 89), (90,)):
    register(KernelSpec(
        family="roste", name="hadamard_kernel_fp32", fn=hadamard_kernel, signature=_SIG32, gemm=True,
        targets=_targets, options={"enable_fp_fusion": False},
        configs=[{"constexprs": dict(**_constexprs(a, p, _targets[0] // 10, True), QUANT=quant, SYM=False,
                                     CLIPPED=quant == 1, QB=QB),
                  "num_warps": _warps(max(16, triton.next_power_of_2(a)), p), "num_stages": 1,
                  "aligned": ["x_ptr", "ha_ptr", "hp_ptr", "out_ptr", "stride_x", "stride_o"]}
                 for a, p, quant in _SHAPES32]))
register(KernelSpec(
    family="roste", name="fake_quant_kernel", fn=fake_quant_kernel,
    signature={"x_ptr": "*bf16", "out_ptr": "*bf16", "inside_ptr": "*i8", "n": "i32", "clip": "fp32",
               "levels": "fp32", "stride_x": "i32", "stride_o": "i32"},
    options={"enable_fp_fusion": False},
    configs=[{"constexprs": dict(SYM=sym, CLIPPED=True, QB=QB), "num_warps": 4, "num_stages": 1,
              "aligned": ["x_ptr", "out_ptr", "stride_x", "stride_o"]} for sym in (False, True)]))
register(KernelSpec(
    family="roste", name="fake_quant_cols_kernel", fn=fake_quant_cols_kernel,
    signature={"x_ptr": "*bf16", "out_ptr": "*bf16", "inside_ptr": "*i8", "R": "i32", "n": "i32", "clip": "fp32",
               "levels": "fp32", "stride_x": "i32", "stride_o": "i32"},
    options={"enable_fp_fusion": False},
    configs=[{"constexprs": dict(SYM=sym, CLIPPED=True, BR=32, BC=64), "num_warps": 4, "num_stages": 1,
              "aligned": ["x_ptr", "out_ptr", "stride_x", "stride_o"]} for sym in (False, True)]))
