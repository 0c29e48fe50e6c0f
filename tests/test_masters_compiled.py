"""Layers with float32 masters (SparseDeltaLinear's deltas, RowMaskedLinear's rows) trained by another optimizer
(torch.optim.AdamW: transformers.Trainer's default) under a compiled forward (torch.compile, Trainer's
torch_compile=True): the compiled forward skips the layer's eager check of its merged weight, so the optimizer
step's hook (nn/masters.py) writes the weight at once. Before, training through the compiled model changed
nothing, silently."""
import pytest
import torch
import torch.nn.functional as F

from fusedtune.nn import RowMaskedLinear, SparseDeltaLinear


def _sparse_delta():
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(20, 12), density=0.2, seed=1)

    def want(x):
        w = m.weight.detach().clone().view(-1)
        w[m.indices.long()] = (m.base_values.float() + m.values.detach()).to(w.dtype)
        return F.linear(x, w.view_as(m.weight), m.bias)
    return m, [m.values], want


def _rows():
    lin = torch.nn.Linear(20, 12)
    m = RowMaskedLinear.from_linear(lin, torch.tensor([2, 5, 9]))

    def want(x):
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        w[m.rows], b[m.rows] = m.weight_rows.detach(), m.bias_rows.detach()
        return F.linear(x, w, b)
    return m, m.master_parameters(), want


@pytest.mark.filterwarnings("ignore:fusedtune")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("make", [_sparse_delta, _rows], ids=["sparse_delta", "hft_rows"])
def test_a_compiled_forward_takes_another_optimizers_steps(make, fused):
    torch.manual_seed(0)
    m, masters, want = make()
    before = m.weight.detach().clone()
    forward = torch.compile(m, backend="eager", fullgraph=False)
    opt = torch.optim.AdamW(masters, lr=1e-2, fused=fused)
    x = torch.randn(8, 20)
    for _ in range(3):
        opt.zero_grad()
        forward(x).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(m.weight.detach(), before)         # the steps reached the weight
    assert torch.equal(forward(x), want(x))
