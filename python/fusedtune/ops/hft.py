"""Half-fine-tuning family ops.

    hft_row_linear(x, weight, weight_rows, rows, bias, bias_rows)  y = x W^T + b with W frozen; the
        backward gives dX (full) and the gradient of weight_rows, the master copy of W's selected rows,
        computed only for those rows (row_grad: one GEMM over gathered dy columns, no dense dW), and
        of bias_rows, the master of b at those rows (dy summed over tokens at the rows).
    row_grad(dy, x, rows, out_dtype=torch.float32)      that compact gradient [R, in], accumulated in
        float32 and rounded once to out_dtype (float32, bfloat16 or float16)
    masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, targets, rows, ...)
        one fused multi-tensor AdamW pass; a row master also writes its rows into its full weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _autocast, _ext
from .. import backend as _backend
from ..reference import hft as ref
from ..reference.adamw import CONST_KEYS, check_distinct, check_hparams, check_writable
from ._eager import EagerOp
from ._linear import (check_linear_shapes, check_one_device, dense_weight_grad, refuse_double_backward,
                      values_readable)

# "cpu": torch's own CPU GEMM is the CPU kernel; "cuda": a gather of dy's selected columns + one cuBLAS
# GEMM (_gather_gemm), taken before the Triton kernel on a GPU
_ROW_GRAD_HAS = ("reference", "cpu", "cuda", "triton")
_ADAMW_HAS = ("reference", "cpu", "cuda")


def _gather_gemm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The cuda backend: dy's selected columns gathered into one [T, R] copy, then one cuBLAS GEMM with
    float32 accumulation (16-bit inputs: mm's out_dtype gives the float32 sum, rounded once to out_dtype).
    Chosen by measurement (bench/results/hft.csv, H200, 2026-11-30): the Triton kernel's gathered A-tile
    loads held it to 46-51 TFLOP/s, while gather + cuBLAS took 0.08-0.09x its time."""
    d2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])   # (no reshape, .to or .t call that changes
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])        # nothing: ~1.5-3 us of host time each)
    g = d2.index_select(1, rows).t()
    if x2.dtype == torch.float32 or out_dtype == x2.dtype:
        out = g @ x2
    else:
        out = torch.mm(g, x2, out_dtype=torch.float32)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _row_grad_impl(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, backend: str,
                   out_dtype: torch.dtype) -> torch.Tensor:
    if backend == "cuda":
        return _gather_gemm(dy, x, rows, out_dtype)
    if backend == "triton":
        from ..triton_kernels import hft as tk
        return tk.row_grad(dy.reshape(-1, dy.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]).contiguous(),
                           rows.contiguous(), out_dtype)     # (rows read as rows + m)
    return ref.row_grad(dy, x, rows, out_dtype)


_row_grad_op = torch.library.custom_op("fusedtune::hft_row_grad", mutates_args=())(_row_grad_impl)
_row_grad = EagerOp(_row_grad_op, _row_grad_impl)


@_row_grad_op.register_fake
def _(dy, x, rows, backend, out_dtype):
    return x.new_empty((rows.shape[0], x.shape[-1]), dtype=out_dtype)


OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rows(rows: torch.Tensor, n: int, what: str, values: bool = True):
    """values=False skips the range/order check, which reads the rows on the host (a GPU sync);
    RowMaskedLinear checks its rows once, when they are set, and passes values=False."""
    if not torch.is_tensor(rows) or rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"{what}: rows must be a 1-D int64 tensor")
    if not values or rows.numel() == 0 or not values_readable(rows):
        return
    if int(rows.min()) < 0 or int(rows.max()) >= n:
        raise ValueError(f"{what}: rows must lie in [0, {n}), got [{int(rows.min())}, {int(rows.max())}]")
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError(f"{what}: rows must be sorted and unique")


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, backend: str | None = None,
             check_rows: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G[r, :] = sum over tokens of dy[t, rows[r]] * x[t, :], [len(rows), in_features], accumulated in
    float32 and rounded once to out_dtype (the same bits as the float32 result cast, without the float32
    buffer). check_rows=False skips the host-side check of the row values (a GPU sync)."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"row_grad: out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")
    check_linear_shapes("row_grad", x, dy=dy)
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"row_grad: dy {tuple(dy.shape)} and x {tuple(x.shape)} differ in leading dims")
    if dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"row_grad: dy ({dy.dtype}, {dy.device}) and x ({x.dtype}, {x.device}) must match")
    _check_rows(rows, dy.shape[-1], "row_grad", check_rows)
    name = _backend.resolve("hft_row_grad", x.device, _ROW_GRAD_HAS, backend)
    return _row_grad(dy, x, rows.to(x.device), name, out_dtype)


