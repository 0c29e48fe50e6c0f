"""FP8Linear's GEMMs through cuBLAS's block-scaled FP8 GEMM, where it runs (docs/fp8.md).

cuBLAS 12.9+ (cuBLASLt) has the DeepSeek-V3 recipe on sm_90: 1x128 scales on one or both operands,
128x128 on the other, each 128-wide K block's partial sum promoted into fp32 with both scales -- the
math of fusedtune's Triton fp8_gemm. torch reaches it through torch._scaled_mm when both scale tensors are
float32 and shaped as blocks. On an H200 torch._scaled_mm with rowwise scales ran at 1408 TFLOP/s where the
Triton block-scaled GEMM reached 694 (bench/results/fp8.csv, 2026-11-30), so FP8Linear takes cuBLAS for a
GEMM when:

- the engine allows it: FUSEDTUNE_FP8_GEMM = auto (default; cuBLAS where usable, else Triton), triton
  (never), or cublas (cuBLAS for every GEMM whose shape it takes; an error where it cannot run at all);
- the device is sm_90 and torch's CUDA is 12.9 or newer;
- the shape is one it takes: K a multiple of 512 for a 128x128 operand (its scales' K-block count a
  multiple of 4: cuBLAS pads that dimension, and an unpadded stride is only certain then) and of 128
  for 1x128 x 1x128, N and K multiples of 16 (torch._scaled_mm), M a multiple of 4 (on an H200 with
  CUDA 13.0, M = 1, 2, 3, 5, 15, 17, 33, 129 raised CUBLAS_STATUS_NOT_SUPPORTED and 4, 8, 12, 16, 24, 48,
  100 ran: bench/results/h200_2026-11-30.md), output bfloat16 or float32;
- a one-time check on the device passed: a 256 x 256 x 512 product with random FP8 values and random
  per-block scales, through cuBLAS and through the float32 emulation (fusedtune.reference.fp8.gemm),
  agrees to 1% (relative Frobenius; bf16 output rounding is 0.2%, a scale laid out wrongly gives ~50%).
  If it fails or raises, the engine is off on that device for the process, with the reason, which
  fusedtune.report states and a warning says once.

Scale layouts torch._scaled_mm wants (from torch's tests): a 1x128 scale [rows, K/128] with stride
(1, rows) ("outer-dim-major"); B's scale passed as [K/128, N] (1x128, row-major) or [K/128, N/128]
with stride (1, K/128) (128x128, the [N/128, K/128] blocks transposed).
"""
from __future__ import annotations

import os
import warnings

import torch

from ..reference import fp8 as ref

ENGINE_ENV = "FUSEDTUNE_FP8_GEMM"
ENGINES = ("auto", "triton", "cublas")
_OUT = (torch.bfloat16, torch.float32)
_checked: dict = {}      # (device index, b_rows, out dtype) -> None (usable) or why not
_warned: set = set()


def engine() -> str:
    e = os.environ.get(ENGINE_ENV, "auto") or "auto"
    if e not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={e!r}: expected one of {', '.join(ENGINES)}")
    return e


def device_gap(device) -> str | None:
    """Why cuBLAS's block-scaled FP8 GEMM cannot run on `device` at all (None: it may; the one-time check
    decides)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "not a CUDA device"
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap != (9, 0):
        return f"cuBLAS block-scaled FP8 needs sm_90 (this GPU is sm_{cap[0]}{cap[1]})"
    ver = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if ver < (12, 9):
        return f"cuBLAS block-scaled FP8 needs CUDA 12.9+ (torch is built with {torch.version.cuda})"
    return None


def shape_gap(M: int, N: int, K: int, b_rows: int, out_dtype) -> str | None:
    """Why this GEMM's shape or output dtype is not one cuBLAS takes (None: it is)."""
    if out_dtype not in _OUT:
        return f"output {out_dtype} (cuBLAS block scaling: bfloat16 or float32)"
    if K % (4 * ref.TILE if b_rows == ref.TILE else ref.TILE):
        return f"K = {K} not a multiple of {4 * ref.TILE if b_rows == ref.TILE else ref.TILE}"
    if N % 16 or M == 0:
        return f"N = {N} not a multiple of 16" if N % 16 else "no rows"
    if M % 4:   # seen on an H200 (cuBLAS 13.0): other row counts give CUBLAS_STATUS_NOT_SUPPORTED
        return f"M = {M} rows not a multiple of 4"
    return None


