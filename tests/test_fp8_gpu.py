"""FP8 on a GPU (sm_89+): the Triton and CUDA quantizers byte-identical to the reference (the CUDA one also to
the CPU kernel), the block-scaled GEMM against the reference emulation, SQNR of FP8Linear outputs and
gradients at LLM sizes, the quantizers' backend choice."""
import pytest
import torch

from fusedtune.ops import fp8 as F8
from fusedtune import _ext
from fusedtune import backend as B
from fusedtune.reference import fp8 as ref
from fp8_cases import edge_input, identical, near_boundaries, same

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fp8_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")


@pytest.mark.parametrize("M,K", [(4096, 4096), (1000, 333)])
def test_quantizers_byte_identical(M, K):
    x = (torch.randn(M, K, device="cuda") * 3).bfloat16()
    for a, b in zip(F8.fp8_quantize_1x128(x, backend="triton"), F8.fp8_quantize_1x128(x, backend="reference")):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    w = (torch.randn(K, M, device="cuda") * 0.02).bfloat16()
    for a, b in zip(F8.fp8_quantize_128x128(w, backend="triton", transpose=True),
                    F8.fp8_quantize_128x128(w, backend="reference", transpose=True)):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


# K <= 128 makes KB == 1, which Triton specializes to a constant: the scale loads then must not inherit
# the tiles' contiguity hints (16-byte loads across the wrap at M % 4 != 0 fault: misaligned address)
@pytest.mark.parametrize("M,N,K,b_rows,tr", [(2048, 4096, 4096, 128, False), (1000, 777, 4096, 1, False),
                                              (512, 4096, 1024, 128, True), (1001, 130, 128, 1, False),
                                              (333, 202, 100, 128, True)])
def test_gemm_matches_emulation(M, N, K, b_rows, tr):
    a_q, a_s = ref.quantize_rows(torch.randn(M, K, device="cuda"))
    b = torch.randn(N, K, device="cuda")
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    if tr:
        b_q = b_q.t().contiguous()
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, tr, backend="triton")
    want = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, tr, backend="reference")
    assert 1 - 2 * (got.double() * want.double()).sum() / (got.double() ** 2 + want.double() ** 2).sum() < 1e-6


