"""The tensor-core factor kernel (csrc/cuda/roste_mma.cu, hadamard_mma_kernel) on a GPU: H_m on mma.sync first,
then the butterflies. Its fp32 sums run in the tensor core's adder, so it is not the CPU kernel's bits; it is
held to the float64 reference within DESIGN.md's rule, with the butterfly kernel (fp32 CUDA cores, the same
final rounding) as the same-precision computation, and to that kernel's bits on almost every element."""
import pytest
import torch

from fusedtune.ops import roste
from fusedtune.reference import hadamard as href

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not __import__("fusedtune")._ext.with_cuda(), reason="fusedtune._C has no CUDA kernels")]

# (rows, n): the factors 12, 28, 36, 40, 44; p from 32 (40 x 32) to 2048; p <= 256: the lane stages end the
# butterflies (stored from registers); above, one shared-memory pass of 1 bit (p = 512), 2 bits (1024) or
# 3 bits (12 x 2048: 164 KB of shared memory, skipped where a block cannot have it); more rows than resident
# blocks
CASES = [(33, 28 * 512), (1200, 28 * 512), (300, 28 * 128), (2001, 40 * 128), (70, 40 * 256), (50, 12 * 1024),
         (20, 12 * 2048), (65, 12 * 64), (40, 36 * 64), (3, 40 * 32), (129, 44 * 256), (17, 44 * 512)]


def _fits(n):
    m, p = href.split_size(n)
    return roste.mma_smem_bytes(m, p) <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin


def _mma(x, transpose=False):
    n = x.shape[-1]
    return torch.ops.fusedtune.hadamard_mma_kernel(x, 1 / n ** 0.5, list(roste._neg_masks(n, transpose)))


def _butterfly(x, transpose=False):
    n = x.shape[-1]
    return torch.ops.fusedtune.hadamard_kernel(x, 1 / n ** 0.5, list(roste._neg_masks(n, transpose)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_mma_kernel_within_rule(rows, n, dtype, transpose):
    """Forward (H_m) and backward (H_m^T: 12, 40 and 44 are not symmetric): error against float64 at most
    twice the butterfly kernel's (plus 1e-6), and at least 99% of the elements that kernel's bits (both are
    fp32-accurate before the one rounding; a wrong row, column or sign would change almost all)."""
    if not _fits(n):
        pytest.skip(f"a row of {n} does not fit this GPU's shared memory for the tensor-core kernel")
    x = torch.randn(rows, n, device="cuda", generator=torch.Generator("cuda").manual_seed(n + rows)).to(dtype)
    got, ref = _mma(x, transpose), _butterfly(x, transpose)
    exact = href.hadamard(x.double(), transpose=transpose)
    err = (got.double() - exact).abs().max().item()
    base = (ref.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"error {err:.3e} > 2 x the butterfly kernel's {base:.3e}"
    same = (got.view(torch.int16) == ref.view(torch.int16)).double().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the elements are the butterfly kernel's bits"


def test_mma_kernel_special_values_and_power_of_two_rows():
    """NaN and inf land where the butterfly kernel puts them; a row scaled by 2^100 or 2^-100 is the scaled
    output of its unscaled copy bit for bit (the tensor core's sums align to the largest term, so a
    power of two moves through them exactly; the tiny row's outputs stay normal)."""
    n = 28 * 512
    x = torch.randn(64, n, device="cuda")
    x[1] = x[3] * 2.0 ** 100
    x[2] = x[4] * 2.0 ** -100
    x[5, 17] = float("nan")
    x[6, 1000] = float("inf")
    x[7, 3] = -float("inf")
    x[8] = 0.0
    x = x.bfloat16()
    got, ref = _mma(x), _butterfly(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[5]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[1].float(), (got[3].float() * 2.0 ** 100)) and torch.equal(got[2].float(),
                                                                                       got[4].float() * 2.0 ** -100)
    assert torch.equal(got[8], torch.zeros_like(got[8]))


def test_mma_kernel_through_the_op_and_autograd():
    """With the kernel on (mma_scope), hadamard under auto and backend='cuda' take it for 16-bit factored
    rows, forward and backward (H_m^T), and leave float32 and power-of-two rows to the kernels before."""
    n = 40 * 256
    x = torch.randn(96, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    with roste.mma_scope(True):
        y = roste.hadamard(x)
        y.backward(dy)
        assert torch.equal(y, _mma(x.detach())) and torch.equal(x.grad, _mma(dy, transpose=True))
        assert torch.equal(roste.hadamard(x.detach(), backend="cuda"), y)
        for other in (torch.randn(8, n, device="cuda"), torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)):
            assert roste.mma_refuses(other)
            assert torch.equal(roste.hadamard(other, backend="cuda"), _butterfly(other))
    with roste.mma_scope(False):
        assert torch.equal(roste.hadamard(x.detach(), backend="cuda"), _butterfly(x.detach()))


def test_mma_kernel_refuses_what_it_does_not_serve():
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        _mma(torch.randn(4, 28 * 512, device="cuda"))
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.fusedtune.hadamard_mma_kernel(torch.randn(4, 4096, device="cuda").bfloat16(), 1.0, [])
    assert _mma(torch.empty(0, 28 * 512, device="cuda", dtype=torch.bfloat16)).shape == (0, 28 * 512)
