"""triton_kernels/launch.py on a GPU: the fast path's launches compute what Triton's own launches compute
(tests/test_triton_launch.py checks the kernel choice and arguments without a GPU)."""
import pytest
import torch
import triton

from fusedtune.triton_kernels import launch as L
from launch_cases import axpy as _axpy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n,stride,seed", [(1000, 1, 3), (1000, 16, 1), (1, 3, 2**40), (4096, 2, -5)])
def test_fast_launch_computes_what_triton_computes(offset, n, stride, seed):
    if not L.ENABLED:
        pytest.skip("fast launch off (FUSEDTUNE_FAST_LAUNCH=0 or Triton < 3.6)")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-50, 50, (n * stride + offset,), device="cuda", generator=g).float()[offset:]
    y = torch.randint(-50, 50, (n,), device="cuda", generator=g).float()
    want = x[::stride][:n] * 2.0 + y + float(seed)     # small integers: exact in float32 either way
    fk = L.fast(_axpy)
    grid = (triton.cdiv(n, 256),)
    for _ in range(3):                                 # the first through Triton, the rest from the cache
        out = torch.full((n,), float("nan"), device="cuda")
        fk[grid](x, y, out, n, stride, seed, 2.0, FLAG=True, BLOCK=256)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert fk.stats["fast"] >= 2


def test_lora_layer_same_bits_with_and_without_fast_launch(monkeypatch):
    """Under deterministic algorithms: otherwise dB comes from fp32 atomics, whose order changes from run to
    run whichever launch path is taken (seen on an H200: dB differed, everything else equal)."""
    from fusedtune.nn import LoRALinear
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(lin, r=16, alpha=32, dropout=0.1)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(4, 33, 512, device="cuda", dtype=torch.bfloat16)

    def run():
        torch.manual_seed(1)                           # the dropout seed
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi] + [p for p in layer.parameters() if p.requires_grad], torch.ones_like(y))
        return [y.detach()] + list(grads)

    fast = [run() for _ in range(3)][-1]
    monkeypatch.setattr(L, "ENABLED", False)
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
