"""zo_apply_: bit equality across backends, undo exactness and drift, stochastic rounding,
no parameter-sized buffers, opcheck and torch.compile."""
import pytest
import torch

import fusedtune
from fusedtune.ops import zo_apply_
from fusedtune.testing import check_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (4, 33), (3, 5, 129), (1000, 3)]


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in SHAPES]
    ts.append(torch.empty(0, dtype=dtype))
    return ts


CASES = [
    dict(seeds=[3], coeffs=[1e-3]),
    dict(seeds=[1, (1 << 64) - 1, 42], coeffs=[1e-3, -2.5e-4, 0.75], noise="rademacher"),
    dict(seeds=[9], coeffs=[-1e-3], undo=([9], [1e-3])),
    dict(seeds=[9, 10], coeffs=[-1e-6, 1e-3], undo=([9, 4], [-1e-3, 2e-3]), alpha=0.999),
    dict(seeds=[5], coeffs=[3e-3], rounding="stochastic", rounding_seed=77),
    dict(seeds=[5], coeffs=[3e-3], rounding="stochastic", undo=([6], [1e-3]), alpha=0.9, tensor_ids=[9, 8, 7, 6, 5, 4]),
    # the shapes the kernels compile apart (zo_math.h MODE_ONE / MODE_SAME x noise x rounding), not covered above
    dict(seeds=[11], coeffs=[2e-3], noise="rademacher", alpha=0.99),
    dict(seeds=[12], coeffs=[-4e-3], undo=([12], [2e-3]), rounding="stochastic", rounding_seed=5, noise="rademacher"),
    dict(seeds=[13], coeffs=[-1e-3], undo=([13], [5e-4]), rounding="stochastic", rounding_seed=8, alpha=0.995),
    dict(seeds=[14], coeffs=[7e-4], noise="rademacher", rounding="stochastic", rounding_seed=3),
    # MODE_NEXT: one seed undone and reapplied plus a second (a folded MeZO's last pass), each noise and rounding
    dict(seeds=[15, 16], coeffs=[-2e-3, 1e-3], undo=([15], [-1e-3])),
    dict(seeds=[17, 18], coeffs=[-5e-4, 1e-3], undo=([17], [1e-3]), noise="rademacher", rounding="stochastic",
         rounding_seed=4, alpha=0.99),
    dict(seeds=[19, 20], coeffs=[3e-4, -1e-3], undo=([19], [1e-3]), rounding="stochastic", rounding_seed=6),
    dict(seeds=[23, 24], coeffs=[2e-3, 1e-3], undo=([23], [-2e-3]), noise="rademacher", alpha=0.9),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bit_identical_across_backends(dtype, case):
    kw = dict(CASES[case])

    def run(b):
        ts = _tensors(dtype)
        zo_apply_(ts, backend=b, **kw)
        return ts
    before = _tensors(dtype)
    after = run("reference")
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the op changed nothing"
    check_backends(run, "cpu", exact=True)


def test_reference_matches_first_principles():
    # t + c * z computed by hand from zo_noise, rounded once
    w = (torch.randn(4097) * 0.1).to(torch.bfloat16)
    z1 = fusedtune.ops.zo_noise(w.shape, 11, tensor_id=0)
    z2 = fusedtune.ops.zo_noise(w.shape, 12, tensor_id=0)
    c1, c2 = torch.tensor(1e-2), torch.tensor(-3e-3)
    want = (w.float() + (c1 * z1 + c2 * z2)).to(torch.bfloat16)
    for b in ["reference"] + (["cpu"] if fusedtune._ext.loaded() else []):
        got = w.clone()
        zo_apply_(got, [11, 12], [1e-2, -3e-3], backend=b)
        assert torch.equal(got, want), b


@pytest.mark.parametrize("dtype", DTYPES)
def test_undo_restores_where_naive_mezo_drifts(dtype):
    w0 = (torch.randn(1 << 18) * 0.02).to(dtype)
    eps = 1e-3
    ours, naive = w0.clone(), w0.clone()
    zo_apply_(ours, [5], [eps])
    zo_apply_(ours, [5], [-eps], undo=([5], [eps]))
    minus = ours.clone()
    zo_apply_(ours, [5], [0.0], undo=([5], [-eps]))
    for c in (eps, -2 * eps, eps):  # MeZO: +eps, -2eps, +eps, each rounded
        zo_apply_(naive, [5], [c])
    exact_ours = (ours == w0).float().mean().item()
    exact_naive = (naive == w0).float().mean().item()
    assert exact_ours > 0.85 and exact_naive < 0.65 and exact_ours > exact_naive + 0.25, (exact_ours, exact_naive)
    # where the preimage is not unique (a move into a coarser binade), the restore is off by at
    # most one step of the format at the perturbed magnitude
    ulp_rel = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    bound = ulp_rel * (w0.float().abs() + eps * 4)
    assert ((ours.float() - w0.float()).abs() <= bound).all()
    # the second forward sees round(w - eps z) from the unperturbed weights (exact where unique)
    direct = w0.clone()
    zo_apply_(direct, [5], [-eps])
    assert (minus == direct).float().mean().item() > 0.85


def test_drift_over_many_steps_bf16():
    w0 = (torch.randn(1 << 16) * 0.02).to(torch.bfloat16)
    eps = 1e-3
    ours, naive = w0.clone(), w0.clone()
    for k in range(20):
        zo_apply_(ours, [k], [eps])
        zo_apply_(ours, [k], [-eps], undo=([k], [eps]))
        zo_apply_(ours, [k], [0.0], undo=([k], [-eps]))
        for c in (eps, -2 * eps, eps):
            zo_apply_(naive, [k], [c])
    drift = lambda t: (t.float() - w0.float()).abs().mean().item()  # noqa: E731
    assert drift(ours) * 5 < drift(naive), (drift(ours), drift(naive))


def undo_edge_values(dtype) -> torch.Tensor:
    """Powers of two (a move into the coarser binade has two preimages), the largest finite values (x - dp
    rounds to infinity), zeros of both signs, subnormals, infinities and NaN; beside ordinary weights."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal
    v = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.25, 1024.0, big, -big, big * 0.999, 0.0, -0.0, tiny, -tiny,
                      tiny / 8, 3e-3, -0.07, 0.0123, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    return torch.cat([v, torch.randn(300, dtype=torch.float64, generator=g) * 0.05]).to(dtype).repeat(8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pc", [1e-3, -0.75, 1e38, float("inf")])   # (a NaN result's sign is the hardware's)
def test_undo_edges_bit_identical(dtype, pc):
    """The CPU kernel's undo against the reference's at the format's edges: the largest values (x - dp
    rounds to infinity), zeros, subnormals, infinities and NaN, under ordinary, huge and infinite deltas;
    same-seed undo (MeZO's compiled path), that with a second seed (a folded MeZO's) and an undo of another
    seed (the generic path). (The neighbour
    search itself: test_undo_neighbour_search_bit_identical.)"""
    for kw in (dict(seeds=[21], coeffs=[-pc], undo=([21], [pc])), dict(seeds=[22], coeffs=[1e-3], undo=([23], [pc])),
               dict(seeds=[24, 25], coeffs=[-pc, 1e-3], undo=([24], [pc]))):
        def run(b):
            t = undo_edge_values(dtype)
            zo_apply_(t, backend=b, **kw)
            return [t]
        checked = check_backends(run, "cpu", exact=True)
        assert checked or not fusedtune._ext.loaded()


def undo_search_inputs(dtype) -> torch.Tensor:
    """Stored values where round(x - dp) can miss x under a dyadic dp (a tie) and the undo's search moves to
    a neighbour: every 16-bit pattern; for float32, the values at and next to powers of two of both signs
    (the binade edges), zeros and subnormals."""
    from fusedtune.reference import zo as zref
    if dtype != torch.float32:
        return zref.as_dtype(torch.arange(1 << 16, dtype=torch.int64), dtype)
    p = torch.tensor([2.0 ** e for e in range(-30, 31)] + [0.0, 1e-45, 1.2e-38], dtype=torch.float32)
    p = torch.cat([p, -p])
    near = [p, torch.nextafter(p, torch.full_like(p, float("inf"))), torch.nextafter(p, torch.full_like(p, -float("inf")))]
    return torch.cat(near).repeat(16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_undo_neighbour_search_bit_identical(dtype):
    """The undo's search where round(x - dp) misses x (ties under dyadic deltas: Rademacher noise makes dp =
    +-pc exactly; both zeros; subnormals): x is each input and its forward image under the same element's dp.
    The CPU kernel checks the one neighbour on x's side (zo_math.h invert), the reference checks both in
    order; and the search must have moved some elements, or the test checks nothing."""
    from fusedtune.reference import zo as zref
    start = undo_search_inputs(dtype)
    n = start.numel()
    searched = 0
    for pc in (2.0 ** -25, -2.0 ** -24, 2.0 ** -9, -5 * 2.0 ** -134, 2.0 ** -150, 3 * 2.0 ** -12):
        image = torch.cat([start, start])
        zo_apply_(image, [4], [pc], noise="rademacher", backend="reference")
        x = torch.cat([start, image[n:]])      # the image at the positions (dp) that made it
        for b in ["cpu"] if fusedtune._ext.loaded() else []:
            want, got = x.clone(), x.clone()
            zo_apply_(want, [4], [0.0], undo=([4], [pc]), noise="rademacher", backend="reference")
            zo_apply_(got, [4], [0.0], undo=([4], [pc]), noise="rademacher", backend=b)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (pc, b)
        bits = x.view(torch.int32 if dtype == torch.float32 else torch.int16).to(torch.int64)
        bits &= 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
        dp = zref.zo_noise(x.shape, 4, noise="rademacher") * pc
        xv = zref.from_bits(bits, dtype)
        searched += int((torch.isfinite(xv) & (zref.invert(bits, dp, dtype) != zref.to_bits(xv - dp, dtype))).sum())
    assert searched > 0, dtype


def test_stochastic_rounding_is_unbiased_and_seeded():
    w = torch.ones(1 << 18, dtype=torch.bfloat16)  # ulp(1) = 2^-7: a 1e-3 update is under half an ulp
    z = fusedtune.ops.zo_noise(w.shape, 3, noise="rademacher")
    nearest, sr, sr2, sr3 = w.clone(), w.clone(), w.clone(), w.clone()
    zo_apply_(nearest, [3], [1e-3], noise="rademacher")
    zo_apply_(sr, [3], [1e-3], noise="rademacher", rounding="stochastic", rounding_seed=1)
    zo_apply_(sr2, [3], [1e-3], noise="rademacher", rounding="stochastic", rounding_seed=1)
    zo_apply_(sr3, [3], [1e-3], noise="rademacher", rounding="stochastic", rounding_seed=2)
    assert torch.equal(nearest, w)  # nearest loses the whole update
    moved = sr.float() - 1
    for sign in (1.0, -1.0):
        mean = moved[z == sign].mean().item()
        assert abs(mean - sign * 1e-3) < 1e-4, mean
    assert torch.equal(sr, sr2) and not torch.equal(sr, sr3)


def fp16_edge_values() -> torch.Tensor:
    """float16 values around every branch of its stochastic rounding: normal, subnormal, below 2^-24,
    zeros, the overflow edge, inf and NaN (the update moves them across the boundaries)."""
    v = torch.tensor([1.0, -3.14, 6.1e-5, -6.0e-5, 2.0e-6, -7.0e-7, 6.0e-8, 5.96e-8, -3.0e-8, 1e-9, 0.0, -0.0,
                      65504.0, -65472.0, 60000.0, float("inf"), float("-inf"), float("nan")])
    return v.repeat(64).half()


@pytest.mark.parametrize("coeff", [1e-7, 3e-5, 40.0])
def test_float16_stochastic_rounding_edges_bit_identical(coeff):
    def run(b):
        t = fp16_edge_values()
        zo_apply_(t, [11], [coeff], rounding="stochastic", rounding_seed=5, backend=b)
        return [t]
    checked = check_backends(run, "cpu", exact=True)
    assert checked or not fusedtune._ext.loaded()
    out = run("reference")[0].float()
    assert torch.isinf(out[15]) and torch.isnan(out[17]) and torch.isfinite(out[:15]).all()


def test_float16_stochastic_rounding_is_unbiased_in_normal_and_subnormal_range():
    for base, c in ((1.0, 1e-4), (1e-6, 1e-8)):       # ulp(1) = 2^-10; fp16 subnormal step = 2^-24
        w = torch.full((1 << 18,), base, dtype=torch.float16)
        z = fusedtune.ops.zo_noise(w.shape, 3, noise="rademacher")
        nearest, sr = w.clone(), w.clone()
        zo_apply_(nearest, [3], [c], noise="rademacher")
        zo_apply_(sr, [3], [c], noise="rademacher", rounding="stochastic", rounding_seed=1)
        assert torch.equal(nearest, w)                   # under half a step: nearest loses the update
        moved = sr.double() - w.double()
        for sign in (1.0, -1.0):
            mean = moved[z == sign].mean().item()
            assert abs(mean - sign * c) < 0.05 * c, (base, sign, mean)


def test_float32_stochastic_is_plain_float32():
    a = torch.randn(1000)
    b = a.clone()
    zo_apply_(a, [1], [1e-3], rounding="stochastic", rounding_seed=3)
    zo_apply_(b, [1], [1e-3])
    assert torch.equal(a, b)


def test_only_given_tensors_change():
    a, b = torch.randn(100), torch.randn(100)
    b0 = b.clone()
    zo_apply_([a], [1], [1.0])
    assert torch.equal(b, b0)


@pytest.mark.skipif(not fusedtune._ext.loaded(), reason="needs the C++ CPU kernels")
def test_cpu_kernel_allocates_nothing_parameter_sized():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(o) and o.untyped_storage().data_ptr() not in self.known:
                    self.numels.append((str(func), o.numel()))
            return out

    params = [torch.randn(4096, 64), torch.randn(100_000).bfloat16()]
    opt = fusedtune.optim.MeZO(params, lr=1e-3, backend="cpu")
    rec = Record()
    rec.known = {p.untyped_storage().data_ptr() for p in params}
    with rec:
        opt.step(lambda: params[0][0, 0] * 2.0)
    assert rec.numels and max(n for _, n in rec.numels) <= 16, rec.numels


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    if backend == "cpu" and not fusedtune._ext.loaded():
        pytest.skip("needs the C++ CPU kernels")
    ts = [torch.randn(33), torch.randn(5, 7).bfloat16()]
    s, c = torch.tensor([1, 2]), torch.tensor([1e-3, 2e-3])
    ps, pc = torch.tensor([1]), torch.tensor([1e-3])
    torch.library.opcheck(torch.ops.fusedtune.zo_apply_.default,
                          (ts, s, c, ps, pc, [0, 1], 0.999, 0, 0, 5, backend))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.fusedtune.zo_apply_kernel_.default,
                              (ts, [0, 1], s, c, ps, pc, 1.0, 1, 0, 5))


def test_torch_compile_fullgraph():
    def step(ts, coeff):
        torch.ops.fusedtune.zo_apply_(ts, torch.tensor([4]), coeff, torch.tensor([4]), torch.tensor([1e-3]),
                                      [0, 1], 1.0, 0, 0, 0, "cpu" if fusedtune._ext.loaded() else "reference")
        return ts[0].sum()

    a = [torch.randn(64), torch.randn(8, 8).bfloat16()]
    b = [t.clone() for t in a]
    coeff = torch.tensor([-1e-3])
    step(a, coeff)
    torch.compile(step, fullgraph=True, backend="aot_eager")(b, coeff)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_public_wrapper_compiles_fullgraph():
    def perturb(t):
        zo_apply_([t], [7], [1e-3])
        return t * 2

    a, b = torch.randn(100), None
    b = a.clone()
    ra = perturb(a)
    rb = torch.compile(perturb, fullgraph=True, backend="aot_eager")(b)
    assert torch.equal(ra, rb) and torch.equal(a, b)
