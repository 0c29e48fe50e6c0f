"""FP8 family, Triton: the block-scaled FP8 GEMM for Hopper (sm_90) with TMA loads on a persistent grid.

fp8_gemm_tma_kernel   C[M, N] = sum over 128-wide K blocks of (A_kb . B_kb^T) * a_scale * b_scale, as
                      fp8_gemm_kernel (fp8.py), for B stored K-major ([N, K]: the forward's W, the dX GEMM's
                      K-major copy of W, the wgrad's column-wise copies).

Why a second kernel: on an H200 (bench/results/fp8.csv, 2026-11-30) fp8_gemm_kernel, whose tiles come in by
pointer loads, ran the 8192^3 GEMM at 709 TFLOP/s; the goal is 1000, and cuBLAS's block-scaled GEMM ran 1180
(FP8Linear takes cuBLAS where it can; the public fp8_gemm op and the shapes cuBLAS refuses take Triton). Here:
  - A and B tiles come in by TMA (tensor descriptors made on the device): no address arithmetic, wrap or masks
    in the K loop (the copy engine fills rows and columns past the edges, K's tail among them, with zeros,
    which add nothing), pipelined into num_stages shared-memory buffers, the products on wgmma (QGMMA);
  - one or two programs an SM walk the output tiles in grouped order (a wave's tiles share their A rows and B
    columns in L2); the output goes out by TMA, whose store drains while the next tile begins (the software
    pipeline is the K loop's: a tile's first loads are not fetched during the previous tile's epilogue).
The promotion is fp8_gemm_kernel's, operation for operation: each block's product in a fresh float32
accumulator, then acc += part * a_scale[m] * b_scale[n]. (A fresh accumulator holds as many registers as the
running one: 128 x 256 tiles would spill, so the tiles here are 128 x 128 over two warpgroups or 64-row.)
Off by default until a GPU run times it (bench fp8's "fp8_gemm (fused-tma)" rows): FUSEDTUNE_FP8_TMA=1 (read
at import) or ENABLED = True turns it on for sm_90. TMA needs 16-byte-aligned base addresses and row strides
(K a multiple of 16; N of 8 for a 16-bit output, of 4 for float32); gemm() in fp8.py checks and takes
fp8_gemm_kernel otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedtune._env import env_flag, interpreting

from .common import autotune, cdiv
from .launch import fast
from .lora import _sm_count
from .lora_tma import _aligned, _ensure_allocator, _row_stride, available
from .registry import KernelSpec, register

_INTERP = interpreting()
ENV = "FUSEDTUNE_FP8_TMA"
ENABLED = env_flag(ENV, False)
launches = 0      # calls that took this kernel (the bench checks that its timings did)
TILE = 128        # the K block of the scales: the promotion's granularity
MIN_ROWS = 64     # fewer rows stay on fp8_gemm_kernel (every config here has BLOCK_M >= 64)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, CTAS, FLATTEN): shared memory is stages x (BM + BN) x 128 bytes of
# operand buffers plus the output tile the TMA store reads (BM x BN x 2 or 4 bytes); 128 x 128 at 4 stages is 128
# KB + 32 KB. CTAS programs an SM: the 128 x 128 tiles over 8 warps take 246-255 registers a thread (one program
# an SM); the 4-warp tiles fit two an SM in registers and shared memory, so one program's wgmma can run while the
# other promotes its block. FLATTEN: the tile loop and the K loop pipelined as one (tl.range flatten), so a tile's
# first loads are in flight during the previous tile's epilogue; 189 registers at 64 x 128 (no spills), while
# 128 x 128 over 8 warps spilled 520 bytes with it (python -m fusedtune kernels)
_HOPPER_CONFIGS = [(128, 128, 8, 4, 1, False), (128, 128, 8, 3, 1, False), (64, 256, 8, 3, 1, False),
                   (64, 128, 4, 3, 2, False), (128, 64, 4, 3, 2, False), (64, 128, 4, 3, 2, True),
                   (128, 64, 4, 3, 2, True)]
_CONFIGS = [(32, 32, 4, 1, 1, False)] if _INTERP else _HOPPER_CONFIGS


@autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "CTAS": c, "FLATTEN": f}, num_warps=w, num_stages=s)
                   for m, n, w, s, c, f in _CONFIGS], key=["M", "N", "K", "B_ROWS"])
@triton.jit
def fp8_gemm_tma_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB, stride_am, stride_bn, stride_cm,
                        B_ROWS: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CTAS: tl.constexpr, FLATTEN: tl.constexpr):
    """CTAS: the programs an SM the launch makes (the grid's business; the tiles are walked num_programs apart).
    FLATTEN: one software pipeline over the tile and K loops (_HOPPER_CONFIGS)."""
    a_d = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_d = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_d = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        m0 = (first_m + (tile % group) % size_m) * BLOCK_M
        n0 = ((tile % group) // size_m) * BLOCK_N
        # the scales of rows past the edge: the last row's (their products are zeros; the store clips them)
        as_ptrs = as_ptr + tl.minimum(m0 + tl.arange(0, BLOCK_M), M - 1) * KB
        bs_ptrs = bs_ptr + (tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1) // B_ROWS) * KB
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            a = a_d.load([m0, kb * BLOCK_K])
            b = b_d.load([n0, kb * BLOCK_K])
            part = tl.dot(a, b.T)
            acc += part * tl.load(as_ptrs + kb)[:, None] * tl.load(bs_ptrs + kb)[None, :]
        c_d.store([m0, n0], acc.to(c_ptr.dtype.element_ty))


def usable(a_q: torch.Tensor, b_q: torch.Tensor, c: torch.Tensor, b_transposed: bool) -> bool:
    """Whether fp8.gemm() may take this kernel: ENABLED, B stored K-major, at least MIN_ROWS rows, a Hopper GPU
    (or the interpreter: lora_tma.available), unit column strides and TMA's alignment (lora_tma._aligned)."""
    if not ENABLED or b_transposed or a_q.shape[0] < MIN_ROWS or not available(a_q.device):
        return False
    if a_q.shape[1] == 0 or any(t.shape[1] > 1 and t.stride(1) != 1 for t in (a_q, b_q, c)):
        return False    # (K = 0: a descriptor's dimensions must be at least 1)
    if any(_row_stride(t) < t.shape[1] for t in (a_q, b_q, c)):
        return False    # rows that overlap (a stride-0 broadcast): not a layout a descriptor describes
    return all(_aligned(t, _row_stride(t)) for t in (a_q, b_q, c))


def gemm(a_q, a_s, b_q, b_s, c, b_rows: int) -> torch.Tensor:
    """C = A . B^T with block promotion into c [M, N] (usable() said yes); returns c. a_s [M, K/128] and b_s
    [N or N/128, K/128] float32, contiguous."""
    M, K = a_q.shape
    N = b_q.shape[0]
    if M == 0 or N == 0:
        return c
    global launches
    launches += 1
    _ensure_allocator()
    sms = 4 if _INTERP else _sm_count(a_q.device.index)      # CTAS programs an SM (4 in the interpreter)
    grid = lambda meta: (min(sms * meta["CTAS"], cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    fast(fp8_gemm_tma_kernel)[grid](a_q, a_s, b_q, b_s, c, M, N, K, cdiv(K, TILE), _row_stride(a_q), _row_stride(b_q),
                                    _row_stride(c), B_ROWS=b_rows, GROUP_M=8, BLOCK_K=TILE)
    return c


_SIG = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16",
        "M": "i32", "N": "i32", "K": "i32", "KB": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32"}


def _cfg(m, n, w, s, c, f, b_rows=128, out="bf16"):
    return {"constexprs": dict(B_ROWS=b_rows, GROUP_M=8, BLOCK_K=TILE, BLOCK_M=m, BLOCK_N=n, CTAS=c, FLATTEN=f),
            "num_warps": w,
            "num_stages": s, "signature": {} if out == "bf16" else {"c_ptr": f"*{out}"},
            "aligned": ["a_ptr", "as_ptr", "b_ptr", "bs_ptr", "c_ptr", "N", "K", "stride_am", "stride_bn", "stride_cm"]}


register(KernelSpec(   # sm_90 only: TMA and wgmma (on sm_89 the descriptors would compile to plain loads)
    family="fp8", name="fp8_gemm_tma_kernel", fn=fp8_gemm_tma_kernel.fn, signature=_SIG, gemm=True, targets=(90,),
    requires={90: "QGMMA"},
    configs=[_cfg(*c) for c in _HOPPER_CONFIGS] + [_cfg(*_HOPPER_CONFIGS[0], b_rows=1),
                                                   _cfg(*_HOPPER_CONFIGS[0], out="fp32")]))
