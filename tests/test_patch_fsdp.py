"""FSDP2 (fully_shard, two CPU processes, gloo) over the methods whose layers are plain modules of
parameters (full, lora, fp8, fp8_lora, roste, hft at matrix granularity), patched before sharding, with an
optimizer made after it; qlora too, whose packed NF4 weights FSDP turns into plain parameters without
bitsandbytes' quant_state (LoRALinear keeps it). Each rank
trains three steps on its own batch; the full weights FSDP gathers afterwards are the same on both ranks
bit for bit, and bit for bit the same as one process taking both batches' mean gradient each step:
halving is exact, so FSDP's average of two ranks' gradients equals the two halves one process
accumulates. Frozen weights stay as they were."""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
from ranks import gloo_worker, run_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CASES = ["lora", "qlora", "fp8", "roste", "hft", "full", "fp8_lora"]
STEPS, LR = 3, 1e-3


def _batch(rank):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(10 + rank))


def _train(name, shard, batches):
    """A patched tiny Llama trained STEPS AdamW steps, each on the mean of its losses over batches (a
    backward per batch, as each rank takes its own: FP8's 1x128 tiles of the gradients run along the
    tokens, so a joined batch would quantize otherwise) -> (its named full weights, its first batch's losses)."""
    import fusedtune
    from tiny_models import tiny_llama
    m = tiny_llama()
    m.train()
    from fusedtune.patch import PatchError
    rep = fusedtune.patch(m, name)
    refused = None
    if shard:
        from torch.distributed.fsdp import fully_shard
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        # qlora: FSDP's parameters are plain ones; bitsandbytes' quant_state is gone from the packed weights
        packed = [p for p in m.parameters() if not p.is_floating_point()]
        assert all(getattr(p, "quant_state", None) is None for p in packed)
        assert bool(packed) == (name == "qlora"), (name, len(packed))
        try:      # the report's optimizer holds the parameters fully_shard replaced: its step would move nothing
            rep.step(lambda: m(batches[0], labels=batches[0]).loss)
            refused = "stepped"
        except PatchError as e:
            refused = str(e)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        for i, ids in enumerate(batches):
            loss = m(ids, labels=ids).loss
            (loss / len(batches)).backward()
            if i == 0:
                losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    full = {}
    for n, p in m.named_parameters():
        t = p.detach()
        full[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return full, losses, refused


# torch 2.11's fully_shard makes every sharded parameter require grad before it copies the flag, so it cannot
# shard an integer parameter (qlora's packed NF4 weights); torch 2.14's passes the flag through
_TORCH_INT_PARAMS = "only Tensors of floating point dtype can require gradients"


def _ranks_train(rank, res):
    from fusedtune.patch import methods, missing_requirements
    for name in CASES:
        if not missing_requirements(methods()[name]):
            try:
                res[name] = _train(name, True, [_batch(rank)])
            except RuntimeError as e:
                if name != "qlora" or _TORCH_INT_PARAMS not in str(e):
                    raise
                res[name] = str(e)
    res["unsupported"] = _unsupported(rank)


def _unsupported(rank) -> dict:
    """Methods whose layers keep float32 masters, patched before fully_shard (found by audit: FSDP swapped the
    masters for its own, the optimizer stepped those, and the weights never moved, without a word): the first
    forward refuses."""
    import fusedtune
    from torch.distributed.fsdp import fully_shard
    from tiny_models import tiny_llama
    out = {}
    for name, opts in (("hft", {"granularity": "row"}), ("sparse_delta", {})):
        m = tiny_llama()
        fusedtune.patch(m, name, **opts)
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        try:
            m(_batch(rank))
            out[name] = "ran"
        except RuntimeError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(gloo_worker, tmp_path_factory.mktemp("fsdp"), _ranks_train)


@pytest.mark.parametrize("name", CASES)
def test_sharded_training_matches_one_process_on_the_joined_batch(ranks, name):
    r0, r1 = ranks
    if name not in r0:
        pytest.skip(f"{name}: requirements missing")
    if isinstance(r0[name], str):
        pytest.skip(f"{name}: this torch's fully_shard cannot shard integer parameters (the packed NF4 weights): "
                    f"{r0[name]}")
    (w0, l0, s0), (w1, l1, s1) = r0[name], r1[name]
    assert "no longer the model's" in s0 and "no longer the model's" in s1, s0
    assert w0.keys() == w1.keys()
    for n in w0:
        assert torch.equal(w0[n], w1[n]), f"{name}: {n} differs between the ranks"
    ref, ref_losses, _ = _train(name, False, [_batch(0), _batch(1)])
    assert ref.keys() == w0.keys()
    for n in ref:
        assert torch.equal(w0[n], ref[n]), f"{name}: {n} differs from one process's by {(w0[n] - ref[n]).abs().max()}"
    start = _train_start(name)
    trained = [n for n, (_, grad) in start.items() if grad]
    frozen = [n for n, (_, grad) in start.items() if not grad]
    assert trained and all(not torch.equal(w0[n], start[n][0]) for n in trained), f"{name}: a weight never moved"
    assert all(torch.equal(w0[n], start[n][0]) for n in frozen), f"{name}: a frozen weight moved"
    assert l0 == ref_losses, f"{name}: rank 0's losses {l0}, one process's on the same batch {ref_losses}"
    assert l1[-1] < l1[0] and l0[-1] < l0[0]


def _train_start(name):
    """The patched model's weights before any step (the same seed as _train): {name: (weight, trains)}."""
    import fusedtune
    from tiny_models import tiny_llama
    m = tiny_llama()
    fusedtune.patch(m, name)
    return {n: (p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()}



def test_methods_with_masters_refuse_a_sharded_forward(ranks):
    for r in ranks:
        for name in ("hft", "sparse_delta"):
            assert "trainable masters are Parameters it did not make" in r["unsupported"][name], r["unsupported"]
