"""HalfFineTuner / RowMaskedLinear edges found by review (each test fails on the code before): a plain checkpoint
loaded with strict=False into row granularity, the old weights a removed tuner kept alive, the constructor's
uninitialized weight, bad arguments taken up to the first forward, and a merge that missed masters changed
outside an optimizer step."""
import gc
import warnings
import weakref

import pytest
import torch

from fusedtune.hft import HalfFineTuner, HFTError
from fusedtune.nn import RowMaskedLinear
from tiny_models import tiny_llama

pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_a_plain_checkpoint_loaded_non_strictly_reaches_the_selected_rows():
    """An nn.Linear checkpoint has no weight_rows: the loaded weight's rows become the masters (the old masters
    were written back over the loaded weight at the selected rows, silently)."""
    model = tiny_llama()
    other = tiny_llama(seed=5)
    HalfFineTuner(model, granularity="row", seed=1)
    model.load_state_dict(other.state_dict(), strict=False)
    for name, p in other.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    torch.testing.assert_close(model(IDS).logits, other(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_remove_lets_the_old_weights_go(granularity):
    model = tiny_llama()
    old = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    hft = HalfFineTuner(model, granularity=granularity)
    hft.remove()
    gc.collect()
    assert old() is None, "the removed tuner still holds the swapped layers' old weights"


def test_constructor_initializes_as_nn_linear():
    torch.manual_seed(0)
    layer = RowMaskedLinear(24, 16, torch.tensor([1, 5]))
    torch.manual_seed(0)
    want = torch.nn.Linear(24, 16)
    assert torch.equal(layer.weight, want.weight) and torch.equal(layer.bias, want.bias)
    assert torch.equal(layer.weight_rows, want.weight[[1, 5]])


def test_bad_arguments_are_refused_before_any_swap():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    for backend in ("bogus", "cuda"):       # (cuda: this is a CPU model)
        with pytest.raises(HFTError, match=f"backend '{backend}' cannot run the row-masked op.*nothing was changed"):
            HalfFineTuner(model, granularity="row", backend=backend)
        with pytest.raises(ValueError, match=f"backend '{backend}'"):
            RowMaskedLinear.from_linear(torch.nn.Linear(8, 8), torch.tensor([0]), backend=backend)
    with pytest.raises(HFTError, match="train_embeddings must be True or False, got 'no'"):
        HalfFineTuner(model, train_embeddings="no")
    assert [type(m) for m in model.modules()] == before and all(p.requires_grad for p in model.parameters())


def test_merge_and_save_take_masters_changed_outside_an_optimizer_step():
    torch.manual_seed(0)
    layer = RowMaskedLinear.from_linear(torch.nn.Linear(24, 16), torch.tensor([2, 7]))
    with torch.no_grad():
        layer.weight_rows.add_(0.5)          # a manual update: no optimizer step hook ran
    want = layer.weight_rows.detach().clone()
    with warnings.catch_warnings():                # (said once a process: "changed outside MaskedAdamW")
        warnings.simplefilter("ignore")
        merged = layer.to_linear()
    assert torch.equal(merged.weight[[2, 7]], want)
    with torch.no_grad():
        layer.weight_rows.add_(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(layer.state_dict()["weight"][[2, 7]], layer.weight_rows.detach())


def test_block_views_stay_ordinary_parameters_through_conversions_and_loads():
    """masters=False: the trained rows are views of the weight, not masters; a conversion or load must not make the
    layer their owner (MaskedAdamW would write them into the weight as row masters)."""
    from fusedtune.nn import RowMaskedLinear
    from fusedtune.nn.masters import owner_of
    m = RowMaskedLinear.from_linear(torch.nn.Linear(8, 6), torch.tensor([1, 2]), masters=False)
    m.to(torch.bfloat16)
    m.load_state_dict(m.state_dict())
    assert owner_of(m.weight_rows) is None and owner_of(m.bias_rows) is None


@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_next_stage_drops_the_gradients_of_what_it_freezes(granularity):
    """The documented manual loop (next_stage, a new optimizer, zero_grad, backward, clip_grad_norm_ over
    model.parameters()): the new optimizer's zero_grad does not reach the parameters the stage froze, whose
    last-stage gradients then counted in the clip norm (matrix: 2.28 instead of 2.13 on this model)."""
    model = tiny_llama()
    hft = HalfFineTuner(model, granularity=granularity, seed=0)
    model(IDS, labels=IDS).loss.backward()
    trained_before = {n for n, p in model.named_parameters() if p.requires_grad}
    hft.next_stage()
    opt = hft.make_optimizer(lr=1e-3)
    opt.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    frozen_now = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trained_before & frozen_now                    # (the stage did freeze something that had a gradient)
    assert [n for n in frozen_now if model.get_parameter(n).grad is not None] == []
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()
                                                 if p.requires_grad]))
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9), want)
