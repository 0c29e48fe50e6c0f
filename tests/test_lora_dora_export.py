"""DoRA's op under torch.export and opcheck (found by review): its autograd lived in a Python autograd.Function
around fusedtune::dora_linear, which torch.export does not keep, so an exported DoRA model's backward raised "no
autograd formula was registered". The op now carries its own (register_autograd): the exported program's
gradients are eager's, with and without the LoRA branch's dropout."""
import pytest
import torch
from torch import nn

from fusedtune.nn import LoRALinear
from fusedtune.ops import dora as dora_ops
from fusedtune.ops.lora import _op_args, _seed_tensor, scale_table


class _Holder(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.pre = nn.Linear(40, 40)
        self.dora = LoRALinear.from_linear(nn.Linear(40, 24), r=4, use_dora=True, init_lora_weights=False,
                                           dropout=dropout)
        with torch.no_grad():   # a trained magnitude, not the norm it starts at
            self.dora.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn(24))

    def forward(self, x):
        return torch.tanh(self.dora(torch.relu(self.pre(x)))) * 1.5


_LEAVES = ("pre.weight", "dora.lora_A.default.weight", "dora.lora_B.default.weight",
           "dora.lora_magnitude_vector.default.weight")


def _grads(module, x, dy, seed):
    params = dict(module.named_parameters())
    xr = x.clone().requires_grad_()
    torch.manual_seed(seed)     # the op's dropout seed is drawn from torch's CPU generator, in both programs
    y = module(xr)
    return [y.detach(), *torch.autograd.grad(y, [xr] + [params[n] for n in _LEAVES], dy)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_exported_dora_model_backpropagates_as_eager(dropout):
    torch.manual_seed(1)
    m = _Holder(dropout).train()
    x, dy = torch.randn(2, 5, 40), torch.randn(2, 5, 24)
    ep = torch.export.export(m, (x,), strict=False)
    assert any("fusedtune.dora_linear" in str(n.target) for n in ep.graph.nodes)
    exported = ep.module()
    want = _grads(m, x, dy, seed=7)
    got = _grads(exported, x, dy, seed=7)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if dropout:    # the mask is the seed's: another seed gives other gradients, in both programs alike
        other = _grads(exported, x, dy, seed=8)
        assert not torch.equal(other[2], got[2])
        torch.testing.assert_close(other[2], _grads(m, x, dy, seed=8)[2], rtol=1e-6, atol=1e-6)


def _op_inputs(p, weight_grad=False, bias=True):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    A, B = torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g)
    b = torch.randn(8, generator=g) if bias else None
    norm = dora_ops.dora_weight_norm(w, A, B, 1.5)
    gcol = (torch.rand(8, generator=g) + 0.5) / norm
    args = _op_args(x, w, A, B, scale_table([3], [1.5], x.device), None, b, p, _seed_tensor(11, p), None,
                    "reference")
    x2, w2, A2, B2, b2, *rest = args
    for t in (gcol, x2, A2, B2) + ((b2,) if bias else ()) + ((w2,) if weight_grad else ()):
        t.requires_grad_()
    return (gcol, x2, w2, A2, B2, b2, *rest)


@pytest.mark.parametrize("p,weight_grad,bias", [(0.0, False, True), (0.0, True, False), (0.25, False, True)])
def test_opcheck_with_inputs_that_need_gradients(p, weight_grad, bias):
    """opcheck's autograd registration check fails on an op without register_autograd; its aot_dispatch checks
    trace the op's backward."""
    torch.library.opcheck(dora_ops._dora_op, _op_inputs(p, weight_grad, bias))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_the_op_route_gives_the_direct_routes_gradients(p):
    """torch.ops.fusedtune.dora_linear (what export and compile call) and the direct eager call: the same bits."""
    outs = []
    for call in (dora_ops._dora, dora_ops._dora_op):
        args = _op_inputs(p)
        y = call(*args)[0]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        outs.append([y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))])
        assert type(y.grad_fn).__name__.startswith(
            "Eager_fusedtune_dora_linear" if call is dora_ops._dora else "GeneratedBackwardFor_fusedtune_dora_linear")
    for a, b in zip(*outs):
        assert torch.equal(a, b)