def _row_linear_impl(x: torch.Tensor, weight: torch.Tensor, weight_rows: torch.Tensor, rows: torch.Tensor,
                     bias: torch.Tensor | None, bias_rows: torch.Tensor | None, backend: str) -> torch.Tensor:
    return F.linear(x, weight, bias)   # the masters' values are already in weight and bias


_row_linear_op = torch.library.custom_op("fusedtune::hft_row_linear", mutates_args=())(_row_linear_impl)


@_row_linear_op.register_fake
def _(x, weight, weight_rows, rows, bias, bias_rows, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _row_linear_setup(ctx, inputs, output):
    x, weight, weight_rows, rows, bias, bias_rows, backend = inputs
    ctx.save_for_backward(x, weight, rows)
    ctx.backend = backend
    ctx.master_dtype = weight_rows.dtype
    ctx.bias_master_dtype = None if bias_rows is None else bias_rows.dtype


def _row_linear_backward(ctx, dy):
    refuse_double_backward("hft_row_linear", ctx, 2, "row masters")
    x, weight, rows = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = dy @ weight if need[0] else None
    dw_full = dense_weight_grad(dy, x) if need[1] else None   # a weight the caller trains too
    dw = db = dbr = None
    if need[2]:   # written in the master's dtype (block granularity: the weight's) by the kernel
        md = ctx.master_dtype
        if md == torch.float64:     # summed in float64 (the kernels accumulate in float32)
            dw = ref.row_grad(dy, x, rows, md)
        else:
            dw = _row_grad(dy, x, rows, ctx.backend, md if md in OUT_DTYPES else torch.float32)
        if dw.dtype != md:
            dw = dw.to(md)
    if need[4] or need[5]:
        dy2 = dy.reshape(-1, dy.shape[-1])
        db = dy2.sum(0) if need[4] else None
        if need[5]:
            dbr = dy2.index_select(1, rows).sum(0, dtype=torch.float64 if ctx.bias_master_dtype == torch.float64
                                                else torch.float32)
            if dbr.dtype != ctx.bias_master_dtype:
                dbr = dbr.to(ctx.bias_master_dtype)
    return dx, dw_full, dw, None, db, dbr, None


torch.library.register_autograd("fusedtune::hft_row_linear", _row_linear_backward, setup_context=_row_linear_setup)
_row_linear = EagerOp(_row_linear_op, _row_linear_impl, _row_linear_setup, _row_linear_backward)


def hft_row_linear(x, weight, weight_rows, rows, bias=None, bias_rows=None, backend: str | None = None,
                   check_rows: bool = True) -> torch.Tensor:
    """Linear layer whose trainable part is the rows `rows` of a frozen weight (HFT row mode), and
    the bias at those rows when bias_rows (their master, [len(rows)]) is given.
    check_rows=False skips the host-side check of the row values (callers that checked them once)."""
    check_linear_shapes("hft_row_linear", x, weight, bias)
    if weight_rows.dim() != 2 or weight_rows.shape != (rows.shape[0], weight.shape[1]):
        raise ValueError(f"hft_row_linear: weight_rows must be [{rows.shape[0]}, {weight.shape[1]}], "
                         f"got {tuple(weight_rows.shape)}")
    if bias_rows is not None and (bias is None or bias_rows.shape != (rows.shape[0],)):
        raise ValueError(f"hft_row_linear: bias_rows must be [{rows.shape[0]}] and needs the bias, got "
                         f"{tuple(bias_rows.shape)} with bias {'None' if bias is None else tuple(bias.shape)}")
    check_one_device("hft_row_linear", x, weight, weight_rows, rows, bias, bias_rows)
    _check_rows(rows, weight.shape[0], "hft_row_linear", check_rows)
    name = _backend.resolve("hft_row_grad", x.device, _ROW_GRAD_HAS, backend)
    return _autocast.linear_call(lambda x_, w_, b_: _row_linear(x_, w_, weight_rows, rows, b_, bias_rows, name),
                                 x, weight, bias)


def _masked_adamw_impl(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], targets: list[torch.Tensor], rows: list[torch.Tensor],
                       consts: list[float], backend: str) -> None:
    if backend == "reference":
        none = [params[0].new_empty(0)] * len(params) if not targets else None   # no row masters: empty lists
        ref.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, targets or none, rows or none,
                          dict(zip(CONST_KEYS, consts)))
    else:
        torch.ops.fusedtune.masked_adamw_kernel_(params, grads, exp_avgs, exp_avg_sqs, targets, rows, consts)


_masked_adamw_op = torch.library.custom_op(
    "fusedtune::masked_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "targets"))(_masked_adamw_impl)
_masked_adamw = EagerOp(_masked_adamw_op, _masked_adamw_impl, mutated=(0, 2, 3, 4))   # direct in plain eager mode


@_masked_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, targets, rows, consts, backend):
    return None


