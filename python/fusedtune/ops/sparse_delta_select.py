"""Sparse-delta family ops of regrowth (fusedtune.sparse_delta.Regrower), backends reference (also
"cpu": the same torch ops) and triton.

    regrow_candidates(n, exclude, scores=None, absolute=False, row=None, col=None)
        -> (positions int64 sorted, scores float32): every valid position of a layer whose regrowth
        score is at least the n-th best valid score (the n best and all ties at that threshold; the
        caller breaks the ties). The score of flat position p = r * in + c is scores[p] (a dense
        accumulator), |scores[p]| (absolute=True: a dense gradient), or min(row[r], col[c]) (SM3
        accumulators, never made dense by the Triton kernel). Invalid: a position in `exclude` (the
        layer's sorted int32 indices), a NaN or -inf score. The Triton kernels select by radix
        histograms of the scores' keys and compact about n positions: no sort, no dense score copy.
    sm3_update(g, row, col) -> (row, col)   one SM3-II step of SpIEL-MA's row/column accumulators
        from a dense float32 gradient g [out, in], in one read of g (reference: chunks of rows).

Both backends return the same bits (NaN aside: its bits are not kept); the tie-break that follows is
seeded, so a selection is the same on every backend and device.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import sparse_delta as ref
from .sparse_delta import check_indices

_HAS = ("reference", "cpu", "triton")   # "cpu": the reference math (torch ops are this op's CPU kernel)
MAX_NUMEL = 2 ** 31 - 2 ** 16   # triton_kernels/sparse_delta_select.py (not imported here: it needs Triton)
_MODES = ref.REGROW_MODES


def _candidates_impl(scores: torch.Tensor | None, row: torch.Tensor | None, col: torch.Tensor | None,
                     exclude: torch.Tensor, n: int, mode: int, numel: int, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ..triton_kernels import sparse_delta_select as tk
        return tk.candidates(n, mode, scores, row, col, exclude, numel)
    return ref.regrow_candidates(n, _MODES[mode], scores, row, col, exclude)


_candidates_op = torch.library.custom_op("fusedtune::regrow_candidates", mutates_args=())(_candidates_impl)


@_candidates_op.register_fake
def _(scores, row, col, exclude, n, mode, numel, backend):
    m = torch.library.get_ctx().new_dynamic_size()
    return exclude.new_empty((m,), dtype=torch.int64), exclude.new_empty((m,), dtype=torch.float32)


def _float_vec(t, what: str, dev) -> torch.Tensor:
    if not torch.is_tensor(t) or t.dtype != torch.float32 or t.dim() != 1 or t.device != dev:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"regrow_candidates: {what} must be a 1-D float32 tensor on {dev}, got {got}")
    return t.contiguous()


def regrow_candidates(n: int, exclude: torch.Tensor, scores: torch.Tensor | None = None, absolute: bool = False,
                      row: torch.Tensor | None = None, col: torch.Tensor | None = None,
                      backend: str | None = None, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module doc. Give either `scores` (any float dtype, any shape: flat row-major positions)
    or `row` and `col` (float32 [out] and [in]). check=False skips the host check of `exclude`."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"regrow_candidates: n must be a non-negative int, got {n!r}")
    if (scores is None) == (row is None and col is None) or (scores is None and (row is None or col is None)):
        raise ValueError("regrow_candidates: give either scores, or both row and col")
    if scores is not None:
        if not torch.is_tensor(scores) or not scores.is_floating_point():
            raise ValueError(f"regrow_candidates: scores must be a float tensor, got "
                             f"{scores.dtype if torch.is_tensor(scores) else type(scores).__name__}")
        dev, numel, mode = scores.device, scores.numel(), 1 if absolute else 0
        scores = scores.reshape(-1).float().contiguous()
    else:
        if absolute:
            raise ValueError("regrow_candidates: absolute applies to scores, not to row/col accumulators")
        dev = row.device if torch.is_tensor(row) else torch.device("cpu")
        row, col = _float_vec(row, "row", dev), _float_vec(col, "col", dev)
        numel, mode = row.numel() * col.numel(), 2
    if not torch.is_tensor(exclude) or exclude.device != dev:
        raise ValueError(f"regrow_candidates: exclude must be a tensor on {dev} (the scores' device), got "
                         f"{exclude.device if torch.is_tensor(exclude) else type(exclude).__name__}")
    if check:
        check_indices(exclude, numel, "regrow_candidates")
    name = _backend.resolve("regrow_candidates", dev, _HAS, backend)
    if name == "triton" and numel >= MAX_NUMEL:
        raise ValueError(f"regrow_candidates: the Triton kernels index {numel} positions in 32 bits; at most "
                         f"{MAX_NUMEL - 1} (use backend='reference' for a larger weight)")
    with torch.no_grad():
        return _candidates_op(scores, row, col, exclude.contiguous(), n, mode, numel, name)


def _sm3_impl(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ..triton_kernels import sparse_delta_select as tk
        return tk.sm3_update(g, row, col)
    return ref.sm3_update(g, row, col)


_sm3_op = torch.library.custom_op("fusedtune::sm3_update", mutates_args=())(_sm3_impl)


@_sm3_op.register_fake
def _(g, row, col, backend):
    return torch.empty_like(row), torch.empty_like(col)


def sm3_update(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (row, col) SM3 accumulators after the dense float32 gradient g [out, in]."""
    if not torch.is_tensor(g) or g.dtype != torch.float32 or g.dim() != 2:
        raise ValueError(f"sm3_update: g must be a 2-D float32 tensor, got "
                         f"{g.dtype if torch.is_tensor(g) else type(g).__name__} "
                         f"{tuple(g.shape) if torch.is_tensor(g) else ''}")
    for what, t, size in (("row", row, g.shape[0]), ("col", col, g.shape[1])):
        if not torch.is_tensor(t) or t.dtype != torch.float32 or t.shape != (size,) or t.device != g.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"sm3_update: {what} must be float32 of shape ({size},) on {g.device}, got {got}")
    if g.numel() == 0:      # no rows or no columns: zero accumulators on every backend (the reference's rule)
        return torch.zeros_like(row), torch.zeros_like(col)
    name = _backend.resolve("sm3_update", g.device, _HAS, backend)
    with torch.no_grad():
        return _sm3_op(g.contiguous(), row.contiguous(), col.contiguous(), name)


def regrow_backend(device, backend: str | None = None) -> dict:
    """Which backends the regrowth ops take on `device` and why the others were not taken."""
    d = torch.device(device)
    return {op: _backend.explain(op, d, _HAS, backend) for op in ("regrow_candidates", "sm3_update")}
