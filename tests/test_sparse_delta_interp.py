"""sparse_delta Triton SDDMM in the interpreter (fp16/fp32: the interpreter's bf16 math is wrong)."""
import pytest
import torch

from fusedtune.ops.sparse_delta import sddmm
from fusedtune.testing import assert_within_rule

pytestmark = pytest.mark.interp


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T", [45, 64, 130])   # the transposed rows are zero-padded to a multiple of 64
def test_triton_sddmm_matches_reference(dtype, T):
    out, inp = 19, 23
    dy, x = torch.randn(T, out).to(dtype), torch.randn(T, inp).to(dtype)
    idx = torch.randperm(out * inp)[:70].sort().values.to(torch.int32)
    got = sddmm(dy, x, idx, backend="triton")
    r, c = idx.long() // inp, idx.long() % inp
    exact = (dy.double()[:, r] * x.double()[:, c]).sum(0)
    unfused = (dy.float()[:, r] * x.float()[:, c]).sum(0)
    assert_within_rule(got, exact, unfused, "sddmm", atol=1e-4)