def _call(a_q, a_s, b_q, b_s, b_rows: int, out_dtype) -> torch.Tensor:
    """C = A . B^T (a_q [M, K], b_q [N, K], both K-major; a_s [M, K/128]; b_s [N or N/128, K/128])."""
    sa = a_s.t().contiguous().t()                                    # [M, KB], stride (1, M)
    sb = b_s.t().contiguous() if b_rows == 1 else b_s.contiguous().t()   # [KB, N] / [KB, NB] stride (1, KB)
    return torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)


def _check(device, b_rows: int, out_dtype) -> str | None:
    """The one-time agreement check on `device` (module docstring)."""
    g = torch.Generator(device=device).manual_seed(1234)
    M, N, K = 256, 256, 512

    def fp8(r, c):
        v = torch.randn(r, c, device=device, generator=g) * 100
        return v.clamp(-448, 448).to(torch.float8_e4m3fn)

    def scales(r, c):
        return torch.rand(r, c, device=device, generator=g) * 3.75 + 0.25
    a_q, b_q = fp8(M, K), fp8(N, K)
    a_s = scales(M, K // ref.TILE)
    b_s = scales(N if b_rows == 1 else N // ref.TILE, K // ref.TILE)
    try:
        got = _call(a_q, a_s, b_q, b_s, b_rows, out_dtype).float()
    except Exception as e:  # noqa: BLE001 - the reason is kept and reported
        return f"torch._scaled_mm with block scales raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    want = ref.gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32)
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if not err <= 1e-2:
        return f"cuBLAS block-scaled result disagreed with the float32 emulation (relative error {err:.3g})"
    return None


def usable(device, M: int, N: int, K: int, b_rows: int, out_dtype) -> bool:
    """Whether this GEMM goes through cuBLAS (module docstring). Raises under FUSEDTUNE_FP8_GEMM=cublas when
    the device cannot run it at all."""
    e = engine()
    if e == "triton":
        return False
    gap = device_gap(device)
    why = gap or status(device, b_rows, out_dtype)
    if why is not None:
        if e == "cublas":
            raise RuntimeError(f"{ENGINE_ENV}=cublas: {why}")
        if gap is None and why not in _warned and _key(device, b_rows, out_dtype) in _checked:
            # an sm_90 whose cuBLAS failed the check: say so once
            _warned.add(why)
            warnings.warn(f"fusedtune fp8: the Triton FP8 GEMM is used: {why}", stacklevel=3)
        return False
    return shape_gap(M, N, K, b_rows, out_dtype) is None


def _key(device, b_rows: int, out_dtype) -> tuple:
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device(), b_rows, out_dtype


def status(device, b_rows: int = ref.TILE, out_dtype=torch.bfloat16) -> str | None:
    """None when cuBLAS's block-scaled GEMM passed its check on `device` for this operand kind and output,
    else why not (runs the check once)."""
    why = device_gap(device)
    if why is not None:
        return why
    key = _key(device, b_rows, out_dtype)
    if key not in _checked:
        if torch.cuda.is_current_stream_capturing():   # the check syncs: not inside a CUDA graph capture
            return "not checked yet on this device (first use inside a CUDA graph capture)"
        _checked[key] = _check(torch.device(device), b_rows, out_dtype)
    return _checked[key]


def gemm(a_q, a_s, b_q, b_s, b_rows: int, out_dtype) -> torch.Tensor:
    """C [M, N] = A . B^T through cuBLAS; call only where usable() said so."""
    return _call(a_q, a_s, b_q, b_s, b_rows, out_dtype)
