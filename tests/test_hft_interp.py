"""hft Triton row-gradient GEMM in the interpreter (fp16/fp32: the interpreter's bf16 dot is wrong)."""
import pytest
import torch

from fusedtune.ops.hft import row_grad
from fusedtune.testing import assert_within_rule

pytestmark = pytest.mark.interp


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T,out,inp", [(37, 21, 19), (70, 40, 33)])
def test_triton_row_grad_matches_reference(dtype, T, out, inp):
    dy = torch.randn(T, out).to(dtype)
    x = torch.randn(T, inp).to(dtype)
    rows = torch.tensor(sorted({0, 3, 4, out - 1, out // 2}))
    got = row_grad(dy, x, rows, backend="triton")
    exact = dy.double()[:, rows].t() @ x.double()
    unfused = (dy[:, rows].t() @ x).float() if dtype == torch.float32 else (dy[:, rows].t().float() @ x.float())
    assert_within_rule(got, exact, unfused, "row_grad", atol=1e-3 if dtype == torch.float16 else 1e-5)
    # a 16-bit output is the kernel's float32 sum rounded once in the store (fp16: the interpreter's bf16 is wrong)
    half = row_grad(dy, x, rows, backend="triton", out_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, got.to(torch.float16))
