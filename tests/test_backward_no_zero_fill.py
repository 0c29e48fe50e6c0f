"""Backward of the ops with auxiliary outputs (saved for backward, not differentiable): autograd is told not
to materialize their gradients, so a backward allocates and zero-fills nothing of their size (for
fp8_linear that was a [K, M] FP8 tensor and its scales on every step). Both routes: the direct eager one
and the torch.library dispatcher. Gradients themselves are the other tests' business."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedtune.ops import _eager, fp8_linear, lora_linear, rotate_fake_quant

_FILLS = {torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default,
          torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar}


class _Fills(TorchDispatchMode):
    """(shape, dtype) of every zero-fill or fill dispatched in the scope."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _FILLS and isinstance(out, torch.Tensor):
            self.seen.append((tuple(out.shape), out.dtype))
        return out


def _fills_in_backward(y, dy):
    with _Fills() as f:
        y.backward(dy)
    return f.seen


@pytest.fixture(params=["direct", "dispatcher"])
def route(request):
    if request.param == "direct":
        yield
    else:
        with _eager.dispatcher_only():
            yield


def test_lora_backward_fills_nothing_of_the_shrink_size(route):
    g = torch.Generator().manual_seed(0)
    M, K, N, R = 37, 48, 40, 5      # t is [M, R] float32: no fill of that shape may appear
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(R, K, generator=g, requires_grad=True)
    B = torch.randn(N, R, generator=g, requires_grad=True)
    y = lora_linear(x, W, A, B, 2.0)
    seen = _fills_in_backward(y, torch.randn(M, N, generator=g))
    assert ((M, R), torch.float32) not in seen, seen
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_fp8_linear_backward_fills_no_fp8_copy(route):
    g = torch.Generator().manual_seed(1)
    M, K, N = 256, 128, 128
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g, requires_grad=True)
    y = fp8_linear(x, W)
    seen = _fills_in_backward(y, torch.randn(M, N, generator=g))
    assert not [s for s in seen if s[1] == torch.float8_e4m3fn or s[0] == (K, M // 128)], seen
    assert x.grad is not None and W.grad is not None


def test_rotate_fake_quant_backward_fills_no_mask(route):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 64, generator=g, requires_grad=True)
    y = rotate_fake_quant(x, 4, ste="clipped")
    seen = _fills_in_backward(y, torch.randn(16, 64, generator=g))
    assert not [s for s in seen if s[1] == torch.bool], seen
    assert x.grad is not None
