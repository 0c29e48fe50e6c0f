"""FP8 on a GPU (sm_89+): the Triton quantizers byte-identical to the reference, the block-scaled GEMM
against the reference emulation, SQNR of FP8Linear outputs and gradients at LLM sizes."""
import pytest
import torch

from fusedtune.ops import fp8 as F8
from fusedtune.reference import fp8 as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fp8_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")


@pytest.mark.parametrize("M,K", [(4096, 4096), (1000, 333)])
def test_quantizers_byte_identical(M, K):
    x = (torch.randn(M, K, device="cuda") * 3).bfloat16()
    for a, b in zip(F8.fp8_quantize_1x128(x, backend="triton"), F8.fp8_quantize_1x128(x, backend="reference")):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    w = (torch.randn(K, M, device="cuda") * 0.02).bfloat16()
    for a, b in zip(F8.fp8_quantize_128x128(w, backend="triton", transpose=True),
                    F8.fp8_quantize_128x128(w, backend="reference", transpose=True)):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


# K <= 128 makes KB == 1, which Triton specializes to a constant: the scale loads then must not inherit
# the tiles' contiguity hints (16-byte loads across the wrap at M % 4 != 0 fault: misaligned address)
@pytest.mark.parametrize("M,N,K,b_rows,tr", [(2048, 4096, 4096, 128, False), (1000, 777, 4096, 1, False),
                                              (512, 4096, 1024, 128, True), (1001, 130, 128, 1, False),
                                              (333, 202, 100, 128, True)])
def test_gemm_matches_emulation(M, N, K, b_rows, tr):
    a_q, a_s = ref.quantize_rows(torch.randn(M, K, device="cuda"))
    b = torch.randn(N, K, device="cuda")
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    if tr:
        b_q = b_q.t().contiguous()
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, tr, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, tr, backend="reference")
    assert 1 - 2 * (got.double() * want.double()).sum() / (got.double() ** 2 + want.double() ** 2).sum() < 1e-6


def test_fp8_linear_sqnr():
    x = torch.randn(4096, 4096, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(4096, 4096, device="cuda").bfloat16()
    y = F8.fp8_linear(x, w, backend="triton")
    y.backward(dy)
    xf, wf, dyf = x.detach().double(), w.detach().double(), dy.double()
    assert ref.sqnr_db(y, xf @ wf.t()) >= 25
    assert ref.sqnr_db(x.grad, dyf @ wf) >= 18 and ref.sqnr_db(w.grad, dyf.t() @ xf) >= 18
