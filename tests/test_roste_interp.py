"""The RoSTE Triton kernels in the interpreter: the Hadamard transform against the float64 reference,
the fused rotate + fake-quant against the reference fake quantization of the same rotation (bit for
bit), the unrotated fake quant against the reference (bit for bit), the straight-through backward."""
import pytest
import torch

from fusedtune.backend import BackendError
from fusedtune.ops.roste import hadamard, rotate_fake_quant
from fusedtune.reference import hadamard as href
from fusedtune.reference import roste as rref
from fusedtune.testing import assert_within_rule

pytestmark = pytest.mark.interp


SIZES = [16 * 16, 4096, 28 * 128, 12 * 64, 76 * 64, 40 * 32, 172 * 64, 148 * 128, 156 * 16]


def unfused_fp32(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The same two-GEMM transform (H_A X H_P^T) as plain float32 torch matmuls: what DESIGN.md's rule
    measures a float32 kernel against."""
    from fusedtune.triton_kernels import roste as tk
    n = x.shape[-1]
    A, P = tk.plan(n)
    ha, hp, _ = tk._mats(n, transpose, "cpu", torch.float32)
    X = x.float().reshape(-1, A, P)
    return ((ha[:A, :A] @ X) @ hp.t() * (1.0 / n ** 0.5)).reshape(x.shape)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])   # (bf16 is wrong in the interpreter)
def test_triton_hadamard_matches_reference(n, transpose, dtype):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = hadamard(x, transpose=transpose, backend="triton")
    assert got.dtype == dtype
    exact = href.hadamard(x.double(), transpose=transpose)
    if dtype == torch.float32:    # three fp16 parts per operand: only the fp32 sums round, as in fp32 GEMMs
        assert_within_rule(got, exact, unfused_fp32(x, transpose), f"float32 hadamard n={n}", atol=1e-7)
        return
    want = hadamard(x, transpose=transpose, backend="reference")
    torch.testing.assert_close(got.double(), exact, atol=2e-3, rtol=2e-3)
    assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 2e-3


@pytest.mark.parametrize("n", [12 * 64, 148 * 128])      # the whole row in one block; blocks of 32 rows of H_A
def test_float32_one_hot_rows_are_exact(n):
    """A row with one nonzero x: every output is +-x * scale, one rounding. The three fp16 parts carry all
    24 bits of x (two parts, 22 bits, would not: the fp32 sums have nothing to round here)."""
    g = torch.Generator().manual_seed(n)
    x = torch.zeros(6, n)
    x[torch.arange(6), torch.randint(0, n, (6,), generator=g)] = (1 + torch.rand(6, generator=g)) * torch.tensor(
        [1.0, -3e-20, 7e25, 0.1, -1.0, 2.0 ** -115])
    assert torch.equal(hadamard(x, backend="triton"), unfused_fp32(x, False))


def test_float32_rows_keep_their_range_and_small_values():
    """The row's power-of-two scaling: values near float32's limits and a row whose entries span 2^-60 ..
    2^40 transform within the rule (fp16 parts alone would overflow or flush them)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 76 * 64, generator=g)
    x[0] *= 1e30
    x[1] *= 1e-30
    x[2] *= torch.logspace(-18, 12, 76 * 64)
    x[3] = 0.0
    got = hadamard(x, backend="triton")
    exact = href.hadamard(x.double())
    assert torch.isfinite(got).all() and (got[3] == 0).all()
    assert_within_rule(got, exact, unfused_fp32(x, False), "float32 hadamard, extreme rows", atol=0.0)


def test_sizes_the_kernel_cannot_serve_are_said():
    with pytest.raises(BackendError, match="n = 65536"):
        hadamard(torch.zeros(2, 65536, dtype=torch.float16), backend="triton")
    with pytest.raises(BackendError, match="n = 37888"):
        rotate_fake_quant(torch.zeros(2, 148 * 256, dtype=torch.float16), 4, backend="triton")
    with pytest.raises(BackendError, match="n = 37888"):
        hadamard(torch.zeros(2, 148 * 256), backend="triton")


