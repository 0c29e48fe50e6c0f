"""LoRA family, Triton: the fused LoRA GEMM for Hopper (sm_90) with TMA loads on a persistent grid.

lora_gemm_tma_kernel   C[M, N] = P . Q^T + keep/(1-p) * (T . E^T) + bias, as lora_gemm_kernel (lora.py) without
                       NF4 and the accumulate / split-K modes (DoRA's column scale included: F, then C = g * F + bias).

Why a second kernel: on an H200 (bench/results/lora.csv, 2026-11-30) lora_gemm_kernel, whose tiles are
loaded through masked pointer loads, ran the 4096^3 forward at 522 TFLOP/s against cuBLAS's 785, so the
fused schedule cost +50% over the base GEMM and the cuBLAS schedule (the base through cuBLAS, then an
expand pass that reads and writes the output once more) +15-30%; the goal is +10%. Here:
  - P and Q tiles come in by TMA (tensor descriptors made on the device): no address arithmetic or masks
    in the K loop (the copy engine fills out-of-bounds rows and columns with zeros), the loads pipelined
    into num_stages shared-memory buffers, the products on wgmma (HGMMA in the kernel report);
  - one program per SM walks the output tiles in grouped order (GROUP_M row tiles share their column
    tiles while those are in L2); the output goes out by TMA, whose store drains while the next tile
    begins (the software pipeline is the K loop's: a tile's first loads are not fetched during the
    previous tile's epilogue);
  - the LoRA term and the bias are the accumulator's start, not an epilogue: acc = keep * (T . E^T) + bias,
    then the K loop adds P . Q^T to it. One accumulator (a separate one for the masked LoRA term would
    double the registers of a 128x256 tile); the same sum as lora_gemm_kernel's in another order.
Q is read as the forward reads W (Q_T False: q [N, K] row-major, Q = q) or as dX reads it (Q_T True: q
[K, N] row-major, Q = q^T, a tile of it is q[k0:, n0:] as it lies). TMA needs 16-byte-aligned base
addresses and row strides and unit column strides; gemm() in lora.py checks them and takes
lora_gemm_kernel otherwise, and on every GPU other than sm_90 (where descriptors compile to plain loads).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.runtime import _allocation     # where Triton keeps the allocator (3.6 - 3.8)
except ImportError:
    _allocation = None

from fusedtune._env import env_flag, interpreting

from .common import autotune, cdiv
from .launch import fast
from .lora import _block_r, _keep, _sm_count
from .registry import KernelSpec, register

_INTERP = interpreting()
ENV = "FUSEDTUNE_LORA_TMA"
# Off by default until a GPU run times it against lora_gemm_kernel and cuBLAS (bench lora's "fused-tma
# schedule" rows); FUSEDTUNE_LORA_TMA=1 (read at import) or ENABLED = True turns it on for sm_90.
ENABLED = env_flag(ENV, False)
launches = 0      # calls that took this kernel (the bench checks that its fused-tma timings did)
# Fewer rows stay on lora_gemm_kernel: every config here has BLOCK_M >= 64 and BLOCK_N >= 128, so a decode-size
# call (M < 64) would run N / 128 programs (32 at N = 4096) on 132 SMs to stream W, where lora_gemm_kernel's
# 32 x 64 tiles run twice as many. (Reasoned, unmeasured: the bench's fused-tma rows are at 4096 tokens.)
MIN_ROWS = 64

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, EPI_SPLIT): shared memory is stages x (BM + BN) x BK x 2 bytes of
# operand buffers plus the output tile the TMA store reads (BM x BN x 2); 128x256x64 at 3 stages is 213 KB
# of sm_90's 227 (python -m fusedtune kernels)
# (EPI_SPLIT 2: the output tile stored in two halves, so its staging buffer is half as large and 128x256 fits a
# fourth operand stage: 224 KB)
_HOPPER_CONFIGS = [(128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 2), (128, 128, 64, 8, 4, 1), (128, 128, 64, 4, 4, 1),
                   (64, 128, 64, 4, 4, 1)]
_CONFIGS = [(32, 32, 32, 4, 1, 2)] if _INTERP else _HOPPER_CONFIGS


@autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "EPI_SPLIT": e}, num_warps=w, num_stages=s)
                   for m, n, k, w, s, e in _CONFIGS], key=["M", "N", "K", "R", "Q_T"])
@triton.jit(do_not_specialize=["seed", "thresh"])
def lora_gemm_tma_kernel(p_ptr, q_ptr, t_ptr, e_ptr, bias_ptr, c_ptr, g_ptr, f_ptr, M, N, K, R, stride_pm, stride_q,
                         stride_en, stride_er, stride_cm, seed, thresh, keep_scale, programs,
                         Q_T: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                         COL_SCALE: tl.constexpr, EPI_PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                         GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EPI_SPLIT: tl.constexpr):
    p_d = tl.make_tensor_descriptor(p_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if Q_T:
        q_d = tl.make_tensor_descriptor(q_ptr, shape=[K, N], strides=[stride_q, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        q_d = tl.make_tensor_descriptor(q_ptr, shape=[N, K], strides=[stride_q, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_d = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                    block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
    if COL_SCALE:    # DoRA: F, the product before the column scale and the bias, laid out as C
        f_d = tl.make_tensor_descriptor(f_ptr, shape=[M, N], strides=[stride_cm, 1],
                                        block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    offs_r = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_m * num_n, programs):
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % size_m
        pid_n = (tile % group) // size_m
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:     # the accumulator starts as keep/(1-p) * (T . E^T) (module docstring)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + offs_r
                r_ok = rr < R
                t = tl.load(t_ptr + offs_m[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                            other=0.0)
                e = tl.load(e_ptr + offs_n[None, :] * stride_en + rr[:, None] * stride_er,
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(t, e, acc, input_precision=EPI_PREC)
            if DROPOUT:
                acc = tl.where(_keep(seed, offs_m, n0, thresh, BLOCK_M, BLOCK_N), acc * keep_scale, 0.0)
        if HAS_BIAS and not COL_SCALE:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        for k0 in range(0, K, BLOCK_K):
            a = p_d.load([m0, k0])
            if Q_T:
                b = q_d.load([k0, n0])
            else:
                b = q_d.load([n0, k0]).T
            acc = tl.dot(a, b, acc)
        if COL_SCALE:    # F = x W^T + t B^T, then C = g[n] * F + bias (lora_gemm_kernel's epilogue)
            _store(f_d, m0, n0, acc, f_ptr.dtype.element_ty, EPI_SPLIT, BLOCK_M, BLOCK_N)
            acc = acc * tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        _store(c_d, m0, n0, acc, c_ptr.dtype.element_ty, EPI_SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _store(d, m0, n0, acc, dtype: tl.constexpr, EPI_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] to the descriptor's tile at (m0, n0): whole, or (EPI_SPLIT 2) as two halves of
    BLOCK_N / 2 columns (half the staging buffer in shared memory)."""
    tl.static_assert(EPI_SPLIT == 1 or EPI_SPLIT == 2)
    if EPI_SPLIT == 1:
        d.store([m0, n0], acc.to(dtype))
    else:
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        d.store([m0, n0], lo.to(dtype))
        d.store([m0, n0 + BLOCK_N // 2], hi.to(dtype))


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernel makes on the device (128 bytes each a program)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if _INTERP else "cuda")


def _ensure_allocator():
    """Triton asks a context-local allocator for the descriptors' memory; where none is set (the default
    raises), set one that takes it from torch's caching allocator. Per call: the autograd engine runs a
    backward on its own thread, whose context starts without one. A user's own allocator is left alone."""
    try:
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except AttributeError:    # another Triton's layout: set ours (replacing a user's, if any)
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _row_stride(t: torch.Tensor) -> int:
    """The row stride a descriptor gets (a one-row tensor's own stride may be anything: its row length)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _aligned(t: torch.Tensor, row_stride: int) -> bool:
    """TMA's rule for a 2-D operand: 16-byte-aligned base address and row stride (the caller checks the unit
    column stride)."""
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


def available(device) -> bool:
    """Whether this kernel can run on `device`: a Hopper GPU (compute capability 9.x), or the interpreter."""
    device = torch.device(device)
    return _INTERP or (device.type == "cuda" and _hopper(device.index))


@functools.lru_cache(maxsize=None)
def _hopper(index) -> bool:
    """Compute capability 9.x, read once per device (None: the current device, as torch reads it)."""
    return torch.cuda.get_device_capability(index)[0] == 9


def usable(p: torch.Tensor, q: torch.Tensor, q_strides: tuple, c: torch.Tensor, f_out=None) -> bool:
    """Whether lora.gemm() may take this kernel for C = P . Q^T with Q[n, k] at q + n*q_strides[0] +
    k*q_strides[1]: ENABLED, at least MIN_ROWS rows, a Hopper GPU (or the interpreter), 16-bit operands, and
    TMA's alignment."""
    if not ENABLED or p.shape[0] < MIN_ROWS or not available(p.device):
        return False
    if p.dtype not in (torch.bfloat16, torch.float16) or q.dtype != p.dtype or c.dtype != p.dtype:
        return False
    qs0, qs1 = q_strides
    if qs1 == 1:
        row = qs0
    elif qs0 == 1:
        row = qs1
    else:
        return False
    if p.shape[1] == 0 or (p.shape[1] > 1 and p.stride(1) != 1) or (c.shape[1] > 1 and c.stride(1) != 1):
        return False    # (K = 0: a descriptor's dimensions must be at least 1)
    if row < (p.shape[1] if qs1 == 1 else c.shape[1]) or _row_stride(p) < p.shape[1] or _row_stride(c) < c.shape[1]:
        return False    # rows that overlap (a stride-0 broadcast): not a layout a descriptor describes
    if f_out is not None and (f_out.dtype != c.dtype or f_out.stride() != c.stride() or f_out.data_ptr() % 16):
        return False    # (F shares C's descriptor layout)
    return _aligned(p, _row_stride(p)) and _aligned(q, row) and _aligned(c, _row_stride(c))


