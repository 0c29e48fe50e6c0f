"""Regrowth's selection ops (ops/sparse_delta_select.py), reference backend: against first principles
(a full sort), NaN/-inf/-0.0/ties/exclusion rules, SM3 against its formula, the seeded pick, opcheck,
bad inputs. The Triton kernels are held to these in test_sparse_delta_select_interp.py and on a GPU."""
import pytest
import torch

from fusedtune.ops.sparse_delta_select import _candidates_op, _sm3_op, regrow_candidates, sm3_update
from fusedtune.sparse_delta.regrow import pick, top_n


def brute_candidates(score: torch.Tensor, n: int, exclude: torch.Tensor):
    """Every valid position scoring at least the n-th best valid score, by sorting a Python list."""
    s = score.reshape(-1).tolist()
    ex = set(exclude.tolist())
    valid = [(v, p) for p, v in enumerate(s) if p not in ex and v == v and v != float("-inf")]
    if not valid or n == 0:
        return [], []
    thr = sorted((v for v, _ in valid), reverse=True)[min(n, len(valid)) - 1]
    keep = sorted(p for v, p in valid if v >= thr)
    return keep, [0.0 if s[p] == 0 else s[p] for p in keep]


def scores_with_edges(out, inp, kind, gen):
    if kind == "ties":
        s = torch.randint(-3, 4, (out, inp), generator=gen).float()
    else:
        s = torch.randn(out, inp, generator=gen)
    flat = s.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:4]] = float("nan")
    flat[1], flat[2], flat[3], flat[5] = float("-inf"), -0.0, float("inf"), 0.0
    return s


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("n", [0, 1, 17, 300, 10_000])
def test_candidates_equal_a_full_sort(kind, absolute, n):
    gen = torch.Generator().manual_seed(n + 7 * absolute)
    s = scores_with_edges(23, 41, kind, gen)
    ex = torch.randperm(s.numel(), generator=gen)[:90].sort().values.int()
    pos, vals = regrow_candidates(n, ex, scores=s, absolute=absolute)
    want_pos, want_vals = brute_candidates(s.abs() if absolute else s, n, ex)
    assert pos.dtype == torch.int64 and vals.dtype == torch.float32
    assert pos.tolist() == want_pos and vals.tolist() == want_vals
    assert not (vals.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any()   # -0.0 came back as 0.0
    if n and kind == "randn" and n < 300:
        assert len(want_pos) == n            # no ties: exactly the n best


def test_candidates_rowcol_equal_the_dense_minimum():
    gen = torch.Generator().manual_seed(3)
    row, col = torch.rand(29, generator=gen), torch.randint(0, 4, (37,), generator=gen).float()
    row[4], col[9] = float("nan"), float("nan")
    ex = torch.randperm(29 * 37, generator=gen)[:50].sort().values.int()
    for n in (1, 40, 500):
        pos, vals = regrow_candidates(n, ex, row=row, col=col)
        want = brute_candidates(torch.minimum(row[:, None], col[None, :]), n, ex)
        assert (pos.tolist(), vals.tolist()) == want
        assert not ((pos // 37) == 4).any() and not ((pos % 37) == 9).any()   # a NaN row or column: never


def test_pick_takes_all_above_and_a_seeded_draw_of_ties():
    s = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.5, 3.0, 9.0])
    picks = set()
    for seed in range(12):
        got = top_n(s, 4, torch.Generator().manual_seed(seed)).tolist()
        assert got == sorted(got) and {0, 7} <= set(got) and len(got) == 4 and set(got) <= {0, 2, 3, 4, 6, 7}
        picks.add(tuple(got))
        assert got == top_n(s, 4, torch.Generator().manual_seed(seed)).tolist()   # deterministic per seed
    assert len(picks) > 1                        # the ties are drawn, not always the first ones
    assert top_n(torch.tensor([float("nan"), 2.0, float("-inf")]), 3, torch.Generator()).tolist() == [1]
    assert pick(torch.empty(0, dtype=torch.int64), torch.empty(0), 3, torch.Generator()).numel() == 0


@pytest.mark.parametrize("out", [0, 3, 600])      # 600 rows: the reference's row chunks (256) meet
def test_sm3_update_equals_its_formula(out):
    gen = torch.Generator().manual_seed(out)
    g = torch.randn(out, 45, generator=gen)
    row, col = torch.rand(out, generator=gen), torch.rand(45, generator=gen)
    nu = torch.minimum(row[:, None], col[None, :]) + g.square()
    new_row, new_col = sm3_update(g, row, col)
    assert torch.equal(new_row, nu.amax(1)) and torch.equal(new_col, nu.amax(0) if out else torch.zeros(45))
    if out:
        g[1, 2] = float("nan")
        new_row, new_col = sm3_update(g, row, col)
        assert new_row[1].isnan() and new_col[2].isnan() and new_row.isnan().sum() == 1 == new_col.isnan().sum()


def test_sm3_scores_bound_the_summed_squares():
    """SM3-II's promise, which SpIEL-MA relies on: min(row[r], col[c]) >= the squared gradients summed."""
    gen = torch.Generator().manual_seed(1)
    row, col, total = torch.zeros(30), torch.zeros(20), torch.zeros(30, 20)
    for _ in range(4):
        g = torch.randn(30, 20, generator=gen)
        row, col = sm3_update(g, row, col)
        total += g.square()
    assert (torch.minimum(row[:, None], col[None, :]) >= total * (1 - 1e-6)).all()


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    s, ex = torch.randn(12, 9, generator=gen).reshape(-1), torch.tensor([3, 50], dtype=torch.int32)
    torch.library.opcheck(_candidates_op, (s, None, None, ex, 10, 1, s.numel(), "reference"))
    row, col = torch.rand(12, generator=gen), torch.rand(9, generator=gen)
    torch.library.opcheck(_candidates_op, (None, row, col, ex, 10, 2, 108, "reference"))
    torch.library.opcheck(_sm3_op, (torch.randn(12, 9, generator=gen), row, col, "reference"))


def test_bad_inputs():
    s, ex = torch.randn(40), torch.tensor([1, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="either scores, or both row and col"):
        regrow_candidates(3, ex)
    with pytest.raises(ValueError, match="either scores, or both row and col"):
        regrow_candidates(3, ex, scores=s, row=torch.rand(4), col=torch.rand(10))
    with pytest.raises(ValueError, match="either scores, or both row and col"):
        regrow_candidates(3, ex, row=torch.rand(4))
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        regrow_candidates(-1, ex, scores=s)
    with pytest.raises(ValueError, match="scores must be a float tensor"):
        regrow_candidates(3, ex, scores=torch.arange(40))
    with pytest.raises(ValueError, match="row must be a 1-D float32"):
        regrow_candidates(3, ex, row=torch.rand(4).double(), col=torch.rand(10))
    with pytest.raises(ValueError, match="absolute applies to scores"):
        regrow_candidates(3, ex, row=torch.rand(4), col=torch.rand(10), absolute=True)
    with pytest.raises(TypeError, match="indices must be a 1-D int32"):
        regrow_candidates(3, ex.long(), scores=s)
    with pytest.raises(ValueError, match="sorted"):
        regrow_candidates(3, ex.flip(0), scores=s)
    with pytest.raises(ValueError, match=r"lie in \[0, 40\)"):
        regrow_candidates(3, torch.tensor([1, 40], dtype=torch.int32), scores=s)
    with pytest.raises(ValueError, match="g must be a 2-D float32"):
        sm3_update(torch.randn(4, 5).half(), torch.rand(4), torch.rand(5))
    with pytest.raises(ValueError, match=r"col must be float32 of shape \(5,\)"):
        sm3_update(torch.randn(4, 5), torch.rand(4), torch.rand(6))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_sm3_update_of_an_empty_gradient_gives_zero_accumulators(shape):
    """Found by audit: a gradient with no columns failed in amax over an empty dim (no rows was handled)."""
    row, col = sm3_update(torch.randn(shape), torch.ones(shape[0]), torch.ones(shape[1]))
    assert torch.equal(row, torch.zeros(shape[0])) and torch.equal(col, torch.zeros(shape[1]))
