"""The Hopper LoRA GEMM (triton_kernels/lora_tma.py: TMA loads, persistent grid, the LoRA term and bias as
the accumulator's start) in the interpreter against the exact product, fp16 (the interpreter's bf16 is
wrong), through lora_linear's fused schedule: the forward (Q = W) and dX (Q = W^T, dropout mask on the LoRA
term) orientations, ranks past one BLOCK_R, more output tiles than programs; and the operands TMA cannot
load going to lora_gemm_kernel instead."""
import pytest
import torch

from fusedtune.ops import lora_linear
from fusedtune.reference.lora import dropout_mask
from fusedtune.testing import assert_within_rule
from lora_cases import exact64, rand_adapter

pytestmark = pytest.mark.interp


@pytest.fixture
def tma(monkeypatch):
    """The fused schedule with lora_tma enabled; returns the calls of lora_tma.gemm and of the lora_gemm_kernel
    launcher (tk._launch)."""
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora as tk
    from fusedtune.triton_kernels import lora_tma
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 2**62)
    monkeypatch.setattr(lora_tma, "ENABLED", True)
    monkeypatch.setattr(lora_tma, "MIN_ROWS", 1)     # the small shapes here (test_few_rows_stay_classic)
    calls = {"tma": 0, "classic": 0}

    def counted(name, fn):
        def call(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return call
    monkeypatch.setattr(lora_tma, "gemm", counted("tma", lora_tma.gemm))
    monkeypatch.setattr(tk, "_launch", counted("classic", tk._launch))
    return calls


def _run(backend, x, W, A, B, **kw):
    xi = x.detach().requires_grad_()       # (not a clone: x's address is part of some cases)
    Ai, Bi = (t.clone().requires_grad_() for t in (A, B))
    y = lora_linear(xi, W, Ai, Bi, 1.5, backend=backend, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, [xi, Ai, Bi], dy)), dy


def _case(M, K, N, r, dtype=torch.float16):
    g = torch.Generator().manual_seed(M + r)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A, B = rand_adapter(r, K, N, g)
    return x, W, A, B, torch.randn(N, generator=g).to(dtype)


# 16-byte rows (K, N multiples of 8 in fp16) that are not multiples of the 32-wide interpreter tiles; 3 x 5
# output tiles on 4 programs; r 40 takes two BLOCK_R (32) steps
@pytest.mark.parametrize("M,K,N,r", [(37, 72, 88, 5), (70, 40, 136, 40)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_tma_gemm_within_rule(M, K, N, r, p, tma):
    x, W, A, B, bias = _case(M, K, N, r)
    got, dy = _run("triton", x, W, A, B, bias=bias, dropout_p=p, seed=99)
    assert tma == {"tma": 2, "classic": 0}       # the forward GEMM and the dX GEMM
    want, _ = _run("reference", x, W, A, B, bias=bias, dropout_p=p, seed=99)
    keep = dropout_mask(M, K, 99, p) if p else None
    y64, g64 = exact64(x, W, [A], [B], [1.5], bias, keep=keep, p=p, dy=dy)
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"output {i}", atol=2e-3)


def test_tma_gemm_three_dim_input_without_bias(tma):
    x, W, A, B, _ = _case(24, 64, 48, 8)
    x3 = x.reshape(2, 12, 64)
    got, dy = _run("triton", x3, W, A, B)
    assert tma == {"tma": 2, "classic": 0}
    y64, g64 = exact64(x, W, [A], [B], [1.5], None, dy=dy.reshape(24, 48))
    want, _ = _run("reference", x3, W, A, B)
    for i, (a, w, e) in enumerate(zip(got, want, [y64.reshape(2, 12, 48)] + [g64[0].reshape(2, 12, 64)] + g64[1:])):
        assert_within_rule(a, e, w, f"output {i}", atol=2e-3)


@pytest.mark.parametrize("what", ["row bytes not a multiple of 16", "float32", "unaligned base address"])
def test_what_tma_cannot_load_takes_the_classic_kernel(what, tma):
    """TMA needs 16-byte-aligned base addresses and row strides and 16-bit operands here: anything else goes
    to lora_gemm_kernel (and still gives the right result)."""
    if what == "row bytes not a multiple of 16":       # K = 70 halves: 140-byte rows of x; N = 50: of y
        x, W, A, B, bias = _case(33, 70, 50, 4)
    elif what == "float32":
        x, W, A, B, bias = _case(33, 64, 48, 4, torch.float32)
    else:                                              # x starts 2 bytes into its storage
        x, W, A, B, bias = _case(33, 72, 48, 4)
        x = torch.cat([torch.zeros(1, dtype=x.dtype), x.flatten()])[1:].view(33, 72)
        assert x.data_ptr() % 16
    got, dy = _run("triton", x, W, A, B, bias=bias)
    # each GEMM decides for itself: an unaligned x leaves the dX GEMM (dy . W) to TMA
    assert tma == ({"tma": 1, "classic": 1} if what == "unaligned base address" else {"tma": 0, "classic": 2}), tma
    want, _ = _run("reference", x, W, A, B, bias=bias)
    y64, g64 = exact64(x, W, [A], [B], [1.5], bias, dy=dy)
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"output {i}", atol=2e-3 if x.dtype == torch.float16 else 1e-5)


