"""Regrowth's Triton kernels (triton_kernels/sparse_delta_select.py) in the interpreter: the radix
selection and the SM3 update return the reference's bits, at every histogram level, and a Regrower
that runs them selects what the reference selects."""
import functools

import pytest
import torch

from fusedtune.ops import sparse_delta_select as ops
from fusedtune.optim import SparseDeltaAdamW
from fusedtune.sparse_delta import Regrower
from fusedtune.sparse_delta import regrow as regrow_mod
from fusedtune.triton_kernels import sparse_delta_select as tk
from fusedtune.testing import assert_same_bits
from test_sparse_delta_regrow import Net, batches, layers, train
from test_sparse_delta_select import scores_with_edges

pytestmark = pytest.mark.interp


def _nan_as_7(t):
    return t.nan_to_num(7.5)   # NaN's bits are not kept: compare NaN positions, not payloads


@pytest.fixture
def levels(monkeypatch):
    """Records the histogram level (1 to len(LEVEL_BINS)) of every histogram launch."""
    seen = []
    kernel = tk.select_hist_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["LEVEL"] + 1)
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(tk, "select_hist_kernel", Spy())
    return seen


@pytest.mark.parametrize("slack,deepest", [(1 << 16, 1), (0, len(tk.LEVEL_BINS))])  # slack 0: ties go to the last
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("absolute", [False, True])
def test_candidates_match_reference(monkeypatch, levels, slack, deepest, kind, absolute):
    monkeypatch.setattr(tk, "KEEP_SLACK", slack)
    gen = torch.Generator().manual_seed(5 + absolute)
    s = scores_with_edges(37, 53, kind, gen)
    ex = torch.randperm(s.numel(), generator=gen)[:200].sort().values.int()
    for n in (1, 60, 700, 5000):
        got = ops.regrow_candidates(n, ex, scores=s, absolute=absolute, backend="triton")
        want = ops.regrow_candidates(n, ex, scores=s, absolute=absolute, backend="reference")
        assert torch.equal(got[0], want[0]), n
        assert_same_bits(got[1], want[1], f"scores n={n}")
    if kind == "ties":    # integer scores: the threshold's bin holds many; slack 0 resolves it bit by bit
        assert max(levels) == deepest


@pytest.mark.parametrize("slack", [1 << 16, 0])
def test_candidates_rowcol_match_reference(monkeypatch, slack):
    monkeypatch.setattr(tk, "KEEP_SLACK", slack)
    gen = torch.Generator().manual_seed(2)
    row, col = torch.rand(41, generator=gen), torch.randint(0, 5, (67,), generator=gen).float() * 0.1
    row[7], col[3] = float("nan"), float("nan")
    ex = torch.randperm(41 * 67, generator=gen)[:150].sort().values.int()
    for n in (1, 90, 1000):
        got = ops.regrow_candidates(n, ex, row=row, col=col, backend="triton")
        want = ops.regrow_candidates(n, ex, row=row, col=col, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), n


def test_candidates_fewer_valid_than_asked():
    s = torch.full((50,), float("nan"))
    s[[4, 9, 30]] = torch.tensor([1.0, -2.0, 0.5])
    ex = torch.tensor([9], dtype=torch.int32)
    got = ops.regrow_candidates(10, ex, scores=s, backend="triton")
    assert got[0].tolist() == [4, 30] and got[1].tolist() == [1.0, 0.5]
    assert ops.regrow_candidates(10, ex, scores=torch.full((50,), float("-inf")), backend="triton")[0].numel() == 0


@pytest.mark.parametrize("shape", [(1, 1), (37, 300), (70, 45)])
def test_sm3_update_matches_reference(shape):
    gen = torch.Generator().manual_seed(shape[0])
    g = torch.randn(*shape, generator=gen) * 3
    row, col = torch.rand(shape[0], generator=gen), torch.rand(shape[1], generator=gen)
    g.view(-1)[0] = float("nan")
    got = ops.sm3_update(g, row, col, backend="triton")
    want = ops.sm3_update(g, row, col, backend="reference")
    assert_same_bits([_nan_as_7(t) for t in got], [_nan_as_7(t) for t in want], "sm3")


@pytest.mark.parametrize("variant,candidates", [("ag", 1.0), ("ag", None), ("ma", None)])
def test_regrower_on_triton_selects_as_reference(monkeypatch, variant, candidates):
    def run(backend):
        if backend:
            monkeypatch.setattr(regrow_mod, "regrow_candidates",
                                functools.partial(ops.regrow_candidates, backend=backend))
            monkeypatch.setattr(regrow_mod, "sm3_update", functools.partial(ops.sm3_update, backend=backend))
        net = Net(density=0.3)
        opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
        rg = Regrower(net, opt, every=3, rate=0.5, decay="constant", variant=variant, accumulate_steps=2,
                      candidates=candidates, seed_moments="grad")
        train(net, opt, rg, batches(6))
        monkeypatch.undo()
        return [t for lay in layers(net).values()
                for t in (lay.indices, lay.values.detach(), opt.state[lay.values]["exp_avg_sq"])]
    ref = run(None)
    assert_same_bits(run("triton"), ref, f"{variant} regrowth, triton vs reference")


def test_bench_section_runs():
    """bench sparse_delta's regrowth section, run on tiny shapes through the interpreter: a framework
    check (rows, accounting), not performance."""
    from fusedtune.bench.core import CpuTimer
    from fusedtune.bench.sparse_delta_regrow import bench_regrow
    rows = bench_regrow(CpuTimer(quick=True, min_reps=1, budget_s=0.0), quick=True)
    assert len(rows) == 8 and {r["backend"] for r in rows} == {"triton"}
    for r in rows:
        assert r["time_ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] == r["baseline_ms"] / r["time_ms"]
        assert r["positions"] in (64 * 64, 176 * 64) and r["k"] == round(0.01 * r["positions"])
        assert r["bytes_compulsory"] == (0 if "SM3 row/col" in r["kernel"] else 4 * r["positions"])


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 1000, 4099])
def test_exclusion_bits_set_exactly_the_indices(numel):
    """The bitmask kernel: bit p % 32 of word p // 32 set for every index p (bit 31 and the last word among
    them), nothing else; int64 or strided indices are taken as int32."""
    gen = torch.Generator().manual_seed(numel)
    idx = torch.randperm(numel, generator=gen)[: max(1, numel // 3)].sort().values
    idx = torch.unique(torch.cat([idx, torch.tensor([numel - 1, min(31, numel - 1)])]))
    words = tk.exclusion_bits(idx, numel)
    assert words.dtype == torch.int32 and words.numel() == (numel + 31) // 32 + 1
    bits = ((words.long()[:, None] >> torch.arange(32)) & 1).flatten()
    want = torch.zeros_like(bits)
    want[idx] = 1
    assert torch.equal(bits, want)
    strided = torch.stack([idx.int(), idx.int()], 1)[:, 0]
    assert strided.stride(0) == 2 and torch.equal(tk.exclusion_bits(strided, numel), words)
    assert tk.exclusion_bits(idx[:0], numel).eq(0).all()
    bad = torch.cat([idx, torch.tensor([-1, numel, 32 * words.numel() + 5])])    # outside: no write anywhere
    assert torch.equal(tk.exclusion_bits(bad, numel), words)