def test_rostelinear_refuses_or_reports_a_size_the_triton_rotation_cannot_serve(monkeypatch):
    """RoSTELinear with backend="triton" over a size the Triton rotation cannot serve (172 * 8: P < 16) is refused at
    construction, and patch changes nothing (found by review: it was accepted, reported as Triton, and the first
    forward failed); under "auto" on a GPU the report says the reference, which the op then runs."""
    import fusedtune
    from fusedtune.nn import RoSTELinear
    from fusedtune.nn import roste as nn_roste
    n = 172 * 8
    model = torch.nn.Sequential(torch.nn.Linear(n, 16), torch.nn.Linear(16, 16))
    with pytest.raises(BackendError, match="n = 1376 is not"):
        fusedtune.patch(model, "roste", target_modules="all-linear", backend="triton", a_bits=8)
    assert [type(m) for m in model] == [torch.nn.Linear] * 2 and fusedtune.report(model).method is None
    RoSTELinear.from_linear(torch.nn.Linear(n, 16), backend="triton", rotate=False)       # nothing to rotate
    layer = RoSTELinear.from_linear(torch.nn.Linear(n, 16))
    monkeypatch.setattr(nn_roste, "roste_backend", lambda device, backend: {"backend": "triton", "why_not": {}})
    rep = layer._fusedtune_report()
    assert rep["backend"] == "reference" and "n = 1376 is not" in rep["why_not"]["triton"]
    assert RoSTELinear.from_linear(torch.nn.Linear(4096, 8))._fusedtune_report()["backend"] == "triton"
    # the Triton plan is asked only where Triton was asked for or reported (it imports triton, an optional extra:
    # found by review, a CPU install without it could not build a RoSTELinear)
    monkeypatch.setattr(nn_roste, "triton_cannot_rotate", lambda n: pytest.fail("asked without Triton"))
    monkeypatch.setattr(nn_roste, "roste_backend", lambda device, backend: {"backend": "cpu", "why_not": {}})
    assert RoSTELinear.from_linear(torch.nn.Linear(n, 16), backend="cpu")._fusedtune_report()["backend"] == "cpu"


def test_fp16_large_column_does_not_overflow_between_the_gemms():
    """A = 256 (n = 32768): H_A x reaches 256 x 5000 in one column before H_P spreads it; the bf16 split
    keeps it finite where an fp16 intermediate would overflow."""
    x = torch.zeros(2, 32768)
    x[:, ::128] = 5000.0
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    got = hadamard(x.to(torch.float16), backend="triton")
    from fusedtune.reference.hadamard import hadamard as ref_hadamard
    want = ref_hadamard(x.to(torch.float16).double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=0.05, rtol=2e-3)


def test_fp16_intermediate_stays_in_range():
    x = torch.full((2, 108 * 32), 1000.0).to(torch.float16)      # H_A x reaches 108000 before normalization
    got = hadamard(x, backend="triton")
    want = hadamard(x.float(), backend="reference")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=1.0, rtol=2e-3)


def _rows(n, dtype, seed):
    """Rows that exercise the quantizer: Gaussian with an outlier, all positive with a tiny range (a large
    zero point), constant, all zero, one with a wide dynamic range, one with a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, n, generator=g)
    x[0, 3] = 40.0
    x[1] = 1.0 + torch.rand(n, generator=g) * 1e-2
    x[2] = -0.375
    x[3] = 0.0
    x[4] = x[4] * torch.logspace(-4, 2, n)
    x[6, 5] = float("nan")
    return x.to(dtype)


def assert_same_bits(got, want):
    """Equal bit for bit (signed zeros included); NaN where the reference has NaN (any payload)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[got.dtype]
    assert torch.equal(got.view(ints)[~nan], want.view(ints)[~nan])


@pytest.mark.parametrize("bits,symmetric,clip", [(4, False, 0.95), (8, False, 1.0), (2, True, 1.0), (4, True, 0.9),
                                                  (3, False, 0.5)])
@pytest.mark.parametrize("n,dtype", [(12 * 64, torch.float16), (4096, torch.float16), (172 * 64, torch.float16),
                                     (12 * 64, torch.float32), (148 * 128, torch.float32)])
