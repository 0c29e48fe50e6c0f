"""Zeroth-order family, Triton kernel: the per-element rule of csrc/include/fusedtune/zo_math.h.

Every value is handled as integer bits and float32 (bf16/fp16 are loaded as int16 and converted by
integer ops), so the kernel is bit-identical to the reference on the GPU and in the interpreter;
launches pass enable_fp_fusion=False so that no multiply-add is contracted into an FMA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv

from .launch import fast
from .registry import KernelSpec, register

BLOCK_G = 256  # groups of 4 elements per program
NUM_WARPS = 8


@triton.jit
def _philox(k0, k1, c0, c1, c2, c3):
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _draw4(seed, c0, c1, c2, stream: tl.constexpr):
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.full(c0.shape, stream, tl.uint32)
    return _philox(k0, k1, c0, c1, c2, c3)


@triton.jit
def _noise(u, table_ptr, NOISE: tl.constexpr):
    neg = (u >> 31) != 0
    if NOISE == 1:
        v = tl.full(u.shape, 1.0, tl.float32)
    else:
        r = u & 0x7FFFFFFF
        j = (r >> 21).to(tl.int32)
        f = (r & 0x1FFFFF).to(tl.float32) * 4.76837158203125e-07
        a = tl.load(table_ptr + j)
        b = tl.load(table_ptr + j + 1)
        v = a + (b - a) * f
    return tl.where(neg, v * -1.0, v)   # not -v: triton 3.6 negates floats as 0 - v (+0.0 for -0.0)


@triton.jit
def _f32_to_bf16(v):
    x = v.to(tl.uint32, bitcast=True)
    nan = (x & 0x7FFFFFFF) > 0x7F800000
    r = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    return tl.where(nan, ((x >> 16) & 0x8000) | 0x7FC0, r)


@triton.jit
def _f32_to_f16(v):
    x = v.to(tl.uint32, bitcast=True)
    sign = (x >> 16) & 0x8000
    ax = x & 0x7FFFFFFF
    special = tl.where(ax > 0x7F800000, 0x7E00, 0x7C00).to(tl.uint32)
    sub = ((ax.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000)
    norm = (ax + 0xC8000FFF + ((ax >> 13) & 1)) >> 13
    out = tl.where(ax >= 0x477FF000, special, tl.where(ax < 0x38800000, sub, norm))
    return sign | out


@triton.jit
def _f32_to_f16_sr(v, rnd):
    """Stochastic rounding to fp16 bits (zo_math.h f32_to_f16_sr: the same integer steps)."""
    x = v.to(tl.uint32, bitcast=True)
    sign = x & 0x80000000
    ax = x & 0x7FFFFFFF
    e = (ax >> 23).to(tl.int32) - 127
    d = tl.minimum(tl.maximum(tl.where(e >= -14, 13, -1 - e), 13), 23).to(tl.uint32)
    mask = (tl.full(ax.shape, 1, tl.uint32) << d) - 1
    kept = (ax + (rnd & mask)) & (mask ^ 0xFFFFFFFF)
    p = ax.to(tl.float32, bitcast=True) * 16777216.0
    u = (rnd >> 8).to(tl.float32) * 5.9604644775390625e-08
    tiny = tl.where(u < p, 0x33800000, 0).to(tl.uint32)
    pattern = sign | tl.where(ax < 0x33800000, tiny, kept)
    return tl.where(ax >= 0x477FE000, _f32_to_f16(v), _f32_to_f16(pattern.to(tl.float32, bitcast=True)))


@triton.jit
def _f16_to_f32(h):
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    sub = (m.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
    bits = tl.where(e == 0x1F, 0x7F800000 | (m << 13), tl.where(e == 0, sub, ((e + 112) << 23) | (m << 13)))
    return (sign | bits).to(tl.float32, bitcast=True)


@triton.jit
def _load_f32(bits, DT: tl.constexpr):
    if DT == 0:
        return bits.to(tl.float32, bitcast=True)
    elif DT == 1:
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return _f16_to_f32(bits)


@triton.jit
def _round(v, DT: tl.constexpr):
    if DT == 0:
        return v.to(tl.uint32, bitcast=True)
    elif DT == 1:
        return _f32_to_bf16(v)
    else:
        return _f32_to_f16(v)


@triton.jit
def _step(b, delta, DT: tl.constexpr):
    """Bits one position up (delta=1) or down (delta=-1) in the format's monotone order."""
    SIGN: tl.constexpr = 0x80000000 if DT == 0 else 0x8000
    mag = (b & (SIGN - 1)).to(tl.int64)
    o = tl.where((b & SIGN) != 0, 0 - mag, mag) + delta
    return tl.where(o >= 0, o, (0 - o) | SIGN).to(tl.uint32)


