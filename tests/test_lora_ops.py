"""LoRA ops on the CPU: the reference against an fp64 computation from the definition, the op's
gradients, the seeded dropout, several adapters against per-adapter loops, opcheck, compile, bad input."""
import contextlib
import math

import pytest
import torch

import fusedtune
from fusedtune.backend import BackendError
from fusedtune.ops import lora_linear, lora_linear_grouped, lora_linear_multi
from fusedtune.ops.lora import _lora_op, scale_table
from fusedtune.reference import lora as ref
from fusedtune.testing import assert_within_rule
from lora_cases import exact64, rand_adapter


def _grads(y, x, A, B, dy):
    return torch.autograd.grad(y, [x, A, B], dy)


@pytest.mark.parametrize("r", [1, 7, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_within_rule_of_fp64(r, dtype, backend):
    g = torch.Generator().manual_seed(r)
    M, K, N = 45, 97, 61
    x = torch.randn(3, M, K, generator=g).to(dtype).requires_grad_()
    W = torch.randn(N, K, generator=g).to(dtype) / K ** 0.5
    A, B = (t.requires_grad_() for t in rand_adapter(r, K, N, g))
    bias = torch.randn(N, generator=g).to(dtype)
    s = 16 / math.sqrt(r)
    y = lora_linear(x, W, A, B, s, bias=bias, backend=backend)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    got = [y] + list(_grads(y, x, A, B, dy))
    y64, (gx, gA, gB) = exact64(x, W, [A], [B], [s], bias, dy=dy)
    # the unfused same-precision computation (peft's: base GEMM in dtype, fp32 adapter path, adds)
    xu = x.detach().requires_grad_()
    Au, Bu = A.detach().requires_grad_(), B.detach().requires_grad_()
    yu = torch.nn.functional.linear(xu, W, bias) + (((xu.float() @ Au.t()) @ Bu.t()) * s)
    yu = yu.to(dtype)
    unf = [yu] + list(_grads(yu, xu, Au, Bu, dy))
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, e, u) in enumerate(zip(got, [y64, gx, gA, gB], unf)):
        assert_within_rule(a.reshape(e.shape), e, u.reshape(e.shape), f"output {i}", atol=atol)


def test_gradcheck_fp64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    # the reference computes float64 inputs in float64 (the kernels take fp32 and 16-bit types)
    assert torch.autograd.gradcheck(lambda *a: lora_linear(*a[:4], 0.5, bias=a[4], backend="reference"),
                                    (x, W, A, B, b))


def test_dropout_mask_is_seeded_and_has_the_right_rate():
    m1 = ref.dropout_mask(300, 333, seed=7, p=0.25)
    assert torch.equal(m1, ref.dropout_mask(300, 333, seed=7, p=0.25))
    assert not torch.equal(m1, ref.dropout_mask(300, 333, seed=8, p=0.25))
    n = m1.numel()
    kept = m1.float().mean().item()
    assert abs(kept - 0.75) < 5 * math.sqrt(0.25 * 0.75 / n)
    assert ref.dropout_mask(10, 10, seed=7, p=0.0).all()
    # element (m, k) depends on (m, k) only: a [5, 6] input's mask is the corner of a [9, 11] input's
    assert torch.equal(ref.dropout_mask(5, 6, 3, 0.5), ref.dropout_mask(9, 11, 3, 0.5)[:5, :6])
    # and it is word k % 4 of Philox(seed; k // 4, m, 0, 2), checked element by element
    from fusedtune.reference.zo import philox4x32_10
    big = ref.dropout_mask(9, 11, 3, 0.5)
    for m, k in [(0, 0), (3, 5), (8, 10), (4, 7)]:
        t = lambda v: torch.tensor([v])  # noqa: E731
        word = philox4x32_10(3, t(k // 4), t(m), t(0), t(2))[k % 4].item()
        assert big[m, k].item() == (word >= 2**31)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_follows_its_mask_in_forward_and_backward(backend):
    g = torch.Generator().manual_seed(3)
    M, K, N, r, p, seed = 40, 33, 29, 5, 0.3, 1234
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A, B = (t.requires_grad_() for t in rand_adapter(r, K, N, g))
    y = lora_linear(x, W, A, B, 2.0, dropout_p=p, seed=seed, backend=backend)
    dy = torch.randn(y.shape, generator=g)
    grads = _grads(y, x, A, B, dy)
    keep = ref.dropout_mask(M, K, seed, p)
    y64, g64 = exact64(x, W, [A], [B], [2.0], keep=keep, p=p, dy=dy)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-5)
    for a, e in zip(grads, g64):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-5)
    # a different seed is a different mask: the output changes
    y2 = lora_linear(x, W, A, B, 2.0, dropout_p=p, seed=seed + 1, backend=backend)
    assert (y2 - y).abs().max() > 1e-3


def test_dropout_seed_none_draws_from_torch_generator():
    x, W = torch.randn(8, 16), torch.randn(12, 16)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    torch.manual_seed(5)
    y1 = lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    y2 = lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    y3 = lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_multi_adapter_batch_equals_per_adapter_loop(backend):
    g = torch.Generator().manual_seed(4)
    K, N = 37, 23
    ranks, scales = [1, 16, 5, 64], [2.0, 0.5, 1.0, 0.25]
    ad = [rand_adapter(r, K, N, g) for r in ranks]
    As = [a.requires_grad_() for a, _ in ad]
    Bs = [b.requires_grad_() for _, b in ad]
    W = torch.randn(N, K, generator=g)
    # skewed segments: 1 row of adapter 0, 50 of adapter 1, none of adapter 2, 9 without adapter, 3 of adapter 3
    idx = torch.tensor([0] + [1] * 50 + [-1] * 9 + [3] * 3)[torch.randperm(63, generator=g)]
    x = torch.randn(63, K, generator=g, requires_grad=True)
    y = lora_linear_multi(x, W, list(zip(As, Bs, scales)), idx, backend=backend)
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [x] + As + Bs, dy)
    y64, g64 = exact64(x, W, As, Bs, scales, rows_adapter=idx, dy=dy)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-5)
    for a, e in zip(got, g64):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-5)
    assert got[1 + 2].abs().max() == 0     # adapter 2 had no rows: zero gradient


