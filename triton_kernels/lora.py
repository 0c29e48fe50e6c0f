"""LoRA family, Triton kernels (the math of python/fusedtune/reference/lora.py).

lora_shrink_kernel   T[M, R] = (dropout(P) . Q^T) * S[gid]      the skinny x.A^T (and dy.B) GEMM, fp32 out
lora_gemm_kernel     C[M, N] = P . Q^T + keep/(1-p) * (T . E^T) + bias
                     (ACCUMULATE 1: C += the rest, over a base product cuBLAS wrote; ACCUMULATE 2: C = the
                     sum of K float32 slabs of P + the rest, over the split-K partials (SPLIT_K) of the
                     in-GEMM NF4 dequant: lora_expand_kernel)
                     (DoRA, COL_SCALE: also F = the product before the bias, and C = G[n] * F + bias)
                     forward: P=x, Q=W, T=t, E=B;  dgrad: P=dy, Q=W^T, T=u, E=A^T (dropout keep mask)
                     the LoRA term is an extra inner loop of length R over the fp32 shrink buffer, so
                     x and W are read once and y written once; Q may be NF4 (dequantized in the tile load)
lora_dy_kernel       U = (dy . B) * S[gid] and DB = dy^T . t from one read of dy (DB by fp32 atomics;
                     torch's deterministic mode takes lora_shrink_kernel + lora_wgrad_kernel instead)
lora_wgrad_kernel    O[s, C, R] = sum over rows m of split s of dropout(P)[m, C]^T . T[m, R]
                     dB (P=dy, T=t) and dA^T (P=x with dropout, T=u); splits summed on the host
nf4_dequant_kernel   bitsandbytes NF4 (double-quantized absmax) -> a 16-bit weight buffer
lora_dropout_delta_kernel   dropout(X) - X with the LoRA branch's mask (the input gradient of DoRA's
                     rescaled base term: the map is diagonal, its own adjoint), or (KEEP_ONLY) keep * X
                     unscaled, exact in X's dtype (the operand of DoRA's float32 dropped-base product)

All accumulate in fp32. Operands of the skinny products are promoted to fp32 and multiplied with
PREC ("tf32x3" on a GPU: products of 16-bit inputs exact, fp32 inputs to about 2^-22; "ieee" in the
interpreter), so the adapter path keeps float32 accuracy as peft's fp32 adapters do. Inside the big
GEMM the LoRA term t.B^T uses tf32 for a 16-bit model (relative error ~2^-11 of the LoRA term, below
the 2^-9 rounding of the bf16 output) and follows torch's allow_tf32 for a float32 model.
Offsets are 32-bit (tensors of 2^31 elements or more are refused: split the tokens).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import autotune, cdiv, gemm_tile, next_pow2
from .launch import fast
from .registry import KernelSpec, register
from .zo import _philox

_INTERP = interpreting()
_GEMM_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
]
_NF4_CONFIGS = [  # the in-GEMM NF4 dequant gathers bytes, codes and scales: fewer stages fit shared memory
    (16, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 64, 64, 8, 2),
]  # (64, 64) with 4 warps and (32, 128) spill or overflow sm_89's shared memory (python -m fusedtune kernels)
_IEEE_CONFIGS = [  # fp32 operands without TF32 (torch's default) multiply on FMA units: an operand tile lives
    (128, 128, 16, 8, 3), (64, 128, 32, 8, 3), (128, 64, 16, 4, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3),
]  # in registers, so BLOCK_K shrinks; _GEMM_CONFIGS' 128x256 / 128x128 x 64 spill 700-800 / 8 B there
_EXPAND_CONFIGS = [  # C += keep * (T . E^T) + bias over a C that cuBLAS wrote: memory-bound, no K loop
    (64, 128, 16, 4, 1), (64, 64, 16, 4, 1), (32, 128, 16, 4, 1),   # (128, 128) w8 spills on sm_80
]
_EXPAND_IEEE_CONFIGS = [(64, 64, 16, 4, 1), (32, 64, 16, 4, 1)]   # fp32 FMA: (64, 128) spills 830-3200 B
if _INTERP:
    _GEMM_CONFIGS = _NF4_CONFIGS = _IEEE_CONFIGS = _EXPAND_CONFIGS = _EXPAND_IEEE_CONFIGS = [(32, 32, 32, 4, 1)]


def _autotuned(configs, **kw):
    return autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                                           num_stages=s) for m, n, k, w, s in configs],
                    key=["M", "N", "K", "R", "stride_qk"], **kw)  # stride_qk: forward (1) or dgrad (N) orientation


@triton.jit
def _keep(seed, rows, col0, thresh, BM: tl.constexpr, BN: tl.constexpr):
    """Dropout keep mask [BM, BN] for rows `rows` and columns col0 .. col0+BN-1 (col0 a multiple of 4):
    word k % 4 of Philox4x32-10(seed; k // 4, m, 0, 2) >= thresh (one Philox call per 4 columns)."""
    g = (col0 // 4 + tl.arange(0, BN // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(g[None, :], (BM, BN // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, BN // 4))
    z = tl.zeros((BM, BN // 4), tl.uint32)
    s = seed.to(tl.int64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    u0, u1, u2, u3 = _philox(k0, k1, c0, c1, z, z + 2)
    # join appends a trailing axis: x[m, j, a, b] = (b ? (u1, u3) : (u0, u2))[a] = word 2a + b at column 4j + 2a + b
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BM, BN))
    return u >= thresh.to(tl.int64).to(tl.uint32)


@triton.jit
def _nf4_tile(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, flat, offset, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, DOUBLE: tl.constexpr):
    """NF4 values at flat weight indices `flat` (bitsandbytes layout: byte i//2, high nibble first)."""
    byte = tl.load(q_ptr + (flat >> 1)).to(tl.int32)
    nib = (byte >> ((1 - (flat & 1)) * 4)) & 0xF
    v = tl.load(code_ptr + nib)
    blk = flat // BLOCKSIZE
    if DOUBLE:
        a8 = tl.load(absmax_ptr + blk).to(tl.int32)
        amax = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCKSIZE2) + offset
    else:
        amax = tl.load(absmax_ptr + blk)
    return v * amax


@triton.jit
def _nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, blk, ok, offset, BLOCKSIZE2: tl.constexpr, DOUBLE: tl.constexpr):
    """The absmax of NF4 blocks `blk` (double quantization: its 8-bit code times the block group's scale)."""
    if DOUBLE:
        a8 = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        amax = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=ok, other=0.0) + offset
    else:
        amax = tl.load(absmax_ptr + blk, mask=ok, other=0.0).to(tl.float32)
    return amax


