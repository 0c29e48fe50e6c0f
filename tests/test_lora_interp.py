"""LoRA Triton kernels in the interpreter against the reference (fp32/fp16: the interpreter's bf16 is
wrong): the fused forward and backward, seeded dropout (bit-identical masks), several adapters, rank
loops past one BLOCK_R, and the NF4 base on both schedules."""
import pytest
import torch

from fusedtune.ops import lora as lora_ops
from fusedtune.ops import lora_linear, lora_linear_multi
from fusedtune.reference.nf4 import Nf4Weight, dequantize
from fusedtune.testing import assert_within_rule
from lora_cases import exact64, rand_adapter

pytestmark = pytest.mark.interp


@pytest.fixture(params=["fused", "cublas"])
def base_schedule(request, monkeypatch):
    """Each base-GEMM schedule of lora_triton (CUBLAS_MIN_WORK): the LoRA term in the Triton GEMM, or torch.mm
    then lora_expand_kernel; returns (schedule, calls of tk.gemm / tk.expand_) to check which one ran."""
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 0 if request.param == "cublas" else 2**62)
    return request.param, _count_calls(monkeypatch, tk, "gemm", "expand_")


def test_expand_kernels_restore_c_when_timing_configs():
    """The expand kernels add into C in place: their autotuners must restore C after each timed config run
    (restore_value), or a shape's first call under timed autotuning would add the LoRA term many times
    (the GPU test shows it happening without restore_value)."""
    from fusedtune.triton_kernels import lora as tk
    assert tk.lora_expand_kernel.restore_value == ["c_ptr"] == tk.lora_expand_ieee_kernel.restore_value


def _took(base_schedule, gemms: int):
    """The schedule ran: `gemms` base GEMMs, all Triton (fused) or all torch.mm + expand (cublas)."""
    sched, calls = base_schedule
    assert calls == ({"gemm": gemms, "expand_": 0} if sched == "fused" else {"gemm": 0, "expand_": gemms}), calls


def _run(backend, x, *args, **kw):
    xi = x.clone().requires_grad_()
    A, B = (t.clone().requires_grad_() for t in args[1:3])
    y = lora_linear(xi, args[0], A, B, *args[3:], backend=backend, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, [xi, A, B], dy)), dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(37, 70, 50, 5), (65, 33, 97, 80)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_triton_matches_reference(dtype, M, K, N, r, p, base_schedule):
    g = torch.Generator().manual_seed(M + r)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A, B = rand_adapter(r, K, N, g)
    bias = torch.randn(N, generator=g).to(dtype)
    got, dy = _run("triton", x, W, A, B, 1.5, bias=bias, dropout_p=p, seed=99)
    _took(base_schedule, 2)
    want, _ = _run("reference", x, W, A, B, 1.5, bias=bias, dropout_p=p, seed=99)
    from fusedtune.reference.lora import dropout_mask
    keep = dropout_mask(M, K, 99, p) if p else None
    y64, g64 = exact64(x, W, [A], [B], [1.5], bias, keep=keep, p=p, dy=dy)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"output {i}", atol=atol)   # the reference is the unfused computation here


@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


def _count_calls(monkeypatch, module, *names):
    calls = {n: 0 for n in names}

    def counted(name, fn):
        def call(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return call
    for n in names:
        monkeypatch.setattr(module, n, counted(n, getattr(module, n)))
    return calls


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("mode", ["one_dy_read", "deterministic"])
@pytest.mark.parametrize("dtype,r", [(torch.float16, 16), (torch.float32, 64), (torch.float16, 3)])
def test_triton_backward_schedules_match_reference(mode, dtype, r, parts, monkeypatch, request, base_schedule):
    """Both backward schedules: lora_dy_kernel (u and dB from one read of dy, dB by atomics) and, in
    torch's deterministic mode, the shrink + wgrad kernels; each within DESIGN.md's rule of fp64, with
    the skinny reductions (shrink over K, u over N) whole or cut into 3 parts."""
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(tk, "FORCE_PARTS", parts)
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    calls = _count_calls(monkeypatch, tk, "dy_products", "shrink", "wgrad")
    g = torch.Generator().manual_seed(r)
    M, K, N = 67, 45, 83
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A, B = rand_adapter(r, K, N, g)
    got, dy = _run("triton", x, W, A, B, 0.75, dropout_p=0.1, seed=3)
    fused = mode == "one_dy_read"
    # forward: one shrink; backward: dy_products + wgrad(x, u) (fused) or shrink(dy) + wgrad x2
    assert calls == ({"dy_products": 1, "shrink": 1, "wgrad": 1} if fused else
                     {"dy_products": 0, "shrink": 2, "wgrad": 2})
    _took(base_schedule, 2)
    want, _ = _run("reference", x, W, A, B, 0.75, dropout_p=0.1, seed=3)
    from fusedtune.reference.lora import dropout_mask
    y64, g64 = exact64(x, W, [A], [B], [0.75], keep=dropout_mask(M, K, 3, 0.1), p=0.1, dy=dy)
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"{mode} output {i}", atol=1e-5 if dtype == torch.float32 else 2e-3)


