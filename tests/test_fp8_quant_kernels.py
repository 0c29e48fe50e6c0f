"""The extension's FP8 quantizer kernel (fp8_quant_kernel: csrc/cpu/fp8.cpp here, csrc/cuda/fp8.cu on a GPU,
both on fp8_math.h) against the reference: the same bytes and scales for every input dtype, pow2, partial
tiles, strided rows and the scale rules' edges; the backend choice (auto takes it on CPU tensors, and on a
GPU for the shapes the CUDA kernel takes) and clear errors."""
import pytest
import torch

from fusedtune import _ext
from fusedtune import backend as B
from fusedtune.ops import fp8 as F8
from fp8_cases import e4m3_edges, edge_input, near_boundaries, same

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="fusedtune._C is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("M,K", [(1, 1), (5, 130), (200, 300), (128, 128), (136, 264)])
def test_cpu_kernel_bytes_equal_reference(dtype, pow2, M, K):
    x = edge_input(M, K, dtype, seed=M + K)
    for copy in (False, True):
        got = F8.fp8_quantize_1x128(x, pow2=pow2, transpose=copy, backend="cpu")
        want = F8.fp8_quantize_1x128(x, pow2=pow2, transpose=copy, backend="reference")
        assert all(same(a, b) for a, b in zip(got, want)), (copy, [same(a, b) for a, b in zip(got, want)])
        got = F8.fp8_quantize_128x128(x, pow2=pow2, transpose=copy, backend="cpu")
        want = F8.fp8_quantize_128x128(x, pow2=pow2, transpose=copy, backend="reference")
        assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))


def test_cpu_kernel_writes_the_canonical_nan_byte():
    """Every NaN byte is 0x7F, a negative NaN input's too (the CUDA kernel's division and cvt give that NaN;
    x86 would pass the input's sign through), so the CPU and CUDA kernels agree byte for byte."""
    x = torch.randn(8, 256)
    x[0, 3] = -float("nan")       # its row tile (and its column tile): NaN scale, NaN bytes
    x[5, 200] = float("nan")
    for q in (F8.fp8_quantize_1x128(x, transpose=True, backend="cpu")[0::2]
              + F8.fp8_quantize_128x128(x, transpose=True, backend="cpu")[0::2]):
        b = q.view(torch.uint8)
        nan = torch.isnan(q.float())
        assert nan.any() and bool((b[nan] == 0x7F).all()), b[nan].unique()


def test_cpu_kernel_reads_strided_rows():
    wide = edge_input(200, 400, torch.bfloat16, seed=3)
    x = wide[:, 50:350]
    assert x.stride() == (400, 1)
    got = F8.fp8_quantize_1x128(x, backend="cpu")
    want = F8.fp8_quantize_1x128(x.contiguous(), backend="reference")
    assert all(same(a, b) for a, b in zip(got, want))


def test_cpu_kernel_e4m3_rounding_on_edges():
    """Every E4M3 value, the midpoints between neighbours (ties to even), values just off them, saturation
    and subnormals, at scale 1 (each row's amax is 448): the bytes of torch's own cast."""
    x = e4m3_edges()
    q, s, _, _ = F8.fp8_quantize_1x128(x, transpose=False, backend="cpu")
    assert (s == 1.0).all() and same(q, x.to(torch.float8_e4m3fn))


def test_auto_takes_the_kernel_on_cpu_tensors_and_fp8_linear_uses_it(monkeypatch):
    x = torch.randn(16, 256)
    assert F8._resolve_quant(x, None) == "cpu"
    calls = []
    real = torch.ops.fusedtune.fp8_quant_kernel

    def spy(t, block, copy, pow2):
        calls.append((tuple(t.shape), block, copy))
        return real(t, block, copy, pow2)

    monkeypatch.setattr(torch.ops.fusedtune, "fp8_quant_kernel", spy)
    w = torch.randn(64, 256) * 0.02
    dy = torch.randn(16, 64)
    outs = {}
    for backend in (None, "reference"):      # the same bytes, the same GEMM emulation: the same results
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F8.fp8_linear(xi, wi, backend=backend)
        outs[backend] = [y] + list(torch.autograd.grad(y, [xi, wi], dy))
    assert sorted(calls) == sorted([((64, 256), True, True), ((16, 256), False, True), ((16, 64), False, True)])
    assert all(torch.equal(a, b) for a, b in zip(outs[None], outs["reference"]))


