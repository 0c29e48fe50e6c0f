"""Sparse-delta family, Triton kernels of regrowth (fusedtune.sparse_delta.Regrower): the score
accumulators and the selection of the best regrowth positions, without a dense score tensor and
without sorting.

candidates(n, mode, ...): every valid position whose score is at least the n-th largest valid score
    (the n best and all ties at the threshold), sorted by position, with its score. A score is
        mode 0  src[p]                    (a dense accumulator, SpIEL-AG without candidates)
        mode 1  |src[p]|                  (a dense gradient: SpIEL-AG's candidate choice)
        mode 2  min(row[p // in], col[p % in])  (SM3 row/column accumulators, SpIEL-MA)
    A position is valid unless it is in the exclusion bitmask (the layer's current indices), or its
    score is NaN or -inf. Radix select over the scores' order-preserving 32-bit keys: a histogram
    of the top 8 key bits (one read), then, only while the threshold's bin holds too many
    positions, of the next 8 bits among that bin (one read each, at most three more); then one read
    that compacts the positions at or above the bin into a buffer of about n entries, where the
    exact threshold is found. 256 bins a level, not 2048: tl.histogram's warp-level lowering costs
    about (bins / 32) x (log2(bins) + 3) instructions a thread per element (ballots per key bit, then
    a mask and a popcount per bin the lane owns), ~900 at 2048 bins and ~90 at 256; on an H200 the
    2048-bin version ran the selection at 11 G positions a second, slower than torch.topk. The reference (torch.topk over the dense score) reads and writes the
    dense scores about ten times and, for mode 2, materialises them (4 bytes per weight).
sm3_update(g, row, col): SM3-II, nu = min(row[r], col[c]) + g[r, c]^2, new row = max over c of nu,
    new col = max over r of nu; one read of g (the reference: 5 reads and 3 writes of a dense buffer,
    one of them an extra dense float32 tensor). Maxima are exact, so any order gives the same bits.
    NaN propagates as in torch (torch.minimum, torch.amax).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting

from .common import cdiv

from .launch import fast
from .registry import KernelSpec, register

_INTERP = interpreting()
SELECT_BLOCK = 256 if _INTERP else 4096
SELECT_WARPS = 8
SM3_BR, SM3_BC, SM3_WARPS = (16, 32, 4) if _INTERP else (32, 256, 8)
LEVEL_BITS = 8
LEVEL_SHIFTS = (24, 16, 8, 0)  # key bits of the histogram levels: [31:24], [23:16], [15:8], [7:0]
LEVEL_BINS = (1 << LEVEL_BITS,) * len(LEVEL_SHIFTS)
KEEP_SLACK = 1 << 16           # compact once the candidates number at most 2n + KEEP_SLACK
MAX_NUMEL = 2 ** 31 - 2 ** 16  # positions index in 32 bits (a program's block may pass the end)
EXCL_BLOCK = 256 if _INTERP else 1024


@triton.jit
def _select_scores(src_ptr, row_ptr, col_ptr, offs, ok, IN, MODE: tl.constexpr):
    if MODE == 2:
        r = offs // IN
        a = tl.load(row_ptr + r, mask=ok, other=0.0)
        b = tl.load(col_ptr + (offs - r * IN), mask=ok, other=0.0)
        s = tl.where((a != a) | (b != b), float("nan"), tl.minimum(a, b))
    else:
        s = tl.load(src_ptr + offs, mask=ok, other=0.0)
        if MODE == 1:
            s = tl.abs(s)
    return tl.where(s == 0.0, 0.0, s)     # -0.0 -> +0.0: equal scores get equal keys


@triton.jit
def _select_keys(s, offs, ok, excl_ptr):
    """(order-preserving int32 key of s, valid): a float's bits, with the magnitude bits flipped when
    it is negative."""
    word = tl.load(excl_ptr + (offs >> 5), mask=ok, other=0)
    excluded = ((word >> (offs & 31)) & 1) != 0
    valid = ok & (excluded == 0) & (s == s) & (s != float("-inf"))
    b = s.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF), valid


@triton.jit
def select_hist_kernel(src_ptr, row_ptr, col_ptr, excl_ptr, hist_ptr, NUMEL, IN, PREFIX,
                       MODE: tl.constexpr, LEVEL: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
    # the histogram of key bits [SHIFT + 7 : SHIFT], SHIFT = 24 - 8 * LEVEL, over the valid positions whose
    # key >> (SHIFT + 8) equals PREFIX (level 0: all)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)    # int32: NUMEL < MAX_NUMEL
    ok = offs < NUMEL
    s = _select_scores(src_ptr, row_ptr, col_ptr, offs, ok, IN, MODE)
    u, valid = _select_keys(s, offs, ok, excl_ptr)
    if LEVEL == 0:      # the key's top 8 bits, as a bin 0..255 (the arithmetic shift keeps the sign)
        bins = (u >> 24) + 128
    else:
        valid = valid & ((u >> (32 - 8 * LEVEL)) == PREFIX)
        bins = (u >> (24 - 8 * LEVEL)) & 0xFF
    h = tl.histogram(bins, NBINS, mask=valid)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), h, mask=h > 0)


@triton.jit
def select_compact_kernel(src_ptr, row_ptr, col_ptr, excl_ptr, count_ptr, pos_ptr, score_ptr, NUMEL, IN, LO,
                          MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)    # int32: NUMEL < MAX_NUMEL
    ok = offs < NUMEL
    s = _select_scores(src_ptr, row_ptr, col_ptr, offs, ok, IN, MODE)
    u, valid = _select_keys(s, offs, ok, excl_ptr)
    keep = valid & (u >= LO)
    k32 = keep.to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(k32, axis=0))
    slot = base + tl.cumsum(k32, axis=0) - 1
    tl.store(pos_ptr + slot, offs.to(tl.int64), mask=keep)
    tl.store(score_ptr + slot, s, mask=keep)


@triton.jit
def sm3_update_kernel(g_ptr, row_ptr, col_ptr, row_out, col_out, OUT, IN, BR: tl.constexpr, BC: tl.constexpr):
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    rok, cok = rr < OUT, cc < IN
    ok = rok[:, None] & cok[None, :]
    a = tl.load(row_ptr + rr, mask=rok, other=0.0)
    b = tl.load(col_ptr + cc, mask=cok, other=0.0)
    g = tl.load(g_ptr + rr.to(tl.int64)[:, None] * IN + cc[None, :], mask=ok, other=0.0)
    lo = tl.minimum(a[:, None], b[None, :])
    nu = tl.where((a[:, None] != a[:, None]) | (b[None, :] != b[None, :]), float("nan"), lo) + g * g
    # nu >= 0 or NaN (made +NaN): as int32 bits, a non-negative float's order is the integer order and
    # +NaN lies above +inf, so integer maxima are the float maxima with NaN propagating
    bits = tl.where(nu != nu, 0x7FC00000, nu.to(tl.int32, bitcast=True))
    bits = tl.where(ok, bits, 0)
    tl.atomic_max(row_out + rr, tl.max(bits, axis=1), mask=rok)
    tl.atomic_max(col_out + cc, tl.max(bits, axis=0), mask=cok)


@triton.jit
def exclusion_bits_kernel(idx_ptr, words_ptr, K, NUMEL, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    i = tl.load(idx_ptr + offs, mask=ok, other=0)
    ok = ok & (i >= 0) & (i < NUMEL)     # an index outside the weight (unchecked callers) writes nothing
    tl.atomic_or(words_ptr + (i >> 5), 1 << (i & 31), mask=ok, sem="relaxed")


def exclusion_bits(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 bitmask of numel bits with the indices in [0, numel) set (others set nothing): one launch of atomic
    ORs (the torch version took six ops: a long copy, ones, a shift, a mask, a cast and index_add_)."""
    words = torch.zeros((numel + 31) // 32 + 1, dtype=torch.int32, device=indices.device)
    idx = indices if indices.dtype == torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
    if idx.numel():
        fast(exclusion_bits_kernel)[(cdiv(idx.numel(), EXCL_BLOCK),)](idx, words, idx.numel(), numel,
                                                                    BLOCK=EXCL_BLOCK, num_warps=4)
    return words


def _threshold_bin(h: list, need: int) -> tuple[int, int]:
    """(b, above): the highest bin b with at least `need` counts in bins >= b; above = counts in bins > b."""
    above = 0
    for b in range(len(h) - 1, -1, -1):
        if above + h[b] >= need:
            return b, above
        above += h[b]
    raise AssertionError("fewer valid scores than asked for")


def candidates(n: int, mode: int, src: torch.Tensor | None, row: torch.Tensor | None, col: torch.Tensor | None,
               exclude: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions int64 sorted, scores float32) of every valid position scoring at least the n-th best."""
    dev = exclude.device

    def empty():
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    if n <= 0 or numel == 0:
        return empty()
    IN = col.numel() if mode == 2 else 1
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    args = (dummy if src is None else src, dummy if row is None else row, dummy if col is None else col,
            exclusion_bits(exclude, numel))
    grid = (cdiv(numel, SELECT_BLOCK),)
    prefix, above, need, lo = 0, 0, n, 0
    for level, (shift, nbins) in enumerate(zip(LEVEL_SHIFTS, LEVEL_BINS)):
        hist = torch.zeros(nbins, dtype=torch.int32, device=dev)
        fast(select_hist_kernel)[grid](*args, hist, numel, IN, prefix, MODE=mode, LEVEL=level, NBINS=nbins,
                                 BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS)
        h = hist.tolist()      # (one copy to the host a level; the rest is Python on a list)
        if level == 0:
            n = need = min(n, sum(h))
            if n == 0:
                return empty()
        b, up = _threshold_bin(h, need)
        above += up
        need -= up
        prefix = (prefix << LEVEL_BITS) + b if level else b - nbins // 2   # key >> shift of the threshold's bin
        lo = prefix << shift
        if above + h[b] <= 2 * n + KEEP_SLACK:
            break
    total = above + h[b]
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    pos = torch.empty(total, dtype=torch.int64, device=dev)
    score = torch.empty(total, dtype=torch.float32, device=dev)
    fast(select_compact_kernel)[grid](*args, count, pos, score, numel, IN, lo, MODE=mode, BLOCK=SELECT_BLOCK,
                                num_warps=SELECT_WARPS)
    thr = torch.topk(score, n, sorted=False).values.min()
    keep = (score >= thr).nonzero().flatten()
    pos, order = pos[keep].sort()
    return pos, score[keep][order]


def sm3_update(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g float32 [out, in] contiguous, row [out], col [in] -> the new (row, col)."""
    OUT, IN = g.shape
    row_out = torch.zeros(OUT, dtype=torch.int32, device=g.device)
    col_out = torch.zeros(IN, dtype=torch.int32, device=g.device)
    if g.numel():
        grid = (cdiv(OUT, SM3_BR), cdiv(IN, SM3_BC))
        fast(sm3_update_kernel)[grid](g, row, col, row_out, col_out, OUT, IN, BR=SM3_BR, BC=SM3_BC, num_warps=SM3_WARPS,
                                enable_fp_fusion=False)     # g * g rounded, then added: the reference's roundings
    return row_out.view(torch.float32), col_out.view(torch.float32)


def _select_sig(extra: dict) -> dict:
    return {"src_ptr": "*fp32", "row_ptr": "*fp32", "col_ptr": "*fp32", "excl_ptr": "*i32", **extra,
            "NUMEL": "i32", "IN": "i32"}


register(KernelSpec(
    family="sparse_delta", name="select_hist_kernel", fn=select_hist_kernel,
    signature={**_select_sig({"hist_ptr": "*i32"}), "PREFIX": "i32"},
    configs=[{"constexprs": dict(MODE=m, LEVEL=lv, NBINS=nb, BLOCK=SELECT_BLOCK), "num_warps": SELECT_WARPS,
              "num_stages": 1} for m in (0, 1, 2) for lv, nb in enumerate(LEVEL_BINS)]))
register(KernelSpec(
    family="sparse_delta", name="exclusion_bits_kernel", fn=exclusion_bits_kernel,
    signature={"idx_ptr": "*i32", "words_ptr": "*i32", "K": "i32", "NUMEL": "i32"},
    configs=[{"constexprs": dict(BLOCK=EXCL_BLOCK), "num_warps": 4, "num_stages": 1}]))
register(KernelSpec(
    family="sparse_delta", name="select_compact_kernel", fn=select_compact_kernel,
    signature={**_select_sig({"count_ptr": "*i32", "pos_ptr": "*i64", "score_ptr": "*fp32"}), "LO": "i32"},
    configs=[{"constexprs": dict(MODE=m, BLOCK=SELECT_BLOCK), "num_warps": SELECT_WARPS, "num_stages": 1}
             for m in (0, 1, 2)]))
register(KernelSpec(
    family="sparse_delta", name="sm3_update_kernel", fn=sm3_update_kernel,
    signature={"g_ptr": "*fp32", "row_ptr": "*fp32", "col_ptr": "*fp32", "row_out": "*i32", "col_out": "*i32",
               "OUT": "i32", "IN": "i32"},
    configs=[{"constexprs": dict(BR=SM3_BR, BC=SM3_BC), "num_warps": SM3_WARPS, "num_stages": 1}],
    options={"enable_fp_fusion": False}))