def test_fp8_linear_sqnr():
    x = torch.randn(4096, 4096, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(4096, 4096, device="cuda").bfloat16()
    y = F8.fp8_linear(x, w, backend="triton")
    y.backward(dy)
    xf, wf, dyf = x.detach().double(), w.detach().double(), dy.double()
    assert ref.sqnr_db(y, xf @ wf.t()) >= 25
    assert ref.sqnr_db(x.grad, dyf @ wf) >= 18 and ref.sqnr_db(w.grad, dyf.t() @ xf) >= 18


def test_cublas_block_scaled_gemm_passes_its_check_on_sm90():
    """On sm_90 with CUDA 12.9+, cuBLAS's block-scaled FP8 GEMM (torch._scaled_mm with 1x128 / 128x128 float32
    scales) agrees with the float32 emulation for every operand kind and output FP8Linear uses, so FP8Linear
    takes it; the scale layouts fp8_cublas passes are the ones cuBLAS reads."""
    from fusedtune.ops import fp8_cublas
    gap = fp8_cublas.device_gap("cuda")
    if gap:
        pytest.skip(gap)
    for b_rows in (128, 1):
        for dt in (torch.bfloat16, torch.float32):
            assert fp8_cublas.status("cuda", b_rows, dt) is None, (b_rows, dt)


@pytest.mark.parametrize("engine", ["triton", "cublas"])
@pytest.mark.parametrize("M,N,K", [(1024, 1536, 2048), (1000, 336, 333)])
def test_fp8_linear_engines_match_the_emulation(engine, M, N, K, monkeypatch):
    """FP8Linear's output and gradients on each GEMM engine against the same FP8 math emulated in float32
    (backend="reference"): the same quantized operands, so only accumulation order and output rounding differ
    (SQNR >= 40 dB; bf16 rounding alone is ~50). The ragged shape takes Triton under either engine."""
    from fusedtune.ops import fp8_cublas
    if engine == "cublas" and fp8_cublas.device_gap("cuda"):
        pytest.skip(fp8_cublas.device_gap("cuda"))
    monkeypatch.setenv(fp8_cublas.ENGINE_ENV, engine)
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    outs = {}
    for backend in ("triton", "reference"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F8.fp8_linear(xi, wi, backend=backend)
        outs[backend] = [y] + list(torch.autograd.grad(y, [xi, wi], dy))
    for i, (a, b) in enumerate(zip(outs["triton"], outs["reference"])):
        assert ref.sqnr_db(a, b) >= 40, (engine, i, ref.sqnr_db(a, b))


def _need_cuda_kernel():
    ok, why = B.can_serve("cuda", torch.device("cuda"), frozenset(F8._QHAS))
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K", [(4096, 4096), (2000, 4104), (1000, 336), (8, 8), (136, 264)])
def test_cuda_quantizers_byte_identical(dtype, M, K):
    """The extension's CUDA quantizer: the reference's bytes and scales, and the CPU kernel's, for both
    quantizers with and without their copies, pow2 too, over partial tiles and the scale rules' edges;
    the first two shapes give a block several tiles (its grid is the blocks resident at once), full and
    partial ones in turn."""
    _need_cuda_kernel()
    x = edge_input(M, K, dtype, device="cuda", seed=M + K)
    for pow2 in (False, True):
        for copy in (False, True):
            for fn in (F8.fp8_quantize_1x128, F8.fp8_quantize_128x128):
                got = fn(x, pow2=pow2, transpose=copy, backend="cuda")
                want = fn(x, pow2=pow2, transpose=copy, backend="reference")
                cpu = fn(x.cpu(), pow2=pow2, transpose=copy, backend="cpu")
                assert len(got) == len(want) == len(cpu)
                for i, (a, b, c) in enumerate(zip(got, want, cpu)):
                    assert same(a, b) and identical(a.cpu(), c), (fn.__name__, pow2, copy, i)


def test_cuda_reciprocal_quotients_keep_the_division_bytes():
    """x * RN(1/s) with the IEEE division where it could change the byte: the reference's bytes on rows built
    around E4M3 rounding midpoints (the reciprocal alone differs on ~900 elements of each)."""
    _need_cuda_kernel()
    for seed in range(4):
        x = near_boundaries(seed).cuda()
        for fn in (F8.fp8_quantize_1x128, F8.fp8_quantize_128x128):
            got = fn(x, transpose=True, backend="cuda")
            want = fn(x, transpose=True, backend="reference")
            assert all(same(a, b) for a, b in zip(got, want)), (seed, fn.__name__)


def test_cuda_quantizer_reads_strided_rows():
    _need_cuda_kernel()
    wide = edge_input(256, 1024, torch.bfloat16, device="cuda", seed=5)
    x = wide[:, 128:896]                      # rows 2048 bytes apart, 768 wide
    got = F8.fp8_quantize_1x128(x, backend="cuda")
    want = F8.fp8_quantize_1x128(x.contiguous(), backend="reference")
    assert all(same(a, b) for a, b in zip(got, want))


def test_auto_routes_the_quantizers_by_shape():
    """auto takes the CUDA quantizer where M and K are multiples of 8 (a misaligned tensor is copied), Triton
    elsewhere; backend="cuda" on a shape it refuses raises; FP8Linear's results are the same bytes either way."""
    _need_cuda_kernel()
    assert F8._resolve_quant(torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16), None) == "cuda"
    assert F8._resolve_quant(torch.empty(1001, 4096, device="cuda", dtype=torch.bfloat16), None) == "triton"
    with pytest.raises(B.BackendError, match="multiples of 8"):
        F8.fp8_quantize_1x128(torch.randn(1001, 4096, device="cuda"), backend="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(512, 1024, device="cuda", generator=g).bfloat16()
    w = (torch.randn(768, 1024, device="cuda", generator=g) * 0.02).bfloat16()
    dy = torch.randn(512, 768, device="cuda", generator=g).bfloat16()
    outs = {}
    for backend in (None, "triton"):          # quantizers: CUDA (auto) / Triton; the same GEMMs
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F8.fp8_linear(xi, wi, backend=backend)
        outs[backend] = [y] + list(torch.autograd.grad(y, [xi, wi], dy))
    assert all(torch.equal(a, b) for a, b in zip(outs[None], outs["triton"]))


def test_fp8_linear_compiles_with_the_cuda_quantizers():
    """torch.compile (fullgraph) of FP8Linear with the default backend on a GPU, whose quantizers are the
    CUDA kernel (the shape-only routing traces; alignment is handled inside the op): the eager results."""
    _need_cuda_kernel()
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    layer = FP8Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4, 64, 384, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    g_eager = torch.autograd.grad(eager, [x, layer.weight], dy)
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    g_comp = torch.autograd.grad(comp, [x, layer.weight], dy)
    assert torch.equal(comp, eager) and all(torch.equal(a, b) for a, b in zip(g_comp, g_eager))