def test_cuda_terms_are_named_and_misaligned_inputs_are_copied():
    assert F8._cuda_refuses(torch.empty(16, 256, dtype=torch.bfloat16)) == ""
    assert F8._cuda_refuses(torch.empty(0, 5)) == ""                  # nothing to quantize
    assert "multiples of 8" in F8._cuda_refuses(torch.empty(12, 256))
    assert "multiples of 8" in F8._cuda_refuses(torch.empty(16, 100))
    off = torch.randn(16 * 256 + 1).bfloat16()[1:].view(16, 256)     # 2 bytes past an aligned address
    rows = torch.randn(16, 260).bfloat16()[:, :256]                  # rows 520 bytes apart
    for x in (off, rows):
        y = F8._aligned(x)
        assert y.data_ptr() % 16 == 0 and y.stride(0) * 2 % 16 == 0 and torch.equal(y, x)
    ok = torch.randn(16, 256).bfloat16()
    assert F8._aligned(ok) is ok


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(B.BackendError, match="cuda"):
        F8.fp8_quantize_1x128(torch.randn(16, 256), backend="cuda")


def test_kernel_bad_inputs():
    op = torch.ops.fusedtune.fp8_quant_kernel
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(torch.ones(8, 8, dtype=torch.int32), False, True, False)
    with pytest.raises(RuntimeError, match="2-D"):
        op(torch.ones(2, 8, 8), False, True, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.ones(8, 16)[:, ::2], False, True, False)


@pytest.mark.parametrize("seed", range(4))
def test_reciprocal_quotients_keep_the_division_bytes_near_boundaries(seed):
    """The kernels take x * RN(1/s) for x / s, and the IEEE division only where that could change the E4M3
    byte (fp8_math.h: e4m3_quotient): on fp8_cases.near_boundaries' rows (about 900 elements whose byte the
    reciprocal alone gets wrong) the bytes are the reference's (fl(x / s), then torch's cast)."""
    x = near_boundaries(seed)
    for copy in (False, True):
        got = F8.fp8_quantize_1x128(x, transpose=copy, backend="cpu")
        want = F8.fp8_quantize_1x128(x, transpose=copy, backend="reference")
        assert all(same(a, b) for a, b in zip(got, want))


def test_fp8_linear_compiles_with_the_kernel_quantizers():
    """FP8Linear under torch.compile (fullgraph) with the default backend, which takes the extension's
    quantizers here (the shape-only routing traces): the eager results, gradients included."""
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    layer = FP8Linear(256, 64, bias=True)
    x = torch.randn(2, 8, 256, requires_grad=True)
    dy = torch.randn(2, 8, 64)
    eager = layer(x)
    g_eager = torch.autograd.grad(eager, [x, layer.weight, layer.bias], dy)
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    g_comp = torch.autograd.grad(comp, [x, layer.weight, layer.bias], dy)
    assert torch.equal(comp, eager) and all(torch.equal(a, b) for a, b in zip(g_comp, g_eager))


def test_shapes_the_cuda_kernel_refuses_go_to_triton_said_once(monkeypatch):
    """On a GPU (resolution faked here) auto sends a shape the CUDA quantizer refuses to Triton and says so
    once, not once per token count; backend="cuda" asked for raises."""
    monkeypatch.setattr(B, "_warned", set())
    monkeypatch.setattr(F8._backend, "resolve", lambda op, dev, has, backend=None: backend or "cuda")
    monkeypatch.setattr(F8._backend, "can_serve", lambda name, dev, has: (True, ""))
    monkeypatch.setattr(F8, "fp8_arch_gap", lambda dev: None)
    with pytest.warns(UserWarning, match="multiples of 8") as got:
        assert [F8._resolve_quant(torch.empty(m, 256), None) for m in (1, 3, 5)] == ["triton"] * 3
    assert len([w for w in got if "fp8_quantize" in str(w.message)]) == 1
    assert F8._resolve_quant(torch.empty(16, 256), None) == "cuda"
    with pytest.raises(B.BackendError, match="multiples of 8"):
        F8._resolve_quant(torch.empty(3, 256), "cuda")
