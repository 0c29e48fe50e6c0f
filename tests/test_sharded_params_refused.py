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


def _patch_worker(rank, world, init, out):
    import transformers
    from torch.distributed.fsdp import fully_shard

    from fusedtune import PatchError, patch, unpatch
    from fusedtune.patch import swapped_kind
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    res = {}
    try:
        m = transformers.LlamaForCausalLM(cfg)             # patched, then sharded: unpatch refuses, changes nothing
        patch(m, "lora", target_modules=["q_proj"], backend="reference")
        fully_shard(m.model.layers[0])
        fully_shard(m)
        try:
            unpatch(m)
        except PatchError as e:
            res["unpatch"] = str(e)
        res["still_patched"] = swapped_kind(m, "model.layers.0.self_attn.q_proj") == "linear"
        m = transformers.LlamaForCausalLM(cfg)             # sharded, then patched: refused before any swap
        fully_shard(m.model.layers[0])
        fully_shard(m)
        try:
            patch(m, "lora", target_modules=["q_proj"], backend="reference")
        except PatchError as e:
            res["patch"] = str(e)
        res["untouched"] = type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        m = transformers.LlamaForCausalLM(cfg)             # only the root sharded: plain tensors after a forward
        fully_shard(m)
        m(input_ids=torch.zeros(1, 4, dtype=torch.long))
        try:
            patch(m, "lora", target_modules=["q_proj"], backend="reference")
        except PatchError as e:
            res["patch_root"] = str(e)
        m = transformers.LlamaForCausalLM(cfg)             # HFT's block granularity swaps in RowMaskedLinear
        patch(m, "hft", granularity="block", backend="reference")
        fully_shard(m)
        try:
            unpatch(m)
        except PatchError as e:
            res["unpatch_hft"] = str(e)
        res["hft_still_patched"] = type(m.model.layers[0].self_attn.q_proj).__name__ == "RowMaskedLinear"
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_patch_and_unpatch_refuse_layers_sharded_by_fsdp2(tmp_path):
    """Swapping modules under FSDP2: patch after fully_shard would leave the new LoRA parameters unsharded
    and their gradients unreduced across ranks (also when only the root is sharded, whose parameters are
    plain tensors after a forward); unpatch after fully_shard mixed plain tensors with DTensors inside the
    merge (LoRA; HFT's block granularity too). Both refuse, saying what to do, and change nothing."""
    res, = run_ranks(_patch_worker, tmp_path, world=1)
    assert "is sharded" in res["unpatch"] and "full_state_dict" in res["unpatch"] and res["still_patched"]
    assert "Patch first, then fully_shard" in res["patch"] and res["untouched"]
    assert "Patch first, then fully_shard" in res["patch_root"]
    assert "method 'hft' puts modules back" in res["unpatch_hft"] and res["hft_still_patched"]
