"""Run a test's worker in two CPU processes (gloo, a file rendezvous in `out`) and read what each rank saved."""
from __future__ import annotations

import os
import sys

import torch
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