def gemm(p, q, q_strides: tuple, c, t, e, e_strides: tuple, bias, drop, epi_prec: str, col_scale=None,
         f_out=None) -> torch.Tensor:
    """C = P . Q^T + keep/(1-p) * (T . E^T) + bias into c [M, N] (usable() said yes); returns c. col_scale
    (float32 [N]) with f_out (laid out as c): f_out <- the product before the bias, C <- col_scale[n] * it +
    bias (DoRA)."""
    M, K = p.shape
    N = c.shape[1]
    R = 0 if t is None else t.shape[1]
    if M == 0 or N == 0:
        return c
    global launches
    launches += 1
    _ensure_allocator()
    q_t = q_strides[1] != 1
    sms = 4 if _INTERP else _sm_count(p.device.index)      # one program per SM (4 in the interpreter)
    grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    fast(lora_gemm_tma_kernel)[grid](
        p, q, c if t is None else t, c if e is None else e, c if bias is None else bias, c,
        c if col_scale is None else col_scale, c if f_out is None else f_out, M, N, K, R,
        _row_stride(p), q_strides[1] if q_t else q_strides[0], e_strides[0], e_strides[1], _row_stride(c),
        drop.seed, drop.thresh, drop.scale, sms,
        Q_T=q_t, HAS_LORA=t is not None and R > 0, HAS_BIAS=bias is not None, DROPOUT=drop.on,
        COL_SCALE=col_scale is not None, EPI_PREC=epi_prec, BLOCK_R=_block_r(R, 32), GROUP_M=8)
    return c


