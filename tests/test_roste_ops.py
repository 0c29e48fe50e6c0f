"""RoSTE family (reference backend): Hadamard against scipy and H H^T = m I for every factor, the
transform's autograd, fake quantization from first principles, straight-through gradients, RoSTELinear,
compile, refusals that name the supported sizes."""
import math
from pathlib import Path

import pytest
import torch

from fusedtune import _ext
from fusedtune.backend import BackendError
from fusedtune.nn import RoSTELinear
from fusedtune.ops.roste import _hadamard_op, _neg_masks, _rfq_op, hadamard, rotate_fake_quant
from fusedtune.reference import hadamard as href
from fusedtune.reference import roste as rref
from tiny_models import tiny_llama, train_losses

scipy_linalg = pytest.importorskip("scipy.linalg")


@pytest.mark.parametrize("n", [1, 2, 64, 1024, 32768])
def test_powers_of_two_match_scipy(n):
    x = torch.randn(3, n, dtype=torch.float32, generator=torch.Generator().manual_seed(n))
    H = torch.tensor(scipy_linalg.hadamard(n), dtype=torch.float64) if n <= 4096 else None
    y = hadamard(x)
    if H is not None:
        torch.testing.assert_close(y.double(), x.double() @ H.t() / math.sqrt(n), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-4)   # orthonormal


@pytest.mark.parametrize("m", href.FACTORS)
def test_every_factor_is_hadamard_and_the_transform_inverts(m):
    H = href.factor_matrix(m)
    assert torch.equal(H @ H.t(), m * torch.eye(m, dtype=torch.float64)) and set(H.unique().tolist()) == {-1.0, 1.0}
    n = m * 8
    x = torch.randn(5, n, dtype=torch.float32, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(hadamard(x).double(), x.double() @ href.hadamard_matrix(n).t() / math.sqrt(n),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x), transpose=True), x, atol=1e-5, rtol=1e-5)


def test_model_sizes_are_supported_or_refused_by_name():
    for n in (4096, 14336, 4864, 18944, 3584, 5120, 128, 896, 11008, 13824):   # Llama-2/3, Qwen2.5, Mistral
        href.split_size(n)
    assert href.split_size(11008) == (172, 64) and href.split_size(156 * 32) == (156, 32)
    with pytest.raises(ValueError, match=r"29568 = 231 x 2\^7 is not supported.*12, 20, 28.*156, 172"):
        hadamard(torch.zeros(2, 29568))
    with pytest.raises(ValueError, match="not supported"):
        hadamard(torch.zeros(2, 7 * 9))


