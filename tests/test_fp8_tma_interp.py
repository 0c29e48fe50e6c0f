"""The Hopper block-scaled FP8 GEMM (triton_kernels/fp8_tma.py: TMA loads, persistent grid) in the interpreter,
which runs fp8 dots exactly, against the reference emulation, as test_fp8_interp.py holds fp8_gemm_kernel:
through the public op (both scale layouts of B, K past the last full block, a single K block, more output tiles
than programs, 16-bit and float32 outputs, a block with inf), through FP8Linear's forward and backward (all three
GEMMs), and the operands TMA cannot load going to fp8_gemm_kernel instead."""
import pytest
import torch

from fusedtune.ops import fp8 as F8
from fusedtune.reference import fp8 as ref
from fp8_cases import linear_by_backend

pytestmark = pytest.mark.interp


@pytest.fixture
def tma(monkeypatch):
    """fp8_tma enabled for any row count; returns the calls of fp8_tma.gemm and of fp8_gemm_kernel's launch."""
    from fusedtune.triton_kernels import fp8 as tk
    from fusedtune.triton_kernels import fp8_tma
    monkeypatch.setattr(fp8_tma, "ENABLED", True)
    monkeypatch.setattr(fp8_tma, "MIN_ROWS", 1)
    calls = {"tma": 0, "classic": 0}
    real_tma, real_fast = fp8_tma.gemm, tk.fast

    def tma_gemm(*a, **k):
        calls["tma"] += 1
        return real_tma(*a, **k)

    def classic_fast(kernel):
        if kernel is tk.fp8_gemm_kernel:
            calls["classic"] += 1
        return real_fast(kernel)
    monkeypatch.setattr(fp8_tma, "gemm", tma_gemm)
    monkeypatch.setattr(tk, "fast", classic_fast)
    return calls


def _operands(M, N, K, b_rows, seed=2):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)[None, :]
    b = torch.randn(N, K, generator=g)
    a_q, a_s = ref.quantize_rows(a)
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    return a_q, a_s, b_q, b_s


@pytest.mark.parametrize("b_rows", [1, 128])
@pytest.mark.parametrize("M,N,K", [(70, 92, 272), (200, 164, 256), (33, 36, 112)])   # K tail, KB 2, KB 1
def test_tma_gemm_matches_reference(b_rows, M, N, K, tma):
    a_q, a_s, b_q, b_s = _operands(M, N, K, b_rows)
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, backend="reference")
    assert tma == {"tma": 1, "classic": 0}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # the same products by the classic kernel: the same math, in another order of the fp32 sums
    classic = F8.fp8_gemm(a_q, a_s, b_q.t().contiguous(), b_s, b_rows, torch.float32, True, backend="triton")
    assert tma["classic"] == 1
    torch.testing.assert_close(got, classic, atol=1e-4, rtol=1e-5)


def test_tma_gemm_16bit_output_and_nonfinite_block(tma):
    """float16 output (the interpreter's bf16 arithmetic is unreliable; the store's conversion is the same
    code), and a 1x128 block holding inf: its scale is NaN, so its row's outputs are NaN, as the reference's."""
    a_q, a_s, b_q, b_s = _operands(96, 104, 256, 128, seed=5)
    a_s[3, 1] = float("nan")
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.float16, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.float16, backend="reference")
    assert tma["tma"] == 1 and torch.isnan(got[3]).all()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, equal_nan=True)


@pytest.mark.parametrize("case", ["K % 16", "B transposed", "C row stride", "few rows"])
def test_operands_tma_cannot_load_take_the_classic_kernel(case, tma, monkeypatch):
    from fusedtune.triton_kernels import fp8_tma
    M, N, K, tr = 70, 92, 272, False
    if case == "K % 16":
        K = 300                          # A's row stride (K bytes) is not a multiple of 16
    elif case == "C row stride":
        N = 90                           # float32 rows of 360 bytes
    elif case == "B transposed":
        tr = True                        # B stored [K, N]: not the K-major tile wgmma takes
    else:
        monkeypatch.setattr(fp8_tma, "MIN_ROWS", 64)
        M = 40
    a_q, a_s, b_q, b_s = _operands(M, N, K, 128)
    if tr:
        b_q = b_q.t().contiguous()
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.float32, tr, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, 128, torch.float32, tr, backend="reference")
    assert tma == {"tma": 0, "classic": 1}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_fp8_linear_through_tma_matches_reference(tma):
    """FP8Linear's forward (x W^T), dX (dy against W's K-major copy) and dW (the column-wise copies of dy and x)
    all through the TMA kernel, against the reference backend."""
    res = linear_by_backend(160, 272, 144)
    assert tma == {"tma": 3, "classic": 0}
    for got, want in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_bench_tma_rows_time_the_kernel_and_restore_the_settings(monkeypatch):
    """bench fp8's opt-in sections, run through the interpreter with every op on Triton (on a GPU they run
    on sm_90 only): the fp8_gemm rows reach the TMA kernel and compare with the classic kernel, FP8Linear's row
    takes it for its GEMMs, the scope puts FUSEDTUNE_FP8_GEMM and ENABLED back, and FUSEDTUNE_BENCH_SKIP
    leaves both out with a row saying why."""
    import os

    import fusedtune
    from fusedtune.bench import fp8 as bf
    from fusedtune.triton_kernels import fp8_tma

    def timer(fn):
        fn()
        return (1.0, 1.0, 1.0)
    monkeypatch.setattr(fp8_tma, "MIN_ROWS", 1)
    monkeypatch.delenv("FUSEDTUNE_FP8_GEMM", raising=False)
    enabled, before = fp8_tma.ENABLED, fp8_tma.launches
    with fusedtune.use_backend("triton"):
        gemm_rows = bf.tma_rows(timer, [128], "cpu")
        linear_rows = bf.tma_linear_rows(timer, 128, "cpu")
    assert fp8_tma.launches - before == 1 + 2 * 3    # one fp8_gemm call; FP8Linear: the counted call + the timer's
    assert [r["baseline"] for r in gemm_rows] == ["fp8_gemm_kernel (pointer loads)", "torch bf16 matmul"]
    assert all(r["kernel"] == "fp8_gemm (1x128 x 128x128, promoted, fused-tma)" for r in gemm_rows)
    assert "GEMMs took" not in linear_rows[0]["note"] and "FUSEDTUNE_FP8_TMA=1" in linear_rows[0]["note"]
    assert fp8_tma.ENABLED is enabled and "FUSEDTUNE_FP8_GEMM" not in os.environ
    monkeypatch.setenv("FUSEDTUNE_BENCH_SKIP", "fp8-tma")
    for rows in (bf.tma_rows(timer, [128], "cpu"), bf.tma_linear_rows(timer, 128, "cpu")):
        assert len(rows) == 1 and rows[0]["note"].startswith("skipped: fp8-tma left out")
