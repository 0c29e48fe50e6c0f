"""LoRA under CUDA-graph capture on a GPU: a LoRALinear forward + backward captured once and replayed on new
inputs gives the eager call's outputs (what `bench lora`'s graph-replay rows time). A file of its own so that
bench/gpu_check.sh can run it beside the DoRA tests, the LoRA family's file being its longest."""
import math

import pytest
import torch

from fusedtune.bench.lora import capture

pytestmark = pytest.mark.gpu


def _case(M, K, N, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    W = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).to(dtype)
    B = torch.randn(N, r, device="cuda", generator=g) * 0.1
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    return x, W, B, dy


@pytest.mark.parametrize("deterministic", [False, True])
def test_layer_forward_backward_captures_in_a_cuda_graph(deterministic):
    """A LoRALinear forward + autograd.grad (dX, dA, dB) captures in one CUDA graph (what `bench lora`'s
    graph-replay rows time, and what a host-bound user gets from CUDA graphs): replayed on new x and dy it
    gives the eager call's outputs -- bit for bit in deterministic mode; within float32 summation order
    otherwise (dB is summed by atomics there). x is [batch, seq, in], as a model's layers get it."""
    from fusedtune.nn import LoRALinear
    x, W, B, dy = _case(512, 1024, 768, 16, torch.bfloat16, seed=7)
    lin = torch.nn.Linear(1024, 768, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = LoRALinear.from_linear(lin, r=16, alpha=32)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(B)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    xs = x.reshape(4, 128, 1024).clone().requires_grad_()     # [batch, seq, in]: flattened inside the op
    dys = dy.reshape(4, 128, 768).clone()

    def fb():
        y = layer(xs)
        return (y,) + torch.autograd.grad(y, [xs] + params, dys)

    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        graph, out = capture(fb)      # warm-up off the default stream (autotuning, cuBLAS workspaces), capture
        g = torch.Generator(device="cuda").manual_seed(11)
        with torch.no_grad():
            xs.copy_(torch.randn(xs.shape, device="cuda", generator=g))
            dys.copy_(torch.randn(dys.shape, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        want = fb()
    finally:
        torch.use_deterministic_algorithms(old)
    for i, (a, b) in enumerate(zip(out, want)):
        if deterministic or i < 3:     # y, dX, dA: no atomics on either path
            assert torch.equal(a, b), f"output {i}"
        else:
            # dB: float32 atomics add its 64-row partials in a run-dependent order; the error of a reordered
            # sum scales with the partials' magnitudes, not with the (possibly much smaller) result
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
