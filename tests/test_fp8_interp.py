"""FP8 Triton kernels in the interpreter: the quantizers byte-identical to the reference (torch's
float8 cast), the integer E4M3 conversion over edge values, the block-scaled GEMM (the interpreter
runs fp8 dots exactly) against the reference emulation, and FP8Linear's backward."""
import pytest
import torch

from fusedtune.ops import fp8 as F8
from fusedtune.reference import fp8 as ref
from fp8_cases import e4m3_edges, linear_by_backend

pytestmark = pytest.mark.interp


def _u8(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a, b):
    """Bytes equal, NaN bytes compared as NaN (torch writes 0x7F or 0xFF)."""
    if a.dtype == torch.float8_e4m3fn:
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        return torch.equal(na, nb) and torch.equal(_u8(a)[~na], _u8(b)[~nb])
    return torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0))


@pytest.mark.parametrize("M,K", [(5, 130), (200, 300), (128, 128)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_bytes_equal_reference(M, K, pow2):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)) * torch.logspace(-4, 3, K)[None, :]
    x[0, :3] = torch.tensor([1e-9, -3e-5, 0.0])
    if M > 3:
        x[1, 7] = float("inf")
        x[2, K - 1] = float("nan")
        x[3, :] = 0.0
    if M > 4:   # tiles whose amax / 448 underflows float32 (2^-145) or is subnormal (2^-140: rounded down
        x[4] = 0.0                     # it would put x / s past 448)
        x[4, 1] = 2.0 ** -145
        x[4, K - 1] = 2.0 ** -140
    got = F8.fp8_quantize_1x128(x, pow2=pow2, backend="triton")
    want = F8.fp8_quantize_1x128(x, pow2=pow2, backend="reference")
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and _same(a, b), f"output {i}"


def test_quantize_128x128_bytes_equal_reference():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(1)) * 0.02
    w[5, 5] = float("nan")
    got = F8.fp8_quantize_128x128(w, backend="triton")
    want = F8.fp8_quantize_128x128(w, backend="reference")
    assert all(_same(a, b) for a, b in zip(got, want))
    got_t = F8.fp8_quantize_128x128(w, backend="triton", transpose=True)   # + the bytes transposed, same pass
    assert len(got_t) == 3 and all(_same(a, b) for a, b in zip(got_t, want))
    assert got_t[2].shape == (260, 300) and torch.equal(got_t[2].view(torch.uint8), want[0].view(torch.uint8).t())


def test_integer_e4m3_conversion_matches_torch_cast_on_edges():
    x = e4m3_edges()           # every row's amax is 448: scale 1, so the kernel casts the values themselves
    got = F8.fp8_quantize_1x128(x, transpose=False, backend="triton")
    assert (got[1] == 1.0).all()
    assert _same(got[0], x.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("b_rows,transposed", [(1, False), (128, False), (128, True)])  # (128, True): dX = dy W
@pytest.mark.parametrize("K", [300, 256, 100])   # 100: KB == 1
def test_gemm_matches_reference(b_rows, transposed, K):
    a_q, a_s = ref.quantize_rows(torch.randn(70, K, generator=torch.Generator().manual_seed(2)))
    b = torch.randn(90, K, generator=torch.Generator().manual_seed(3))
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    if transposed:
        b_q = b_q.t().contiguous()       # stored [K, N]
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, transposed, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, transposed, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_fp8_linear_forward_backward_matches_reference():
    res = linear_by_backend(150, 260, 140)
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