@triton.jit
def _invert(x, dp, DT: tl.constexpr):
    xv = _load_f32(x, DT)
    finite = (xv.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
    b0 = _round(xv - dp, DT)
    bm = _step(b0, -1, DT)
    bp = _step(b0, 1, DT)
    out = tl.where(_round(_load_f32(bp, DT) + dp, DT) == x, bp, b0)
    out = tl.where(_round(_load_f32(bm, DT) + dp, DT) == x, bm, out)
    out = tl.where(_round(_load_f32(b0, DT) + dp, DT) == x, b0, out)
    return tl.where(finite, out, x)


@triton.jit
def _finish(x, d, alpha, rnd, DT: tl.constexpr, SCALE: tl.constexpr, SR: tl.constexpr):
    w = _load_f32(x, DT)
    if SCALE:
        w = w * alpha
    v = w + d
    if SR and DT == 1:
        vb = v.to(tl.uint32, bitcast=True)
        finite = (vb & 0x7F800000) != 0x7F800000
        return tl.where(finite, (vb + (rnd & 0xFFFF)) >> 16, _f32_to_bf16(v))
    elif SR and DT == 2:
        return _f32_to_f16_sr(v, rnd)
    else:
        return _round(v, DT)


@triton.jit
def _words(seed, c0, c1, c2, col, stream: tl.constexpr):
    """[BLOCK, 4] random words: element (g, k) takes word k of group g's Philox output."""
    u0, u1, u2, u3 = _draw4(seed, c0, c1, c2, stream)
    return tl.where(col == 0, u0[:, None], tl.where(col == 1, u1[:, None], tl.where(col == 2, u2[:, None],
                                                                                    u3[:, None])))


@triton.jit
def _delta(seeds_ptr, coeffs_ptr, n, c0, c1, c2, col, table_ptr, NOISE: tl.constexpr):
    d = tl.zeros((c0.shape[0], 4), tl.float32)
    for j in range(0, n):
        s = tl.load(seeds_ptr + j)
        c = tl.load(coeffs_ptr + j)
        d = d + c * _noise(_words(s, c0, c1, c2, col, 0), table_ptr, NOISE)
    return d


@triton.jit(do_not_specialize=["numel", "tid", "n", "n_prev", "rseed_lo", "rseed_hi"])  # one compile per flag set
def zo_apply_kernel(x_ptr, numel, tid, seeds_ptr, coeffs_ptr, n, prev_seeds_ptr, prev_coeffs_ptr, n_prev,
                    table_ptr, alpha, rseed_lo, rseed_hi, DT: tl.constexpr, NOISE: tl.constexpr, HAS_PREV: tl.constexpr,
                    SCALE: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    col = tl.arange(0, 4)[None, :]
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, tid, tl.uint32)
    e = g[:, None] * 4 + col  # [BLOCK, 4] contiguous elements: coalesced, vectorisable accesses
    m = e < numel
    if DT == 0:
        x = tl.load(x_ptr + e, mask=m, other=0).to(tl.uint32, bitcast=True)
    else:
        x = tl.load(x_ptr + e, mask=m, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    d = _delta(seeds_ptr, coeffs_ptr, n, c0, c1, c2, col, table_ptr, NOISE)
    if HAS_PREV:
        x = _invert(x, _delta(prev_seeds_ptr, prev_coeffs_ptr, n_prev, c0, c1, c2, col, table_ptr, NOISE), DT)
    if SR:
        rseed = (rseed_hi.to(tl.int64) << 32) | (rseed_lo.to(tl.int64) & 0xFFFFFFFF)
        rnd = _words(rseed, c0, c1, c2, col, 1)
    else:
        rnd = x
    y = _finish(x, d, alpha, rnd, DT, SCALE, SR)
    if DT == 0:
        tl.store(x_ptr + e, y.to(tl.int32, bitcast=True), mask=m)
    else:
        tl.store(x_ptr + e, y.to(tl.uint16).to(tl.int16, bitcast=True), mask=m)


_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_tables: dict = {}


def _table(device):
    if device not in _tables:
        from fusedtune.reference.zo import normal_table
        _tables[device] = normal_table(device)
    return _tables[device]


def zo_apply_(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs, alpha, noise, rounding, rounding_seed):
    """Launch the kernel once per tensor (arguments already validated by fusedtune.ops.zo)."""
    if not tensors:
        return
    dev = tensors[0].device
    table = _table(dev)
    # the rounding seed is passed as two signed 32-bit kernel arguments (Triton types a Python int by its
    # value: i32, u32 or i64, and u32 shifts went wrong): a host value, fixed in a captured CUDA graph
    # like LoRA's dropout seed (a temporary device copy would be read after it is freed by a replay)
    rs = int(rounding_seed) & 0xFFFFFFFFFFFFFFFF
    signed32 = lambda v: v - (1 << 32) if v >= 1 << 31 else v  # noqa: E731
    rseed_lo, rseed_hi = signed32(rs & 0xFFFFFFFF), signed32(rs >> 32)
    alpha32 = float(torch.tensor(alpha, dtype=torch.float32))
    has_prev = prev_seeds.numel() > 0
    for t, tid in zip(tensors, tensor_ids):
        if t.numel() == 0:
            continue
        dt = _DT[t.dtype]
        x = t.view(torch.int32) if dt == 0 else t.view(torch.int16)
        groups = (t.numel() + 3) // 4
        grid = (cdiv(groups, BLOCK_G),)
        fast(zo_apply_kernel)[grid](
            x, t.numel(), tid, seeds, coeffs, seeds.numel(), prev_seeds if has_prev else seeds,
            prev_coeffs if has_prev else coeffs, prev_seeds.numel(), table, alpha32, rseed_lo, rseed_hi,
            DT=dt, NOISE=noise, HAS_PREV=has_prev, SCALE=alpha32 != 1.0, SR=(rounding == 1 and dt != 0),
            BLOCK=BLOCK_G, num_warps=NUM_WARPS, enable_fp_fusion=False)


_SIG = {"x_ptr": "*i16", "numel": "i64", "tid": "i32", "seeds_ptr": "*i64", "coeffs_ptr": "*fp32", "n": "i32",
        "prev_seeds_ptr": "*i64", "prev_coeffs_ptr": "*fp32", "n_prev": "i32", "table_ptr": "*fp32",
        "alpha": "fp32", "rseed_lo": "i32", "rseed_hi": "i32"}
register(KernelSpec(
    family="zo", name="zo_apply_kernel", fn=zo_apply_kernel, signature=_SIG,
    configs=[{"constexprs": dict(DT=dt, NOISE=0, HAS_PREV=hp, SCALE=False, SR=sr, BLOCK=BLOCK_G),
              "num_warps": NUM_WARPS, "num_stages": 1,
              "signature": dict(_SIG, x_ptr="*i32" if dt == 0 else "*i16")}
             for dt, hp, sr in [(1, False, False), (1, True, False), (1, False, True), (0, True, False),
                                (2, True, False), (2, False, True)]],
    options={"enable_fp_fusion": False}))
