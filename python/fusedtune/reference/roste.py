"""Pure-PyTorch reference of RoSTE's fake quantization (docs/roste.md).

rotate_fake_quant(x, bits, granularity, symmetric, clip_ratio, rotate):
    y = hadamard(x) (orthonormal, last dim) when rotate, else x
    per group (granularity "token": each row over the last dim; "channel": each column over the rows),
    in float32:
      asymmetric  hi = max(y) * clip, lo = min(y) * clip, scale = (hi - lo) / (2^bits - 1),
                  zero = round(-lo / scale), q = clamp(round(y / scale) + zero, 0, 2^bits - 1),
                  out = (q - zero) * scale
      symmetric   scale = max|y| * clip / (2^(bits-1) - 1), q = clamp(round(y / scale), -2^(bits-1),
                  2^(bits-1) - 1), out = q * scale
    asymmetric, a constant group (clipped hi == lo) is not clipped: lo, hi = its min and max, scale =
    max(|hi|, |lo|) / (2^bits - 1), zero = round(-lo / scale), which give the constant back for any
    clip_ratio and sign to within the rounding of scale (1 ulp; exactly for values such as 2.5 whose
    division by 2^bits - 1 is exact), inside the clip range; an all-zero group takes scale 1.
    round() is round-half-to-even (torch.round).
quantize(y, ...) returns the (q, scale, zero) of these formulas (zero = 0 when symmetric); fake_quant
is computed from the same call (fusedtune.roste.export stores q as integer codes).
Backward (straight-through): dy passes unchanged (ste="identity") or only where y was inside the
clipping range [lo, hi] (ste="clipped"), then through the transpose of the rotation.
"""
from __future__ import annotations

import torch

from .hadamard import hadamard


def _group_minmax(y: torch.Tensor, granularity: str):
    dim = -1 if granularity == "token" else 0
    if y.shape[dim] == 0:   # a group of no elements (channels over 0 tokens): the all-zero group's rule
        z = y.sum(dim=dim, keepdim=True)
        return z, z
    return y.amin(dim=dim, keepdim=True), y.amax(dim=dim, keepdim=True)


def _quantize(y: torch.Tensor, bits: int, granularity: str, symmetric: bool, clip_ratio: float, mask: bool = True):
    """(q, scale, zero, inside) in float32: integer codes q (as floats), per-group scale and zero point
    (zero is 0 when symmetric) and the mask of values inside the clip range (None without mask)."""
    y = y.float()
    lo_u, hi_u = _group_minmax(y, granularity)
    clip = torch.tensor(clip_ratio, dtype=torch.float32)
    lo, hi = lo_u * clip, hi_u * clip
    one = torch.ones((), dtype=torch.float32, device=y.device)   # made there: torch.where takes no host value
    if symmetric:
        amax = torch.maximum(hi.abs(), lo.abs())
        qmax = 2 ** (bits - 1) - 1
        scale = amax / torch.full_like(amax, qmax)
        scale = torch.where(scale == 0, one, scale)
        q = torch.clamp(torch.round(y / scale), -qmax - 1, qmax)
        zero = torch.zeros_like(scale)
        inside = (y >= -amax) & (y <= amax) if mask else None
    else:
        levels = 2 ** bits - 1
        scale = (hi - lo) / torch.full_like(hi, levels)
        const = scale == 0                                                          # a constant group: unclipped
        lo, hi = torch.where(const, lo_u, lo), torch.where(const, hi_u, hi)
        flat = torch.maximum(hi.abs(), lo.abs()) / torch.full_like(hi, levels)
        scale = torch.where(const, torch.where(flat == 0, one, flat), scale)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(y / scale) + zero, 0, levels)
        inside = (y >= lo) & (y <= hi) if mask else None
    return q, scale, zero, inside


def quantize(y: torch.Tensor, bits: int, granularity: str = "token", symmetric: bool = False,
             clip_ratio: float = 1.0):
    """(q, scale, zero) in float32: the integer codes (held as floats; [0, 2^bits - 1] asymmetric,
    [-2^(bits-1), 2^(bits-1) - 1] symmetric) and the per-group scale and zero point (keepdim shapes:
    [rows, 1] for "token", [1, cols] for "channel"; zero is 0 when symmetric). fake_quant is
    (q - zero) * scale (q * scale when symmetric) of exactly these, so the two cannot diverge."""
    q, scale, zero, _ = _quantize(y, bits, granularity, symmetric, clip_ratio)
    return q, scale, zero