if _ext.loaded():
    @torch.library.register_fake("fusedtune::masked_adamw_kernel_")
    def _(params, grads, exp_avgs, exp_avg_sqs, targets, rows, consts):
        return None


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, targets, rows, *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: int, backend: str | None = None,
                  check_rows: bool = True, check: bool = True) -> None:
    """One AdamW step in place over lists of tensors (all on one device). targets[i] is None or an empty
    tensor, or the full weight [out, in] that params[i] (a [len(rows[i]), in] row master) writes to.
    check_rows=False skips the host-side check of the row values (MaskedAdamW: the layers checked);
    check=False (MaskedAdamW, which built the lists) also skips the per-tensor Python checks where the
    extension's kernels run, which check every tensor themselves before changing anything."""
    n = len(params)
    if not n:
        return
    if not all(len(v) == n for v in (grads, exp_avgs, exp_avg_sqs, targets, rows)):
        raise ValueError("masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, targets and rows differ in length")
    check_hparams("masked_adamw_", lr, beta1, beta2, eps, weight_decay, step)
    dev = params[0].device
    name = _backend.resolve("masked_adamw_", dev, _ADAMW_HAS, backend)
    if check or name == "reference":
        _check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, targets, rows, dev, check_rows)
    elif check_rows:    # the kernels check shapes, not row values: a row outside the target was written through
        for t, r in zip(targets, rows):
            if t is not None and t.numel():
                _check_rows(r, t.shape[0], "masked_adamw_", True)
    c = ref.adamw_constants(lr, beta1, beta2, eps, weight_decay, step)
    consts = [c[k] for k in CONST_KEYS]
    if any(t is not None and t.numel() for t in targets):   # row masters: an entry each (empty: a plain parameter)
        targets = [torch.empty(0, device=dev) if t is None else t for t in targets]
        rows = [r if r is not None and r.numel() else torch.empty(0, dtype=torch.int64, device=dev) for r in rows]
    else:                    # none: empty lists (two empty tensors a parameter would be allocations every step)
        targets, rows = [], []
    with torch.no_grad():
        _masked_adamw(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(targets), list(rows),
                      consts, name)


def _check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, targets, rows, dev, check_rows: bool,
                       distinct: bool = True) -> None:
    """What the kernels check, and (distinct) that an entry's tensors share no memory (the Python-side check;
    MaskedAdamW's own lists, moments it allocated, skip it: ~20 us a tensor)."""
    check_writable("masked_adamw_", zip(params, exp_avgs, exp_avg_sqs, targets))
    for i, (p, g, m, v, t, r) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, targets, rows)):
        if t is None:
            t = p.new_empty(0)
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or g.dtype != p.dtype:
            raise TypeError(f"masked_adamw_: params[{i}] is {p.dtype} with grad {g.dtype}; need a float dtype, "
                            "grad of the same dtype")
        if m.dtype != torch.float32 or v.dtype != torch.float32 or m.shape != p.shape or v.shape != p.shape:
            raise TypeError(f"masked_adamw_: moments of params[{i}] must be float32 of shape {tuple(p.shape)}")
        if g.shape != p.shape:
            raise ValueError(f"masked_adamw_: grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(p.shape)}")
        if any(x.device != dev for x in (p, g, m, v)) or (t.numel() and (t.device != dev or r.device != dev)):
            raise ValueError(f"masked_adamw_: tensors of params[{i}] are not all on {dev}")
        if not all(x.is_contiguous() for x in (p, g, m, v, t)):
            raise ValueError(f"masked_adamw_: tensors of params[{i}] must be contiguous")
        if distinct and not torch.compiler.is_compiling():   # (data_ptr arithmetic: not traceable)
            check_distinct("masked_adamw_", i, p, g, m, v, t)   # (contiguous: a byte overlap is a shared element)
        if t.numel():
            if p.dim() != 2 or t.dim() != 2 or t.shape[1] != p.shape[1] or r.shape != (p.shape[0],):
                raise ValueError(f"masked_adamw_: row master {i} {tuple(p.shape)} does not fit target "
                                 f"{tuple(t.shape)} with {r.numel()} rows")
            _check_rows(r, t.shape[0], "masked_adamw_", check_rows)


def hft_backend(device, backend: str | None = None) -> dict:
    """Which backends the HFT ops take on `device` and why the others were not taken."""
    d = torch.device(device)
    return {"row_grad": _backend.explain("hft_row_grad", d, _ROW_GRAD_HAS, backend),
            "masked_adamw_": _backend.explain("masked_adamw_", d, _ADAMW_HAS, backend)}
