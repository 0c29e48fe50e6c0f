"""MeZO under data parallelism (two CPU processes, gloo): each rank sees its own batch; the step averages
both losses over the ranks, so the ranks take the same update, bit for bit the single-process step on the
mean loss of both batches. Ranks given different seeds (or resumed at different step counts) are refused
before anything is perturbed; FSDP1's flattened parameters are refused."""
import os

import pytest
import torch
import torch.distributed as dist

from fusedtune.optim import MeZO
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS = 3


def _model():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _loss(net, batch):
    x, y = batch
    return (net(x) - y).square().mean()


def _worker(rank, world, init, out, seeds):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        net = _model()
        opt = MeZO(net.parameters(), lr=1e-2, eps=1e-3, seed=seeds[rank])
        before = [p.detach().clone() for p in net.parameters()]
        try:
            losses = [float(opt.step(lambda: _loss(net, _batch(rank)))) for _ in range(STEPS)]
            result = {"losses": losses, "params": [p.detach().clone() for p in net.parameters()]}
            sd = opt.state_dict()       # a resume whose states differ in their step count: refused at the
            if rank == 1:               # first step of the resumed optimizers
                sd["mezo"]["steps"] = 1
            resumed = MeZO(net.parameters(), lr=1e-2, eps=1e-3, seed=seeds[rank])
            resumed.load_state_dict(sd)
            try:
                resumed.step(lambda: _loss(net, _batch(rank)))
                result["reload"] = "stepped"
            except RuntimeError as e:
                result["reload"] = str(e)
            from torch.distributed.fsdp import FullyShardedDataParallel
            try:                        # FSDP1's flattened parameters: the forward reads FSDP's own copies
                MeZO(FullyShardedDataParallel(_model(), device_id=torch.device("cpu")).parameters(), lr=1e-2)
                result["fsdp1"] = "accepted"
            except TypeError as e:
                result["fsdp1"] = str(e)
        except RuntimeError as e:
            result = {"error": str(e), "untouched": all(torch.equal(a, b) for a, b in zip(net.parameters(), before))}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, seeds):
    return run_ranks(_worker, tmp_path, seeds)


def test_ranks_take_the_single_process_step_on_the_mean_loss(tmp_path):
    r0, r1 = _spawn(tmp_path, (7, 7))
    net = _model()
    opt = MeZO(net.parameters(), lr=1e-2, eps=1e-3, seed=7)
    want = [float(opt.step(lambda: (_loss(net, _batch(0)) + _loss(net, _batch(1))) / 2)) for _ in range(STEPS)]
    for r in (r0, r1):
        assert r["losses"] == want
        assert all(torch.equal(a, b) for a, b in zip(r["params"], net.parameters()))
    for r in (r0, r1):
        assert "different seeds or step counts" in r["reload"]
        assert "FullyShardedDataParallel (flattened / sharded) are not supported" in r["fsdp1"]
    alone = _model()    # without the average, rank 0 alone would have gone elsewhere
    opt = MeZO(alone.parameters(), lr=1e-2, eps=1e-3, seed=7)
    for _ in range(STEPS):
        opt.step(lambda: _loss(alone, _batch(0)))
    assert not all(torch.equal(a, b) for a, b in zip(alone.parameters(), net.parameters()))


def test_different_seeds_are_refused_before_any_perturbation(tmp_path):
    for r in _spawn(tmp_path, (7, 8)):
        assert "different seeds" in r["error"] and r["untouched"]
