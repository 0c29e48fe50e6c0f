"""FP8 family benchmark (python -m fusedtune bench fp8).

1. The block-scaled FP8 GEMM (fusedtune.ops.fp8.fp8_gemm, x 1x128 / W 128x128 scales, bf16 out) at
   M = N = K in {4096, 8192, 16384} (--quick: 8192), against torch's bf16 matmul and
   torch._scaled_mm with rowwise scales (where this torch and GPU run it), same run. TFLOP/s and % of
   the H100's 1979 dense FP8 TFLOP/s. Goal on an H100: >= 1000 TFLOP/s at 8192^3.
   On sm_90 also against cuBLAS's block-scaled FP8 GEMM on the same operands (torch._scaled_mm with
   1x128 / 128x128 scales, what FP8Linear takes there: ops/fp8_cublas.py). On a GPU also dX = dy . W's B layout: W read transposed inside the GEMM (FP8Linear's backward now)
   against a K-major copy of W made beforehand.
2. The quantizers, 1x128 with its column-wise copy (x, dy) and 128x128 with its transposed copy (W):
   bandwidth over the bytes they must move (read bf16, write two FP8 copies and their scales) against a
   bf16 copy of the same tensor, per backend (GPU: the extension's CUDA kernel and Triton's).
3. FP8Linear forward+backward (dX, dW) at 8192 x 8192 x 8192 against bf16 nn.Linear, and against
   torchao's Float8Linear (rowwise) when torchao is installed; on a GPU also with every GEMM on the
   Triton kernel (FUSEDTUNE_FP8_GEMM=triton). Goal on an H100: >= 1.4x bf16.

4. On sm_90, last and apart (a kernel that faults leaves the process's CUDA context unusable), the opt-in Hopper
   GEMM (triton_kernels/fp8_tma.py: TMA loads on a persistent grid; FUSEDTUNE_FP8_TMA=1): fp8_gemm on it against
   fp8_gemm_kernel, torch's bf16 matmul and cuBLAS's block-scaled GEMM, and FP8Linear with its three GEMMs on it
   (cuBLAS off). Left out, with a row saying so, where FUSEDTUNE_BENCH_SKIP names "fp8-tma".

Before timing, each pair that is meant to compute the same result runs once and the row's note says how far
apart they are (core.agreement / core.sqnr_agreement; "RESULTS DIFFER" where they do): against bf16 math (torch's
matmul, nn.Linear: y, dX, dW) by SQNR, FP8 rounding giving ~28.7 dB (flagged below 20 dB); against torch's
rowwise FP8 and torchao's Float8Linear the same way (FP8 rounding on both sides); against cuBLAS's GEMM on the
same operands and scales and the two dX layouts by max relative error. The quantizers against a clone (the same
bytes moved, not the same result) are not checked; nor is fp8_gemm on the TMA kernel (its GPU tests check it, and
an extra call would change the launch count tests/test_fp8_tma_interp.py pins).

--cpu: tiny shapes with the float32 emulation; the rows check the framework, not performance.
"""
from __future__ import annotations

import copy
import os

import torch

from .core import agreement, hbm_share, linear_host_rows, opt_in_skipped, roofline_pct, row, sqnr_agreement

SIZES, QUICK_SIZES, TINY_SIZES = (4096, 8192, 16384), (8192,), (256,)
GOAL_TFLOPS = 1000.0
GOAL_LINEAR = 1.4
CPU_NOTE = "CPU framework check, not performance"
# fp8_gemm on the TMA kernel runs no extra call for a check (tests/test_fp8_tma_interp.py counts its launches)
TMA_UNCHECKED = ("; result not checked here: its GPU tests (tests/test_fp8_tma_gpu.py, which gate this section) "
                 "compare it with fp8_gemm_kernel")