@triton.jit
def _nf4_tile_vec(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, k0, n0, offs_k, offs_n, k_ok, n_ok, KW,
                  offset, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE: tl.constexpr,
                  VEC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile B[k, n] of an NF4 weight W [*, KW] (row-major, KW % BLOCKSIZE == 0) from
    contiguous byte loads: VEC 1, B[k, n] = W[n0 + n, k0 + k] (the forward: bytes contiguous along k);
    VEC 2, B[k, n] = W[k0 + k, n0 + n] (dX: along n). Each byte holds two neighbours (high nibble first),
    both looked up and interleaved; the tile's contiguous extent lies in one quantization block (it
    divides BLOCKSIZE, and k0 or n0 is a multiple of it), so one absmax per column (VEC 1) or row (VEC 2).
    The same products as _nf4_tile (code value times absmax)."""
    if VEC == 1:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + offs_n[None, :] * (KW // 2) + kb[:, None],
                       mask=(2 * kb < KW)[:, None] & n_ok[None, :], other=0).to(tl.int32)      # [BK/2, BN]
        v = tl.join(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF)))        # [BK/2, BN, 2]
        v = tl.reshape(tl.permute(v, (0, 2, 1)), (BLOCK_K, BLOCK_N))
        amax = _nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, (offs_n * KW + k0) // BLOCKSIZE, n_ok, offset,
                           BLOCKSIZE2, DOUBLE)
        return v * amax[None, :]
    else:
        nb = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        rows = k0 + offs_k
        byte = tl.load(q_ptr + rows[:, None] * (KW // 2) + nb[None, :],
                       mask=k_ok[:, None] & (2 * nb < KW)[None, :], other=0).to(tl.int32)   # [BK, BN/2]
        v = tl.join(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF)))      # [BK, BN/2, 2]
        v = tl.reshape(v, (BLOCK_K, BLOCK_N))
        amax = _nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, (rows * KW + n0) // BLOCKSIZE, k_ok, offset,
                           BLOCKSIZE2, DOUBLE)
        return v * amax[:, None]


@triton.jit(do_not_specialize=["seed", "thresh"])   # (an int equal to 1 would become a constant)
def lora_shrink_kernel(p_ptr, q_ptr, t_ptr, gid_ptr, s_ptr, M, K, R, stride_pm, stride_qr, stride_qk,
                       seed, thresh, keep_scale, k_per_split,
                       HAS_GID: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j, s) takes K columns [s * k_per_split, (s + 1) * k_per_split) and writes its scaled
    partial to T[s] (the scale is linear); the launcher sums the parts in order (split K: more programs
    in flight for a skinny, memory-bound product, deterministic)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_lo = pid_s * k_per_split
    k_hi = min(K, k_lo + k_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + (k_lo + offs_k)[None, :]
    q_ptrs = q_ptr + offs_r[None, :] * stride_qr + (k_lo + offs_k)[:, None] * stride_qk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < k_hi
        a = tl.load(p_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            a = tl.where(_keep(seed, offs_m, k0, thresh, BLOCK_M, BLOCK_K), a * keep_scale, 0.0)
        b = tl.load(q_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        p_ptrs += BLOCK_K
        q_ptrs += BLOCK_K * stride_qk
    _store_scaled_part(t_ptr, acc, gid_ptr, s_ptr, pid_s, offs_m, offs_r, m_ok, r_ok, M, R, HAS_GID, BLOCK_M)


@triton.jit
def _store_scaled_part(out_ptr, acc, gid_ptr, s_ptr, part, offs_m, offs_r, m_ok, r_ok, M, R,
                       HAS_GID: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[part][m, r] = acc[m, r] * S[gid[m], r] (0 for gid -1; every row group 0 without gid)."""
    if HAS_GID:
        g = tl.load(gid_ptr + offs_m, mask=m_ok, other=-1)
    else:
        g = tl.zeros((BLOCK_M,), tl.int32)
    s = tl.load(s_ptr + g[:, None] * R + offs_r[None, :], mask=(g >= 0)[:, None] & r_ok[None, :], other=0.0)
    out = out_ptr + part.to(tl.int64) * M * R
    tl.store(out + offs_m[:, None] * R + offs_r[None, :], acc * s, mask=m_ok[:, None] & r_ok[None, :])


