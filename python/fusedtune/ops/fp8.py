"""FP8 family ops (docs/fp8.md; the math is python/fusedtune/reference/fp8.py).

    fp8_quantize_1x128(x, pow2=False, transpose=True) -> (q_row, s_row, q_col, s_col)
        1x128 row-wise E4M3 copy of x [M, K] and its column-wise copy [K, M], from one read
    fp8_quantize_128x128(w, pow2=False, transpose=False) -> (q, s) or (q, s, q_t)
        128x128 blocks (transposable with s); q_t: the bytes transposed [K, N], from the same pass
    fp8_gemm(a_q, a_s, b_q, b_s, b_block_rows=128, out_dtype=torch.bfloat16, b_transposed=False)
        C = A . B^T, each 128-wide K block's FP8 partial sum promoted into fp32 with both scales;
        b_transposed: b_q is stored [K, N] (e.g. W for dX = dy . W); b_s is always [N rows or blocks, K blocks]
    fp8_linear(x, weight, bias, w_q, w_s)                y = x W^T + b in FP8, with autograd: saves the
        FP8 column-wise copy of x and its scales (not a 16-bit x); dX = dy W and dW = dy^T x in FP8
"""
from __future__ import annotations

import math

import functools

import torch

from .. import _autocast, _ext
from .. import backend as _backend
from ..reference import fp8 as ref
from . import fp8_cublas
from ._eager import EagerOp
from ._linear import check_linear_shapes, check_one_device

_HAS = ("reference", "cpu", "triton")   # fp8_gemm, fp8_linear ("cpu": the reference emulation in torch)
# the quantizers: "cpu" and "cuda" are the extension's kernels (fp8_quant_kernel; csrc/cpu/fp8.cpp,
# csrc/cuda/fp8.cu), byte-identical to the reference and to Triton's
_QHAS = ("reference", "cpu", "cuda", "triton")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tk():
    from ..triton_kernels import fp8 as tk
    return tk


def _empty(dev):
    return torch.empty(0, dtype=torch.float8_e4m3fn, device=dev), torch.empty(0, dtype=torch.float32, device=dev)


def _q1_impl(x: torch.Tensor, pow2: bool, transpose: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor, torch.Tensor]:
    if backend in ("cpu", "cuda"):
        return tuple(torch.ops.fusedtune.fp8_quant_kernel(_aligned(x) if backend == "cuda" else x, False, transpose,
                                                          pow2))
    if backend == "triton":
        qr, sr, qc, sc = _tk().quantize_rows(x, transpose, pow2)
    else:
        qr, sr = ref.quantize_rows(x, pow2)
        qc, sc = ref.quantize_rows(x.t(), pow2) if transpose else (None, None)
    if qc is None:
        qc, sc = _empty(x.device)
    return qr, sr, qc, sc


_q1_op = torch.library.custom_op("fusedtune::fp8_quantize_1x128", mutates_args=())(_q1_impl)
_q1 = EagerOp(_q1_op, _q1_impl)