def _tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def _scaled_mm_rowwise(a16, b16):
    """torch._scaled_mm with rowwise scales (fp8 copies and scales made outside the timed call)."""
    sa = a16.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 448
    sb = b16.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 448
    aq = (a16.float() / sa).to(torch.float8_e4m3fn)
    bq = (b16.float() / sb).to(torch.float8_e4m3fn)
    return lambda: torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)


def _gemm_case(n: int, device, dt) -> tuple:
    """(a, b, aq, as_, bq, bs): random [n, n] a and b in dt, a's 1x128 and b's 128x128 quantization."""
    from ..ops.fp8 import fp8_quantize_1x128, fp8_quantize_128x128
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dt)
    b = torch.randn(n, n, device=device, generator=g).to(dt)
    aq, as_, _, _ = fp8_quantize_1x128(a, transpose=False)
    return (a, b, aq, as_) + tuple(fp8_quantize_128x128(b))


def gemm_rows(timer, sizes, on_gpu, device):
    from ..ops.fp8 import fp8_gemm
    rows = []
    dt = torch.bfloat16 if on_gpu else torch.float32
    for n in sizes:
        a, b, aq, as_, bq, bs = _gemm_case(n, device, dt)
        flops = 2 * n ** 3
        out = fp8_gemm(aq, as_, bq, bs, 128, dt)      # ours once, checked against each baseline before timing
        vs_bf16 = sqnr_agreement(out, a @ b.t())
        ours = timer(lambda: fp8_gemm(aq, as_, bq, bs, 128, dt))
        bf16 = timer(lambda: a @ b.t())
        tf = _tflops(flops, ours[0])
        note = CPU_NOTE if not on_gpu else (f"{tf:.0f} TFLOP/s; goal >= {GOAL_TFLOPS:.0f} at 8192^3: "
                                            f"{'met' if tf >= GOAL_TFLOPS else 'NOT met'}" if n == 8192 else
                                            f"{tf:.0f} TFLOP/s")
        shape = f"M=N=K={n}"
        rows.append(row("fp8_gemm (1x128 x 128x128, promoted)", shape, "e4m3->bf16", "triton" if on_gpu else "cpu",
                        "torch bf16 matmul", ours, bf16[0], roofline_pct(ours[0], flops=flops, precision="fp8"),
                        note=f"{note}; {vs_bf16}"))
        if on_gpu:
            try:
                sm_fn = _scaled_mm_rowwise(a, b)
                vs_sm = sqnr_agreement(out, sm_fn(), why="FP8 rounding on both sides")
                sm = timer(sm_fn)
                rows.append(row("fp8_gemm (1x128 x 128x128, promoted)", shape, "e4m3->bf16", "triton",
                                "torch._scaled_mm rowwise", ours, sm[0],
                                roofline_pct(ours[0], flops=flops, precision="fp8"), note=f"{note}; {vs_sm}"))
            except Exception as e:  # noqa: BLE001 - report, do not hide the other rows
                rows.append(row("fp8_gemm (1x128 x 128x128, promoted)", shape, "e4m3->bf16", "triton",
                                "torch._scaled_mm rowwise", ours, None, None,
                                note=f"_scaled_mm not runnable here ({type(e).__name__}: {e})"))
        if on_gpu:
            rows.append(cublas_block_row(timer, ours, aq, as_, bq, bs, shape, flops, note, out))
            rows.append(dgrad_layout_row(timer, aq, as_, bq, bs, dt, shape, flops))
        del out
        rows += quant_rows(timer, a, shape, on_gpu)
    return rows


