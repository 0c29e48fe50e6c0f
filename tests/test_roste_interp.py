"""The RoSTE Hadamard Triton kernel in the interpreter against the float64 reference."""
import pytest
import torch

from fusedtune.backend import BackendError
from fusedtune.ops.roste import hadamard

pytestmark = pytest.mark.interp


@pytest.mark.parametrize("n", [16 * 16, 4096, 28 * 128, 12 * 64, 76 * 64, 40 * 32])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16])   # (bf16 is wrong in the interpreter; fp32: reference)
def test_triton_hadamard_matches_reference(n, transpose, dtype):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = hadamard(x, transpose=transpose, backend="triton")
    want = hadamard(x, transpose=transpose, backend="reference")
    exact = hadamard(x.double().float(), transpose=transpose, backend="reference").double()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)
    assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + tol


def test_sizes_the_kernel_cannot_serve_are_said():
    with pytest.raises(BackendError, match="n = 18944"):
        hadamard(torch.zeros(2, 148 * 128, dtype=torch.float16), backend="triton")
    with pytest.raises(BackendError, match="torch.float32"):
        hadamard(torch.zeros(2, 4096), backend="triton")


def test_fp16_intermediate_stays_in_range():
    x = torch.full((2, 108 * 32), 1000.0).to(torch.float16)      # H_A x reaches 108000 before normalization
    got = hadamard(x, backend="triton")
    want = hadamard(x.float(), backend="reference")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=1.0, rtol=2e-3)
