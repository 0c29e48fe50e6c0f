"""The Hopper LoRA GEMM (triton_kernels/lora_tma.py) on an sm_90 GPU: lora_linear's fused schedule through it,
forward and dX (dropout included), within DESIGN.md's rule of the exact product like the classic kernel
(test_lora_gpu.py); its backward runs on the autograd engine's device thread, whose context starts without
a Triton allocator; and it captures in a CUDA graph (the descriptors' scratch memory comes from the graph's
pool). Run by bench/gpu_check.sh beside the DoRA tests."""
import pytest
import torch

from test_lora_gpu import _case, _within_rule

pytestmark = pytest.mark.gpu


@pytest.fixture
def tma(monkeypatch):
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora_tma
    if not lora_tma.available("cuda"):
        pytest.skip("lora_gemm_tma_kernel needs an sm_90 GPU")
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 2**62)
    monkeypatch.setattr(lora_tma, "ENABLED", True)
    calls = []
    real = lora_tma.gemm
    monkeypatch.setattr(lora_tma, "gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype,M,K,N,r,p", [(torch.bfloat16, 4096, 4096, 4096, 16, 0.0),
                                              (torch.bfloat16, 1000, 336, 1032, 7, 0.1),
                                              (torch.float16, 300, 4096, 1024, 64, 0.0),
                                              (torch.bfloat16, 777, 1024, 14336, 40, 0.1)])
def test_tma_schedule_within_rule(dtype, M, K, N, r, p, tma):
    _within_rule(dtype, M, K, N, r, p)
    assert len(tma) == 2, "the forward and the dX GEMM took lora_gemm_tma_kernel"


def test_tma_schedule_captures_in_a_cuda_graph(tma):
    from fusedtune.ops import lora_linear
    x, W, A, B, dy = _case(512, 1024, 768, 16, torch.bfloat16, seed=3)
    xs = x.clone().requires_grad_()
    A, B = A.requires_grad_(), B.requires_grad_()

    def fb():
        y = lora_linear(xs, W, A, B, 2.0)
        return (y,) + torch.autograd.grad(y, [xs, A, B], dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fb()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fb()
    with torch.no_grad():
        xs.copy_(torch.randn(xs.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)))
    graph.replay()
    torch.cuda.synchronize()
    want = fb()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])     # y and dX: no atomics
    assert len(tma) >= 2