def test_fused_rotate_fake_quant_equals_reference_quant_of_the_rotation(n, dtype, bits, symmetric, clip):
    x = _rows(n, dtype, n + bits)
    got = rotate_fake_quant(x, bits, "token", symmetric, clip, rotate=True, ste="clipped", backend="triton")
    y = hadamard(x, backend="triton")                  # the kernel's own rotation, rounded to x's dtype
    want, inside = rref.fake_quant(y, bits, "token", symmetric, clip)
    assert_same_bits(got, want.to(x.dtype))
    assert torch.isnan(got[6]).all() and not torch.isnan(got[:6]).any()   # a NaN makes its row NaN
    from fusedtune.triton_kernels import roste as tk
    _, got_inside = tk.rotate_fake_quant(x, bits, symmetric, clip, True, True)
    assert torch.equal(got_inside, inside)
    exact = rref.rotate_fake_quant(x, bits, "token", symmetric, clip, True)[0]      # float64 rotation
    # differs only where the rotation rounds differently: a code that flips (rare); in float32 also the last
    # bits of a whole row when its min or max (so its scale) moved by an ulp
    near = (got[:6] - exact[:6]).abs() <= 1e-5 * exact[:6].abs().amax(1, keepdim=True)
    assert (~near).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,symmetric,clip", [(4, False, 0.95), (8, True, 1.0), (2, False, 1.0)])
def test_unrotated_fake_quant_is_bit_exact(dtype, bits, symmetric, clip):
    x = _rows(1000, dtype, bits)                        # 1000: a partial last block of the quantizing pass
    got = rotate_fake_quant(x, bits, "token", symmetric, clip, rotate=False, backend="triton")
    want = rref.rotate_fake_quant(x, bits, "token", symmetric, clip, rotate=False)[0]
    assert_same_bits(got, want)
    if symmetric:                                      # small negatives round to -0.0, as torch.round
        assert (want.view(torch.int32 if dtype == torch.float32 else torch.int16) ==
                torch.tensor(-0.0, dtype=dtype).view(torch.int32 if dtype == torch.float32 else torch.int16)).any()


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_straight_through_backward_matches_reference(ste, granularity):
    x = _rows(28 * 16, torch.float16, 7)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    grads = []
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_()
        out = rotate_fake_quant(xx, 4, granularity, False, 0.8, rotate=True, ste=ste, backend=backend)
        out.backward(dy)
        grads.append(xx.grad.double())
    torch.testing.assert_close(grads[0], grads[1], atol=2e-3, rtol=2e-3)
    if ste == "clipped":                               # the clip range zeroes part of the gradient
        full = hadamard(dy.float(), transpose=True).double()
        assert (grads[1] - full).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,symmetric,clip", [(4, False, 0.95), (8, True, 1.0), (3, True, 0.7)])