@pytest.mark.parametrize("m", sorted(href.GS_SEEDS))
def test_goethals_seidel_seeds_are_what_the_search_tool_finds(m):
    """The stored orbit signs of 156 and 172 are reproducible: tools/hadamard_search.py finds them."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "tools" / "hadamard_search.py"
    spec = importlib.util.spec_from_file_location("hadamard_search", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    v, gen, signs = href.GS_SEEDS[m]
    _, found = tool.search(v, gen)
    assert [tuple(s) for s in found[0]] == [tuple(s) for s in signs]
    seqs = [tool.sequence(v, href.orbits(v, gen), s) for s in signs]
    total = sum(tool.paf(a) for a in seqs)
    assert total[0] == 4 * v and (total[1:] == 0).all()


def test_hadamard_autograd_gradcheck_and_dtypes():
    x = torch.randn(2, 24, dtype=torch.float32, requires_grad=True)
    y = hadamard(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx.double(), g.double() @ href.hadamard_matrix(24) / math.sqrt(24), atol=1e-5,
                               rtol=1e-5)
    for dt in (torch.bfloat16, torch.float16):
        assert hadamard(x.detach().to(dt)).dtype == dt
    torch.library.opcheck(_hadamard_op, (torch.randn(3, 40), 0.5, False, "reference"))
    # a transposed x: the fake's output is contiguous, as the kernels' (found by review: it copied x's strides)
    torch.library.opcheck(_hadamard_op, (torch.randn(40, 3).t(), 0.5, False, "reference"))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_from_first_principles(bits, symmetric):
    y = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits)) * 3
    out, _ = rref.fake_quant(y, bits, "token", symmetric, 0.9)
    for row, o in zip(y, out):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = row.abs().max().item() * 0.9 / qmax
            want = [max(-qmax - 1, min(qmax, round(v / s))) * s for v in row.tolist()]
        else:
            lo, hi = row.min().item() * 0.9, row.max().item() * 0.9
            s = (hi - lo) / (2 ** bits - 1)
            z = round(-lo / s)
            want = [(max(0, min(2 ** bits - 1, round(v / s) + z)) - z) * s for v in row.tolist()]
        torch.testing.assert_close(o.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
        assert len(set(o.tolist())) <= 2 ** bits


def test_channel_granularity_and_rotation_lower_the_error_on_outliers():
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    x[:, 3] *= 50                                                    # an outlier channel
    plain = rotate_fake_quant(x, 4, rotate=False)
    rot = hadamard(rotate_fake_quant(x, 4, rotate=True), transpose=True)   # back to x's basis
    assert (rot - x).pow(2).mean() < 0.5 * (plain - x).pow(2).mean()
    ch = rotate_fake_quant(x, 4, "channel", rotate=False)
    assert (ch - x).pow(2).mean() < (plain - x).pow(2).mean()


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_straight_through_gradient(ste):
    x = torch.randn(4, 32, requires_grad=True)
    out = rotate_fake_quant(x, 3, clip_ratio=0.8, ste=ste)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    y = hadamard(x.detach())
    lo, hi = y.amin(-1, keepdim=True) * 0.8, y.amax(-1, keepdim=True) * 0.8
    gg = g if ste == "identity" else torch.where((y >= lo) & (y <= hi), g, torch.zeros(()))
    torch.testing.assert_close(gx, hadamard(gg, transpose=True), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(_rfq_op, (torch.randn(3, 40), 4, "token", False, 0.9, True, ste, "reference"))
    torch.library.opcheck(_rfq_op, (torch.randn(40, 3).t(), 4, "token", False, 0.9, True, ste, "reference"))


def test_roste_linear_trains_and_compiles():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = RoSTELinear.from_linear(lin, w_bits=4, a_bits=8)
    x = torch.randn(16, 64)
    rel = (layer(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.2
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    target = torch.randn(16, 32)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(comp(x), layer(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits must be an int in"):
        rotate_fake_quant(torch.zeros(2, 16), 9)
    with pytest.raises(ValueError, match="granularity must be"):
        rotate_fake_quant(torch.zeros(2, 16), 4, "group")
    with pytest.raises(ValueError, match="takes a 2-D tensor"):
        rotate_fake_quant(torch.zeros(2, 2, 16), 4, "channel")
    with pytest.raises(ValueError, match="clip_ratio must be in"):
        rotate_fake_quant(torch.zeros(2, 16), 4, clip_ratio=0.0)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        hadamard(torch.zeros(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="29568"):
        RoSTELinear.from_linear(torch.nn.Linear(29568, 8))


def test_patch_roste_trains_every_parameter_and_unpatches():
    import fusedtune
    model = tiny_llama(64, 128)
    ids = torch.randint(0, 64, (2, 16))
    rep = fusedtune.patch(model, "roste", w_bits=4, a_bits=8, lr=3e-3)
    assert len(rep.rows) == 14 and rep.trainable_params == sum(p.numel() for p in model.parameters())
    losses = train_losses(rep, model, ids, 6)
    assert losses[-1] < losses[0]
    fusedtune.unpatch(model)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


@pytest.mark.parametrize("clip", [1.0, 0.95, 0.5])
def test_constant_groups_are_reproduced(clip):
    """Asymmetric: a constant group comes back as itself for any clip ratio and sign, inside the clip
    range (the clipped STE passes its gradient); clipping a constant used to give +1.3% / -5% at 0.95."""
    y = torch.full((3, 16), 2.5)
    y[1] = -0.75
    y[2] = 0.0
    for bits in (2, 4, 8):
        out, inside = rref.fake_quant(y, bits, "token", False, clip)
        torch.testing.assert_close(out, y, rtol=0, atol=0)
        assert inside.all()
        out, _ = rref.fake_quant(y.t().contiguous(), bits, "channel", False, clip)
        torch.testing.assert_close(out, y.t(), rtol=0, atol=0)
    c = torch.randn(300, 1, generator=torch.Generator().manual_seed(1)).expand(300, 16).contiguous()
    out, _ = rref.fake_quant(c, 4, "token", False, clip)                  # any constant: within 1 ulp
    assert ((out - c).abs() <= c.abs() * 2.0 ** -23).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("rotate", [False, True])
def test_no_rows(backend, granularity, rotate):
    """A batch of 0 rows gives 0 rows and a 0-row gradient (channel groups over 0 tokens raised)."""
    if backend == "cpu" and not _ext.loaded():
        pytest.skip("fusedtune._C is not built")
    x = torch.randn(0, 64, requires_grad=True)
    y = rotate_fake_quant(x, 4, granularity=granularity, rotate=rotate, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 64)


needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="fusedtune._C is not built")


@needs_ext
@pytest.mark.parametrize("n", [8, 64, 256, 4096, 32768, 12 * 8, 12 * 64, 28 * 512, 40 * 128, 44 * 256, 36 * 16,
                               40 * 8, 44 * 16, 12 * 16])
@pytest.mark.parametrize("transpose", [False, True])
def test_cpu_butterfly_kernel_matches_the_float64_reference(n, transpose):
    """The C++ kernel (the CUDA kernel's stage plan with lane exchanges through memory): fp32 math, so
    within fp32 rounding of the float64 transform; 16-bit outputs within one rounding of the exact value."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    x[0, 0] = 300.0
    exact = href.hadamard(x.double(), transpose=transpose)
    got = hadamard(x, transpose=transpose, backend="cpu")
    torch.testing.assert_close(got.double(), exact, atol=4e-6 * math.log2(n), rtol=1e-5)
    assert torch.equal(got, torch.ops.fusedtune.hadamard_kernel(x, 1 / math.sqrt(n), list(_neg_masks(n, transpose))))
    for dt, rel in ((torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)):
        xd = x.to(dt)
        got = hadamard(xd, transpose=transpose, backend="cpu")
        exact = href.hadamard(xd.double(), transpose=transpose)
        assert got.dtype == dt
        assert ((got.double() - exact).abs() <= exact.abs() * rel + 1e-6).all()


@needs_ext
def test_cpu_butterfly_backward_and_refusals():
    x = torch.randn(2, 40 * 16, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(2, 40 * 16)
    hadamard(x, backend="cpu").backward(dy)
    torch.testing.assert_close(x.grad.double(), href.hadamard(dy.double(), transpose=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(BackendError, match=r"n = 11008 = 172 x 64 is not"):
        hadamard(torch.zeros(2, 11008), backend="cpu")
    with pytest.raises(BackendError, match=r"2\^k >= 8"):
        hadamard(torch.zeros(2, 24), backend="cpu")
    with pytest.raises(RuntimeError, match="not a power of two"):
        torch.ops.fusedtune.hadamard_kernel(torch.zeros(2, 12 * 24), 1.0, [0] * 12)
    with pytest.raises(RuntimeError, match="bits beyond the factor order"):
        torch.ops.fusedtune.hadamard_kernel(torch.zeros(2, 12 * 8), 1.0, [1 << 12] + [0] * 11)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.fusedtune.hadamard_kernel(torch.zeros(2, 64, dtype=torch.float64), 1.0, [])
    with pytest.raises(RuntimeError, match="factor order 24 is not compiled"):
        torch.ops.fusedtune.hadamard_kernel(torch.zeros(2, 24 * 8), 1.0, [0] * 24)
    masks = list(_neg_masks(12 * 8, False))
    masks[3] ^= 1 << 5                              # one sign flipped: not the compiled H_12 nor its transpose
    with pytest.raises(RuntimeError, match="neither the compiled H_12 nor its transpose"):
        torch.ops.fusedtune.hadamard_kernel(torch.zeros(2, 12 * 8), 1.0, masks)


def test_compiled_factor_header_is_the_generators_output():
    """csrc's H_m sign tables (hadamard_factors.h, compiled into the CPU and CUDA kernels) are what
    tools/gen_hadamard_factors.py writes from reference.hadamard.factor_matrix: rerun it after changing a
    construction."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "tools" / "gen_hadamard_factors.py"
    spec = importlib.util.spec_from_file_location("gen_hadamard_factors", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert Path(gen.PATH).read_text() == gen.render()


@pytest.mark.parametrize("n,cpu", [(96, True), (12288, True), (11008, False)])   # the C++ kernel has no 172
def test_hadamard_and_its_backward_compile_fullgraph(n, cpu):
    """Compile safety is what fast-hadamard-transform lacks: the transform and its backward (the same
    transform) trace into one graph on the reference and the C++ CPU backends."""
    x = torch.randn(3, n, dtype=torch.float32)
    for b in ["reference"] + (["cpu"] if cpu and _ext.loaded() else []):
        f = lambda t: hadamard(t, backend=b).square().sum()  # noqa: E731
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        f(xe).backward()
        torch.compile(f, fullgraph=True, backend="aot_eager")(xc).backward()
        torch.testing.assert_close(xc.grad, xe.grad)
        torch.testing.assert_close(xe.grad, 2 * x, rtol=1e-4, atol=1e-4)   # H orthonormal: d|xH|^2/dx = 2x


@pytest.mark.parametrize("n", [64, 96, 40])   # 96 = 12 x 8, 40: non-power-of-two rotations (a factor H_m)
def test_roste_linear_backward_compiles_fullgraph(n):
    """The straight-through backward rotates through the hadamard op: a compiled backward traces its fake
    (it used to run the reference's code, whose H_m is a real tensor, and fail for non-powers of two)."""
    layer = RoSTELinear.from_linear(torch.nn.Linear(n, 32), w_bits=4, a_bits=8)
    x = torch.randn(8, n)
    layer(x).pow(2).mean().backward()
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    torch.compile(lambda t: layer(t).pow(2).mean(), fullgraph=True, backend="aot_eager")(x).backward()
    torch.testing.assert_close(layer.weight.grad, want)


def test_int_linear_opcheck():
    """The exported layer's integer GEMM op (fusedtune::roste_int_linear): schema, fake tensor and
    dispatch checks, rotated and not."""
    from fusedtune.ops.roste import _int_linear_op
    g = torch.Generator().manual_seed(4)
    M, K, N = 5, 64, 16
    x = torch.randn(2, M, K, generator=g)
    qweight = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)   # two 4-bit codes a byte
    sw = torch.rand(N, generator=g) / 16 + 0.01
    zw = torch.randn(N, generator=g)
    uw = torch.randn(N, generator=g, dtype=torch.float64)
    for rotate, bias in ((False, None), (True, torch.randn(N, generator=g))):
        torch.library.opcheck(_int_linear_op, (x, rotate, 4, 0.9, qweight, 4, sw, zw, uw, bias, "reference"))


@needs_ext
def test_hadamard_kernel_opcheck():
    n = 12 * 32
    x = torch.randn(3, n)
    torch.library.opcheck(torch.ops.fusedtune.hadamard_kernel.default, (x, 1 / math.sqrt(n), list(_neg_masks(n, False))))
    torch.library.opcheck(_hadamard_op, (x, 0.5, False, "cpu"))


def test_tensor_core_kernel_switch_and_refusals_on_the_cpu():
    """The tensor-core factor kernel (roste_mma.cu; its results are checked in test_roste_mma_gpu.py) is off
    unless FUSEDTUNE_HADAMARD_MMA=1 or mma_scope says so; it never takes CPU tensors, so the C++ kernel's
    bits stay the CPU result with it on; mma_scope restores the switch after an error."""
    import subprocess
    import sys

    from fusedtune.ops import roste
    code = "from fusedtune.ops import roste; print(roste.MMA)"
    for env, want in (({}, "False"), ({roste.MMA_ENV: "1"}, "True")):
        e = {k: v for k, v in __import__("os").environ.items() if k != roste.MMA_ENV}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**e, **env})
        assert r.stdout.strip().splitlines()[-1] == want, r.stderr
    x = torch.randn(5, 28 * 512).bfloat16()
    assert "CUDA" in roste.mma_refuses(x)
    before = roste.MMA
    with pytest.raises(KeyError):
        with roste.mma_scope(not before):
            assert roste.MMA is (not before)
            raise KeyError
    assert roste.MMA is before
    if _ext.loaded():
        with roste.mma_scope(True):
            assert torch.equal(hadamard(x, backend="cpu"), torch.ops.fusedtune.hadamard_kernel(
                x, 1 / math.sqrt(x.shape[-1]), list(_neg_masks(x.shape[-1], False))))


def test_tensor_core_kernel_is_compiled_for_every_factor():
    """Every factor split_size can return (all of FACTORS but 20, which splits as 40 x 2^(k-1)) has its row-tile
    count among the tile counts the tensor-core kernel is compiled for (roste_mma.cu's dispatch cases, read
    from the source), and mma_refuses' list is that list."""
    import re

    from fusedtune.ops import roste
    src = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "roste_mma.cu").read_text()
    cases = {int(a) for a, b in re.findall(r"case (\d+): return launch_mma<DT, (\d+)>", src) if a == b}
    assert cases == set(roste._MMA_TILES)
    used = {href.split_size(m * 64)[0] for m in href.FACTORS}
    assert used == set(href.FACTORS) - {20}
    assert all(-(-m // 16) in cases for m in used)


def test_hadamard_choice_names_the_backend_hadamard_runs(monkeypatch):
    """The benchmark labels its unfused baseline with hadamard_choice: it must be what hadamard() runs, per shape."""
    from fusedtune.ops import roste as ops_roste
    ran = []
    real = ops_roste._hadamard

    def spy(x, s, t, name):
        ran.append(name)
        return real(x, s, t, name)
    monkeypatch.setattr(ops_roste, "_hadamard", spy)
    for n in (768, 4096, 11008, 3584):
        for backend in (None, "reference"):
            x = torch.randn(2, n)
            ops_roste.hadamard(x, backend=backend)
            assert ran[-1] == ops_roste.hadamard_choice(x, backend), (n, backend, ran[-1])
