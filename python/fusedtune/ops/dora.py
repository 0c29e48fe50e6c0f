"""DoRA (weight-decomposed LoRA; peft's use_dora=True) on the fused LoRA op.

    dora_weight_norm(weight, lora_A, lora_B, scale, nf4=None)
        ||W + scale * B . A|| of every output row, float32, in row chunks of at most 2^24 elements: never
        the whole [out, in] matrix B . A (an NF4 base is dequantized first). The sum is formed before the
        norm, as peft does: the expanded ||W||^2 + 2s<W, BA> + s^2||BA||^2 would need one GEMM less but
        cancels where the adapter nearly undoes a row.
    dora_linear(x, weight, lora_A, lora_B, scale, magnitude, bias=None, dropout_p=0.0, seed=None, nf4=None)
        y = g * (x W^T + s (drop(x) A^T) B^T) + (g - 1) * ((drop(x) - x) W^T) + bias,
        g = magnitude / dora_weight_norm(...) per output row, the norm detached (DoRA section 4.3, as peft).

The second term is peft's: with dropout its DoRA layer rescales the base output of the dropped input,
one more GEMM (there is none without dropout or in eval). Without dropout, fusedtune::dora_linear is the
fused LoRA GEMM with the column scale in its epilogue; it also writes F = x W^T + s t B^T, the product
before the scale and the bias, in the model's dtype, for the magnitude's gradient sum over rows of
dy * F / norm (peft's is as coarse: its base output there is the model's dtype). With dropout the
magnitude's gradient is sum over rows of dy * G / norm with G = drop(x) W^T + s t B^T, which peft forms in
float32 (its DoRA branch runs in the adapters' float32): the op writes G in float32, its base product from
the exact keep * x through the base GEMM with float32 accumulation and output (one GEMM, as
(drop(x) - x) W^T was), and y = (x W^T + s t B^T + bias) + (g - 1) * G rounded once. (G assembled from F
and (drop(x) - x) W^T rounded to bf16, or even from a bf16 drop(x) - x, was ~2^-9 relative off: a
magnitude gradient ~10^3 times peft's error at a Llama layer shape.) In the backward the adapter
gradients take dy * g in float32 (peft's LoRA branch is float32: rounding dy * g to a bf16 model's dtype
first would cost the adapters ~2^-9 of relative accuracy), dX takes it rounded to the model's dtype (the
base GEMM's) plus, with dropout, (drop - 1)(((g - 1) dy) W); one pass over dy and F (or G) makes dy * g,
both roundings and the column sums (fusedtune::dora_dy, reference.lora.dora_dy; the Triton
lora_dora_dy_kernel on a GPU).

peft forms lora_B(lora_A(eye(in))) (an [in, out] matrix), adds it to W and takes the norm, all in the
input's dtype (bfloat16 for a bf16 model) on every forward; here it is float32 throughout, chunked, and
cached in inference by the layer.
"""
from __future__ import annotations

import torch

from .. import _autocast
from .. import backend as _backend
from ..reference import lora as ref
from ..reference import nf4 as nf4_ref
from . import _eager
from ._eager import EagerOp
from .lora import _HAS, _impl, _lora_bwd, _nf4_dict, _op_args, _seed_tensor, scale_table

_CHUNK = 1 << 24   # elements of W upcast to float32 at a time (64 MiB)


def _dense(weight, nf4, dtype, backend: str | None):
    """The dense base weight: `weight`, or the NF4 weight dequantized to `dtype` (the dtype its GEMMs use)."""
    if nf4 is None:
        return weight
    if _backend.resolve("lora_linear", nf4.q.device, _HAS, backend) == "triton":
        from ..triton_kernels import lora as tk  # noqa: PLC0415
        return tk.nf4_dequant(nf4.state(), nf4.shape, dtype)
    return nf4_ref.dequantize(nf4, dtype)


