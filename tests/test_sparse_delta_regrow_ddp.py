"""Regrowth under DistributedDataParallel (two CPU processes, gloo): each rank trains on its own batch,
the dense gradients of window steps are averaged over the ranks before they are scored, so both ranks
select the same positions and hold the same deltas, and those equal a single process's on both batches.
Without the reduction (process_group=None) the ranks select differently: the reduction is what agrees."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fusedtune.nn import SparseDeltaLinear
from fusedtune.optim import SparseDeltaAdamW
from fusedtune.sparse_delta import Regrower
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS, EVERY = 6, 3         # selections at steps 3 and 6; dense gradients on steps 2, 3, 5, 6


def _net():
    g = torch.Generator().manual_seed(0)
    lins = [nn.Linear(12, 16), nn.Linear(16, 5)]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.4)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return nn.Sequential(SparseDeltaLinear.from_linear(lins[0], density=0.1, seed=1), nn.Tanh(),
                         SparseDeltaLinear.from_linear(lins[1], density=0.1, seed=2))


def _batch(rank, t):
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(6, 12, generator=g), torch.randn(6, 5, generator=g)


def _train(net, run, variant, process_group, rank=None):
    """STEPS steps on rank `rank`'s batches (None: both ranks' batches in one); the layers' final state."""
    opt = SparseDeltaAdamW(net.parameters(), lr=2e-2)
    rg = Regrower(net, opt, every=EVERY, rate=0.3, decay="constant", variant=variant, accumulate_steps=2,
                  process_group=dist.group.WORLD if process_group == "world" else process_group)
    copy_error = None
    if process_group == "world":
        try:
            copy.deepcopy(rg)
        except TypeError as e:
            copy_error = str(e)
    for t in range(1, STEPS + 1):
        parts = [_batch(r, t) for r in ((0, 1) if rank is None else (rank,))]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        opt.zero_grad(set_to_none=True)
        (run(x) - y).square().mean().backward()
        opt.step()
        rg.step()
    sparse = [net[0], net[2]]
    return {"indices": [m.indices.clone() for m in sparse], "values": [m.values.detach().clone() for m in sparse],
            "weight": [m.weight.detach().clone() for m in sparse], "moved": [h["moved"] for h in rg.history],
            "copy_error": copy_error}


def _worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {}
        for variant in ("ag", "ma"):
            for group in ("auto", None, "world"):
                net = _net()
                res[variant, group] = _train(net, nn.parallel.DistributedDataParallel(net), variant, group, rank)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("regrow_ddp")
    return run_ranks(_worker, out)


@pytest.mark.parametrize("variant", ["ag", "ma"])
def test_ranks_select_the_same_positions(ranks, variant):
    r0, r1 = (r[variant, "auto"] for r in ranks)
    assert r0["moved"] == r1["moved"] and len(r0["moved"]) == 2 and all(m > 0 for m in r0["moved"])
    for key in ("indices", "values", "weight"):
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key])), key


def test_ddp_regrowth_equals_one_process_on_both_batches(ranks):
    net = _net()
    want = _train(net, net, "ag", "auto")
    got = ranks[0]["ag", "auto"]
    assert got["moved"] == want["moved"]
    for a, b in zip(got["indices"], want["indices"]):
        assert torch.equal(a, b)
    for a, b in zip(got["values"], want["values"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = _net()
    assert not all(torch.equal(a, start[i].indices) for a, i in zip(got["indices"], (0, 2))), "positions moved"


def test_without_the_reduction_the_ranks_select_differently(ranks):
    r0, r1 = (r["ag", None] for r in ranks)
    assert not all(torch.equal(a, b) for a, b in zip(r0["indices"], r1["indices"]))


def test_an_explicit_group_reduces_alike_and_refuses_copies(ranks):
    for r in ranks:
        got, auto = r["ag", "world"], r["ag", "auto"]
        assert all(torch.equal(a, b) for a, b in zip(got["indices"], auto["indices"]))
        assert all(torch.equal(a, b) for a, b in zip(got["values"], auto["values"]))
        assert "cannot be copied" in got["copy_error"]
