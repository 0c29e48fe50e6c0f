"""LoRA family ops (docs/lora.md; the math is python/fusedtune/reference/lora.py).

    lora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=None)
        y = x W^T + scale * (dropout(x) A^T) B^T + bias, with autograd (dX, dA, dB; dW and dbias
        only when they require grad). One adapter.
    lora_linear_multi(x, weight, adapters, adapter_index=None, bias=None, dropout_p=0.0, seed=None)
        several adapters [(A, B, scale), ...] of any ranks: every row uses the adapter that
        adapter_index names (-1: none; one index per row, or per sequence of a [batch, seq, in] x),
        or, with adapter_index None, the sum of all of them (peft's several active adapters).
    lora_linear_grouped(x, weight, A, B, scale_table, row_group=None, ...)
        the general form both build on: A [R, K] and B [N, R] stacked along the rank, and a float32
        scale table [G, R] giving each row group's factor for each rank column.

Dropout (on the LoRA branch only) is regenerated from a seed instead of a stored mask. The seed is a
host value passed to the kernels (seed=None: drawn per call from torch's CPU generator), so a CUDA graph
captures it as a constant and every replay draws the same mask: under graph replay, train with dropout
0 or capture anew when the mask should change.

The weight may be a bitsandbytes NF4 weight (nf4=Nf4Weight.from_bnb(...)): it is dequantized inside
the GEMM's tile load when there are few rows (nf4_path "fused") and into a 16-bit buffer followed by
the GEMM otherwise ("buffer"); see nf4_path().
"""
from __future__ import annotations

import math

import torch

from .. import _autocast
from .. import backend as _backend
from ..reference import lora as ref
from ..reference import nf4 as nf4_ref
from ._eager import EagerOp
from ._linear import check_one_device, values_readable

_HAS = ("reference", "cpu", "triton")   # "cpu": torch's CPU GEMMs on the reference math
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_REF_FLOATS = _FLOATS + (torch.float64,)   # the reference also runs float64 (gradcheck)
_NO_SEED = torch.zeros((), dtype=torch.int64)   # the seed of calls without dropout (read only, shared)
# in-GEMM NF4 dequant up to this many rows; a dequantized buffer above. 0: the buffer everywhere. On an H200
# (bench/results/h200_2026-11-30.md) a 16-token gate/up forward+backward took 1.37 ms in-GEMM against 1.47 ms
# with the buffer in the second run and 1.52 against 0.96 ms in the third (p20 1.38 / 0.89): both host-bound;
# the buffer lost by 7% in one run and won by 37% in the other. 53 vs 1.6 ms at 4096.
# The bench times both schedules at every token count.
NF4_FUSED_MAX_ROWS = 0


class LoRAUnsupported(NotImplementedError):
    """A peft LoRA feature that the fused op or layer does not implement."""


def _impl(backend: str):
    if backend == "triton":
        from . import lora_triton
        return lora_triton
    return None


def _seed_value(seed: torch.Tensor) -> int:
    """The seed tensor's value; the shared no-dropout seed without a .item() call (a dispatcher op a call)."""
    return 0 if seed is _NO_SEED else int(seed)


def _nf4_dict(q, x, B, absmax, code, absmax2, code2, blocksize, blocksize2, offset) -> dict | None:
    if blocksize == 0:
        return None
    return nf4_ref.nf4_state(q, absmax, code, absmax2, code2, blocksize, blocksize2, offset,
                             (B.shape[0], x.shape[1]))