@_q1_op.register_fake
def _(x, pow2, transpose, backend):
    M, K = x.shape
    f8, f32 = torch.float8_e4m3fn, torch.float32
    qc = x.new_empty((K, M) if transpose else (0,), dtype=f8)
    sc = x.new_empty((K, -(-M // ref.TILE)) if transpose else (0,), dtype=f32)
    return x.new_empty((M, K), dtype=f8), x.new_empty((M, -(-K // ref.TILE)), dtype=f32), qc, sc


def _q128_impl(w: torch.Tensor, pow2: bool, transpose: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    if backend in ("cpu", "cuda"):
        q, s, qt, _ = torch.ops.fusedtune.fp8_quant_kernel(_aligned(w) if backend == "cuda" else w, True, transpose,
                                                           pow2)
        return q, s, qt
    if backend == "triton":
        q, s, qt = _tk().quantize_blocks(w, pow2, transpose)
    else:
        q, s = ref.quantize_128x128(w, pow2)
        qt = q.view(torch.uint8).t().contiguous().view(q.dtype) if transpose else None
    return q, s, (qt if qt is not None else _empty(w.device)[0])


_q128_op = torch.library.custom_op("fusedtune::fp8_quantize_128x128", mutates_args=())(_q128_impl)
_q128 = EagerOp(_q128_op, _q128_impl)


@_q128_op.register_fake
def _(w, pow2, transpose, backend):
    N, K = w.shape
    return (w.new_empty((N, K), dtype=torch.float8_e4m3fn),
            w.new_empty((-(-N // ref.TILE), -(-K // ref.TILE)), dtype=torch.float32),
            w.new_empty((K, N) if transpose else (0,), dtype=torch.float8_e4m3fn))


def _gemm_impl(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block_rows: int,
               b_transposed: bool, out_dtype: str, backend: str) -> torch.Tensor:
    dt = _DTYPES[out_dtype]
    if backend == "triton":
        return _tk().gemm(a_q, a_s, b_q, b_s, b_block_rows, dt, b_transposed)
    if b_transposed:
        b_q = b_q.t()
    return ref.gemm(a_q, a_s, b_q, b_s, b_block_rows, dt)


_gemm_op = torch.library.custom_op("fusedtune::fp8_gemm", mutates_args=())(_gemm_impl)
_gemm = EagerOp(_gemm_op, _gemm_impl)


@_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, b_block_rows, b_transposed, out_dtype, backend):
    return a_q.new_empty((a_q.shape[0], b_q.shape[1] if b_transposed else b_q.shape[0]), dtype=_DTYPES[out_dtype])


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_2d(t, what):
    if not torch.is_tensor(t) or t.dim() != 2:
        raise ValueError(f"fp8: {what} must be a 2-D tensor, got {tuple(t.shape) if torch.is_tensor(t) else t!r}")


def fp8_arch_gap(device) -> str | None:
    """Why this device cannot run the FP8 GEMMs (a GPU older than sm_89, e.g. an A100), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_arch_gap(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_arch_gap(index: int) -> str | None:   # once per GPU (FP8Linear and every op call ask)
    cap = torch.cuda.get_device_capability(index)
    if tuple(cap) >= (8, 9):
        return None
    return f"FP8 tensor cores need sm_89 or newer; this GPU is sm_{cap[0]}{cap[1]}"


def _resolve(op, t, backend):
    name = _backend.resolve(op, t.device, _HAS, backend)
    gap = fp8_arch_gap(t.device) if name == "triton" else None
    if gap:
        raise _backend.BackendError(f"fp8: {gap} (use bf16 nn.Linear there; fusedtune.report states it)")
    return name


def _cuda_refuses(t) -> str:
    """Why the extension's CUDA quantizer cannot take t [M, K] ('' when it can). Shapes only, so that
    torch.compile traces it; a tensor or row stride that is not 16-byte aligned is copied first
    (_aligned, in the op's implementation, which sees real tensors)."""
    M, K = t.shape
    if t.numel() and (M % 8 or K % 8):
        return f"the CUDA quantizer takes M and K that are multiples of 8, got {M} x {K}"
    return ""


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where its address or row stride is not a multiple of 16 bytes (the CUDA
    quantizer's 16-byte loads; a contiguous copy of M, K multiples of 8 is aligned)."""
    if x.numel() and (x.data_ptr() % 16 or (x.shape[0] > 1 and x.stride(0) * x.element_size() % 16)):
        return x.contiguous() if not x.is_contiguous() else x.clone()
    return x


def _resolve_quant(t, backend) -> str:
    """The quantizers' backend for t: under auto on a GPU the CUDA kernel where it serves t's shape, else
    Triton (said once); backend="cuda" asked for and refused raises."""
    name = _backend.resolve("fp8_quantize", t.device, _QHAS, backend)
    if name == "cuda":
        why = _cuda_refuses(t)
        if not why:
            return name
        if _backend.requested(backend) == "cuda":
            raise _backend.BackendError(f"fp8_quantize: backend 'cuda': {why}")
        nxt = "triton" if _backend.can_serve("triton", t.device, frozenset(_QHAS))[0] else "reference"
        _backend.warn_once(("fp8_quantize", nxt, "shape"),    # once, not once per token count
                           f"fusedtune: fp8_quantize: {why}; running {nxt} (for this and other such shapes)")
        name = nxt
    if name == "triton" and fp8_arch_gap(t.device):
        raise _backend.BackendError(f"fp8: {fp8_arch_gap(t.device)} (use bf16 nn.Linear there; fusedtune.report "
                                    "states it)")
    return name


def fp8_quantize_1x128(x, pow2: bool = False, transpose: bool = True, backend: str | None = None):
    _check_2d(x, "x")
    if x.dtype not in _FLOATS:
        raise TypeError(f"fp8_quantize_1x128: x must be float32/bfloat16/float16, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _q1(x, bool(pow2), bool(transpose), _resolve_quant(x, backend))


def fp8_quantize_128x128(w, pow2: bool = False, backend: str | None = None, transpose: bool = False):
    """(q, s), or with transpose (q, s, q_t): q_t [K, N] holds q's bytes transposed (the K-major B operand of
    dX = dy . W, whose scales are s transposed), written by the same pass."""
    _check_2d(w, "w")
    if w.dtype not in _FLOATS:
        raise TypeError(f"fp8_quantize_128x128: w must be float32/bfloat16/float16, got {w.dtype}")
    if w.stride(-1) != 1:
        w = w.contiguous()
    q, s, qt = _q128(w, bool(pow2), bool(transpose), _resolve_quant(w, backend))
    return (q, s, qt) if transpose else (q, s)


def fp8_gemm(a_q, a_s, b_q, b_s, b_block_rows: int = 128, out_dtype=torch.bfloat16, b_transposed: bool = False,
             backend: str | None = None) -> torch.Tensor:
    for t, n in ((a_q, "a_q"), (b_q, "b_q"), (a_s, "a_s"), (b_s, "b_s")):
        _check_2d(t, n)
    if a_q.dtype != torch.float8_e4m3fn or b_q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_gemm: a_q and b_q must be float8_e4m3fn, got {a_q.dtype} and {b_q.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise TypeError("fp8_gemm: scales must be float32")
    if b_block_rows not in (1, ref.TILE):
        raise ValueError(f"fp8_gemm: b_block_rows must be 1 (1x128 scales) or 128 (128x128), got {b_block_rows}")
    M, K = a_q.shape
    N, Kb = (b_q.shape[1], b_q.shape[0]) if b_transposed else b_q.shape
    if Kb != K:
        raise ValueError(f"fp8_gemm: A has K={K}, B has K={Kb}")
    KB = -(-K // ref.TILE)
    bs_shape = (-(-N // b_block_rows), KB)      # always [output rows or blocks, K blocks]
    if a_s.shape != (M, KB) or b_s.shape != bs_shape:
        raise ValueError(f"fp8_gemm: scales must be a_s {(M, KB)} and b_s {bs_shape}, got {tuple(a_s.shape)} and "
                         f"{tuple(b_s.shape)}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"fp8_gemm: out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    return _gemm(a_q.contiguous(), a_s.contiguous(), b_q.contiguous(), b_s.contiguous(), int(b_block_rows),
                 bool(b_transposed), _name(out_dtype),
                 _resolve("fp8_gemm", a_q, backend))  # (the kernel reads unit inner strides)


# ----------------------------------------------------------------------------------------- FP8 linear

def _linear_gemm(a_q, a_s, b_q, b_s, b_rows: int, out_dtype: str, backend: str) -> torch.Tensor:
    """One of FP8Linear's GEMMs (C = A . B^T, B K-major): cuBLAS's block-scaled FP8 GEMM where
    fp8_cublas.usable() says so (sm_90, a shape it takes, its one-time check passed), else fp8_gemm's
    Triton kernel (or the backend's emulation)."""
    if backend == "triton":
        dt = _DTYPES[out_dtype]
        if fp8_cublas.usable(a_q.device, a_q.shape[0], b_q.shape[0], a_q.shape[1], b_rows, dt):
            return fp8_cublas.gemm(a_q, a_s, b_q, b_s, b_rows, dt)
    return _gemm(a_q, a_s, b_q, b_s, b_rows, False, out_dtype, backend)


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w_q: torch.Tensor,
                 w_s: torch.Tensor, w_qt: torch.Tensor | None, pow2: bool, need_wgrad: bool,
                 backend: str, qbackend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight is the high-precision master (for the gradient only); w_q, w_s its 128x128 quantization and
    w_qt (or None) w_q's bytes transposed, the dX GEMM's operand (else backward makes it).
    need_wgrad: also quantize x column-wise (saved for dW = dy^T x). qbackend: the 1x128 quantizers'
    backend (_linear_quant_backend)."""
    qr, sr, qc, sc = _q1(x, pow2, need_wgrad, qbackend)
    y = _linear_gemm(qr, sr, w_q, w_s, ref.TILE, _name(x.dtype), backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y, qc, sc


_linear_op = torch.library.custom_op("fusedtune::fp8_linear", mutates_args=())(_linear_impl)


@_linear_op.register_fake
def _(x, weight, bias, w_q, w_s, w_qt, pow2, need_wgrad, backend, qbackend):
    M, K = x.shape
    if not need_wgrad:
        return (x.new_empty((M, weight.shape[0])), x.new_empty((0,), dtype=torch.float8_e4m3fn),
                x.new_empty((0,), dtype=torch.float32))
    return (x.new_empty((M, weight.shape[0])), x.new_empty((K, M), dtype=torch.float8_e4m3fn),
            x.new_empty((K, -(-M // ref.TILE)), dtype=torch.float32))


def _lin_setup(ctx, inputs, output):
    x, weight, bias, w_q, w_s, w_qt, pow2, need_wgrad, backend, qbackend = inputs
    ctx.save_for_backward(output[1], output[2], w_q, w_s, w_qt)   # FP8 x^T and its scales, not a 16-bit x
    ctx.args = (pow2, backend, qbackend, x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)   # else every backward zero-fills a [K, M] FP8 tensor and its scales


def _lin_backward(ctx, dy, _dq, _ds):
    if dy is None:    # y reached no loss (grads are not materialized)
        return (None,) * 10
    xq_c, xs_c, w_q, w_s, w_qt = ctx.saved_tensors
    pow2, backend, qbackend, x_dtype, w_dtype, bias_dtype = ctx.args
    g = ctx.needs_input_grad
    dy = dy.contiguous()
    dq_r, ds_r, dq_c, ds_c = _q1(dy, pow2, bool(g[1]), _linear_quant_backend(dy, backend, qbackend))
    dx = dW = db = None
    if g[0]:   # dX = dy . W: B = W^T [K, N] as a K-major copy, its 128x128 scales transposed. (The GEMM can
        # read W^T in place, b_transposed=True, but FP8 wgmma wants K-major operands: on an H200 that ran at
        # 99 TFLOP/s against 699 on the copy, which as a separate transpose cost 0.39 ms at 8192^2 --
        # bench/results/fp8.csv; the weight quantizer now writes it in the same pass, w_qt)
        w_t = w_qt if w_qt is not None else w_q.view(torch.uint8).t().contiguous().view(w_q.dtype)
        dx = _linear_gemm(dq_r, ds_r, w_t, w_s.t().contiguous(), ref.TILE, _name(x_dtype), backend)
    if g[1]:   # dW = dy^T . x: both 1x128-scaled along the tokens (no tokens: zeros, as nn.Linear gives)
        dW = _linear_gemm(dq_c, ds_c, xq_c, xs_c, 1, _name(w_dtype), backend) if xq_c.numel() else \
            torch.zeros(w_q.shape, dtype=w_dtype, device=dy.device)
    if bias_dtype is not None and g[2]:
        db = dy.float().sum(0).to(bias_dtype)
    return dx, dW, db, None, None, None, None, None, None, None


torch.library.register_autograd("fusedtune::fp8_linear", _lin_backward, setup_context=_lin_setup)
_linear = EagerOp(_linear_op, _linear_impl, _lin_setup, _lin_backward)


def _linear_quant_backend(t, backend: str, qbackend: str) -> str:
    """The quantizer backend of FP8Linear's x (or dy): qbackend (the quantizers' own choice for x, under the
    linear's request), but the linear's Triton kernel where the CUDA quantizer cannot take t (a dy of other
    columns than x, said by _resolve_quant for x)."""
    return "triton" if qbackend == "cuda" and _cuda_refuses(t) else qbackend


def fp8_linear(x, weight, bias=None, w_q=None, w_s=None, pow2: bool = False, backend: str | None = None,
               w_qt=None):
    """y = x W^T + b with x in 1x128 FP8 and W in 128x128 FP8 (quantized here unless w_q, w_s are given;
    w_qt: w_q's bytes transposed [K, N], fp8_quantize_128x128(..., transpose=True)'s third output, for dX;
    made here with w_q when x needs a gradient, else by the backward from w_q).
    Under torch.autocast x and the bias are cast to the autocast dtype (the output's, as F.linear's would
    be) and the op runs with autocast off; the weight is not cast (only its FP8 copy is read; its
    gradient comes in its own dtype)."""
    dt = _autocast.linear_dtype(x.device)
    if dt is not None:
        x, bias = _autocast.cast(dt, x, bias)
        with _autocast.off(x.device):
            return fp8_linear(x, weight, bias, w_q, w_s, pow2, backend, w_qt)
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise TypeError(f"fp8_linear: x and weight must be float32/bfloat16/float16, got {x.dtype}, {weight.dtype}")
    _check_2d(weight, "weight")
    check_linear_shapes("fp8_linear", x)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight expects {K}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in _FLOATS):
        raise ValueError(f"fp8_linear: bias must be a float tensor of shape [{N}], got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    check_one_device("fp8_linear", x, weight, bias, w_q, w_s, w_qt)
    need_dgrad = x.requires_grad and torch.is_grad_enabled()
    if w_q is None and (w_s is not None or w_qt is not None):
        raise ValueError("fp8_linear: w_s / w_qt given without w_q (pass all of fp8_quantize_128x128(weight)'s "
                         "outputs, or none)")
    if w_q is None:
        with torch.no_grad():
            w_q, w_s, w_qt = fp8_quantize_128x128(weight.detach(), pow2, backend, transpose=True) if need_dgrad \
                else (*fp8_quantize_128x128(weight.detach(), pow2, backend), None)
    else:
        nb, kb = -(-N // 128), -(-K // 128)
        if w_s is None or w_q.shape != (N, K) or w_q.dtype != torch.float8_e4m3fn or w_s.shape != (nb, kb) \
                or w_s.dtype != torch.float32:
            raise ValueError(f"fp8_linear: w_q and w_s must be fp8_quantize_128x128(weight)'s outputs: float8_e4m3fn "
                             f"[{N}, {K}] and float32 [{nb}, {kb}], got {w_q.dtype} {tuple(w_q.shape)} and "
                             f"{None if w_s is None else (w_s.dtype, tuple(w_s.shape))}")
        if w_qt is not None and (w_qt.shape != (K, N) or w_qt.dtype != torch.float8_e4m3fn):
            raise ValueError(f"fp8_linear: w_qt must be float8_e4m3fn [{K}, {N}] (w_q transposed), got {w_qt.dtype} "
                             f"{tuple(w_qt.shape)}")
        # the GEMMs read them row-major (a transposed view, a column-major scale table: copied)
        w_q, w_s = w_q.contiguous(), w_s.contiguous()
        w_qt = None if w_qt is None else w_qt.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), K)      # (not -1: K may be 0)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != K):
        x2 = x2.contiguous()
    name = _resolve("fp8_linear", x, backend)
    need_wgrad = bool(weight.requires_grad) and torch.is_grad_enabled()   # else no transposed x copy is kept
    qname = _linear_quant_backend(x2, name, _resolve_quant(x2, backend) if name == "triton" else name)
    y, _, _ = _linear(x2, weight, bias, w_q, w_s, w_qt if need_dgrad else None, bool(pow2), need_wgrad, name,
                      qname)
    return y.reshape(*lead, N)


def fp8_backend(device, backend: str | None = None) -> dict:
    return _backend.explain("fp8_linear", torch.device(device), _HAS, backend)


def fp8_quant_backend(device, backend: str | None = None) -> dict:
    """What the quantizers take on device under backend (before a shape the CUDA kernel refuses sends a call
    to Triton: _resolve_quant)."""
    return _backend.explain("fp8_quantize", torch.device(device), _QHAS, backend)


if _ext.loaded():
    @torch.library.register_fake("fusedtune::fp8_quant_kernel")
    def _(x, block, copy, pow2):
        """The C++/CUDA quantizer's outputs (csrc/include/fusedtune/fp8_checks.h, fp8_outputs): q [M, K]; scales
        [M, KB] (1x128) or [MB, KB] (128x128); with copy the transposed q [K, M] and, 1x128 only, its scales
        [K, MB]; empty otherwise."""
        M, K = x.shape
        MB, KB = -(-M // ref.TILE), -(-K // ref.TILE)
        f8, f32 = torch.float8_e4m3fn, torch.float32
        return (x.new_empty((M, K), dtype=f8), x.new_empty((MB if block else M, KB), dtype=f32),
                x.new_empty((K, M) if copy else (0,), dtype=f8),
                x.new_empty((K, MB) if copy and not block else (0,), dtype=f32))
