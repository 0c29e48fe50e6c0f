"""RoSTE Hadamard on a GPU: the Triton kernel against the float64 reference at model sizes; a size it
cannot serve runs the reference with a warning under backend auto."""
import pytest
import torch

from fusedtune.ops.roste import hadamard

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n", [4096, 14336, 4864, 3584, 5120, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_hadamard(n, dtype):
    x = torch.randn(64, n, device="cuda").to(dtype)
    got = hadamard(x, backend="triton")
    exact = hadamard(x.float(), backend="reference").double()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)


def test_auto_falls_back_with_a_warning_for_unserved_sizes():
    with pytest.warns(UserWarning, match="running the reference"):
        hadamard(torch.randn(4, 148 * 128, device="cuda", dtype=torch.bfloat16))