def _lora_impl(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               bias: torch.Tensor | None, scales: torch.Tensor, row_group: torch.Tensor | None, dropout_p: float,
               seed: torch.Tensor, nf4_absmax: torch.Tensor | None, nf4_code: torch.Tensor | None,
               nf4_absmax2: torch.Tensor | None, nf4_code2: torch.Tensor | None, nf4_blocksize: int,
               nf4_blocksize2: int, nf4_offset: float, nf4_path: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: the dense [N, K] weight, or the packed NF4 bytes when nf4_blocksize > 0. x: [..., K] (contiguous);
    y [..., N], t [rows, R] (the rows of x flattened)."""
    if x.dim() != 2:      # flattened here, inside the op: a reshape outside is an autograd node each way
        y, t = _lora_impl(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, lora_A, lora_B, bias, scales,
                          row_group, dropout_p, seed, nf4_absmax, nf4_code, nf4_absmax2, nf4_code2, nf4_blocksize,
                          nf4_blocksize2, nf4_offset, nf4_path, backend)
        # detached: autograd forbids in-place changes (relu_ on the output, in-place forward hooks) to a view made
        # inside an autograd Function; a detached one is not tracked as such (tests/test_lora_ops.py)
        return y.reshape(*x.shape[:-1], y.shape[-1]).detach(), t
    nf4 = _nf4_dict(weight, x, lora_B, nf4_absmax, nf4_code, nf4_absmax2, nf4_code2, nf4_blocksize,
                    nf4_blocksize2, nf4_offset)
    k = _impl(backend)
    if k is not None:
        return k.forward(x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, _seed_value(seed), nf4,
                         nf4_path)
    w = weight if nf4 is None else nf4_ref.dequantize(nf4, x.dtype)
    return ref.forward(x, w, lora_A, lora_B, bias, scales, row_group, dropout_p, _seed_value(seed))


_lora_op = torch.library.custom_op("fusedtune::lora_linear", mutates_args=())(_lora_impl)


@_lora_op.register_fake
def _(x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, seed, *nf4_and_backend):
    return (x.new_empty((*x.shape[:-1], lora_B.shape[0])),
            x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=ref.compute_dtype(x)))


def _lora_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, t: torch.Tensor, scales: torch.Tensor, row_group: torch.Tensor | None,
                   dropout_p: float, seed: torch.Tensor, nf4_absmax: torch.Tensor | None, nf4_code: torch.Tensor | None,
                   nf4_absmax2: torch.Tensor | None, nf4_code2: torch.Tensor | None, nf4_blocksize: int,
                   nf4_blocksize2: int, nf4_offset: float, nf4_path: str, need: list[bool],
                   backend: str,
                   dy_base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy_base: what the base's dX GEMM reads in dy's place (DoRA: dy * g rounded to x's dtype, while u, dA and
    dB take the float32 dy), or None: dy."""
    nf4 = _nf4_dict(weight, x, lora_B, nf4_absmax, nf4_code, nf4_absmax2, nf4_code2, nf4_blocksize,
                    nf4_blocksize2, nf4_offset)
    k = _impl(backend)
    if k is not None:
        dx, dA, dB = k.backward(dy, x, weight, lora_A, lora_B, t, scales, row_group, dropout_p, _seed_value(seed), nf4,
                                nf4_path, *need, dy_base=dy_base)
    else:
        w = weight if nf4 is None else nf4_ref.dequantize(nf4, x.dtype)
        dx, dA, dB = ref.backward(dy, x, w, lora_A, lora_B, t, scales, row_group, dropout_p, _seed_value(seed), *need,
                                  dy_base=dy_base)
    def none(dtype):   # a fresh empty tensor per unneeded gradient: outputs of a custom op may not alias
        return x.new_empty(0, dtype=dtype)
    f32 = ref.compute_dtype(x)
    return (none(x.dtype) if dx is None else dx), (none(f32) if dA is None else dA), (none(f32) if dB is None else dB)


_lora_bwd_op = torch.library.custom_op("fusedtune::lora_linear_backward", mutates_args=())(_lora_bwd_impl)
_lora_bwd = EagerOp(_lora_bwd_op, _lora_bwd_impl)


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scales, row_group, dropout_p, seed, absmax, code, absmax2, code2, bs, bs2,
      offset, path, need, backend, dy_base=None):
    R = lora_A.shape[0]
    f32 = ref.compute_dtype(x)
    return (x.new_empty(x.shape) if need[0] else x.new_empty(0),
            x.new_empty((R, x.shape[1]), dtype=f32) if need[1] else x.new_empty(0, dtype=f32),
            x.new_empty((dy.shape[1], R), dtype=f32) if need[2] else x.new_empty(0, dtype=f32))


