"""Op-level edges found by review (each test fails on the code before): masked_adamw_ with check=False wrote rows
outside its target; zo_apply_ read a seeds tensor on the host for nearest rounding (compile refused it); DoRA's
backward failed on an output without a gradient; float64 row masters got float32 gradients; a DoRA weight_norm of
the wrong shape broadcast silently; masked_adamw_ did not compile."""
import pytest
import torch

from fusedtune.ops import dora as D
from fusedtune.ops import hft as H
from fusedtune.ops import zo as Z

KW = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def test_masked_adamw_checks_row_values_without_the_list_checks():
    big = torch.zeros(64, 4)
    tgt = big[:4]       # row 40 would land in big's storage, outside the target
    p = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\), got \[0, 40\]"):
        H.masked_adamw_([p], [torch.ones(2, 4)], [torch.zeros(2, 4)], [torch.zeros(2, 4)], [tgt],
                        [torch.tensor([0, 40])], step=1, check=False, **KW)
    assert not big.any() and torch.equal(p, torch.ones(2, 4))


def _compiles(fn, *args):
    return torch.compile(fn, fullgraph=True, backend="eager")(*args)


def test_zo_apply_with_a_seeds_tensor_and_nearest_rounding_compiles():
    s, c = torch.tensor([1, 2]), torch.tensor([0.5, -0.5])

    def f(t, s, c):
        Z.zo_apply_([t], s, c)
        return t
    want = f(torch.zeros(4), s, c)
    assert torch.equal(_compiles(f, torch.zeros(4), s, c), want)


def test_masked_adamw_compiles():
    def step(p, g, m, v):
        H.masked_adamw_([p], [g], [m], [v], [None], [None], step=1, **KW)
        return p
    args = [torch.ones(4), torch.full((4,), 0.5), torch.zeros(4), torch.zeros(4)]
    want = step(*[a.clone() for a in args])
    assert torch.equal(_compiles(step, *args), want)


class _NoGradToFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z):
        return y.sum() + z.sum()

    @staticmethod
    def backward(ctx, g):
        return None, g.expand(3)


def test_dora_backward_with_no_gradient_at_its_output():
    torch.manual_seed(0)
    A = torch.randn(3, 6, requires_grad=True)
    B = torch.randn(4, 3, requires_grad=True)
    mag = torch.rand(4, requires_grad=True)
    z = torch.randn(3, requires_grad=True)
    y = D.dora_linear(torch.randn(5, 6), torch.randn(4, 6), A, B, 0.5, mag)
    _NoGradToFirst.apply(y, z).backward()
    assert A.grad is None and B.grad is None and mag.grad is None and z.grad is not None


@pytest.mark.parametrize("shape", [(1,), (4, 1)])
def test_dora_weight_norm_of_another_shape_is_refused(shape):
    x, W, A, B, mag = torch.randn(5, 6), torch.randn(4, 6), torch.randn(3, 6), torch.randn(4, 3), torch.rand(4)
    with pytest.raises(ValueError, match=r"weight_norm must be \[4\]"):
        D.dora_linear(x, W, A, B, 0.5, mag, weight_norm=torch.ones(shape))


def test_float64_row_masters_get_float64_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    W, b, rows = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.tensor([1, 3, 7])
    wr, br = W[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    y = H.hft_row_linear(x, W, wr, rows, b, br)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(wr.grad, g[:, rows].t() @ x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(br.grad, g[:, rows].sum(0), rtol=1e-13, atol=1e-13)
