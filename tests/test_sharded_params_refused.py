"""DTensor parameters (FSDP2's fully_shard, tensor parallelism) hold one shard each, while the fused
optimizers index whole tensors (delta positions, rows, noise counters): SparseDeltaAdamW, MaskedAdamW and
MeZO refuse them by name instead of failing inside a kernel (MeZO: 'invalid python storage') or, for
SparseDeltaAdamW, with a misleading 'not the values of a SparseDeltaLinear'. One gloo process."""
import os

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _worker(rank, world, init, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fusedtune.optim import MaskedAdamW, MeZO, SparseDeltaAdamW
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        errors = {}
        for name, make in (("SparseDeltaAdamW", lambda: SparseDeltaAdamW([p])), ("MaskedAdamW", lambda: MaskedAdamW([p])),
                           ("MeZO", lambda: MeZO([p], lr=1e-3))):
            try:
                make()
                errors[name] = None
            except TypeError as e:
                errors[name] = str(e)
        torch.save(errors, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_dtensor_parameters_are_refused_by_name(tmp_path):
    errors, = run_ranks(_worker, tmp_path, world=1)
    for name, msg in errors.items():
        assert msg is not None and msg.startswith(f"{name}: DTensor") and "DistributedDataParallel" in msg, (name, msg)
