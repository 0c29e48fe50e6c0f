"""The Hopper block-scaled FP8 GEMM (triton_kernels/fp8_tma.py) on an sm_90 GPU: the public op through it against
the float32 emulation at LLM shapes and edge tiles, every autotune config launched directly, FP8Linear's three
GEMMs through it (cuBLAS turned off) with the SQNR bounds of test_fp8_gpu.py, and a CUDA-graph capture (the
descriptors' scratch memory comes from the graph's pool). Run by bench/gpu_check.sh as a test group of its own."""
import pytest
import torch

from fusedtune.ops import fp8 as F8
from fusedtune.reference import fp8 as ref
from fusedtune.triton_kernels.fp8_tma import _HOPPER_CONFIGS

pytestmark = pytest.mark.gpu


@pytest.fixture
def tma(monkeypatch):
    from fusedtune.triton_kernels import fp8_tma
    if not fp8_tma.available("cuda"):
        pytest.skip("fp8_gemm_tma_kernel needs an sm_90 GPU")
    monkeypatch.setattr(fp8_tma, "ENABLED", True)
    calls = []
    real = fp8_tma.gemm
    monkeypatch.setattr(fp8_tma, "gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _operands(M, N, K, b_rows, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a_q, a_s = ref.quantize_rows(torch.randn(M, K, device="cuda", generator=g))
    b = torch.randn(N, K, device="cuda", generator=g)
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    return a_q, a_s, b_q, b_s


def _calc_diff(got, want) -> float:
    """DeepGEMM's test measure, 1 - 2 sum(xy) / sum(x^2 + y^2)."""
    g, w = got.double(), want.double()
    return float(1 - 2 * (g * w).sum() / (g * g + w * w).sum())


@pytest.mark.parametrize("M,N,K,b_rows,out", [(2048, 4096, 4096, 128, torch.bfloat16),
                                               (1000, 4104, 4096, 1, torch.float32),
                                               (777, 1032, 1040, 128, torch.bfloat16),   # K past the last block
                                               (64, 256, 128, 1, torch.float16)])        # one K block
def test_tma_gemm_matches_emulation(M, N, K, b_rows, out, tma):
    a_q, a_s, b_q, b_s = _operands(M, N, K, b_rows, seed=M)
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, out, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, backend="reference")
    assert len(tma) == 1
    assert _calc_diff(got, want) < (1e-6 if out == torch.float32 else 1e-5)


@pytest.mark.parametrize("config", range(len(_HOPPER_CONFIGS)))
@pytest.mark.parametrize("b_rows", [1, 128])
def test_every_config_matches_emulation(config, b_rows):
    """Every autotune config (the GPU tests pick one, FUSEDTUNE_AUTOTUNE=one; the bench may pick any), launched
    directly, on edge tiles on every side (M, N not multiples of any block, K past the last 128)."""
    from fusedtune.triton_kernels import fp8_tma
    if not fp8_tma.available("cuda"):
        pytest.skip("fp8_gemm_tma_kernel needs an sm_90 GPU")
    m, n, w, s, ctas, flatten = _HOPPER_CONFIGS[config]
    M, N, K = 1000, 1032, 1040
    a_q, a_s, b_q, b_s = _operands(M, N, K, b_rows, seed=config)
    c = torch.empty(M, N, device="cuda", dtype=torch.float32)
    fp8_tma._ensure_allocator()
    fp8_tma.fp8_gemm_tma_kernel.fn[(132 * ctas,)](
        a_q, a_s, b_q, b_s, c, M, N, K, -(-K // 128), K, K, N,
        B_ROWS=b_rows, GROUP_M=8, BLOCK_K=128, BLOCK_M=m, BLOCK_N=n, CTAS=ctas, FLATTEN=flatten, num_warps=w,
        num_stages=s)
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, backend="reference")
    assert _calc_diff(c, want) < 1e-6, (config, b_rows)


def test_fp8_linear_through_tma(tma, monkeypatch):
    """FP8Linear at 4096^3 with cuBLAS off: forward, dX and dW through the TMA kernel, within test_fp8_gpu.py's
    SQNR bounds."""
    monkeypatch.setenv("FUSEDTUNE_FP8_GEMM", "triton")
    x = torch.randn(4096, 4096, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(4096, 4096, device="cuda").bfloat16()
    y = F8.fp8_linear(x, w, backend="triton")
    y.backward(dy)
    assert len(tma) == 3
    xf, wf, dyf = x.detach().double(), w.detach().double(), dy.double()
    assert ref.sqnr_db(y, xf @ wf.t()) >= 25
    assert ref.sqnr_db(x.grad, dyf @ wf) >= 18 and ref.sqnr_db(w.grad, dyf.t() @ xf) >= 18


def test_tma_gemm_captures_in_a_cuda_graph(tma):
    from fusedtune.bench.lora import capture
    a_q, a_s, b_q, b_s = _operands(512, 1024, 768, 128, seed=3)
    graph, out = capture(lambda: F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.bfloat16, backend="triton"))
    fresh = _operands(512, 1024, 768, 128, seed=4)
    for dst, src in zip((a_q, a_s, b_q, b_s), fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.bfloat16, backend="triton"))
    assert len(tma) >= 3
