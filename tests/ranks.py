"""Run a test's worker in two CPU processes (gloo, a file rendezvous in `out`) and read what each rank saved."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp


def run_ranks(worker, out, *args, world: int = 2) -> list:
    """mp.spawn worker(rank, world, init, str(out), *args) and load out/rank<r>.pt of every rank."""
    mp.spawn(worker, args=(world, f"file://{out}/rdzv", str(out), *args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