def quant_rows(timer, a, shape, on_gpu):
    """The quantizers against a clone of the same tensor, per backend (GPU: the extension's CUDA kernel, what
    auto takes, and Triton's): the 1x128 quantizer with its column-wise copy (FP8Linear's x and dy) and the
    128x128 one with its transposed copy (its weight). Bytes moved: read x, write two E4M3 copies (1 B an
    element each) and the scales."""
    from .. import backend as B
    from ..ops.fp8 import _QHAS, _cuda_refuses, fp8_quantize_1x128, fp8_quantize_128x128
    cp = timer(lambda: a.clone())
    names = [b for b in (("cuda", "triton") if on_gpu else ("cpu",))
             if B.can_serve(b, a.device, frozenset(_QHAS))[0] and not (b == "cuda" and _cuda_refuses(a))]
    rows = []
    for kind, fn, scales in (("fp8_quantize_1x128 (+ transposed copy)", lambda b: fp8_quantize_1x128(a, backend=b),
                              2 * a.numel() // 128),
                             ("fp8_quantize_128x128 (+ transposed copy)",
                              lambda b: fp8_quantize_128x128(a, backend=b, transpose=True), a.numel() // 128 ** 2)):
        moved = a.numel() * (a.element_size() + 2) + scales * 4
        for b in names:
            qt = timer(lambda: fn(b))
            rows.append(row(kind, shape, str(a.dtype)[6:], b, "bf16 clone (same tensor)", qt, cp[0],
                            roofline_pct(qt[0], moved), note=CPU_NOTE if not on_gpu else
                            hbm_share(qt[0], moved)))
    return rows


def cublas_block_row(timer, ours, aq, as_, bq, bs, shape, flops, note, out):
    """Our Triton GEMM against cuBLAS's block-scaled FP8 GEMM on the same operands and scales (what FP8Linear
    takes on sm_90 where it passes its check: fusedtune/ops/fp8_cublas.py); out: our GEMM's result, checked
    against cuBLAS's."""
    from ..ops import fp8_cublas
    why = fp8_cublas.status(aq.device, 128, torch.bfloat16)
    if why is not None:
        return row("fp8_gemm (1x128 x 128x128, promoted)", shape, "e4m3->bf16", "triton",
                   "cuBLAS block-scaled (torch._scaled_mm 1x128 x 128x128)", ours, None, None,
                   note=f"cuBLAS block scaling not usable here: {why}")
    check = agreement(out, fp8_cublas.gemm(aq, as_, bq, bs, 128, torch.bfloat16))
    cb = timer(lambda: fp8_cublas.gemm(aq, as_, bq, bs, 128, torch.bfloat16))
    return row("fp8_gemm (1x128 x 128x128, promoted)", shape, "e4m3->bf16", "triton",
               "cuBLAS block-scaled (torch._scaled_mm 1x128 x 128x128)", ours, cb[0],
               roofline_pct(ours[0], flops=flops, precision="fp8"),
               note=f"{note}; cuBLAS {_tflops(flops, cb[0]):.0f} TFLOP/s; {check}")


def dgrad_layout_row(timer, dq, ds, wq, ws, dt, shape, flops):
    """dX = dy . W (FP8Linear's backward) two ways: over a K-major copy of W (what FP8Linear does: its
    weight quantizer writes the copy in the same pass), against W as stored, read transposed inside the
    GEMM (FP8 wgmma wants K-major operands, so Triton re-lays B out on chip); a separate torch transpose
    of the FP8 W is timed too (what the copy cost before the quantizer wrote it)."""
    from ..ops.fp8 import fp8_gemm
    ws_t = ws.t().contiguous()
    wq_t = wq.t().contiguous()
    check = agreement(fp8_gemm(dq, ds, wq_t, ws_t, 128, dt), fp8_gemm(dq, ds, wq, ws_t, 128, dt, b_transposed=True))
    in_kernel = timer(lambda: fp8_gemm(dq, ds, wq, ws_t, 128, dt, b_transposed=True))
    copied = timer(lambda: fp8_gemm(dq, ds, wq_t, ws_t, 128, dt))
    transpose = timer(lambda: wq.t().contiguous())
    return row("fp8_gemm dX layout: K-major copy of W", shape, "e4m3->bf16", "triton",
               "W read transposed in the GEMM", copied, in_kernel[0],
               roofline_pct(copied[0], flops=flops, precision="fp8"),
               note=f"{_tflops(flops, copied[0]):.0f} vs {_tflops(flops, in_kernel[0]):.0f} TFLOP/s; a separate "
                    f"torch transpose of the FP8 W {transpose[0]:.3f} ms (the quantizer now writes the copy); {check}")


def _linear_case(n: int, device, dt):
    """(nn.Linear, FP8Linear over a copy of its weight) n x n without bias, x, fb(layer): a forward+backward
    (dX, dW) of it on one [n, n] input and dy, and outs(layer): (y, dX, dW) of one such call (the checks)."""
    from ..nn import FP8Linear
    lin = torch.nn.Linear(n, n, bias=False, device=device, dtype=dt)
    f8 = FP8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(n, n, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(n, n, device=device, dtype=dt)

    def fb(layer):
        return lambda: torch.autograd.grad(layer(x), [x, layer.weight], dy)

    def outs(layer):
        y = layer(x)
        return (y.detach(),) + torch.autograd.grad(y, [x, layer.weight], dy)
    return lin, f8, x, fb, outs


def linear_rows(timer, n, on_gpu, device):
    dt = torch.bfloat16 if on_gpu else torch.float32
    lin, f8, x, fb, outs = _linear_case(n, device, dt)
    mine, theirs = outs(f8), outs(lin)      # (y, dX, dW) once each, before timing
    check = sqnr_agreement(mine, theirs)
    ours = timer(fb(f8))
    base = timer(fb(lin))
    flops = 6 * n ** 3
    ratio = base[0] / ours[0]
    note = CPU_NOTE if not on_gpu else f"goal >= {GOAL_LINEAR}x bf16: {'met' if ratio >= GOAL_LINEAR else 'NOT met'}"
    shape = f"{n}x{n}x{n}"
    rows = [row("FP8Linear fwd+bwd", shape, "e4m3", "triton" if on_gpu else "cpu", "bf16 nn.Linear", ours,
                base[0], roofline_pct(ours[0], flops=flops, precision="fp8"),
                note=note + ("" if not on_gpu else f"; {f8._fusedtune_report()['path']}") + f"; {check}")]
    if on_gpu:   # the same with every GEMM on the Triton kernel (FUSEDTUNE_FP8_GEMM=triton)
        with _Engine("triton"):
            check = sqnr_agreement(outs(f8), theirs)
            tri = timer(fb(f8))
        rows.append(row("FP8Linear fwd+bwd (Triton GEMMs)", shape, "e4m3", "triton", "bf16 nn.Linear", tri, base[0],
                        roofline_pct(tri[0], flops=flops, precision="fp8"),
                        note=f"FUSEDTUNE_FP8_GEMM=triton; {base[0] / tri[0]:.2f}x bf16; {check}"))
    if on_gpu:   # the same with Triton's quantizers (auto takes the extension's CUDA kernel where it serves)
        from ..ops.fp8 import _resolve_quant
        q = _resolve_quant(x.detach(), None)
        tq = FP8Linear.from_linear(copy.deepcopy(lin), backend="triton")
        check = sqnr_agreement(outs(tq), theirs)
        trq = timer(fb(tq))
        rows.append(row("FP8Linear fwd+bwd (Triton quantizers)", shape, "e4m3", "triton", "bf16 nn.Linear", trq,
                        base[0], roofline_pct(trq[0], flops=flops, precision="fp8"),
                        note=f"backend='triton': {base[0] / trq[0]:.2f}x bf16; the default row's quantizers: {q} "
                             f"({trq[0] / ours[0]:.2f}x its time); {check}"))
    if on_gpu:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            m = torch.nn.Sequential(copy.deepcopy(lin))
            convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name("rowwise"))
            check = sqnr_agreement(mine, outs(m[0]), why="FP8 rounding on both sides")
            ao = timer(fb(m[0]))
            rows.append(row("FP8Linear fwd+bwd", shape, "e4m3", "triton", "torchao Float8Linear (rowwise, eager)",
                            ours, ao[0], roofline_pct(ours[0], flops=flops, precision="fp8"), note=check))
        except Exception as e:  # noqa: BLE001
            rows.append(row("FP8Linear fwd+bwd", shape, "e4m3", "triton", "torchao Float8Linear (rowwise, eager)",
                            ours, None, None, note=f"torchao not usable here ({type(e).__name__}: {e})"))
    return rows


class _Engine:
    """A scope: FP8Linear's GEMMs on FUSEDTUNE_FP8_GEMM=`engine` (None: as set), and the Hopper TMA kernel on
    or off (None: as set)."""

    def __init__(self, engine: str | None, tma: bool | None = None):
        self.engine, self.tma = engine, tma

    def __enter__(self):
        from ..ops import fp8_cublas
        from ..triton_kernels import fp8_tma
        self.keep = os.environ.get(fp8_cublas.ENGINE_ENV), fp8_tma.ENABLED
        if self.engine is not None:
            os.environ[fp8_cublas.ENGINE_ENV] = self.engine
        if self.tma is not None:
            fp8_tma.ENABLED = self.tma

    def __exit__(self, *exc):
        from ..ops import fp8_cublas
        from ..triton_kernels import fp8_tma
        env, fp8_tma.ENABLED = self.keep
        if env is None:
            os.environ.pop(fp8_cublas.ENGINE_ENV, None)
        else:
            os.environ[fp8_cublas.ENGINE_ENV] = env


def tma_rows(timer, sizes, device):
    """The opt-in Hopper GEMM (triton_kernels/fp8_tma.py, FUSEDTUNE_FP8_TMA=1) in sections of its own, after the
    others (a kernel that faults leaves the process's CUDA context unusable): fp8_gemm on it against torch's bf16
    matmul, cuBLAS's block-scaled GEMM and fp8_gemm_kernel on the same operands, and FP8Linear with every GEMM
    on it (cuBLAS off) against bf16 nn.Linear. A timing that did not reach the kernel is reported as such."""
    from ..ops import fp8_cublas
    from ..ops.fp8 import fp8_gemm
    from ..triton_kernels import fp8_tma
    kernel = "fp8_gemm (1x128 x 128x128, promoted, fused-tma)"
    why = opt_in_skipped("fp8-tma") or ("" if fp8_tma.available(device) else "needs an sm_90 GPU")
    if why:
        return [row(kernel, "-", "e4m3->bf16", "triton", "-", (float("nan"),) * 3, None, note="skipped: " + why)]
    rows, dt = [], torch.bfloat16
    for n in sizes:
        a, b, aq, as_, bq, bs = _gemm_case(n, device, dt)
        flops, shape = 2 * n ** 3, f"M=N=K={n}"
        before = fp8_tma.launches
        with _Engine(None, True):
            ours = timer(lambda: fp8_gemm(aq, as_, bq, bs, 128, dt))
        if fp8_tma.launches == before:
            rows.append(row(kernel, shape, "e4m3->bf16", "triton", "-", (float("nan"),) * 3, None,
                            note="the timed calls did not take fp8_gemm_tma_kernel (usable() refused them)"))
            continue
        with _Engine(None, False):
            classic = timer(lambda: fp8_gemm(aq, as_, bq, bs, 128, dt))
        tf = _tflops(flops, ours[0])
        note = f"{tf:.0f} TFLOP/s" + (f"; goal >= {GOAL_TFLOPS:.0f} at 8192^3: {'met' if tf >= GOAL_TFLOPS else 'NOT met'}"
                                      if n == 8192 else "") + TMA_UNCHECKED
        pct = roofline_pct(ours[0], flops=flops, precision="fp8")
        rows.append(row(kernel, shape, "e4m3->bf16", "triton", "fp8_gemm_kernel (pointer loads)", ours, classic[0],
                        pct, note=f"{note}; fp8_gemm_kernel {_tflops(flops, classic[0]):.0f} TFLOP/s"))
        rows.append(row(kernel, shape, "e4m3->bf16", "triton", "torch bf16 matmul", ours, timer(lambda: a @ b.t())[0],
                        pct, note=note))
        if fp8_cublas.status(aq.device, 128, dt) is None:
            cb = timer(lambda: fp8_cublas.gemm(aq, as_, bq, bs, 128, dt))
            rows.append(row(kernel, shape, "e4m3->bf16", "triton", "cuBLAS block-scaled (torch._scaled_mm 1x128 x "
                            "128x128)", ours, cb[0], pct, note=f"{note}; cuBLAS {_tflops(flops, cb[0]):.0f} TFLOP/s"))
    return rows


def tma_linear_rows(timer, n, device):
    """FP8Linear forward+backward with its three GEMMs on the Hopper TMA kernel (cuBLAS off)."""
    from ..triton_kernels import fp8_tma
    kernel = "FP8Linear fwd+bwd (Triton TMA GEMMs)"
    why = opt_in_skipped("fp8-tma") or ("" if fp8_tma.available(device) else "needs an sm_90 GPU")
    if why:
        return [row(kernel, "-", "e4m3", "triton", "-", (float("nan"),) * 3, None, note="skipped: " + why)]
    lin, f8, _, fb, outs = _linear_case(n, device, torch.bfloat16)
    theirs = outs(lin)                       # (y, dX, dW) once each, before timing
    with _Engine("triton", True):
        before = fp8_tma.launches
        check = sqnr_agreement(outs(f8), theirs)
        took = fp8_tma.launches - before     # of the call's three GEMMs (forward, dX, dW)
        ours = timer(fb(f8))
    del theirs
    base = timer(fb(lin))
    return [row(kernel, f"{n}x{n}x{n}", "e4m3", "triton", "bf16 nn.Linear", ours, base[0],
                roofline_pct(ours[0], flops=6 * n ** 3, precision="fp8"),
                note=f"FUSEDTUNE_FP8_GEMM=triton, FUSEDTUNE_FP8_TMA=1: {base[0] / ours[0]:.2f}x bf16"
                     + ("" if took == 3 else f"; only {took} of a call's 3 GEMMs took fp8_gemm_tma_kernel")
                     + f"; {check}")]


def sections(timer, quick: bool) -> list:
    on_gpu = timer.name != "cpu"
    device = "cuda" if on_gpu else "cpu"
    if on_gpu and torch.cuda.get_device_capability() < (8, 9):
        return [("skipped", lambda: [row("fp8_gemm", "-", "e4m3", "-", "-", (float("nan"),) * 3, None,
                                         note="skipped: FP8 tensor cores need sm_89 or newer")])]
    sizes = TINY_SIZES if not on_gpu else (QUICK_SIZES if quick else SIZES)
    out = [("GEMMs and quantizers", lambda: gemm_rows(timer, sizes, on_gpu, device)),
           ("FP8Linear", lambda: linear_rows(timer, 8192 if on_gpu else 256, on_gpu, device)),
           ("host time per call", lambda: _host(on_gpu, quick))]
    if on_gpu:   # the opt-in Hopper kernel last, apart (module docstring of triton_kernels/fp8_tma.py)
        out += [("fp8_gemm on the Hopper TMA kernel (opt-in)", lambda: tma_rows(timer, sizes, device)),
                ("FP8Linear on the Hopper TMA kernel (opt-in)", lambda: tma_linear_rows(timer, 8192, device))]
    return out


def _host(on_gpu, quick):
    from ..nn import FP8Linear  # noqa: PLC0415
    return linear_host_rows("FP8Linear", FP8Linear.from_linear, on_gpu, quick)