def test_multi_adapter_per_sequence_index_and_all_active():
    g = torch.Generator().manual_seed(5)
    K, N = 20, 12
    ad = [(*rand_adapter(r, K, N, g), s) for r, s in ((3, 1.0), (6, 3.0))]
    W = torch.randn(N, K, generator=g)
    x = torch.randn(4, 7, K, generator=g)
    y = lora_linear_multi(x, W, ad, torch.tensor([1, -1, 0, 1]))
    rows = torch.tensor([1, -1, 0, 1]).repeat_interleave(7)
    y64 = exact64(x, W, [a[0] for a in ad], [a[1] for a in ad], [a[2] for a in ad], rows_adapter=rows)
    torch.testing.assert_close(y.reshape(-1, N).double(), y64, atol=1e-4, rtol=1e-5)
    yall = lora_linear_multi(x, W, ad)       # no index: every row takes the sum of all adapters
    y64 = exact64(x, W, [a[0] for a in ad], [a[1] for a in ad], [a[2] for a in ad])
    torch.testing.assert_close(yall.reshape(-1, N).double(), y64, atol=1e-4, rtol=1e-5)


def _op_args(dtype=torch.float32, gid=True, p=0.0):
    g = torch.Generator().manual_seed(9)
    M, K, N, R = 10, 12, 8, 6
    x = torch.randn(M, K, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    A = torch.randn(R, K, generator=g, requires_grad=True)
    B = torch.randn(N, R, generator=g, requires_grad=True)
    S = scale_table([2, 4], [0.5, 2.0], "cpu")
    rg = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, -1, 0], dtype=torch.int32) if gid else None
    return (x, W, A, B, torch.randn(N, dtype=dtype), S if gid else S[:1], rg, p, torch.tensor(3),
            None, None, None, None, 0, 0, 0.0, "", "reference")


@pytest.mark.parametrize("gid,p", [(True, 0.0), (False, 0.2)])
def test_opcheck(gid, p):
    torch.library.opcheck(_lora_op, _op_args(gid=gid, p=p))