def _setup(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scales, row_group, dropout_p, seed, *nf4 = inputs
    absmax, code, absmax2, code2, bs, bs2, offset, path, backend = nf4
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scales, row_group, seed, absmax, code, absmax2, code2)
    ctx.args = (dropout_p, bs, bs2, offset, path, backend, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zeros for t's gradient (t is not differentiable) on every backward


def _backward(ctx, dy, _dt):
    if dy is None:    # y reached no loss (grads are not materialized)
        return (None,) * 18
    x, weight, lora_A, lora_B, t, scales, row_group, seed, absmax, code, absmax2, code2 = ctx.saved_tensors
    dropout_p, bs, bs2, offset, path, backend, bias_dtype = ctx.args
    g = ctx.needs_input_grad
    need = [bool(g[0]), bool(g[2]), bool(g[3])]
    x_shape = x.shape
    if x.dim() != 2:      # the op took x [..., K] and gave y [..., N]: the kernels take them flattened (t's rows)
        x, dy = x.reshape(t.shape[0], x.shape[-1]), dy.reshape(t.shape[0], dy.shape[-1])
    dy = dy.contiguous()
    dx = dA = dB = dW = db = None
    if any(need):
        dx, dA, dB = _lora_bwd(dy, x, weight, lora_A, lora_B, t, scales, row_group, dropout_p, seed, absmax, code,
                               absmax2, code2, bs, bs2, offset, path, need, backend, None)
        dx = (dx if dx.shape == x_shape else dx.reshape(x_shape)) if need[0] else None
        dA = (dA if dA.dtype == lora_A.dtype else dA.to(lora_A.dtype)) if need[1] else None
        dB = (dB if dB.dtype == lora_B.dtype else dB.to(lora_B.dtype)) if need[2] else None
    if g[1]:   # the base trains (dense weight only): dW = dy^T x
        ct = ref.compute_dtype(x)
        dW = (dy.t().to(ct) @ x.to(ct)).to(weight.dtype)
    if bias_dtype is not None and g[4]:
        db = dy.to(ref.compute_dtype(x)).sum(0).to(bias_dtype)
    return (dx, dW, dA, dB, db) + (None,) * 13


torch.library.register_autograd("fusedtune::lora_linear", _backward, setup_context=_setup)
_lora = EagerOp(_lora_op, _lora_impl, _setup, _backward)   # the op, called directly in plain eager mode


# ----------------------------------------------------------------------------------------- public API

def _seed_tensor(seed, dropout_p: float) -> torch.Tensor:
    if seed is None:
        if dropout_p > 0.0:   # drawn from torch's CPU generator: reproducible under torch.manual_seed
            return torch.randint(0, 2**62, (), dtype=torch.int64)
        if not torch.compiler.is_compiling() and \
                torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return torch.zeros((), dtype=torch.int64)   # a strict FakeTensorMode takes no real tensor
        return _NO_SEED
    if torch.is_tensor(seed):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"lora: seed must be an int or a one-element integer tensor, got {seed.dtype} "
                            f"{tuple(seed.shape)}")
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    return torch.tensor(int(seed) % 2**64 - (2**64 if int(seed) % 2**64 >= 2**63 else 0), dtype=torch.int64)


