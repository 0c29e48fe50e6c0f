"""The tensor-core factor kernel (csrc/cuda/roste_mma.cu, hadamard_mma_kernel) on a GPU: H_m on mma.sync first,
then the butterflies. Its fp32 sums run in the tensor core's adder, so it is not the CPU kernel's bits; it is
held to the float64 reference within DESIGN.md's rule, with a float32 torch matmul by the dense H_n (rounded
once to the row's dtype) as the same-precision computation, and to that computation's bits on almost every
element."""
import pytest
import torch

from fusedtune.backend import BackendError
from fusedtune.ops import roste
from fusedtune.reference import hadamard as href

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not __import__("fusedtune")._ext.with_cuda(), reason="fusedtune._C has no CUDA kernels")]

# (rows, n): every factor tile count (12: 1 tile of H_m's rows, 28: 2, 40 / 44: 3 -- a warp holds them all; 52,
# 60: 4, 76: 5, 108: 7, 140: 9, 148 / 156: 10, 172: 11 -- a warp a tile); p from 32 (40 x 32) to 2048; p <= 256:
# the lane stages end the butterflies (stored from registers); above, one shared-memory pass of 1 bit (p = 512),
# 2 bits (1024) or 3 bits (12 x 2048: 164 KB of shared memory, skipped where a block cannot have it); more rows
# than resident blocks
CASES = [(33, 28 * 512), (1200, 28 * 512), (300, 28 * 128), (2001, 40 * 128), (70, 40 * 256), (50, 12 * 1024),
         (20, 12 * 2048), (65, 12 * 64), (3, 40 * 32), (129, 44 * 256), (17, 44 * 512), (40, 52 * 128),
         (24, 60 * 64), (600, 76 * 64), (31, 108 * 256), (70, 140 * 64), (1000, 172 * 64), (45, 148 * 128),
         (9, 156 * 64)]


def _fits(n):
    m, p = href.split_size(n)
    return roste.mma_smem_bytes(m, p) <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin


def _mma(x, transpose=False):
    return roste._mma_call(x, 1 / x.shape[-1] ** 0.5, transpose)