_SIG = {"p_ptr": "*bf16", "q_ptr": "*bf16", "t_ptr": "*fp32", "e_ptr": "*fp32", "bias_ptr": "*bf16", "c_ptr": "*bf16",
        "g_ptr": "*fp32", "f_ptr": "*bf16",
        "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_pm": "i32", "stride_q": "i32", "stride_en": "i32",
        "stride_er": "i32", "stride_cm": "i32", "seed": "i64", "thresh": "i64", "keep_scale": "fp32",
        "programs": "i32"}


def _cfg(m, n, k, w, s, e, q_t=False, dropout=False, bias=True, dt="bf16", block_r=16, col_scale=False):
    sig = {} if dt == "bf16" else {"p_ptr": f"*{dt}", "q_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "c_ptr": f"*{dt}"}
    return {"constexprs": dict(Q_T=q_t, HAS_LORA=True, HAS_BIAS=bias, DROPOUT=dropout, COL_SCALE=col_scale,
                               EPI_PREC="tf32",
                               BLOCK_R=block_r, GROUP_M=8, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, EPI_SPLIT=e),
            "num_warps": w, "num_stages": s, "signature": sig,
            "aligned": ["p_ptr", "q_ptr", "t_ptr", "e_ptr", "bias_ptr", "c_ptr", "g_ptr", "f_ptr", "N", "K", "stride_pm",
                        "stride_q", "stride_cm"]}


register(KernelSpec(   # sm_90 only: TMA and wgmma (on sm_80 / sm_89 the descriptors would compile to plain loads)
    family="lora", name="lora_gemm_tma_kernel", fn=lora_gemm_tma_kernel.fn, signature=_SIG, gemm=True, targets=(90,),
    requires={90: "HGMMA"},
    configs=[_cfg(*c) for c in _HOPPER_CONFIGS]
    + [_cfg(*c, q_t=True, dropout=True, bias=False) for c in _HOPPER_CONFIGS[:2]]
    + [_cfg(*_HOPPER_CONFIGS[2], q_t=True, bias=False), _cfg(*_HOPPER_CONFIGS[2], dt="fp16"),
       _cfg(*_HOPPER_CONFIGS[0], q_t=True, dropout=True, bias=False, block_r=32)]
    + [_cfg(*c, col_scale=True) for c in _HOPPER_CONFIGS[:3]]))