def _check(x, weight, A, B, bias, scale_table, row_group, dropout_p, nf4):
    if not torch.is_tensor(x) or x.dtype not in _REF_FLOATS:
        raise TypeError(f"lora: x must be a float32/bfloat16/float16 tensor (float64: reference only), got "
                        f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("lora: x must have at least one dimension (the features)")
    if nf4 is None:
        if weight.dim() != 2:
            raise ValueError(f"lora: weight must be 2-D [out, in], got {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"lora: x is {x.dtype} but the base weight is {weight.dtype}; cast x (autocast is not "
                            "applied inside the fused op)")
        N, K = weight.shape
    else:
        N, K = nf4.shape
    if x.shape[-1] != K:
        raise ValueError(f"lora: x has {x.shape[-1]} features, the base weight expects {K}")
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lora: lora_A must be [r, {K}], got {tuple(A.shape)}")
    R = A.shape[0]
    if B.dim() != 2 or B.shape != (N, R):
        raise ValueError(f"lora: lora_B must be [{N}, {R}] (out_features, r), got {tuple(B.shape)}")
    for name, v in (("lora_A", A), ("lora_B", B)):
        if v.dtype not in _REF_FLOATS:
            raise TypeError(f"lora: {name} must be a float tensor, got {v.dtype}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in _REF_FLOATS):
        raise ValueError(f"lora: bias must be a float tensor of shape [{N}], got {bias.dtype} {tuple(bias.shape)}")
    if scale_table.dim() != 2 or scale_table.shape[1] != R or scale_table.dtype != torch.float32:
        raise ValueError(f"lora: the scale table must be float32 [groups, {R}], got {scale_table.dtype} "
                         f"{tuple(scale_table.shape)}")
    check_one_device("lora", x, A, B, scale_table, weight if nf4 is None else nf4.q, bias, row_group)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return N, K


def nf4_path(M: int, nf4) -> str:
    """Which NF4 schedule a call with M rows takes: 'fused' (dequantized in the GEMM's tile load; weight
    traffic 0.5 byte/element) for 0 < M <= NF4_FUSED_MAX_ROWS, else 'buffer' (dequantize once into a 16-bit
    buffer, then the GEMM: the dequant cost is amortized over many rows)."""
    if nf4 is None:
        return ""
    return "fused" if 0 < M <= NF4_FUSED_MAX_ROWS else "buffer"


def lora_linear_grouped(x, weight, lora_A, lora_B, scale_table, row_group=None, bias=None, dropout_p=0.0,
                        seed=None, nf4=None, backend: str | None = None, check_groups: bool = True) -> torch.Tensor:
    """The general fused LoRA linear (module docstring). weight is ignored (may be None) when nf4 is given.
    row_group: int32 [M] (M = rows of x flattened to 2-D) with values in [-1, groups), or None;
    check_groups=False skips the range check of its values (a host sync; callers that built it on the
    host and checked it there). Under autocast it runs as autocast runs F.linear: x, weight and bias in the
    autocast dtype, the output in it (autocast would otherwise reach inside the op on some backends only)."""
    dt = _autocast.linear_dtype(x.device)
    if dt is not None:
        x, weight, bias = _autocast.cast(dt, x, weight, bias)
        with _autocast.off(x.device):
            return lora_linear_grouped(x, weight, lora_A, lora_B, scale_table, row_group, bias, dropout_p, seed,
                                       nf4, backend, check_groups)
    args = _op_args(x, weight, lora_A, lora_B, scale_table, row_group, bias, dropout_p, seed, nf4, backend,
                    check_groups, flatten=False)
    return _lora(*args)[0]


def _op_args(x, weight, lora_A, lora_B, scale_table, row_group, bias, dropout_p, seed, nf4, backend,
             check_groups: bool = True, flatten: bool = True) -> tuple:
    """The checked arguments of _lora_op: x flattened to 2-D row-major, or (flatten False) x [..., K] made
    contiguous, which the op flattens inside."""
    if weight is None and nf4 is None:
        raise ValueError("lora: weight is None and no nf4 weight was given")
    N, K = _check(x, weight, lora_A, lora_B, bias, scale_table, row_group, dropout_p, nf4)
    if flatten or x.dim() == 2:
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != K):
            x2 = x2.contiguous()
        M = x2.shape[0]
    else:
        x2 = x if x.is_contiguous() else x.contiguous()
        M = math.prod(x.shape[:-1])
    if row_group is not None:
        if row_group.shape != (M,):
            raise ValueError(f"lora: row_group must have one entry per row ({M}), got {tuple(row_group.shape)}")
        row_group = row_group.to(torch.int32).contiguous()
        if check_groups and M and values_readable(row_group):
            lo, hi = int(row_group.min()), int(row_group.max())
            if lo < -1 or hi >= scale_table.shape[0]:
                raise ValueError(f"lora: row_group values must lie in [-1, {scale_table.shape[0]}), got [{lo}, {hi}]")
    scale_table = scale_table.contiguous()
    name = _backend.resolve("lora_linear", x.device, _HAS, backend)
    if name == "triton" and any(t.dtype == torch.float64 for t in (x, lora_A, lora_B)):
        raise TypeError("lora: the Triton kernels take float32/bfloat16/float16 tensors, not float64 (float64 runs "
                        "on backend='reference')")
    nf4_args = (None, None, None, None, 0, 0, 0.0) if nf4 is None else nf4.op_args()
    w = weight if nf4 is None else nf4.q
    return (x2, w, lora_A.contiguous(), lora_B.contiguous(), bias, scale_table, row_group, float(dropout_p),
            _seed_tensor(seed, float(dropout_p)), *nf4_args, nf4_path(M, nf4), name)


def lora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=None, nf4=None,
                backend: str | None = None) -> torch.Tensor:
    """y = x W^T + scale * (dropout(x) A^T) B^T + bias (one adapter; module docstring)."""
    if torch.is_tensor(scale):
        if scale.numel() != 1 or scale.requires_grad:
            raise ValueError(f"lora: a tensor scale must be one number that needs no gradient (the op gives "
                             f"none), got shape {tuple(scale.shape)}, requires_grad={scale.requires_grad}")
        S = scale.to(device=x.device, dtype=torch.float32).reshape(1, 1).expand(1, lora_A.shape[0]).contiguous()
    else:
        S = scale_table([lora_A.shape[0]], [scale], x.device)
    return lora_linear_grouped(x, weight, lora_A, lora_B, S, None, bias, dropout_p, seed, nf4, backend)


def scale_table(ranks: list[int], scales: list[float], device) -> torch.Tensor:
    """float32 [n, sum(ranks)]: row a holds adapter a's scale on its own rank columns, 0 elsewhere. Built
    on the device by fills (no host-to-device copy: no synchronization per call, capturable in a CUDA
    graph)."""
    if len(ranks) == 1:
        return torch.full((1, ranks[0]), float(scales[0]), dtype=torch.float32, device=device)
    S = torch.zeros((len(ranks), sum(ranks)), dtype=torch.float32, device=device)
    lo = 0
    for i, (r, s) in enumerate(zip(ranks, scales)):
        S[i, lo:lo + r] = float(s)
        lo += r
    return S


def stack_adapters(adapters, device):
    """[(A, B, scale), ...] -> (A [R, K], B [N, R], scale table [n, R]) stacked along the rank."""
    if not adapters:
        raise ValueError("lora: no adapters given")
    A = adapters[0][0] if len(adapters) == 1 else torch.cat([a[0] for a in adapters], 0)
    B = adapters[0][1] if len(adapters) == 1 else torch.cat([a[1] for a in adapters], 1)
    return A, B, scale_table([a[0].shape[0] for a in adapters], [a[2] for a in adapters], device)


def lora_linear_multi(x, weight, adapters, adapter_index=None, bias=None, dropout_p=0.0, seed=None, nf4=None,
                      backend: str | None = None) -> torch.Tensor:
    """Several adapters in one call (module docstring). adapter_index: per row of x flattened to 2-D, or
    per sequence (x [batch, seq, in], adapter_index [batch]); -1 = no adapter."""
    A, B, S = stack_adapters(list(adapters), x.device)
    if adapter_index is None:
        if len(S) > 1 and float(dropout_p) > 0.0:
            raise LoRAUnsupported("lora_linear_multi: several summed adapters with dropout: peft draws an independent "
                                  "mask per adapter, one fused call draws one; call once per adapter or use dropout 0")
        table, gid = S.sum(0, keepdim=True), None
    else:
        idx = torch.as_tensor(adapter_index, device=x.device).reshape(-1)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"lora: adapter_index must be integers (an adapter number or -1 per row/sequence), "
                            f"got {idx.dtype}")
        rows = math.prod(x.shape[:-1])
        if idx.numel() != rows:
            per = rows // max(idx.numel(), 1)
            if x.dim() < 3 or idx.numel() != x.shape[0]:
                raise ValueError(f"lora: adapter_index must have one entry per row ({rows}) or per sequence "
                                 f"(x.shape[0]={x.shape[0] if x.dim() else 0}), got {idx.numel()}")
            idx = idx.repeat_interleave(per)
        if idx.numel() and values_readable(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -1 or hi >= len(S):
                raise ValueError(f"lora: adapter_index values must lie in [-1, {len(S)}), got [{lo}, {hi}]")
        table, gid = S, idx.to(torch.int32)
    return lora_linear_grouped(x, weight, A, B, table, gid, bias, dropout_p, seed, nf4, backend, check_groups=False)


def lora_backend(device, backend: str | None = None) -> dict:
    """Which backend the LoRA op takes on `device`, and why the others were not taken."""
    return _backend.explain("lora_linear", torch.device(device), _HAS, backend)