@pytest.mark.parametrize("lead", [(2, 5), (10,), ()])
def test_opcheck_any_leading_shape(lead):
    """The op takes x [..., K] and flattens it inside (a reshape outside is an autograd node each way):
    y [..., N], t [rows, R]; the gradients reach x in its own shape. The row-major rows are the 2-D call's."""
    args = list(_op_args(gid=not lead == (), p=0.2))
    x2 = args[0]
    rows = 1 if lead == () else 10
    x = x2.detach()[:rows].reshape(*lead, x2.shape[1]).requires_grad_()
    args[0] = x
    if lead == ():
        args[5] = args[5][:1]
    torch.library.opcheck(_lora_op, tuple(args))
    y, t = _lora_op(*args)
    flat = list(args)
    flat[0] = x.detach().reshape(-1, x.shape[-1])
    y2, t2 = _lora_op(*flat)
    assert y.shape == (*lead, y2.shape[-1]) and t.shape == t2.shape
    assert torch.equal(y.reshape(y2.shape), y2) and torch.equal(t, t2)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert gx.shape == x.shape


@pytest.mark.parametrize("gid,p", [(True, 0.0), (False, 0.2)])
def test_backward_op_opcheck(gid, p):
    """The backward as its own op (fusedtune::lora_linear_backward, what compiled graphs call): every
    subset of the gradients asked for."""
    from fusedtune.ops.lora import _lora_bwd_op
    args = _op_args(gid=gid, p=p)
    x, W, A, B, _, S, rg, p_, seed, *nf4_and_backend = args
    with torch.no_grad():
        y, t = _lora_op(*args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    for need in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(_lora_bwd_op, (dy, x.detach(), W, A.detach(), B.detach(), t, S, rg, p_, seed,
                                             *nf4_and_backend[:-1], need, nf4_and_backend[-1]))


def test_compile_fullgraph_matches_eager():
    from fusedtune.nn import LoRALinear
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(24, 16), r=4, alpha=8, init_lora_weights=False,
                                   backend="reference")
    x = torch.randn(2, 5, 24, requires_grad=True)
    ye = layer(x)
    ge = torch.autograd.grad(ye.sum(), [x, layer.lora_A["default"].weight])
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")
    yc = comp(x)
    gc = torch.autograd.grad(yc.sum(), [x, layer.lora_A["default"].weight])
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_bad_inputs_are_refused_clearly():
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="x has 9 features"):
        lora_linear(torch.randn(4, 9), W, A, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 8\]"):
        lora_linear(x, W, torch.randn(2, 7), B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[6, 2\]"):
        lora_linear(x, W, A, torch.randn(2, 6), 1.0)
    with pytest.raises(TypeError, match="x is torch.bfloat16 but the base weight is torch.float32"):
        lora_linear(x.bfloat16(), W, A, B, 1.0)
    with pytest.raises(TypeError, match="x must be a float32/bfloat16/float16"):
        lora_linear(x.long(), W, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        lora_linear(x, W, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \[6\]"):
        lora_linear(x, W, A, B, 1.0, bias=torch.randn(5))
    with pytest.raises(ValueError, match="adapter_index values must lie in"):
        lora_linear_multi(x, W, [(A, B, 1.0)], torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="one entry per row"):
        lora_linear_multi(x, W, [(A, B, 1.0)], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="scale table must be float32"):
        lora_linear_grouped(x, W, A, B, torch.ones(1, 3))
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, W, A.to("meta"), B, 1.0)
    with pytest.raises(ValueError, match="a tensor scale must be one number that needs no gradient"):
        lora_linear(x, W, A, B, torch.tensor(2.0, requires_grad=True))   # it would silently get no gradient
    with pytest.raises(ValueError, match="a tensor scale must be one number"):
        lora_linear(x, W, A, B, torch.tensor([1.0, 2.0]))
    if not fusedtune.backend.interpreting():
        with pytest.raises(BackendError, match="backend 'triton' cannot run here"):
            lora_linear(x, W, A, B, 1.0, backend="triton")


@pytest.mark.parametrize("dispatcher", [False, True])
def test_output_of_any_rank_can_be_changed_in_place(dispatcher):
    """y of a [batch, seq, in] x is flattened back inside the op and handed out detached from it: in-place ops on
    the output (relu_, in-place forward hooks) work as on an nn.Linear's, on both routes, and gradients flow."""
    from fusedtune.ops import _eager
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    W = torch.randn(8, 16, generator=g)
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    with (_eager.dispatcher_only() if dispatcher else contextlib.nullcontext()):
        y = lora_linear(x, W, A, B, 2.0)
        want = torch.relu(y.detach().clone())
        torch.relu_(y)
        assert torch.equal(y, want)
        y.sum().backward()
    assert x.grad.shape == x.shape and A.grad is not None and B.grad is not None


def test_no_output_features_with_batched_x():
    """N = 0 with x [2, 3, K]: an empty y, and a backward that reshapes its empty dy by the rows, not by -1."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    A = torch.randn(4, 8, requires_grad=True)
    y = lora_linear(x, torch.randn(0, 8), A, torch.randn(0, 4, requires_grad=True), 2.0)
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(A.grad, torch.zeros_like(A))


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_multi", "dora_linear"])
def test_ops_called_directly_under_autocast_run_as_autocast_runs_f_linear(op):
    """Found by audit: autocast reached inside the op body on the reference/CPU path (bf16 matmuls, a float32
    label) and not on Triton's. Now: x, weight and bias in the autocast dtype, the output in it, the same bits
    as the op called on those casts with autocast off, and float32 gradients for float32 leaves."""
    from fusedtune.ops import dora_linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).requires_grad_()
    W, b = torch.randn(24, 64, generator=g) / 8, torch.randn(24, generator=g)
    A = (torch.randn(4, 64, generator=g) / 8).requires_grad_()
    B = torch.randn(24, 4, generator=g).requires_grad_()
    m = torch.rand(24, generator=g) + 1
    calls = {"lora_linear": lambda x_, W_, b_: lora_linear(x_, W_, A, B, 0.5, b_),
             "lora_linear_multi": lambda x_, W_, b_: lora_linear_multi(x_, W_, [(A, B, 0.5)],
                                                                       torch.zeros(5, dtype=torch.long), b_),
             "dora_linear": lambda x_, W_, b_: dora_linear(x_, W_, A, B, 0.5, m, b_)}
    fn = calls[op]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, W, b)
    want = fn(x.bfloat16(), W.bfloat16(), b.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad.dtype == A.grad.dtype == torch.float32


def test_shapes_under_a_strict_fake_tensor_mode():
    """Found by audit: a call without dropout passed the op a shared real zero-seed tensor, which a strict
    FakeTensorMode (every input fake) refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedtune.nn import LoRALinear
    from fusedtune.ops import dora_linear
    mode = FakeTensorMode()
    real = dict(x=torch.randn(2, 3, 64), W=torch.randn(30, 64), A=torch.randn(4, 64), B=torch.randn(30, 4),
                m=torch.rand(30) + 1)
    f = {k: mode.from_tensor(v) for k, v in real.items()}
    with mode:
        assert lora_linear(f["x"], f["W"], f["A"], f["B"], 0.5).shape == (2, 3, 30)
        assert dora_linear(f["x"], f["W"], f["A"], f["B"], 0.5, f["m"]).shape == (2, 3, 30)
        layer = LoRALinear.from_linear(torch.nn.Linear(64, 30), r=4)
        assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 30)


def test_multi_adapter_index_must_be_integers_and_no_input_features_works():
    """Found by audit: a float adapter_index was truncated ([0.9, 1.5] ran as [0, 1]); with in_features 0 the
    per-row count came out 0 and a correct index was refused (F.linear gives the bias there)."""
    x, W, b = torch.randn(2, 8), torch.randn(6, 8), torch.randn(6)
    ad = [(torch.randn(2, 8), torch.randn(6, 2), 1.0), (torch.randn(3, 8), torch.randn(6, 3), 0.5)]
    for bad in ([0.9, 1.5], torch.tensor([True, False])):
        with pytest.raises(TypeError, match="adapter_index must be integers"):
            lora_linear_multi(x, W, ad, bad, b)
    x0, W0 = torch.randn(3, 0), torch.randn(6, 0)
    y = lora_linear_multi(x0, W0, [(torch.randn(2, 0), torch.randn(6, 2), 1.0)], torch.tensor([0, 0, 0]), b)
    assert torch.equal(y, torch.nn.functional.linear(x0, W0, b))


def test_float64_stays_float64_under_autocast_as_f_linear():
    """Found by review: the autocast cast took float64 to bf16; autocast leaves float64 alone (F.linear too)."""
    x, W = torch.randn(3, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    A, B = torch.randn(2, 16, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, W).dtype == torch.float64
        y = lora_linear(x, W, A, B, 0.5, backend="reference")
    assert y.dtype == torch.float64 and torch.equal(y, lora_linear(x, W, A, B, 0.5, backend="reference"))