def _fp32_matmul(x, transpose=False):
    """x @ H_n^T (x @ H_n when transpose) / sqrt(n) as one float32 torch matmul, rounded to x's dtype."""
    n = x.shape[-1]
    m, p = href.split_size(n)
    hn = torch.kron(href.factor_matrix(m).cuda().float(), href.hadamard_matrix(p).cuda().float())
    return ((x.float() @ (hn if transpose else hn.t())) * (1 / n ** 0.5)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_mma_kernel_within_rule(rows, n, dtype, transpose):
    """Forward (H_m) and backward (H_m^T; most factors are not symmetric): error against float64 at most
    twice the float32 matmul's (plus 1e-6), and at least 99% of the elements that matmul's bits (both are
    fp32-accurate before the one rounding; a wrong row, column or sign would change almost all)."""
    if not _fits(n):
        pytest.skip(f"a row of {n} does not fit this GPU's shared memory for the tensor-core kernel")
    assert not roste.mma_refuses(torch.empty(1, n, device="cuda", dtype=dtype))
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(rows, n, device="cuda", generator=torch.Generator("cuda").manual_seed(n + rows)).to(dtype)
    got, ref = _mma(x, transpose), _fp32_matmul(x, transpose)
    exact = href.hadamard(x.double(), transpose=transpose)
    err = (got.double() - exact).abs().max().item()
    base = (ref.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"error {err:.3e} > 2 x the float32 matmul's {base:.3e}"
    same = (got.view(torch.int16) == ref.view(torch.int16)).double().mean().item()
    assert same >= 0.99, f"only {same:.4f} of the elements are the float32 matmul's bits"


@pytest.mark.parametrize("n", [28 * 512, 172 * 64])
def test_mma_kernel_special_values_and_power_of_two_rows(n):
    """A NaN makes its row NaN, a lone inf its row inf (no NaN: one infinite term an output), a zero row
    zeros; a row scaled by 2^100 or 2^-100 is the scaled output of its unscaled copy bit for bit (the tensor
    core's sums align to the largest term, so a power of two moves through them exactly; the tiny row's
    outputs stay normal)."""
    x = torch.randn(64, n, device="cuda")
    x[1] = x[3] * 2.0 ** 100
    x[2] = x[4] * 2.0 ** -100
    x[5, 17] = float("nan")
    x[6, 1000] = float("inf")
    x[7, 3] = -float("inf")
    x[8] = 0.0
    x = x.bfloat16()
    got = _mma(x)
    assert torch.isnan(got[5]).all() and not torch.isnan(got[torch.arange(64) != 5]).any()
    assert torch.isinf(got[6]).all() and torch.isinf(got[7]).all()
    assert torch.isfinite(got[[i for i in range(64) if i not in (5, 6, 7)]]).all()
    assert torch.equal(got[1].float(), got[3].float() * 2.0 ** 100)
    assert torch.equal(got[2].float(), got[4].float() * 2.0 ** -100)
    assert torch.equal(got[8], torch.zeros_like(got[8]))


def test_mma_kernel_through_the_op_and_autograd():
    """With the kernel on (mma_scope), hadamard under auto and backend='cuda' take it for 16-bit factored
    rows, forward and backward (H_m^T), factors the butterfly kernel lacks (172) too, and leave float32 and
    power-of-two rows to the kernels before; off, backend='cuda' refuses 172 and auto takes Triton there."""
    for n in (40 * 256, 172 * 64):
        x = torch.randn(96, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        with roste.mma_scope(True):
            y = roste.hadamard(x)
            y.backward(dy)
            assert torch.equal(y, _mma(x.detach())) and torch.equal(x.grad, _mma(dy, transpose=True))
            assert torch.equal(roste.hadamard(x.detach(), backend="cuda"), y)
    with roste.mma_scope(True):
        for other in (torch.randn(8, 40 * 256, device="cuda"), torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)):
            assert roste.mma_refuses(other)
            assert torch.equal(roste.hadamard(other, backend="cuda"),
                               torch.ops.fusedtune.hadamard_kernel(other, other.shape[-1] ** -0.5,
                                                                   list(roste._neg_masks(other.shape[-1], False))))
    with roste.mma_scope(False):
        x = torch.randn(8, 172 * 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(BackendError):
            roste.hadamard(x, backend="cuda")
        assert torch.equal(roste.hadamard(x), roste.hadamard(x, backend="triton"))


def test_mma_kernel_refuses_what_it_does_not_serve():
    m, h = 28, roste._mma_factor(28, False, torch.bfloat16, torch.device("cuda", torch.cuda.current_device()))
    op = torch.ops.fusedtune.hadamard_mma_kernel
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        op(torch.randn(4, 28 * 512, device="cuda"), 1.0, h, m)
    with pytest.raises(RuntimeError, match="no factor"):
        op(torch.randn(4, 4096, device="cuda").bfloat16(), 1.0, h, 1)
    with pytest.raises(RuntimeError, match="is not served"):
        op(torch.randn(4, 28 * 24, device="cuda").bfloat16(), 1.0, h, m)       # 24 is not a power of two
    with pytest.raises(RuntimeError, match="h must be"):
        op(torch.randn(4, 40 * 256, device="cuda").bfloat16(), 1.0, h, 40)    # H_28's 32 x 32 for m = 40 (48 x 48)
    with pytest.raises(RuntimeError, match="h must be"):
        op(torch.randn(4, 28 * 512, device="cuda").half(), 1.0, h, m)         # bf16 h for fp16 rows
    assert op(torch.empty(0, 28 * 512, device="cuda", dtype=torch.bfloat16), 1.0, h, m).shape == (0, 28 * 512)


def test_mma_kernel_under_cuda_graph_capture():
    """Capturing before the factor's first upload is refused clearly; after one warm-up call the kernel
    captures and replays its own result."""
    n = 60 * 64   # a factor nothing else in this file uses
    x = torch.randn(8, n, device="cuda", dtype=torch.bfloat16)
    for key in [k for k in roste._MMA_MATS if k[0] == 60]:
        del roste._MMA_MATS[key]
    with roste.mma_scope(True):
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="warm-up"):
            with torch.cuda.graph(g):
                roste.hadamard(x, backend="cuda")
        want = roste.hadamard(x, backend="cuda")           # warm-up
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = roste.hadamard(x, backend="cuda")
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