def dora_weight_norm(weight, lora_A, lora_B, scale: float, nf4=None, nf4_dtype=torch.float32,
                     backend: str | None = None) -> torch.Tensor:
    """float32 [out]: ||W + scale * B . A|| per output row (module docstring); no gradient. An NF4 base
    (weight None) is taken as dequantized to nf4_dtype: pass the dtype its GEMMs compute in."""
    with torch.no_grad(), _autocast.off(lora_A.device):   # float32 sums whatever autocast a caller runs under
        W = _dense(weight, nf4, nf4_dtype, backend)
        if W.dim() != 2 or lora_A.dim() != 2 or lora_A.shape[1] != W.shape[1] or lora_B.shape != (W.shape[0],
                                                                                                lora_A.shape[0]):
            raise ValueError(f"dora: weight {tuple(W.shape)}, lora_A {tuple(lora_A.shape)} and lora_B "
                             f"{tuple(lora_B.shape)} do not make W + B . A")
        ct = ref.compute_dtype(W)
        A, B = lora_A.to(ct), lora_B.to(ct)
        N, K = W.shape
        out = torch.empty(N, dtype=ct, device=W.device)
        step = max(1, _CHUNK // max(K, 1))
        for lo in range(0, N, step):    # a copy of the rows (never W itself), the product added in place, the norm
            rows = W[lo:lo + step].to(ct, copy=True)   # into out: addmm out of place copied its input once more
            rows.addmm_(B[lo:lo + step], A, alpha=float(scale))
            torch.linalg.vector_norm(rows, dim=1, out=out[lo:lo + step])
        return out


def _dora_impl(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               bias: torch.Tensor | None, scales: torch.Tensor, row_group: torch.Tensor | None, dropout_p: float,
               seed: torch.Tensor, nf4_absmax: torch.Tensor | None, nf4_code: torch.Tensor | None,
               nf4_absmax2: torch.Tensor | None, nf4_code2: torch.Tensor | None, nf4_blocksize: int,
               nf4_blocksize2: int, nf4_offset: float, nf4_path: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y = g * F + bias, t, F): the fused LoRA GEMM with DoRA's column scale in its epilogue, which also
    stores F = x W^T + t B^T (before the bias, x's dtype) for the magnitude's gradient. With dropout
    (dropout_p > 0): (y = F + bias + (g - 1) * G, t, G), G = drop(x) W^T + t B^T in float32 (module docstring)."""
    nf4 = _nf4_dict(weight, x, lora_B, nf4_absmax, nf4_code, nf4_absmax2, nf4_code2, nf4_blocksize, nf4_blocksize2,
                    nf4_offset)
    k = _impl(backend)
    if dropout_p > 0.0:
        if k is not None:
            return k.forward_dropped(x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, int(seed), nf4,
                                     nf4_path, g.contiguous())
        w = weight if nf4 is None else nf4_ref.dequantize(nf4, x.dtype)
        return ref.forward_dropped(x, w, lora_A, lora_B, bias, scales, row_group, dropout_p, int(seed), g)
    if k is not None:
        return k.forward_scaled(x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, int(seed), nf4,
                                nf4_path, g.contiguous())
    w = weight if nf4 is None else nf4_ref.dequantize(nf4, x.dtype)
    return ref.forward_scaled(x, w, lora_A, lora_B, bias, scales, row_group, dropout_p, int(seed), g)


_dora_op = torch.library.custom_op("fusedtune::dora_linear", mutates_args=())(_dora_impl)


@_dora_op.register_fake
def _(g, x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, *rest):
    N = lora_B.shape[0]
    ct = ref.compute_dtype(x)
    return (x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=ct),
            x.new_empty((x.shape[0], N), dtype=ct if dropout_p > 0.0 else x.dtype))


def _dora_dy_impl(dy: torch.Tensor, F: torch.Tensor, g: torch.Tensor,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA's backward prologue, one pass over dy and F on the Triton backend (reference.lora.dora_dy):
    (dF = dy * g in float32, dF in dy's dtype, sum_rows dy * F, sum_rows dy)."""
    if backend == "triton":
        from ..triton_kernels import lora_dora as tkd  # noqa: PLC0415
        return tkd.dora_dy(dy, F, g)
    return ref.dora_dy(dy, F, g)


_dora_dy_op = torch.library.custom_op("fusedtune::dora_dy", mutates_args=())(_dora_dy_impl)
_dora_dy = EagerOp(_dora_dy_op, _dora_dy_impl)


@_dora_dy_op.register_fake
def _(dy, F, g, backend):
    M, N = F.shape
    return (F.new_empty((M, N), dtype=g.dtype), dy.new_empty((M, N)), F.new_empty((N,), dtype=g.dtype),
            F.new_empty((N,), dtype=g.dtype))


def _dropped_dgrad_impl(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                        nf4_absmax: torch.Tensor | None, nf4_code: torch.Tensor | None,
                        nf4_absmax2: torch.Tensor | None, nf4_code2: torch.Tensor | None, nf4_blocksize: int,
                        nf4_blocksize2: int, nf4_offset: float, nf4_path: str, dropout_p: float, seed: torch.Tensor,
                        backend: str) -> torch.Tensor:
    """dX of the dropped base term (g - 1) * (drop(x) - x) W^T: drop(d W) - d W, d = (g - 1) * dy rounded to
    x's dtype, d W in x's dtype (as autograd through a 16-bit F.linear would give it)."""
    d = (dy.to(g.dtype) * (g - 1.0)).to(x.dtype)
    nf4 = None if nf4_blocksize == 0 else nf4_ref.nf4_state(weight, nf4_absmax, nf4_code, nf4_absmax2, nf4_code2,
                                                            nf4_blocksize, nf4_blocksize2, nf4_offset,
                                                            (dy.shape[1], x.shape[1]))
    k = _impl(backend)
    if k is not None:
        dw = k.base_dgrad(d, x, weight, nf4, nf4_path)
    else:
        w = weight if nf4 is None else nf4_ref.dequantize(nf4, x.dtype)
        ct = ref.compute_dtype(x)
        dw = (d.to(ct) @ w.to(ct)).to(x.dtype)
    return _dropout_delta(dw, dropout_p, int(seed), backend)


_dropped_dgrad_op = torch.library.custom_op("fusedtune::dora_dropped_dgrad", mutates_args=())(_dropped_dgrad_impl)
_dropped_dgrad = EagerOp(_dropped_dgrad_op, _dropped_dgrad_impl)


@_dropped_dgrad_op.register_fake
def _(dy, x, *rest):
    return x.new_empty(x.shape)


# DoRA's autograd is the op's own (register_autograd), as LoRA's is: torch.export keeps fusedtune::dora_linear in
# its graph and the exported program's backward runs this formula (an autograd.Function around the op, as
# before, left the exported op without one: "no autograd formula"); torch.compile traces the op with its
# autograd, and plain eager calls run the same setup_context and backward through EagerOp's direct route. The
# magnitude's factor g = magnitude / ||W + s B . A|| is the op's first input (computed outside, the norm detached),
# so the op's own gradient for g is the one the magnitude gets through that division.
def _setup(ctx, inputs, output):
    """y = g * F + bias in x's dtype, F = the fused LoRA product (module docstring): one GEMM writes both.
    With dropout also peft's (g - 1) * (drop(x) - x) W^T, the magnitude's gradient from G in float32."""
    g, x2, w, A, B, bias, S, gid, p, seed, absmax, code, absmax2, code2, bs, bs2, offset, path, backend = inputs
    _, t, F = output
    ctx.save_for_backward(g, x2, w, A, B, F, t, S, gid, seed, absmax, code, absmax2, code2)
    ctx.args = (p, bs, bs2, offset, path, backend, None if bias is None else bias.dtype)
    # t and F are outputs only to be saved (setup_context has no other way to keep a forward's intermediates):
    # no gradient flows to them, and none is materialized as zeros for backward (F: a float32 [T, N])
    ctx.mark_non_differentiable(t, F)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dt, _dF):
    if dy is None:      # the output got no gradient (materialize_grads is off): none flows back
        return (None,) * 19
    g, x2, w, A, B, F, t, S, gid, seed, absmax, code, absmax2, code2 = ctx.saved_tensors
    p, bs, bs2, offset, path, backend, bias_dtype = ctx.args
    need_g, need_x, need_w, need_A, need_B, need_bias = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dF, dF_low, dg, dbias = _dora_dy(dy, F, g, backend)    # one pass over dy and F (G with dropout)
    tail = (S, gid, p, seed, absmax, code, absmax2, code2, bs, bs2, offset, path)
    dx = dW = dA = dB = None
    dg = dg if need_g else None
    dbias = dbias.to(bias_dtype) if need_bias and bias_dtype is not None else None
    if need_x or need_A or need_B:   # u, dA, dB from the float32 dy * g; dX's base GEMM reads it rounded
        need = [bool(need_x), bool(need_A), bool(need_B)]
        dx, dA, dB = _lora_bwd(dF, x2, w, A, B, t, *tail, need, backend, dF_low if need_x else None)
        dx = dx if need_x else None
        dA = dA.to(A.dtype) if need_A else None
        dB = dB.to(B.dtype) if need_B else None
    if need_x and p > 0.0:   # the dropped base term's share of dX
        dx = dx + _dropped_dgrad(dy, x2, g, w, absmax, code, absmax2, code2, bs, bs2, offset, path, p, seed,
                                 backend)
    if need_w:      # a base that trains (dense weight only): dW = dF^T x (+ ((g - 1) dy)^T (drop(x) - x))
        ct = dF.dtype
        if p > 0.0:
            dW = dy.to(ct).t() @ x2.to(ct) + (dy.to(ct) * (g - 1.0)).t() @ ref.dropout(x2, p, int(seed))
        else:
            dW = dF.t() @ x2.to(ct)
        dW = dW.to(w.dtype)
    return (dg, dx, dW, dA, dB, dbias) + (None,) * 13


torch.library.register_autograd("fusedtune::dora_linear", _backward, setup_context=_setup)
_dora = EagerOp(_dora_op, _dora_impl, _setup, _backward)   # the op, called directly in plain eager mode


class _DoRAFunctorch(torch.autograd.Function):
    """The op's own setup_context and backward as a user autograd.Function, for torch.func transforms only: torch's
    generated autograd of a custom op refuses functorch's grad transforms (torch.func.vjp: "must override the
    setup_context staticmethod"), a Function with setup_context runs under them (and under vmap by its generated
    rule, the op once per example). torch.compile and torch.export take the op."""

    generate_vmap_rule = True
    setup_context = staticmethod(_setup)
    backward = staticmethod(_backward)

    @staticmethod
    def forward(*args):
        return _dora(*args)


def _column_scaled(g, *args):
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        if _eager._forward_ad((g, *args)):     # (the Function would say only that it has no jvp)
            raise NotImplementedError(f"fusedtune::dora_linear: {_eager.FORWARD_AD}")
        return _DoRAFunctorch.apply(g, *args)
    return _dora(g, *args)


def _dropout_delta(x2, p: float, seed: int, backend: str) -> torch.Tensor:
    """dropout(x) - x with the LoRA branch's mask: a diagonal map, its own adjoint (_dropped_dgrad applies it to
    dX's dropped part)."""
    if backend == "triton":
        from ..triton_kernels import lora as tk  # noqa: PLC0415
        return tk.dropout_delta(x2, tk.Dropout(p, seed))
    return (ref.dropout(x2, p, seed) - x2.to(ref.compute_dtype(x2))).to(x2.dtype)


def dora_linear(x, weight, lora_A, lora_B, scale: float, magnitude, bias=None, dropout_p: float = 0.0, seed=None,
                nf4=None, backend: str | None = None, weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The DoRA linear (module docstring), with autograd to x, lora_A, lora_B and magnitude. weight_norm:
    a precomputed dora_weight_norm (it must be the current one; None computes it). Under autocast: x, weight
    and bias in the autocast dtype, as autocast runs F.linear (lora_linear_grouped)."""
    dt = _autocast.linear_dtype(x.device)
    if dt is not None:
        x, weight, bias = _autocast.cast(dt, x, weight, bias)
        with _autocast.off(x.device):
            return dora_linear(x, weight, lora_A, lora_B, scale, magnitude, bias, dropout_p, seed, nf4, backend,
                               weight_norm)
    N = lora_B.shape[0]
    if magnitude.shape != (N,):
        raise ValueError(f"dora: magnitude must be [{N}] (one per output feature), got {tuple(magnitude.shape)}")
    if not magnitude.dtype.is_floating_point:
        raise TypeError(f"dora: magnitude must be a float tensor, got {magnitude.dtype}")
    p = float(dropout_p)
    seed_t = _seed_tensor(seed, p)          # one mask for the LoRA branch and the rescaled base term
    S = scale_table([lora_A.shape[0]], [float(scale)], x.device)
    args = _op_args(x, weight, lora_A, lora_B, S, None, bias, p, seed_t, nf4, backend)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scale, nf4, x.dtype, backend)
    elif not torch.is_tensor(weight_norm) or tuple(weight_norm.shape) != (N,):
        raise ValueError(f"dora: weight_norm must be [{N}] (one per output feature), got "
                         f"{tuple(weight_norm.shape) if torch.is_tensor(weight_norm) else type(weight_norm).__name__}")
    ct = ref.compute_dtype(x)
    g = magnitude.to(ct) / weight_norm.to(device=x.device, dtype=ct)
    y = _column_scaled(g, *args)[0]   # with dropout, peft's dropped base term included
    return y.reshape(*x.shape[:-1], N)