def test_layer_report_names_the_tma_kernel(tma):
    """LoRALinear's report says its last call's fused GEMM was the TMA kernel (a 16-bit layer: fp16 here)."""
    from fusedtune.nn import LoRALinear
    layer = LoRALinear.from_linear(torch.nn.Linear(64, 48, dtype=torch.float16), r=4, alpha=8, backend="triton")
    layer(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).half())
    assert tma["tma"] == 1
    assert "last call: 10 rows, fused (lora_gemm_tma_kernel" in layer._fusedtune_report()["path"]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_tma_gemm_transposed_weight(p, tma):
    """A Conv1D base (W stored (in, out), passed as its transposed view): the forward reads Q = W^T's rows
    (Q_T) and dX reads W as it lies (with the dropout mask): the other two orientation x epilogue pairs."""
    x, W, A, B, bias = _case(37, 72, 88, 5)
    Wt = W.t().contiguous().t()
    assert Wt.stride() == (1, 88)
    got, dy = _run("triton", x, Wt, A, B, bias=bias, dropout_p=p, seed=5)
    assert tma == {"tma": 2, "classic": 0}
    want, _ = _run("reference", x, W, A, B, bias=bias, dropout_p=p, seed=5)
    keep = dropout_mask(37, 72, 5, p) if p else None
    y64, g64 = exact64(x, W, [A], [B], [1.5], bias, keep=keep, p=p, dy=dy)
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"output {i}", atol=2e-3)


def test_tma_gemm_dora_column_scale(tma):
    """DoRA's forward GEMM through the TMA kernel: F (the product before the column scale) and
    C = g * F + bias from the same accumulator, as lora_gemm_kernel's epilogue; forward and gradients
    against the reference."""
    from fusedtune.ops.dora import dora_linear
    g = torch.Generator().manual_seed(5)
    M, K, N, r = 29, 64, 48, 6
    x = torch.randn(M, K, generator=g).half()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).half()
    A, B = rand_adapter(r, K, N, g, scale_b=0.3)
    mag = torch.rand(N, generator=g) + 0.5
    bias = torch.randn(N, generator=g).half()
    dy = torch.randn(M, N, generator=g).half()
    runs = {}
    for backend in ("triton", "reference"):
        xi, Ai, Bi, mi = (t.clone().requires_grad_() for t in (x, A, B, mag))
        y = dora_linear(xi, W, Ai, Bi, 0.75, mi, bias, 0.0, 7, None, backend)
        runs[backend] = [y] + list(torch.autograd.grad(y, [xi, Ai, Bi, mi], dy))
        if backend == "triton":
            assert tma["tma"] >= 1 and tma["classic"] == 0, tma    # the forward (F and C), and dX
    for i, (a, b) in enumerate(zip(runs["triton"], runs["reference"])):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=f"output {i}")


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("q_t,dropout", [(False, False), (True, True), (True, False), (False, True)])
def test_direct_launch_every_orientation(q_t, dropout, split):
    """The GPU test of every config's direct launch (lora_cases.tma_direct), here with 32 x 32 x 32 tiles, the
    output stored whole and in two halves (EPI_SPLIT), fp16, every orientation x epilogue pair: the same call,
    so a change of the kernel's signature fails here too, without a GPU."""
    from lora_cases import tma_direct
    c, want = tma_direct((32, 32, 32, 4, 1, split), q_t, dropout, 70, 72, 88, 16, torch.float16, "cpu", 4)
    assert (c.double() - want).abs().max().item() <= 2 ** -9 * want.abs().max().item() + 2e-3


def test_few_rows_stay_on_the_classic_kernel(tma, monkeypatch):
    """Calls of fewer than MIN_ROWS rows (decode size) take lora_gemm_kernel; from MIN_ROWS on, the TMA kernel."""
    from fusedtune.triton_kernels import lora_tma
    monkeypatch.setattr(lora_tma, "MIN_ROWS", 40)
    x, W, A, B, bias = _case(39, 72, 88, 5)
    _run("triton", x, W, A, B, bias=bias)
    assert tma == {"tma": 0, "classic": 2}
    x, W, A, B, bias = _case(40, 72, 88, 5)
    _run("triton", x, W, A, B, bias=bias)
    assert tma == {"tma": 2, "classic": 2}