def test_a_strided_bias_is_read_by_its_strides(base_schedule):
    """The kernels index the bias as bias + n: a strided view (b[::2]) read the wrong elements on both
    schedules (found by a fuzzer in the interpreter: y off by up to 29)."""
    g = torch.Generator().manual_seed(5)
    x, W = torch.randn(6, 24, generator=g), torch.randn(10, 24, generator=g) / 5
    A, B = rand_adapter(3, 24, 10, g)
    bias = torch.randn(20, generator=g)[::2]
    assert bias.stride(0) == 2
    got, dy = _run("triton", x, W, A, B, 1.5, bias=bias)
    _took(base_schedule, 2)
    want, _ = _run("reference", x, W, A, B, 1.5, bias=bias)
    y64, g64 = exact64(x, W, [A], [B], [1.5], bias, dy=dy)
    for i, (a, w, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w, f"output {i}", atol=1e-5)


def test_dy_kernel_groups_and_ranks(monkeypatch):
    """lora_dy_kernel alone: mixed-adapter rows (scale table, -1 rows), ranks 1..64, ragged M and N,
    fp16 (two-MMA split) and fp32 dy, against fp64; ranks above DY_MAX_R are refused."""
    from fusedtune.triton_kernels import lora as tk
    g = torch.Generator().manual_seed(5)
    for (M, N, R, dt), parts in zip([(37, 50, 1, torch.float16), (70, 97, 64, torch.float32),
                                     (65, 33, 17, torch.float16), (33, 200, 8, torch.float16)], [1, 2, 1, 4]):
        monkeypatch.setattr(tk, "FORCE_PARTS", parts)
        dy = torch.randn(M, N, generator=g).to(dt)
        B, t, S = torch.randn(N, R, generator=g), torch.randn(M, R, generator=g), torch.rand(3, R, generator=g)
        gid = torch.randint(-1, 3, (M,), generator=g, dtype=torch.int32)
        u, dB = tk.dy_products(dy, B, t, S, gid)
        rs = S.double()[gid.clamp(min=0).long()] * (gid >= 0).double()[:, None]
        torch.testing.assert_close(u.double(), (dy.double() @ B.double()) * rs, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(dB.double(), dy.double().t() @ t.double(), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank 65"):
        tk.dy_products(dy, torch.zeros(N, 65), torch.zeros(M, 65), torch.zeros(1, 65), None)
    assert tk.dy_fused(64) and not tk.dy_fused(65)


@pytest.mark.parametrize("M,parts", [(1, 1), (20, 3), (32, 2)])
def test_dy_kernel_one_row_block_stores_db(M, parts, monkeypatch):
    """Rows in one row block (M <= BLOCK_M, 32 here): dB is stored, not added by atomics into a zero fill;
    every buffer of the call comes from a NaN-poisoned torch.empty, so an element no program wrote shows."""
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(tk, "FORCE_PARTS", parts)
    g = torch.Generator().manual_seed(M)
    N, R = 70, 16
    dy, B, t = torch.randn(M, N, generator=g).half(), torch.randn(N, R, generator=g), torch.randn(M, R, generator=g)
    empty, zeros = torch.empty, []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: zeros.append(a) or torch.full(*a, 0.0, **k))
    u, dB = tk.dy_products(dy, B, t, torch.ones(1, R), None)
    assert zeros == []                                   # no zero-filled dB to add into
    torch.testing.assert_close(u.double(), dy.double() @ B.double(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dB.double(), dy.double().t() @ t.double(), atol=2e-5, rtol=1e-5)


def test_triton_multi_adapter_matches_reference(base_schedule):
    g = torch.Generator().manual_seed(2)
    K, N = 40, 36
    ad = [(*rand_adapter(r, K, N, g), s) for r, s in ((1, 2.0), (17, 0.5), (64, 0.25))]
    W = torch.randn(N, K, generator=g) / K ** 0.5
    x = torch.randn(70, K, generator=g)
    idx = torch.tensor([2] * 50 + [0] + [-1] * 10 + [1] * 9)[torch.randperm(70, generator=g)]
    outs = [lora_linear_multi(x, W, ad, idx, backend=b) for b in ("triton", "reference")]
    _took(base_schedule, 1)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("K,gather", [(192, False), (192, True), (200, False)])
@pytest.mark.parametrize("split", [0, 3])
def test_triton_nf4_paths_match_reference(rows, double, K, gather, split, monkeypatch, base_schedule):
    """5 rows: the in-GEMM dequant -- by contiguous byte loads where the weight's rows are whole quantization
    blocks (K 192), by per-element gathers where not (K 200) or when forced; its K loop whole or cut in 3
    (float32 partials summed by the expand pass); 40 rows: the buffer."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(lora_ops, "NF4_FUSED_MAX_ROWS", 16)
    monkeypatch.setattr(tk, "FORCE_GATHER_TILE", gather)
    monkeypatch.setattr(tk, "FORCE_SPLIT_K", split)
    assert tk._k_splits(rows, 48, K, "cpu") == max(split, 1)
    assert lora_ops.nf4_path(rows, True) == ("fused" if rows <= 16 else "buffer")
    g = torch.Generator().manual_seed(rows)
    N, r = 48, 4
    w = torch.randn(N, K, generator=g) * 0.05
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double, blocksize=64)
    st.dtype = torch.float32
    nf4 = Nf4Weight.from_bnb(q, st)
    vec = K % 64 == 0 and not gather
    assert [tk._nf4_vec(nf4.state(), qs) for qs in ((K, 1), (1, K))] == ([1, 2] if vec else [0, 0])
    x = torch.randn(rows, K, generator=g)
    A, B = rand_adapter(r, K, N, g)
    got, dy = _run("triton", x, None, A, B, 2.0, nf4=nf4)
    if rows > 16 or base_schedule[0] == "fused":      # the in-GEMM dequant is always the fused GEMM
        _took(base_schedule, 2)
    want, _ = _run("reference", x, None, A, B, 2.0, nf4=nf4)
    Wd = dequantize(nf4, torch.float32)
    y64, g64 = exact64(x, Wd, [A], [B], [2.0], dy=dy)
    for i, (a, w_, e) in enumerate(zip(got, want, [y64] + g64)):
        assert_within_rule(a, e, w_, f"output {i}", atol=1e-5)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("shape,blocksize,double", [((33, 130), 64, True), ((3, 130), 64, False),
                                                    ((7, 600), 128, False), ((5, 2000), 4096, True)])
def test_triton_nf4_dequant_kernel_bit_exact(gather, shape, blocksize, double, monkeypatch):
    """The dequant kernel's vector path (contiguous byte loads, one absmax a block) and its per-element gather
    path equal bitsandbytes' dequantization bit for bit: partial last blocks, single and double quantization,
    blocks larger than the kernel's 1024 elements."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(tk, "FORCE_GATHER_DEQUANT", gather)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(blocksize)) * 0.1
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double, blocksize=blocksize)
    st.dtype = torch.float32
    nf4 = Nf4Weight.from_bnb(q, st)
    got = tk.nf4_dequant(nf4.state(), shape, torch.float32)
    assert torch.equal(got, bnbf.dequantize_4bit(q, st))


@pytest.mark.parametrize("dtype,p,nf4", [(torch.float32, 0.0, False), (torch.float16, 0.25, False),
                                         (torch.float32, 0.0, True)])
def test_triton_dora_matches_reference(dtype, p, nf4, base_schedule):
    """DoRA on the Triton kernels: float32 dy*g into the adapter-gradient kernels, the 16-bit one into the
    dgrad GEMM (through torch.mm on the cublas schedule), the NF4 base dequantized by the kernel for the
    weight norm."""
    from fusedtune.ops.dora import dora_linear, dora_weight_norm
    g = torch.Generator().manual_seed(5)
    M, K, N, r = 29, 64, 48, 6
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A, B = rand_adapter(r, K, N, g, scale_b=0.3)
    mag = torch.rand(N, generator=g) + 0.5
    q = None
    if nf4:
        bnbf = pytest.importorskip("bitsandbytes.functional")
        packed, st = bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64)
        st.dtype = torch.float32
        q, W = Nf4Weight.from_bnb(packed, st), None
    dy = torch.randn(M, N, generator=g).to(dtype)
    runs = {}
    for backend in ("triton", "reference"):
        xi, Ai, Bi, mi = (t.clone().requires_grad_() for t in (x, A, B, mag))
        y = dora_linear(xi, W, Ai, Bi, 0.75, mi, None, p, 7, q, backend)
        runs[backend] = [y] + list(torch.autograd.grad(y, [xi, Ai, Bi, mi], dy))
        runs[backend].append(dora_weight_norm(W, A, B, 0.75, q, dtype, backend))
    for i, (a, b) in enumerate(zip(runs["triton"], runs["reference"])):
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a, b, **tol, msg=f"output {i}")