@_autotuned(_GEMM_CONFIGS)
@triton.jit(do_not_specialize=["seed", "thresh"])
def lora_gemm_kernel(p_ptr, q_ptr, t_ptr, e_ptr, bias_ptr, c_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr,
                     g_ptr, f_ptr, M, N, K, R, stride_pm, stride_qn, stride_qk, stride_en, stride_er, stride_cm,
                     seed, thresh, keep_scale, nf4_offset, k_split,
                     HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, NF4: tl.constexpr,
                     COL_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
                     NF4_DOUBLE: tl.constexpr, NF4_BLOCK: tl.constexpr, NF4_BLOCK2: tl.constexpr,
                     NF4_VEC: tl.constexpr, BASE_PREC: tl.constexpr, EPI_PREC: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, offs_m, offs_n, offs_k, m_ok, n_ok = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACCUMULATE == 2:   # the product is the sum of K slabs [M, N] of P, slab s at p + s * k_split (float32
        s_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]        # split-K partials)
        for s in range(0, K):
            acc += tl.load(s_ptrs + s * k_split, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    elif ACCUMULATE:      # C holds the product already (cuBLAS's base GEMM): add to it, one more rounding
        acc = tl.load(c_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    else:
        if SPLIT_K:   # grid axis 1: K [k_lo, k_lo + k_split) (k_split a multiple of BLOCK_K), the partial
            k_lo = tl.program_id(1) * k_split          # product to slab program_id(1) of C, no epilogue
            k_n = tl.minimum(K - k_lo, k_split)
            c_ptrs += tl.program_id(1) * M * stride_cm
        else:         # (a constant start: a runtime one costs the pipelined loop registers and spills)
            k_lo = 0
            k_n = K
        p_ptrs = (p_ptr + k_lo) + offs_m[:, None] * stride_pm + offs_k[None, :]
        q_ptrs = (q_ptr + k_lo * stride_qk) + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk   # [BK, BN]
        for kk in range(0, k_n, BLOCK_K):
            k0 = k_lo + kk
            k_ok = (k0 + offs_k) < K
            a = tl.load(p_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            qm = k_ok[:, None] & n_ok[None, :]
            if NF4:
                if NF4_VEC == 0:
                    flat = tl.where(qm, offs_n[None, :] * stride_qn + (k0 + offs_k)[:, None] * stride_qk, 0)
                    b = _nf4_tile(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, flat, nf4_offset, NF4_BLOCK,
                                  NF4_BLOCK2, NF4_DOUBLE).to(a.dtype)
                else:   # contiguous byte loads (forward: stride_qn is W's row length; dX: stride_qk is)
                    b = _nf4_tile_vec(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, k0, pid_n * BLOCK_N,
                                      offs_k, offs_n, k_ok, n_ok, stride_qn if NF4_VEC == 1 else stride_qk,
                                      nf4_offset, NF4_BLOCK, NF4_BLOCK2, NF4_DOUBLE, NF4_VEC, BLOCK_K,
                                      BLOCK_N).to(a.dtype)
            else:
                b = tl.load(q_ptrs, mask=qm, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=BASE_PREC)
            p_ptrs += BLOCK_K
            q_ptrs += BLOCK_K * stride_qk
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        if DROPOUT:
            lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            lo = acc
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            r_ok = rr < R
            t = tl.load(t_ptr + offs_m[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            e = tl.load(e_ptr + offs_n[None, :] * stride_en + rr[:, None] * stride_er,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            lo = tl.dot(t, e, lo, input_precision=EPI_PREC)
        if DROPOUT:
            acc += tl.where(_keep(seed, offs_m, pid_n * BLOCK_N, thresh, BLOCK_M, BLOCK_N), lo * keep_scale, 0.0)
        else:
            acc = lo
    if COL_SCALE:   # DoRA: F (the unscaled product, for the magnitude's gradient), then the column scale
        tl.store(f_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(f_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        acc = acc * tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


lora_gemm_nf4_kernel = _autotuned(_NF4_CONFIGS)(lora_gemm_kernel.fn)   # same kernel, NF4 configs
# K = 0, ACCUMULATE: C += the LoRA term in place, so timing the configs must put C back after each run
# (restore_value), or the first call of every new shape would add the term once per timed launch
lora_expand_kernel = _autotuned(_EXPAND_CONFIGS, restore_value=["c_ptr"])(lora_gemm_kernel.fn)
lora_expand_ieee_kernel = _autotuned(_EXPAND_IEEE_CONFIGS, restore_value=["c_ptr"])(lora_gemm_kernel.fn)
lora_gemm_ieee_kernel = _autotuned(_IEEE_CONFIGS)(lora_gemm_kernel.fn)  # same kernel, fp32 FMA configs


@triton.jit(do_not_specialize=["seed", "thresh"])
def lora_wgrad_kernel(p_ptr, t_ptr, o_ptr, M, C, R, stride_pm, rows_per_split, seed, thresh, keep_scale,
                      DROPOUT: tl.constexpr, PREC: tl.constexpr, TRANS_OUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    c_ok = offs_c < C
    r_ok = offs_r < R
    m_lo = pid_s * rows_per_split
    m_hi = min(M, m_lo + rows_per_split)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        mm = m0 + offs_m
        m_ok = mm < m_hi
        p = tl.load(p_ptr + mm[:, None] * stride_pm + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        if DROPOUT:
            p = tl.where(_keep(seed, mm, pid_c * BLOCK_C, thresh, BLOCK_M, BLOCK_C), p * keep_scale, 0.0)
        t = tl.load(t_ptr + mm[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(p), t, acc, input_precision=PREC)
    if TRANS_OUT:     # O^T [R, C]: dA = (dropout(x)^T u)^T written where it belongs, no transposing copy after
        o = o_ptr + pid_s * C * R + offs_r[None, :] * C + offs_c[:, None]
    else:
        o = o_ptr + pid_s * C * R + offs_c[:, None] * R + offs_r[None, :]
    tl.store(o, acc, mask=c_ok[:, None] & r_ok[None, :])


@triton.jit
def _dot_exact_a(a, b, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """acc + a . b for fp32 b. SPLIT (a holds 16-bit values, exact in tf32): two tf32 products against
    b's top 11 significant bits and the rest (error ~2^-21 of |a||b|, as tf32x3, at 2 MMAs instead of 3
    and without a's hi/lo registers). Otherwise one dot with input_precision PREC."""
    if SPLIT:
        b_hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        acc = tl.dot(a, b - b_hi, acc, input_precision="tf32")
        acc = tl.dot(a, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def lora_dy_kernel(dy_ptr, b_ptr, t_ptr, u_ptr, db_ptr, gid_ptr, s_ptr, M, N, R, stride_dm, stride_bn, n_per_split,
                   HAS_GID: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of dy for both skinny backward products (R <= BLOCK_R): U = (dy . B) * S[gid] for this
    program's rows, accumulated in registers over its columns; DB += dy^T . t for these rows, one fp32
    atomic add per element of each [BLOCK_N, R] tile into the zeroed DB [N, R] (it stays in L2), or (ATOMIC
    False: all rows in one row block, so each element of DB has one writer) a plain store into DB.
    Program (i, s) takes columns [s * n_per_split, (s + 1) * n_per_split) and writes its part of U (scaled:
    the scale is linear) to U[s]; the launcher sums the parts in order (more programs in flight)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_lo = pid_s * n_per_split
    n_hi = min(N, n_lo + n_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R
    t = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dm + (n_lo + offs_n)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        nn = n0 + offs_n
        n_ok = nn < n_hi
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + nn[:, None] * stride_bn + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = _dot_exact_a(dy, b, acc, SPLIT, PREC)
        db = _dot_exact_a(tl.trans(dy), t, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), SPLIT, PREC)
        if ATOMIC:
            tl.atomic_add(db_ptr + nn[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                          sem="relaxed")
        else:
            tl.store(db_ptr + nn[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :])
        dy_ptrs += BLOCK_N
    _store_scaled_part(u_ptr, acc, gid_ptr, s_ptr, pid_s, offs_m, offs_r, m_ok, r_ok, M, R, HAS_GID, BLOCK_M)


@triton.jit
def nf4_dequant_kernel(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, out_ptr, numel, offset,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE: tl.constexpr, BLOCK: tl.constexpr,
                       VEC: tl.constexpr = False):
    """VEC (BLOCK a multiple of a power-of-two BLOCKSIZE): the packed bytes as one contiguous vector load,
    both nibbles looked up and interleaved, one absmax per quantization block broadcast over it; else one
    gather per element. The same arithmetic either way (code value times the block's absmax)."""
    if VEC:
        HALF: tl.constexpr = BLOCK // 2
        NB: tl.constexpr = BLOCK // BLOCKSIZE
        ob = tl.program_id(0) * HALF + tl.arange(0, HALF)
        byte = tl.load(q_ptr + ob, mask=ob < (numel + 1) // 2, other=0).to(tl.int32)   # (odd: a last half byte)
        v = tl.reshape(tl.join(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF))), (NB, BLOCKSIZE))
        blk = tl.program_id(0) * NB + tl.arange(0, NB)
        amax = _nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, blk, blk < (numel + BLOCKSIZE - 1) // BLOCKSIZE, offset,
                           BLOCKSIZE2, DOUBLE)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.reshape(v * amax[:, None], (BLOCK,)).to(out_ptr.dtype.element_ty),
                 mask=offs < numel)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        flat = tl.where(ok, offs, 0)
        v = _nf4_tile(q_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, flat, offset, BLOCKSIZE, BLOCKSIZE2,
                      DOUBLE)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed", "thresh"])
def lora_dropout_delta_kernel(x_ptr, out_ptr, M, K, stride_xm, seed, thresh, keep_scale,
                              KEEP_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = dropout(X) - X in float32, one rounding (X * keep_scale - X where kept, -X where dropped):
    the reference's two roundings when launched without FMA contraction. KEEP_ONLY: OUT = X where kept,
    else 0 (no scale: exact). OUT is contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    ok = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
    keep = _keep(seed, offs_m, col0, thresh, BLOCK_M, BLOCK_K)
    if KEEP_ONLY:
        out = tl.where(keep, x, 0.0)
    else:
        out = tl.where(keep, x * keep_scale, 0.0) - x
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------- launchers

def _prec() -> str:
    """input_precision of the skinny products (operands promoted to fp32; see the module docstring)."""
    return "ieee" if _INTERP else "tf32x3"


def _base_prec(dtype) -> str:
    """input_precision of the base GEMM and of the LoRA term inside it: 16-bit operands multiply exactly
    (the setting is moot); fp32 operands follow torch.backends.cuda.matmul.allow_tf32, as torch's GEMM."""
    if _INTERP:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_r(R: int, cap: int = 64) -> int:
    return min(cap, max(16, next_pow2(max(R, 1))))


def _check32(what: str, *tensors):
    """The kernels index with 32 bits (fewer registers): refuse tensors of 2^31 elements or more."""
    big = [tuple(t.shape) for t in tensors if t is not None and t.numel() >= 2**31]
    if big:
        raise ValueError(f"lora {what}: the Triton kernels index with 32 bits; got tensors of shape {big} "
                         "(split the tokens into chunks below 2**31 elements)")


def _unit_stride(v):
    """A vector the kernels index as v + n (the bias): a strided view (b[::2]) copied, else v itself."""
    return v if v is None or v.stride(0) == 1 or v.numel() <= 1 else v.contiguous()


class Dropout:
    """The LoRA dropout as the kernels take it (p = 0: off)."""

    def __init__(self, p: float, seed: int):
        from fusedtune.reference.lora import dropout_threshold, keep_scale
        self.on = p > 0.0
        self.seed = int(seed) & ((1 << 64) - 1)
        if self.seed >= 2**63:
            self.seed -= 2**64      # the kernel argument is int64; the bits are what matter
        self.thresh = dropout_threshold(p) if self.on else 0
        self.scale = keep_scale(p) if self.on else 1.0


_NO_DROP = Dropout(0.0, 0)


def dropout(p: float, seed: int) -> Dropout:
    """Dropout(p, seed), the shared no-dropout object when p is 0 (the seed is unused then)."""
    return Dropout(p, seed) if p > 0.0 else _NO_DROP


FORCE_PARTS = 0     # tests: cut the skinny reductions into this many parts in the interpreter


def _parts(programs: int, steps: int, device) -> int:
    """Parts to cut a reduction of `steps` tiles into, so that programs x parts fill the GPU (about 4 per
    SM: a skinny product is memory-bound and one program per SM keeps too few loads in flight), each
    part at least 4 tiles."""
    if _INTERP:
        return max(1, min(FORCE_PARTS, steps)) if FORCE_PARTS else 1
    return max(1, min(cdiv(4 * _sm_count(torch.device(device).index), programs), steps // 4))


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    """Multiprocessors of CUDA device `index` (None: the current one), read once (called per launch)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index
                                            ).multi_processor_count


def _cut(length: int, block: int, parts: int) -> tuple[int, int]:
    """(per_part, parts): per_part a multiple of block, no empty part."""
    per = max(block, cdiv(cdiv(length, parts), block) * block)
    return per, max(1, cdiv(length, per))


def shrink(p: torch.Tensor, q: torch.Tensor, transpose_q: bool, S: torch.Tensor, gid, drop: Dropout):
    """T = (dropout(p) . Q^T) * S[gid], float32 [M, R]. p [M, K] row-major; Q is q [R, K], or q^T when
    transpose_q (q [K, R] row-major, as B [N, R] for u = dy . B). K is cut into parts that write partial
    products, summed in order after (deterministic)."""
    M, K = p.shape
    R = q.shape[1] if transpose_q else q.shape[0]
    _check32("shrink", p, q)
    if M * R >= 2**31:
        raise ValueError(f"lora shrink: an output of {M}x{R} needs 64-bit indexing")
    if M == 0 or R == 0:
        return torch.empty((M, R), dtype=torch.float32, device=p.device)
    sqr, sqk = (1, q.stride(0)) if transpose_q else (q.stride(0), 1)
    BR = _block_r(R)
    BM = 32 if _INTERP or BR > 32 else 64     # BLOCK_R 64 with BLOCK_M 64 spills (kernel report)
    BK = 32
    tiles = cdiv(M, BM) * cdiv(R, BR)
    per, parts = _cut(K, BK, _parts(tiles, cdiv(K, BK), p.device))
    t = torch.empty((parts, M, R), dtype=torch.float32, device=p.device)
    grid = (cdiv(M, BM), cdiv(R, BR), parts)
    fast(lora_shrink_kernel)[grid](p, q, t, gid if gid is not None else t, S, M, K, R, p.stride(0), sqr, sqk,
                             drop.seed, drop.thresh, drop.scale, per, HAS_GID=gid is not None, DROPOUT=drop.on,
                             PREC=_prec(), BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK, num_warps=4)
    return t[0] if parts == 1 else t.sum(0)


def gemm(p: torch.Tensor, q: torch.Tensor, q_strides: tuple, N: int, t, e, e_strides: tuple, bias, out_dtype,
         drop: Dropout, nf4=None, col_scale=None, f_out=None) -> torch.Tensor:
    """C [M, N] = P . Q^T + keep/(1-p) * (T . E^T) + bias. Q[n, k] sits at q + n*q_strides[0] + k*q_strides[1]
    (nf4: q is the packed weight and nf4 the dict of its quantization state); E[n, r] likewise.
    col_scale (float32 [N]) with f_out (an [M, N] tensor like C): f_out <- the product before the bias,
    C <- col_scale[n] * it + bias."""
    M, K = p.shape
    _check32("gemm", p, q, t, e)
    bias = _unit_stride(bias)
    if K > 1 and p.stride(1) != 1:     # P is read as p + m * stride_pm + k (DoRA's dropped dX operand from a
        p = p.contiguous()             # transposed dy was column-major)
    if nf4 is not None and nf4["shape"][0] * nf4["shape"][1] >= 2**31:
        raise ValueError(f"lora gemm: an NF4 weight of {nf4['shape']} needs 64-bit indexing")
    if M * N >= 2**31:
        raise ValueError(f"lora gemm: an output of {M}x{N} needs 64-bit indexing (split the tokens)")
    prec = _base_prec(p.dtype)
    kernel = (lora_gemm_nf4_kernel if nf4 is not None else
              lora_gemm_ieee_kernel if prec == "ieee" else lora_gemm_kernel)
    splits = _k_splits(M, N, K, p.device) if nf4 is not None else 1
    c = torch.empty((M, N), dtype=out_dtype, device=p.device)
    if nf4 is None and M and N:
        if lora_tma.usable(p, q, q_strides, c, f_out):     # sm_90: TMA loads on a persistent grid (lora_tma.py)
            return lora_tma.gemm(p, q, q_strides, c, t, e, e_strides, bias, drop, prec, col_scale, f_out)
    if splits == 1:
        return _launch(kernel, p, q, q_strides, K, t, e, e_strides, bias, c, drop, prec, nf4, col_scale, f_out, 0)
    # split-K (the in-GEMM NF4 dequant at few rows, where the output has too few tiles to fill the GPU): float32
    # partial products, then the expand pass sums them and adds the LoRA term and bias, rounding once
    per = cdiv(cdiv(K, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = cdiv(K, per)
    part = torch.empty((splits, M, N), dtype=torch.float32, device=p.device)
    _launch(kernel, p, q, q_strides, K, None, None, (0, 0), None, part[0], _NO_DROP, prec, nf4, None, None, 0,
            k_split=per, splits=splits)
    expand = lora_expand_ieee_kernel if prec == "ieee" else lora_expand_kernel
    return _launch(expand, part[0], c, (0, 0), splits, t, e, e_strides, bias, c, drop, prec, None, col_scale, f_out,
                   2, k_split=M * N)


FORCE_SPLIT_K = 0       # tests: split the in-GEMM NF4 GEMM's K loop into this many parts in the interpreter
_SPLIT_ALIGN = 64       # a split's K extent: a multiple of every BLOCK_K
_SPLIT_MIN_K = 256      # and at least this long


def _k_splits(M: int, N: int, K: int, device) -> int:
    """Parts to cut an NF4 GEMM's K loop into so that tiles x parts fill the GPU twice over (tiles counted
    at BLOCK_M 16 x BLOCK_N 64, the NF4 configs' smallest), each part at least _SPLIT_MIN_K long; fewer
    when the float32 partials would need 64-bit offsets."""
    if _INTERP:
        return max(1, min(FORCE_SPLIT_K, cdiv(K, _SPLIT_ALIGN))) if FORCE_SPLIT_K else 1
    tiles = cdiv(M, 16) * cdiv(N, 64)
    s = max(1, min(cdiv(2 * _sm_count(torch.device(device).index), tiles), K // _SPLIT_MIN_K))
    return s if s * M * N < 2**31 else 1


def expand_(c: torch.Tensor, t: torch.Tensor, e: torch.Tensor, e_strides: tuple, bias, drop: Dropout,
            prec_dtype, col_scale=None, f_out=None) -> torch.Tensor:
    """C += keep/(1-p) * (T . E^T) + bias in place, C [M, N] row-major holding a product already (the base
    GEMM, through cuBLAS): C read and written once, the sum in float32 rounded once to C's dtype; the
    LoRA term at the precision the fused GEMM gives it (_base_prec of prec_dtype, the operands' dtype).
    col_scale with f_out (DoRA, as gemm()): f_out <- C + T . E^T, then C <- col_scale[n] * that + bias."""
    M, N = c.shape
    _check32("expand", c, t, e)
    bias = _unit_stride(bias)
    if c.stride(1) != 1 or (M > 1 and c.stride(0) < N):
        raise ValueError(f"lora expand: C must be row-major, got strides {c.stride()}")
    prec = _base_prec(prec_dtype)
    kernel = lora_expand_ieee_kernel if prec == "ieee" else lora_expand_kernel
    return _launch(kernel, c, c, (0, 0), 1, t, e, e_strides, bias, c, drop, prec, None, col_scale, f_out, 1)


FORCE_GATHER_TILE = False   # tests: the in-GEMM NF4 dequant by per-element gathers even where VEC applies
_NF4_TILE_MAX = 64          # the largest BLOCK_K (forward) / BLOCK_N (dX) of the NF4 configs


def _nf4_vec(nf4, q_strides) -> int:
    """lora_gemm_kernel's NF4_VEC: 1 (forward) or 2 (dX) when every tile's contiguous extent (BLOCK_K or
    BLOCK_N, powers of two up to _NF4_TILE_MAX) lies in one quantization block -- a power-of-two blocksize
    of at least _NF4_TILE_MAX that divides the weight's row length; else 0 (per-element gathers)."""
    if nf4 is None or FORCE_GATHER_TILE:
        return 0
    bs, row = nf4["blocksize"], nf4["shape"][1]
    if bs & (bs - 1) or bs < _NF4_TILE_MAX or row % bs:
        return 0
    return 1 if q_strides[1] == 1 else 2 if q_strides[0] == 1 else 0


def _launch(kernel, p, q, q_strides, K, t, e, e_strides, bias, c, drop: Dropout, prec, nf4, col_scale, f_out,
            accumulate: int, k_split: int | None = None, splits: int = 1) -> torch.Tensor:
    """One lora_gemm_kernel launch (gemm, expand_). accumulate: 0, 1 (C holds the product) or 2 (the sum of
    K slabs of P, k_split apart). k_split (accumulate 0): the K extent of each of `splits` programs along grid
    axis 1 (None: K, one split)."""
    M, N = c.shape
    R = 0 if t is None else t.shape[1]
    if M == 0 or N == 0:
        return c
    dummy = c
    nf = nf4 or {}
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    fast(kernel)[grid](
        p, q, dummy if t is None else t, dummy if e is None else e, dummy if bias is None else bias, c,
        nf.get("absmax", dummy), nf.get("absmax2", dummy), nf.get("code", dummy), nf.get("code2", dummy),
        dummy if col_scale is None else col_scale, dummy if f_out is None else f_out,
        M, N, K, R, p.stride(0), q_strides[0], q_strides[1], e_strides[0], e_strides[1], c.stride(0),
        drop.seed, drop.thresh, drop.scale, float(nf.get("offset", 0.0)), K if k_split is None else k_split,
        HAS_LORA=t is not None and R > 0, HAS_BIAS=bias is not None, DROPOUT=drop.on, NF4=nf4 is not None,
        COL_SCALE=col_scale is not None, ACCUMULATE=accumulate, SPLIT_K=splits > 1 and not accumulate,
        NF4_DOUBLE="absmax2" in nf, NF4_BLOCK=nf.get("blocksize", 64), NF4_BLOCK2=nf.get("blocksize2", 256),
        NF4_VEC=_nf4_vec(nf4, q_strides),
        BASE_PREC=prec, EPI_PREC=prec, BLOCK_R=_block_r(R, 32), GROUP_M=8)
    return c


def wgrad(p: torch.Tensor, t: torch.Tensor, drop: Dropout, transpose: bool = False) -> torch.Tensor:
    """O [C, R] = dropout(p)^T . t, float32 (transpose: O^T [R, C], row-major); p [M, C] row-major, t float32
    [M, R]."""
    M, C = p.shape
    R = t.shape[1]
    _check32("wgrad", p, t)
    if M == 0 or C == 0 or R == 0:
        return torch.zeros((R, C) if transpose else (C, R), dtype=torch.float32, device=p.device)
    BR = _block_r(R, 32)
    BC = 32 if _INTERP else 64
    BM = 32
    tiles = cdiv(C, BC) * cdiv(R, BR)
    want = 1 if _INTERP else max(1, min(cdiv(M, 4 * BM), cdiv(4 * 132, tiles)))
    rows = cdiv(cdiv(M, want), BM) * BM
    splits = cdiv(M, rows)
    o = torch.empty((splits, R, C) if transpose else (splits, C, R), dtype=torch.float32, device=p.device)
    fast(lora_wgrad_kernel)[(cdiv(C, BC), cdiv(R, BR), splits)](
        p, t, o, M, C, R, p.stride(0), rows, drop.seed, drop.thresh, drop.scale, DROPOUT=drop.on, PREC=_prec(),
        TRANS_OUT=transpose, BLOCK_M=BM, BLOCK_C=BC, BLOCK_R=BR, num_warps=4)
    return o[0] if splits == 1 else o.sum(0)


DY_MAX_R = 64     # lora_dy_kernel keeps all R columns of u in one register tile


def dy_fused(R: int) -> bool:
    """Whether backward reads dy once for u and dB (lora_dy_kernel): R fits one tile and torch is not in
    deterministic mode (the kernel's atomics sum dB in a run-dependent order; the two-kernel path is
    bit-reproducible)."""
    return 0 < R <= DY_MAX_R and not torch.are_deterministic_algorithms_enabled()


def dy_products(dy: torch.Tensor, B: torch.Tensor, t: torch.Tensor, S: torch.Tensor, gid):
    """(u = (dy . B) * S[gid] float32 [M, R], dB = dy^T . t float32 [N, R]) reading dy once; R <= DY_MAX_R.
    dy [M, N] row-major, B [N, R] with unit column stride, t float32 [M, R]."""
    M, N = dy.shape
    R = B.shape[1]
    _check32("dy_products", dy, B, t)
    if not 0 < R <= DY_MAX_R:
        raise ValueError(f"lora dy_products: rank {R} outside 1..{DY_MAX_R}")
    if M == 0 or N == 0:
        return (torch.zeros((M, R), dtype=torch.float32, device=dy.device),
                torch.zeros((N, R), dtype=torch.float32, device=dy.device))
    BR = _block_r(R)
    split = dy.dtype != torch.float32     # 16-bit dy is exact in tf32: 2 MMAs per product (_dot_exact_a)
    # 64 rows per program (fp32 dy: 32, for registers) halve dB's atomics; the parts along N fill the GPU
    BM, BN = (32, 32) if _INTERP else ((64, 32) if split else (32, 16))
    atomic = M > BM      # one row block: each dB element has one writer, stored (no zero fill, no atomics)
    dB = (torch.zeros if atomic else torch.empty)((N, R), dtype=torch.float32, device=dy.device)
    per, parts = _cut(N, BN, _parts(cdiv(M, BM), cdiv(N, BN), dy.device))
    u = torch.empty((parts, M, R), dtype=torch.float32, device=dy.device)
    fast(lora_dy_kernel)[(cdiv(M, BM), parts)](dy, B, t, u, dB, gid if gid is not None else u, S, M, N, R,
                                                dy.stride(0), B.stride(0), per, HAS_GID=gid is not None,
                                                SPLIT=split, PREC=_prec(), ATOMIC=atomic, BLOCK_M=BM, BLOCK_N=BN,
                                                BLOCK_R=BR,
                                                num_warps=4 if BR <= 16 else 8)
    u = u[0] if parts == 1 else u.sum(0)
    return u, dB


def dropout_delta(x: torch.Tensor, drop: Dropout) -> torch.Tensor:
    """dropout(x) - x in x's dtype; x [M, K] with unit column stride."""
    return _dropout_pass(x, drop, False)


def dropout_keep(x: torch.Tensor, drop: Dropout) -> torch.Tensor:
    """x where the LoRA dropout keeps it, else 0, in x's dtype (unscaled: exact); x [M, K], unit column stride."""
    return _dropout_pass(x, drop, True)


def _dropout_pass(x: torch.Tensor, drop: Dropout, keep_only: bool) -> torch.Tensor:
    M, K = x.shape
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    _check32("dropout_keep" if keep_only else "dropout_delta", x)
    if out.numel() == 0:
        return out
    BM, BK = (32, 32) if _INTERP else (16, 256)
    fast(lora_dropout_delta_kernel)[(cdiv(M, BM), cdiv(K, BK))](
        x, out, M, K, x.stride(0), drop.seed, drop.thresh, drop.scale, KEEP_ONLY=keep_only, BLOCK_M=BM, BLOCK_K=BK,
        num_warps=4, enable_fp_fusion=False)
    return out


FORCE_GATHER_DEQUANT = False   # tests: the per-element gather path of nf4_dequant_kernel


def nf4_dequant(nf4: dict, shape: tuple, dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=nf4["q"].device)
    n = out.numel()
    if n >= 2**31:
        raise ValueError(f"lora nf4_dequant: a weight of {tuple(shape)} needs 64-bit indexing")
    if n == 0:
        return out
    bs = nf4["blocksize"]
    vec = bs & (bs - 1) == 0 and bs <= 4096 and not FORCE_GATHER_DEQUANT
    BLOCK = max(1024, bs) if vec else 1024
    fast(nf4_dequant_kernel)[(cdiv(n, BLOCK),)](
        nf4["q"], nf4["absmax"], nf4.get("absmax2", out), nf4["code"], nf4.get("code2", out), out, n,
        float(nf4.get("offset", 0.0)), BLOCKSIZE=bs, BLOCKSIZE2=nf4.get("blocksize2", 256),
        DOUBLE="absmax2" in nf4, BLOCK=BLOCK, VEC=vec, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------- kernel report
# As the runtime specializes them: integer arguments equal to 1 become constants (the unit strides of the
# forward and dgrad orientations), and pointers and LLM-sized dimensions are 16-aligned.

_GEMM_SIG = {"p_ptr": "*bf16", "q_ptr": "*bf16", "t_ptr": "*fp32", "e_ptr": "*fp32", "bias_ptr": "*bf16",
             "c_ptr": "*bf16", "absmax_ptr": "*fp32", "absmax2_ptr": "*fp32", "code_ptr": "*fp32",
             "code2_ptr": "*fp32", "g_ptr": "*fp32", "f_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
             "stride_pm": "i32",
             "stride_cm": "i32", "seed": "i64", "thresh": "i64", "keep_scale": "fp32", "nf4_offset": "fp32",
             "k_split": "i32"}
_GEMM_BASE = dict(HAS_BIAS=True, NF4=False, COL_SCALE=False, ACCUMULATE=0, SPLIT_K=False, NF4_DOUBLE=False, NF4_BLOCK=64, NF4_BLOCK2=256,
                  NF4_VEC=0, BASE_PREC="tf32", EPI_PREC="tf32", BLOCK_R=16, GROUP_M=8, HAS_LORA=True, DROPOUT=False)
_ORIENT = {"fwd": ({"stride_qk": 1, "stride_er": 1}, {"stride_qn": "i32", "stride_en": "i32"}),
           "dgrad": ({"stride_qn": 1, "stride_en": 1}, {"stride_qk": "i32", "stride_er": "i32"}),
           # a Conv1D base (GPT-2: W stored (in, out), passed as W^T's view): W read as dgrad reads it, and back
           "fwd_conv1d": ({"stride_qn": 1, "stride_er": 1}, {"stride_qk": "i32", "stride_en": "i32"}),
           "dgrad_conv1d": ({"stride_qk": 1, "stride_en": 1}, {"stride_qn": "i32", "stride_er": "i32"})}
_ALIGNED = [n for n, t in _GEMM_SIG.items() if t.startswith("*")] + ["N", "K", "stride_pm", "stride_cm", "k_split"]


def _gemm_cfg(m, n, k, w, s, dt="bf16", orient="fwd", bias_dt=None, sig_over=None, **over):
    consts, strides = _ORIENT[orient]
    sig = dict(strides)
    if dt != "bf16":
        sig.update(p_ptr=f"*{dt}", q_ptr=f"*{dt}", bias_ptr=f"*{dt}", c_ptr=f"*{dt}", f_ptr=f"*{dt}")
    if bias_dt:     # lora_bias: base bias + scale * b arrives in float32
        sig["bias_ptr"] = f"*{bias_dt}"
    if over.get("NF4"):
        sig.update(q_ptr="*u8", absmax_ptr="*u8")
    sig.update(sig_over or {})
    return {"constexprs": {**_GEMM_BASE, **consts, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **over},
            "num_warps": w, "num_stages": s, "signature": sig, "aligned": _ALIGNED + list(strides)}


register(KernelSpec(
    family="lora", name="lora_gemm_kernel", fn=lora_gemm_kernel.fn, signature=_GEMM_SIG, gemm=True,
    configs=[_gemm_cfg(*c) for c in _GEMM_CONFIGS]
    + [_gemm_cfg(128, 128, 64, 8, 4, "fp16"), _gemm_cfg(64, 128, 64, 4, 4, BLOCK_R=32),
       _gemm_cfg(128, 128, 64, 8, 4, bias_dt="fp32"),
       _gemm_cfg(128, 256, 64, 8, 3, COL_SCALE=True), _gemm_cfg(16, 64, 64, 4, 2, NF4=True, NF4_DOUBLE=True, COL_SCALE=True),
       _gemm_cfg(128, 128, 64, 8, 4, orient="dgrad", DROPOUT=True, HAS_BIAS=False),
       _gemm_cfg(64, 64, 64, 4, 4, orient="dgrad", DROPOUT=True, HAS_BIAS=False),
       _gemm_cfg(16, 64, 64, 4, 2, orient="dgrad", NF4=True, NF4_DOUBLE=True, HAS_BIAS=False),
       _gemm_cfg(128, 256, 64, 8, 3, orient="fwd_conv1d"), _gemm_cfg(64, 64, 64, 4, 4, orient="fwd_conv1d"),
       _gemm_cfg(128, 128, 64, 8, 4, orient="dgrad_conv1d", HAS_BIAS=False)]
    + [_gemm_cfg(*c, NF4=True, NF4_DOUBLE=True, NF4_VEC=1) for c in _NF4_CONFIGS]       # contiguous byte loads
    + [_gemm_cfg(*c, orient="dgrad", NF4=True, NF4_DOUBLE=True, NF4_VEC=2, HAS_BIAS=False) for c in _NF4_CONFIGS]
    + [_gemm_cfg(*_NF4_CONFIGS[0], NF4=True, NF4_VEC=1)]                                   # single quantization
    # split-K of the in-GEMM NF4 dequant: float32 partials (no epilogue), summed by the expand pass below
    + [_gemm_cfg(*c, orient=o, NF4=True, NF4_DOUBLE=True, NF4_VEC=v, SPLIT_K=True, HAS_LORA=False, HAS_BIAS=False,
                 sig_over={"c_ptr": "*fp32"}) for c in _NF4_CONFIGS for o, v in (("fwd", 1), ("dgrad", 2))]
    + [_gemm_cfg(*c, ACCUMULATE=2, sig_over={"p_ptr": "*fp32"}) for c in _EXPAND_CONFIGS]
    + [_gemm_cfg(*_EXPAND_CONFIGS[0], orient="dgrad", ACCUMULATE=2, DROPOUT=True, HAS_BIAS=False,
                 sig_over={"p_ptr": "*fp32"})]
    # the expand pass after a cuBLAS base GEMM (K = 0): forward with bias, dgrad with the dropout mask
    + [_gemm_cfg(*c, ACCUMULATE=1) for c in _EXPAND_CONFIGS]
    + [_gemm_cfg(*_EXPAND_CONFIGS[0], orient="dgrad", ACCUMULATE=1, DROPOUT=True, HAS_BIAS=False),
       _gemm_cfg(*_EXPAND_CONFIGS[0], ACCUMULATE=1, COL_SCALE=True)]   # DoRA's forward
    + [dict(_gemm_cfg(*c, "fp32", BASE_PREC="ieee", EPI_PREC="ieee", ACCUMULATE=1), gemm=False)
       for c in _EXPAND_IEEE_CONFIGS]
    + [dict(_gemm_cfg(*_EXPAND_IEEE_CONFIGS[0], "fp32", "dgrad", BASE_PREC="ieee", EPI_PREC="ieee", ACCUMULATE=1,
                      DROPOUT=True, HAS_BIAS=False), gemm=False)]
    # fp32 without TF32: FMA by design (no tensor-core instruction to ask for); checked for spills
    + [dict(_gemm_cfg(*c, "fp32", BASE_PREC="ieee", EPI_PREC="ieee"), gemm=False) for c in _IEEE_CONFIGS]
    + [dict(_gemm_cfg(*_IEEE_CONFIGS[0], "fp32", "dgrad", BASE_PREC="ieee", EPI_PREC="ieee", DROPOUT=True,
                      HAS_BIAS=False), gemm=False)]))
_SHRINK_SIG = {"p_ptr": "*bf16", "q_ptr": "*fp32", "t_ptr": "*fp32", "gid_ptr": "*i32", "s_ptr": "*fp32", "M": "i32",
               "K": "i32", "R": "i32", "stride_pm": "i32", "seed": "i64", "thresh": "i64", "keep_scale": "fp32",
               "k_per_split": "i32"}
register(KernelSpec(   # x.A^T (A [R, K]: stride_qk 1) and dy.B (B [N, R]: stride_qr 1)
    family="lora", name="lora_shrink_kernel", fn=lora_shrink_kernel, signature=_SHRINK_SIG, gemm=True,
    configs=[{"constexprs": dict(HAS_GID=False, DROPOUT=True, PREC="tf32x3", BLOCK_M=64, BLOCK_R=16, BLOCK_K=32,
                                 stride_qk=1),
              "signature": {"stride_qr": "i32"}, "num_warps": 4, "num_stages": 1},
             {"constexprs": dict(HAS_GID=True, DROPOUT=False, PREC="tf32x3", BLOCK_M=32, BLOCK_R=64, BLOCK_K=32,
                                 stride_qr=1),
              "signature": {"stride_qk": "i32"}, "num_warps": 4, "num_stages": 1}]))
_WGRAD_SIG = {"p_ptr": "*bf16", "t_ptr": "*fp32", "o_ptr": "*fp32", "M": "i32", "C": "i32", "R": "i32",
              "stride_pm": "i32", "rows_per_split": "i32", "seed": "i64", "thresh": "i64", "keep_scale": "fp32"}
register(KernelSpec(
    family="lora", name="lora_wgrad_kernel", fn=lora_wgrad_kernel, signature=_WGRAD_SIG, gemm=True,
    configs=[{"constexprs": dict(DROPOUT=d, PREC="tf32x3", TRANS_OUT=tr, BLOCK_M=32, BLOCK_C=64, BLOCK_R=br),
              "num_warps": 4, "num_stages": 1} for d, br, tr in ((False, 16, False), (False, 16, True), (True, 32, True))]))
register(KernelSpec(
    family="lora", name="nf4_dequant_kernel", fn=nf4_dequant_kernel,
    signature={"q_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code_ptr": "*fp32", "code2_ptr": "*fp32",
               "out_ptr": "*bf16", "numel": "i32", "offset": "fp32"},
    configs=[{"constexprs": dict(BLOCKSIZE=64, BLOCKSIZE2=256, DOUBLE=True, BLOCK=1024, VEC=v), "num_warps": 4,
              "num_stages": 1, "aligned": ["q_ptr", "absmax_ptr", "absmax2_ptr", "code_ptr", "code2_ptr", "out_ptr",
                                            "numel"]}   # (an LLM weight's element count: a multiple of 16)
             for v in (True, False)]))
register(KernelSpec(
    family="lora", name="lora_dropout_delta_kernel", fn=lora_dropout_delta_kernel,
    signature={"x_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "K": "i32", "stride_xm": "i32", "seed": "i64",
               "thresh": "i64", "keep_scale": "fp32"},
    options={"enable_fp_fusion": False},
    configs=[{"constexprs": dict(KEEP_ONLY=k, BLOCK_M=16, BLOCK_K=256), "num_warps": 4, "num_stages": 1}
             for k in (False, True)]))
_DY_SIG = {"dy_ptr": "*bf16", "b_ptr": "*fp32", "t_ptr": "*fp32", "u_ptr": "*fp32", "db_ptr": "*fp32",
           "gid_ptr": "*i32", "s_ptr": "*fp32", "M": "i32", "N": "i32", "R": "i32", "stride_dm": "i32",
           "stride_bn": "i32", "n_per_split": "i32"}
register(KernelSpec(
    family="lora", name="lora_dy_kernel", fn=lora_dy_kernel, signature=_DY_SIG, gemm=True,
    configs=[{"constexprs": dict(HAS_GID=gid, SPLIT=dt != "fp32", PREC="tf32x3", ATOMIC=atomic, BLOCK_M=bm,
                                 BLOCK_N=16 if dt == "fp32" else 32, BLOCK_R=br),
              "signature": {"dy_ptr": f"*{dt}"}, "num_warps": 4 if br <= 16 else 8, "num_stages": 3}
             for dt, gid, bm, br, atomic in (("bf16", False, 64, 16, True), ("bf16", True, 64, 32, True),
                                             ("fp16", False, 64, 64, True), ("fp32", False, 32, 16, True),
                                             ("fp32", True, 32, 64, True), ("bf16", False, 64, 16, False))]))

from . import lora_tma  # noqa: E402 -- (last: it imports this module's helpers) gemm()'s Hopper kernel