def fake_quant(y: torch.Tensor, bits: int, granularity: str, symmetric: bool, clip_ratio: float, mask: bool = True):
    """(out, inside) in float32: the fake-quantized y and the mask of values inside the clip range (None without
    mask: what the identity straight-through estimator needs)."""
    q, scale, zero, inside = _quantize(y, bits, granularity, symmetric, clip_ratio, mask)
    out = q * scale if symmetric else (q - zero) * scale
    return out, inside


def rotate_fake_quant(x: torch.Tensor, bits: int, granularity: str = "token", symmetric: bool = False,
                      clip_ratio: float = 1.0, rotate: bool = True):
    """(out in x's dtype, inside mask): see the module docstring. x is 2-D for "channel"."""
    y = hadamard(x) if rotate else x
    out, inside = fake_quant(y, bits, granularity, symmetric, clip_ratio)
    return out.to(x.dtype), inside


def ste_backward(dy: torch.Tensor, inside: torch.Tensor, rotate: bool, ste: str, inverse=None) -> torch.Tensor:
    """inverse(g): the transposed orthonormal rotation (default this module's hadamard; the op passes
    the same transform as a custom op, so that a compiled backward can trace it)."""
    g = dy.float()
    if ste == "clipped":
        g = torch.where(inside, g, torch.zeros((), dtype=torch.float32))
    if rotate:
        g = hadamard(g, transpose=True) if inverse is None else inverse(g)
    return g.to(dy.dtype)


# ---------------------------------------------------------------- integer GEMM of exported layers
# An exported layer (fusedtune.roste.QuantizedLinear) holds weight codes qw in [0, 2^w_bits - 1] with a
# per-channel scale sw and zero zw; the per-token activation codes qx, sx, zx come from quantize(). Then
#     y[m, n] = sx[m] * sw[n] * T[m, n] + bias[n],   T = sum_k (qx[m, k] - zx[m]) (qw[n, k] - zw[n])
# T is an integer; the kernels compute it on int8 tensor cores with centered codes c = q - 2^(bits-1)
# (int8 for every width up to 8) and fold the zero points into per-row and per-column terms (docs/roste.md).
# In float64 every term is exact for the codes' ranges, so (T * sx) * sw + bias, rounded to float32 and
# then to the output dtype, is what every backend returns bit for bit.

INT_MAX_K = 65536   # |c_x c_w| <= 2^14: the kernels' int32 accumulator is exact up to K = 2^17; a margin below


def act_codes(y: torch.Tensor, bits: int, clip_ratio: float):
    """Per-token asymmetric codes of y [M, K]: (cx int8 [M, K] = q - 2^(bits-1), sx float32 [M],
    zx float32 [M] = zero - 2^(bits-1), sumx int32 [M] = sum_k cx). A row with a NaN gets sx = NaN
    (its outputs are NaN, as fake quantization's) and codes 0."""
    q, scale, zero = quantize(y, bits, "token", False, clip_ratio)
    c = float(2 ** (bits - 1))
    bad = torch.isnan(q).any(-1, keepdim=True)
    cx = torch.where(bad, torch.zeros((), dtype=q.dtype), q - c).to(torch.int8)
    sx = torch.where(bad, torch.full((), float("nan")), scale)
    zx = torch.where(bad, torch.zeros((), dtype=zero.dtype), zero - c)
    return cx, sx.reshape(-1), zx.reshape(-1), cx.to(torch.int32).sum(-1, dtype=torch.int32)


def integer_linear(cx, sx, zx, cw, sw, zw, bias, out_dtype) -> torch.Tensor:
    """y = (T * sx) * sw + bias in float64 with T = (cx - zx) . (cw - zw)^T exact, rounded to float32 and
    then to out_dtype. cx int8 [M, K], sx, zx float32 [M]; cw int8 [N, K], sw, zw float32 [N] (centered
    codes and zero points as act_codes returns them)."""
    ux = cx.double() - zx.double()[:, None]
    uw = cw.double() - zw.double()[:, None]
    y = (ux @ uw.t()) * sx.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.float().to(out_dtype)