@pytest.mark.parametrize("dtype,M,N", [(torch.float32, 70, 45), (torch.float16, 33, 129), (torch.float16, 1, 7)])
def test_triton_dora_dy_prologue_matches_reference(dtype, M, N):
    """DoRA's backward prologue in one pass: dF = dy*g (float32 and rounded) bit for bit, the column sums of
    dy*F and dy within float32 summation-order error, from a dy with a row stride past its width."""
    from fusedtune.ops.dora import _dora_dy_op
    from fusedtune.reference.lora import dora_dy
    g = torch.Generator().manual_seed(M + N)
    dy = torch.randn(M, N + 3, generator=g).to(dtype)[:, :N]
    F = torch.randn(M, N, generator=g).to(dtype)
    gs = torch.rand(N, generator=g) + 0.5
    got, want = _dora_dy_op(dy, F, gs, "triton"), dora_dy(dy, F, gs)
    assert got[1].dtype == dtype and got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    d = dy.double()
    for i, exact in ((2, (d * F.double()).sum(0)), (3, d.sum(0))):
        assert_within_rule(got[i], exact, want[i], f"sum {i}", atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dropout_delta_is_bit_exact(dtype):
    """DoRA's dropout(x) - x: the kernel equals the reference bit for bit, on x and on a gradient (the map is
    its own adjoint: DoRA's dX applies it to dy's product), on a strided x and ragged tiles."""
    from fusedtune.ops.dora import _dropout_delta
    g = torch.Generator().manual_seed(3)
    x = torch.randn(45, 200, generator=g).to(dtype)[:, 3:150]      # row stride 200, K = 147
    x2 = x.contiguous()
    dy = torch.randn(45, 147, generator=g).to(dtype)
    outs = {}
    for backend in ("triton", "reference"):
        outs[backend] = (_dropout_delta(x2, 0.3, 12345, backend), _dropout_delta(dy, 0.3, 12345, backend))
    assert torch.equal(outs["triton"][0], outs["reference"][0]) and torch.equal(outs["triton"][1], outs["reference"][1])
    from fusedtune.triton_kernels import lora as tk
    assert torch.equal(tk.dropout_delta(x, tk.Dropout(0.3, 12345)), outs["reference"][0])   # strided rows
    kept = outs["reference"][0] != -x2
    assert 0.6 < kept.float().mean() < 0.8                        # about 1 - p of the elements kept


def test_report_names_the_schedule_of_the_last_call(monkeypatch):
    """LoRALinear's report says which base-GEMM schedule its last call took: fused below CUBLAS_MIN_WORK
    multiply-adds, cublas from there, and the outputs of both agree with the reference."""
    from fusedtune.nn import LoRALinear
    from fusedtune.ops import lora_triton
    layer = LoRALinear.from_linear(torch.nn.Linear(24, 40), r=4, alpha=8, backend="triton")
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    want = lora_linear(x, layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       2.0, bias=layer.base_layer.bias, backend="reference")
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 10 * 40 * 24 + 1)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert "last call: 10 rows, fused" in layer._fusedtune_report()["path"]
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 10 * 40 * 24)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert "last call: 10 rows, cublas" in layer._fusedtune_report()["path"]
    # DoRA with dropout runs its GEMMs in the fused kernel whatever the size (found by review: reported as cublas)
    dora = LoRALinear.from_linear(torch.nn.Linear(24, 40), r=4, alpha=8, dropout=0.1, use_dora=True, backend="triton")
    mm = []
    monkeypatch.setattr(torch, "mm", lambda *a, **k: mm.append(1))
    with torch.no_grad():
        dora(x)
    assert mm == [] and "last call: 10 rows, fused (DoRA with dropout" in dora._fusedtune_report()["path"]
    dora.eval()                                    # no dropout: the size's schedule again
    monkeypatch.undo()
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 10 * 40 * 24)
    with torch.no_grad():
        dora(x)
    assert "last call: 10 rows, cublas" in dora._fusedtune_report()["path"]
