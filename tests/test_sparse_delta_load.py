"""SparseDeltaLinear's loads, conversions and index edges found by review (each test fails on the code before): a
checkpoint of another density, invalid loaded indices, a plain nn.Linear checkpoint, deltas without a weight,
torch's swap / overwrite conversion modes, the caller's index tensor, list indices, a non-contiguous weight."""
import pytest
import torch
from torch import nn

from fusedtune.nn import SparseDeltaLinear
from fusedtune.nn.masters import owner_of


def trained(lin, density, seed):
    m = SparseDeltaLinear.from_linear(lin, density=density, seed=seed)
    with torch.no_grad():
        m.values.normal_()
    m.merge_()
    return m


def test_a_checkpoint_of_another_density_is_refused_before_anything_is_written():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    src, dst = trained(a, 0.25, 1), SparseDeltaLinear.from_linear(b, density=0.10, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match="(?s)the checkpoint has 32 deltas, this layer 13.*another density"):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    dst.revert_()
    assert torch.equal(dst.weight, w0) and torch.equal(b.weight, w0)


@pytest.mark.parametrize("edit,why", [(lambda i: i.flip(0), "sorted"), (lambda i: i.clone().fill_(3), "duplicates"),
                                      (lambda i: i + 1000, r"must lie in \[0, 128\)")])
def test_loaded_indices_are_checked(edit, why):
    """Unsorted indices gave silently wrong delta gradients (the forward skips the check)."""
    src = trained(nn.Linear(16, 8), 0.25, 1)
    sd = src.state_dict()
    sd["indices"] = edit(sd["indices"])
    dst = SparseDeltaLinear.from_linear(nn.Linear(16, 8), density=0.25, seed=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=why):
        dst.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_a_plain_linear_checkpoint_is_a_new_base_under_the_deltas():
    """The loaded weight replaced the merged one: the deltas stopped applying and revert_() gave neither base."""
    torch.manual_seed(0)
    m = trained(nn.Linear(16, 8), 0.25, 0)
    deltas = m.values.detach().clone()
    new = nn.Linear(16, 8)
    m.load_state_dict(new.state_dict(), strict=False)
    assert torch.equal(m.values.detach(), deltas)
    want = new.weight.detach().double().clone()
    want.view(-1)[m.indices.long()] += deltas.double()
    torch.testing.assert_close(m.weight.double(), want, rtol=0, atol=1e-6)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), x @ want.float().T + new.bias, rtol=1e-6, atol=1e-6)
    m.revert_()
    assert torch.equal(m.weight, new.weight)


def test_deltas_without_a_weight_merge_over_this_layers_base():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    src, dst = trained(nn.Linear(16, 8), 0.25, 1), trained(lin, 0.25, 2)
    sd = {k: v for k, v in src.state_dict().items() if k in ("indices", "values")}
    dst.load_state_dict(sd, strict=False)
    assert torch.equal(dst.indices, src.indices) and torch.equal(dst.values, src.values)
    want = w0.double().clone()
    want.view(-1)[src.indices.long()] += src.values.detach().double()
    torch.testing.assert_close(dst.weight.double(), want, rtol=0, atol=1e-6)
    dst.revert_()
    assert torch.equal(dst.weight, w0)


@pytest.mark.parametrize("mode", ["swap", "overwrite"])
def test_conversions_under_torchs_future_modes(mode):
    """swap: torch.utils.swap_tensors refused the deltas (the owner registry's weak reference) after the weight
    was converted; overwrite: the new deltas Parameter had no owner (SparseDeltaAdamW refused it)."""
    set_mode = {"swap": torch.__future__.set_swap_module_params_on_conversion,
                "overwrite": torch.__future__.set_overwrite_module_params_on_conversion}[mode]
    m = trained(nn.Linear(16, 8), 0.25, 0)
    want = (m.base_values.to(torch.bfloat16).float() + m.values.detach()).to(torch.bfloat16)   # round(base + delta)
    set_mode(True)
    try:
        m.to(torch.bfloat16)
        assert owner_of(m.values) is m
        m.load_state_dict(m.state_dict())
    finally:
        set_mode(False)
    assert m.weight.dtype == torch.bfloat16 and m.values.dtype == torch.float32
    assert owner_of(m.values) is m
    assert torch.equal(m.weight.view(-1)[m.indices.long()], want)


def test_the_layer_keeps_its_own_indices_and_takes_a_list():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    w0 = lin.weight.detach().clone()
    idx = torch.tensor([1, 5, 7], dtype=torch.int32)
    m = SparseDeltaLinear.from_linear(lin, indices=idx)
    with torch.no_grad():
        m.values.fill_(1.0)
    m.merge_()
    idx.fill_(0)        # the caller's tensor: moved the layer's positions
    m.revert_()
    assert torch.equal(m.weight, w0)
    assert SparseDeltaLinear.from_linear(nn.Linear(4, 4), indices=[1, 5, 7]).indices.tolist() == [1, 5, 7]


def test_a_non_contiguous_weight_is_refused_by_name():
    lin = nn.Linear(8, 4)
    lin.weight = nn.Parameter(torch.randn(8, 4).T)
    with pytest.raises(ValueError, match="weight is not contiguous"):
        SparseDeltaLinear.from_linear(lin)
