"""Sparse-delta benchmark, section 4 (python -m fusedtune bench sparse_delta): regrowth's selection.

On the Llama-3-8B shapes 4096x4096 and 14336x4096 (gate/up; the down_proj transpose has the same
count) at 1% density (k deltas), the fused Triton ops of fusedtune.ops.sparse_delta_select against
the PyTorch path that the Regrower ran before them (and that the reference backend still is), same
run, float32 scores:
  - "candidates |dW|" (SpIEL-AG's first window step: the c*k = k best |dW| outside the indices)
    vs |g| copy, -inf at the indices, valid count, torch.topk, then above/ties by two comparisons;
  - "grow from dense accumulator" (AG without candidates, at selection: n = 0.2k) vs the same
    torch path on the accumulator;
  - "grow from SM3 row/col" (SpIEL-MA at selection: n = 0.2k) vs min(row, col) made dense, then the
    torch path (the Regrower also made a dense copy score / steps: left out, so the baseline is kind);
  - "SM3 update" (MA, each window step) vs torch.minimum broadcast + g^2 + two amax.
Bytes: the one compulsory read of the dense float32 tensor (4 B per position; the SM3 selection has
none: its rows report the positions per second). roofline_pct is over that read. Both sides then run
the same seeded tie draw (not timed). --cpu runs only under TRITON_INTERPRET=1, on tiny shapes.
"""
from __future__ import annotations

import torch

from .core import hbm_share, roofline_pct, row

LLAMA3_8B_SHAPES = [("q/o_proj", 4096, 4096), ("gate/up_proj", 14336, 4096)]
TINY_SHAPES = [("q/o_proj", 64, 64), ("gate/up_proj", 176, 64)]
DENSITY, RATE = 0.01, 0.2


def torch_candidates(s: torch.Tensor, n: int, exclude: torch.Tensor, nan_pass: bool = True):
    """The Regrower's selection before the fused ops, on a dense score s that it may overwrite: NaN
    made -inf into a new tensor (at selection, not for the candidates), -inf at the indices, the
    valid count, torch.topk, then every position above and at the threshold."""
    if nan_pass:
        s = torch.nan_to_num(s, nan=float("-inf"))
    s[exclude] = float("-inf")
    n = min(n, int((s > float("-inf")).sum()))
    thr = torch.topk(s, n, sorted=False).values.min()
    return (s > thr).nonzero().flatten(), (s == thr).nonzero().flatten()


def torch_sm3(g, r, c):
    nu = torch.minimum(r[:, None], c[None, :]).add_(g.square())
    return torch.amax(nu, dim=1), torch.amax(nu, dim=0)


def bench_regrow(timer, quick: bool) -> list[dict]:
    from .. import backend as B
    from ..ops import sparse_delta_select as sel
    from .sparse_delta import make_indices

    dev = timer.device
    on_gpu = torch.device(dev).type == "cuda"
    ok, why = B.can_serve("triton", torch.device(dev), frozenset(sel._HAS))
    if not ok:
        print(f"sparse_delta bench: regrowth selection SKIPPED: {why}")
        return []
    shapes = LLAMA3_8B_SHAPES if on_gpu else TINY_SHAPES
    if quick and on_gpu:
        shapes = shapes[:1]
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, out_f, in_f in shapes:
        numel = out_f * in_f
        idx = make_indices(numel, DENSITY, dev)
        idx64 = idx.long()
        k = idx.numel()
        n = int(RATE * k)
        grad = torch.randn(out_f, in_f, device=dev, generator=g)
        acc = grad.abs() * 3
        r_acc, c_acc = torch.rand(out_f, device=dev, generator=g), torch.rand(in_f, device=dev, generator=g)
        where = f"{'llama3-8b' if on_gpu else 'tiny'} {label}: W {out_f}x{in_f}, density 1% (k={k})"
        cases = [
            (f"regrow candidates |dW| (c = k = {k})",
             lambda: sel.regrow_candidates(k, idx, scores=grad, absolute=True, backend="triton", check=False),
             lambda: torch_candidates(grad.abs().view(-1), k, idx64, nan_pass=False), 4 * numel),
            (f"regrow: grow from dense accumulator (n = {n})",
             lambda: sel.regrow_candidates(n, idx, scores=acc, backend="triton", check=False),
             lambda: torch_candidates(acc.view(-1), n, idx64), 4 * numel),
            (f"regrow: grow from SM3 row/col (n = {n})",
             lambda: sel.regrow_candidates(n, idx, row=r_acc, col=c_acc, backend="triton", check=False),
             lambda: torch_candidates(torch.minimum(r_acc[:, None], c_acc[None, :]).view(-1), n, idx64), 0),
            ("regrow: SM3 update (one window step)",
             lambda: sel.sm3_update(grad, r_acc, c_acc, backend="triton"),
             lambda: torch_sm3(grad, r_acc, c_acc), 4 * numel),
        ]
        for kernel, ours_fn, base_fn, nbytes in cases:
            base, ours = timer(base_fn), timer(ours_fn)
            per_s = numel / (ours[0] * 1e-3)
            note = f"{per_s / 1e9:.3g} G positions/s"
            if nbytes and on_gpu:
                note += f"; the dense read {hbm_share(ours[0], nbytes)}"
            if not on_gpu:
                note = "interpreter on the CPU: a framework check, not performance; " + note
            r = row(kernel, where, "fp32", "triton", "torch: dense score, -inf scatter, torch.topk, compare+nonzero"
                    if "SM3 update" not in kernel else "torch: minimum broadcast + g^2, two amax",
                    ours, base[0], roofline_pct(ours[0], nbytes) if nbytes else None, note=note)
            r.update(positions=numel, k=k, bytes_compulsory=nbytes)
            rows.append(r)
    return rows