@pytest.mark.parametrize("rotate", [False, True])
def test_channel_fake_quant_kernel_is_bit_exact(dtype, bits, symmetric, clip, rotate):
    """Per-column groups over 70 rows (not a multiple of the kernel's 32-row steps) and 192 columns (not a
    multiple of its 64-column blocks), a constant column, an all-zero column, a column with a NaN."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(70, 12 * 16, generator=g)
    x[:, 5] = 0.625
    x[:, 6] = 0.0
    if not rotate:                                     # (a rotated NaN would fill its whole row)
        x[3, 100] = float("nan")
    x[:, 7] *= 50
    x = x.to(dtype)
    got = rotate_fake_quant(x, bits, "channel", symmetric, clip, rotate=rotate, ste="clipped", backend="triton")
    y = hadamard(x, backend="triton") if rotate else x
    want, inside = rref.fake_quant(y, bits, "channel", symmetric, clip)
    assert_same_bits(got, want.to(dtype))
    assert torch.isnan(got).any(1).sum() == (0 if rotate else 70) and not torch.isnan(got[:, :100]).any()
    from fusedtune.triton_kernels import roste as tk
    _, got_inside = tk.fake_quant_channels(y, bits, symmetric, clip, True)
    assert torch.equal(got_inside, inside)


def _int_case(M, K, N, w_bits, dtype, seed):
    from fusedtune.roste.export import pack_codes
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(M, K, generator=g).to(dtype)
    y[1] = y[1].abs() + 3.0            # all positive: a zero point far outside [0, levels]
    y[2] = 0.0
    y[3, 5] = float("nan")
    w = torch.randn(N, K, generator=g)
    w[0] = 0.5                          # a constant channel
    qw, sw, zw = rref.quantize(w, w_bits, "token", False, 0.95)
    c = 2 ** (w_bits - 1)
    cw = (qw - c).to(torch.int8)
    zwc = (zw - c).reshape(-1)
    uw = cw.double().sum(1) - K * zwc.double()
    bias = torch.randn(N, generator=g).to(dtype)
    return y, pack_codes(qw.to(torch.uint8), w_bits), cw, sw.reshape(-1), zwc, uw, bias


@pytest.mark.parametrize("M,K,N,a_bits,w_bits", [(37, 70, 50, 4, 4), (40, 64, 33, 8, 8), (20, 45, 40, 3, 6),
                                                 (9, 33, 17, 7, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_integer_gemm_kernels_equal_the_reference(M, K, N, a_bits, w_bits, dtype):
    """act_codes_kernel gives the reference codes, scales, zero points and sums bit for bit, and
    int_linear_kernel (int8 dot, 4-bit unpacking in the tile load, float64 epilogue) the reference
    output bit for bit: NaN rows, all-positive and all-zero rows, odd K included."""
    from fusedtune.ops.roste import int_linear
    from fusedtune.triton_kernels import roste_int as ti
    y, packed, cw, sw, zw, uw, bias = _int_case(M, K, N, w_bits, dtype, M + K)
    got_codes, want_codes = ti.act_codes(y, a_bits, 0.9), rref.act_codes(y, a_bits, 0.9)
    for a, b in zip(got_codes, want_codes):
        assert torch.equal(a.nan_to_num(7.0) if a.is_floating_point() else a,
                           b.nan_to_num(7.0) if b.is_floating_point() else b)
    got = int_linear(y, a_bits, 0.9, packed, w_bits, sw, zw, uw, bias, backend="triton")
    want = int_linear(y, a_bits, 0.9, packed, w_bits, sw, zw, uw, bias, backend="reference")
    assert got.dtype == dtype and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert got[3].isnan().all() and not got[torch.arange(M) != 3].isnan().any()
    want2 = rref.integer_linear(*want_codes[:3], cw, sw, zw, bias, dtype)   # the unpacked weight: same
    assert torch.equal(want.nan_to_num(7.0), want2.nan_to_num(7.0))


@pytest.mark.parametrize("n", [64, 192, 1280])
@pytest.mark.parametrize("bits", [4, 8])
def test_rotation_and_codes_in_one_launch_equal_the_two_step_codes(n, bits):
    """hadamard_kernel's codes mode (QUANT 2) gives exactly the reference act_codes of the kernel's own
    rotation (what the unfused rotation + act_codes_kernel computes), NaN rows included; and int_linear
    with rotate=True on Triton equals the reference int_linear of that rotation."""
    from fusedtune.ops.roste import int_linear
    from fusedtune.triton_kernels import roste as tk
    from fusedtune.triton_kernels import roste_int as ti
    y, packed, _, sw, zw, uw, bias = _int_case(9, n, 24, 4, torch.float16, n + bits)
    rotated = tk.hadamard(y, 1.0 / n ** 0.5, False)
    got, want = ti.act_codes(y, bits, 0.95, rotate=True), rref.act_codes(rotated, bits, 0.95)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(7.0) if a.is_floating_point() else a,
                           b.nan_to_num(7.0) if b.is_floating_point() else b)
    out = int_linear(y, bits, 0.95, packed, 4, sw, zw, uw, bias, rotate=True, backend="triton")
    ref = int_linear(rotated, bits, 0.95, packed, 4, sw, zw, uw, bias, backend="reference")
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))


def test_bench_float32_rows_run():
    """bench roste's float32 section on a tiny shape through the interpreter: rows and accounting only."""
    from fusedtune.bench.core import CpuTimer
    from fusedtune.bench.roste import _flops, fp32_rows
    rows = fp32_rows(CpuTimer(quick=True, min_reps=1, budget_s=0.0), 3, 768)
    assert [r["kernel"] for r in rows] == ["hadamard (orthonormal), float32 rows",
                                           "rotate_fake_quant (token, W4 asym, fused), float32 rows"]
    assert all(r["dtype"] == "float32" and r["time_ms"] > 0 and r["baseline_ms"] > 0 for r in rows)
    assert _flops(3, 768, parts=3) == 3 * 3 * (2 * 16 * 16 * 64 + 2 * 16 * 64 * 64)   # 768 = 12 x 64: AP 16
