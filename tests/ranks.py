"""Run a test's worker in two CPU processes (gloo, a file rendezvous in `out`) and read what each rank saved.
gloo_worker runs a body(rank, res) between joining and leaving the process group and saves what it filled
in res, also when it raised."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run_then_exit(rank, worker, *args):
    """Run the worker, then leave without interpreter finalization. torch's gloo worker thread can still be
    freeing a finished collective's tensors (which needs the GIL) when the process finalizes, and then
    aborts the process with "terminate called without an active exception" (pytorch/pytorch#190489;
    seen here about once in 30 spawns). The worker's results are already saved and closed; an exception
    still propagates, so mp.spawn reports it as before."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, out, *args, world: int = 2) -> list:
    """mp.spawn worker(rank, world, init, str(out), *args) and load out/rank<r>.pt of every rank."""
    mp.spawn(_run_then_exit, args=(worker, world, f"file://{out}/rdzv", str(out), *args), nprocs=world,
             join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def gloo_worker(rank, world, init, out, body):
    """A worker for run_ranks(gloo_worker, out, body): body(rank, res) with the tests folder importable."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res = {}
    try:
        body(rank, res)
    finally:
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
