"""Pure-PyTorch reference of the sparse-delta family: the specification.

Indices are flat row-major int32 positions r * in_features + c into a weight [out, in], sorted and
unique; deltas are float32.
sddmm: the delta gradient at the k indices, g[i] = sum_t dy[t, r_i] * x[t, c_i] (float32), which the
    kernels compute without a dense dW.
sparse_adamw_: AdamW on the deltas (the shared rule of reference/adamw.py), then the merged weight
    at each index is written as round(base + delta): the float32 delta stays the truth, so bf16
    rounding never loses an update, and writing base back reverts exactly. With per-element step
    counts (entries grown by regrowth), each entry's bias correction follows its own count.
"""
from __future__ import annotations

import torch

from .adamw import adamw_, own_bias

_CHUNK = 1 << 16


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    idx = indices.long()
    r, c = idx // x2.shape[1], idx % x2.shape[1]
    out = torch.empty(idx.numel(), dtype=torch.float32, device=x.device)
    for s in range(0, idx.numel(), _CHUNK):  # bounded memory: T x chunk products at a time
        e = s + _CHUNK
        out[s:e] = (dy2[:, r[s:e]].double() * x2[:, c[s:e]].double()).sum(0).float()
    return out


def sparse_adamw_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, c: dict, lr: float,
                  step: int) -> None:
    """steps[i]: None or the per-element step counts of tensor i (int32, incremented here); an entry
    whose count differs from `step` takes its own bias corrections (reference/adamw.py own_bias)."""
    for val, g, m, v, w, base, idx, st in zip(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps):
        sbc2 = step_size = None
        if st is not None and st.numel():
            st.add_(1)
            own = st != step
            if bool(own.any()):
                o2, os_ = own_bias(c, lr, st)
                sbc2 = torch.where(own, o2, torch.full_like(o2, c["sbc2"]))
                step_size = torch.where(own, os_, torch.full_like(os_, c["step_size"]))
        nv = adamw_(val, g, m, v, c, sbc2, step_size)
        val.copy_(nv)
        merged = base.float() + nv
        w.view(-1).index_copy_(0, idx.long(), merged.to(w.dtype))


# ---------------------------------------------------------------------------------------- regrowth
REGROW_MODES = ("dense", "abs", "rowcol")


def regrow_scores(mode: str, scores: torch.Tensor | None, row: torch.Tensor | None,
                  col: torch.Tensor | None) -> torch.Tensor:
    """The dense float32 regrowth score of every position (flat, row-major): scores, |scores|, or
    min(row[r], col[c]) (NaN if either is NaN), with -0.0 made +0.0."""
    if mode == "rowcol":
        s = torch.minimum(row[:, None], col[None, :]).reshape(-1)
    else:
        s = scores.reshape(-1).float()
        s = s.abs() if mode == "abs" else s.clone()
    return s.masked_fill_(s == 0, 0.0)


def regrow_candidates(n: int, mode: str, scores, row, col, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions int64 sorted, scores float32) of every valid position whose score is at least the
    n-th best valid score: the n best and all ties at that threshold. Valid: not in `exclude`, and a
    score that is not NaN or -inf. Fewer than n valid positions: all of them."""
    s = regrow_scores(mode, scores, row, col)
    s[exclude.long()] = float("-inf")
    s.masked_fill_(torch.isnan(s), float("-inf"))
    n = min(n, int((s > float("-inf")).sum()))
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=s.device), torch.empty(0, dtype=torch.float32, device=s.device)
    thr = torch.topk(s, n, sorted=False).values.min()
    pos = (s >= thr).nonzero().flatten()
    return pos, s[pos]


def sm3_update(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SM3-II on a dense gradient g [out, in]: nu = min(row[r], col[c]) + g[r, c]^2 (two roundings);
    the new row is max over c of nu, the new col max over r (NaN propagates). Rows in chunks: bounded
    memory. An empty g (no rows or no columns): zero accumulators (a max over nothing)."""
    if g.numel() == 0:
        return torch.zeros_like(row), torch.zeros_like(col)
    new_row = torch.empty_like(row)
    new_col = torch.full_like(col, float("-inf"))
    for r0 in range(0, g.shape[0], 256):
        gg = g[r0:r0 + 256].float()
        nu = torch.minimum(row[r0:r0 + 256, None], col[None, :]).add_(gg * gg)
        torch.amax(nu, dim=1, out=new_row[r0:r0 + 256])
        new_col = torch.maximum(new_col, torch.amax(nu, dim=0))
    return new_row, new_col
