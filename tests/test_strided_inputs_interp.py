"""Public entry points handed strided views of the small tensors the Triton kernels index with unit stride
(seeds + j, rows + m, indices + i, P + m * stride + k, the FP8 weight and scale tables row-major): the wrappers
copy them, so the Triton results equal the reference's (found by a layout review; each case was off by 1-190
before). Run in the interpreter (TRITON_INTERPRET=1 pytest -m interp), float32."""
import pytest
import torch

from fusedtune.ops.dora import dora_linear
from fusedtune.ops.fp8 import fp8_linear, fp8_quantize_128x128
from fusedtune.ops.hft import hft_row_linear, row_grad
from fusedtune.ops.sparse_delta import sddmm, sparse_delta_linear
from fusedtune.ops.zo import zo_apply_

pytestmark = pytest.mark.interp


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_zo_seeds_and_coeffs_as_strided_and_expanded_views():
    hist = torch.tensor([[11, 99], [22, 98], [33, 97]], dtype=torch.int64)
    seeds, coeffs = hist[:, 0], torch.tensor([0.5]).expand(3)
    assert seeds.stride(0) == 2 and coeffs.stride(0) == 0
    out = {}
    for backend in ("reference", "triton"):
        t = torch.zeros(64)
        zo_apply_([t], seeds, coeffs, undo=(hist[:2, 1], torch.tensor([-0.25]).expand(2)), backend=backend)
        out[backend] = t
    assert torch.equal(out["triton"], out["reference"])


def test_row_grad_and_hft_row_linear_with_strided_rows():
    g = _gen(0)
    T, N, K = 8, 16, 32
    dy, x, W = torch.randn(T, N, generator=g), torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    rows = torch.arange(0, N)[::2]
    want = row_grad(dy, x, rows.contiguous(), backend="reference")
    torch.testing.assert_close(row_grad(dy, x, rows, backend="triton"), want, rtol=1e-5, atol=1e-5)
    wr = W.index_select(0, rows).clone().requires_grad_(True)
    hft_row_linear(x, W, wr, rows, backend="triton").backward(dy)
    torch.testing.assert_close(wr.grad, want, rtol=1e-5, atol=1e-5)


def test_sddmm_and_sparse_delta_linear_with_strided_indices():
    g = _gen(1)
    T, N, K = 8, 16, 16
    dy, x, W = torch.randn(T, N, generator=g), torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    idx = torch.arange(0, N * K, 3, dtype=torch.int32)[::2]
    want = sddmm(dy, x, idx.contiguous(), backend="reference")
    torch.testing.assert_close(sddmm(dy, x, idx, backend="triton"), want, rtol=1e-5, atol=1e-5)
    v = torch.zeros(idx.shape, requires_grad=True)
    sparse_delta_linear(x, W, v, idx, backend="triton").backward(dy)
    torch.testing.assert_close(v.grad, want, rtol=1e-5, atol=1e-5)


def test_dora_dropout_dgrad_with_a_column_major_dy():
    """dy from y.t(): the dropped-dX operand (dy * (g - 1)) kept dy's column-major layout into the GEMM."""
    g = _gen(2)
    M, K, N, R = 8, 32, 16, 4
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    A, B, mag = torch.randn(R, K, generator=g) * 0.1, torch.randn(N, R, generator=g) * 0.1, torch.rand(N, generator=g)
    w = torch.randn(N, M, generator=g)

    def dx(backend):
        xx = x.clone().requires_grad_(True)
        y = dora_linear(xx, W, A, B, 2.0, mag + 0.5, dropout_p=0.3, seed=123, backend=backend)
        (y.t() * w).sum().backward()          # dy = w.t(): strides (1, M)
        return xx.grad
    torch.testing.assert_close(dx("triton"), dx("reference"), rtol=1e-4, atol=1e-4)


def test_fp8_linear_with_a_transposed_w_qt_and_column_major_scales():
    g = _gen(3)
    M, K, N = 16, 256, 256
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) * torch.linspace(0.01, 10, N)[:, None]
    wq, ws, wqt = fp8_quantize_128x128(W, backend="triton", transpose=True)

    def run(w_s, w_qt):
        xx = x.clone().requires_grad_(True)
        y = fp8_linear(xx, W, None, wq, w_s, backend="triton", w_qt=w_qt)
        y.backward(torch.ones_like(y))
        return y.detach(), xx.grad
    y0, dx0 = run(ws, wqt)
    y1, dx1 = run(ws.t().contiguous().t(), wq.t())   # the same values: scales column-major, w_qt a view
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)
