"""hft ops: compact row gradients equal the dense gradient's rows, MaskedAdamW bit-identical across
backends and close to torch.optim.AdamW, frozen rows untouched, opcheck, compile, bad inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fusedtune
from fusedtune.nn import RowMaskedLinear
from fusedtune.ops.hft import hft_row_linear, masked_adamw_, row_grad
from fusedtune.optim import MaskedAdamW
from fusedtune.testing import check_backends


@pytest.mark.parametrize("shape", [(7, 13, 11), (2, 5, 33, 17)])
def test_row_grad_is_dense_grad_rows(shape):
    *lead, out, inp = shape
    x = torch.randn(*lead, inp, dtype=torch.float64)
    w = torch.randn(out, inp, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*lead, out, dtype=torch.float64)
    F.linear(x, w).backward(dy)
    rows = torch.tensor(sorted({0, out - 1, out // 2, 3}))
    got = row_grad(dy.float(), x.float(), rows, backend="reference")
    torch.testing.assert_close(got.double(), w.grad[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 13, 11), (2, 5, 33, 17)])
def test_gather_gemm_is_dense_grad_rows(shape):
    """The cuda backend's schedule (gather dy's columns, one GEMM) on CPU tensors, where it can run: float32
    inputs (its 16-bit-in, float32-out branch needs CUDA's mm out_dtype; the GPU test covers it)."""
    from fusedtune.ops.hft import _gather_gemm
    *lead, out, inp = shape
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(*lead, inp, generator=g), torch.randn(*lead, out, generator=g)
    rows = torch.tensor(sorted({0, out - 1, out // 2, 3}))
    want = (dy.reshape(-1, out).double().t() @ x.reshape(-1, inp).double())[rows]
    got = _gather_gemm(dy, x, rows, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (len(rows), inp)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert _gather_gemm(dy, x, rows, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_grad_out_dtype_is_the_float32_result_rounded_once(backend, dtype):
    g = torch.Generator().manual_seed(2)
    dy, x = torch.randn(37, 21, generator=g).to(dtype), torch.randn(37, 19, generator=g).to(dtype)
    rows = torch.tensor([0, 3, 4, 20])
    full = row_grad(dy, x, rows, backend=backend)
    assert full.dtype == torch.float32
    for out_dtype in (torch.bfloat16, torch.float16):
        got = row_grad(dy, x, rows, backend=backend, out_dtype=out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, full.to(out_dtype))


def test_row_linear_gradients_match_dense_reference():
    lin = torch.nn.Linear(33, 21)
    rows = torch.tensor([0, 4, 5, 20])
    m = RowMaskedLinear.from_linear(lin, rows)
    x = torch.randn(3, 9, 33, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 9, 21)
    m(x).backward(dy)
    lin(x2).backward(dy)
    assert m.weight.grad is None and m.bias.grad is None
    torch.testing.assert_close(m.weight_rows.grad, lin.weight.grad[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias_rows.grad, lin.bias.grad[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_gives_a_trained_weight_its_dense_gradient(backend):
    """A caller that trains the whole weight too (weight.requires_grad) gets F.linear's dW."""
    x = torch.randn(2, 7, 13, requires_grad=True)
    w = torch.randn(9, 13, requires_grad=True)
    rows = torch.tensor([1, 2, 8])
    w_rows = w.detach()[rows].clone().requires_grad_()
    dy = torch.randn(2, 7, 9)
    hft_row_linear(x, w, w_rows, rows, backend=backend).backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(x2, w2).backward(dy)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_rows.grad, w2.grad[rows], rtol=1e-5, atol=1e-5)


def test_training_touches_only_selected_rows():
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 10).to(torch.bfloat16)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = RowMaskedLinear.from_linear(lin, torch.tensor([2, 3, 8]))
    opt = MaskedAdamW(m.parameters(), lr=1e-2)
    x, target = torch.randn(64, 16).bfloat16(), torch.randn(64, 10)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (m(x).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = (m.weight != w0).any(1).nonzero().flatten().tolist()
    assert changed == [2, 3, 8]
    frozen = torch.ones(10, dtype=torch.bool)
    frozen[[2, 3, 8]] = False
    assert torch.equal(m.weight[frozen].view(torch.int16), w0[frozen].view(torch.int16))
    assert (m.bias != b0).nonzero().flatten().tolist() == [2, 3, 8]          # the bias at the rows trains
    assert torch.equal(m.bias[frozen].view(torch.int16), b0[frozen].view(torch.int16))
    assert torch.equal(m.bias[[2, 3, 8]], m.bias_rows.detach().bfloat16())
    assert torch.equal(m.weight[[2, 3, 8]], m.weight_rows.detach().to(torch.bfloat16))
    assert losses[-1] < losses[0]
    assert opt.state_bytes() == 2 * 3 * (16 + 1) * 4  # moments for the selected rows (weight and bias) only
    assert isinstance(m.to_linear(), torch.nn.Linear)


def _adam_inputs():
    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(37, 5, generator=g), torch.randn(101, generator=g).bfloat16(),
          torch.randn(3, 5, generator=g), torch.randn(17, generator=g).half()]
    gs = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]
    tg = [torch.empty(0), torch.empty(0), torch.randn(11, 5, generator=g).bfloat16(), torch.empty(0)]
    rows = [torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.tensor([0, 6, 10]),
            torch.empty(0, dtype=torch.long)]
    return ps, gs, tg, rows


@pytest.mark.parametrize("row_masters", [True, False])
def test_masked_adamw_bit_identical_across_backends(row_masters):
    """Also without any row master: the kernels then get empty target and row lists."""
    def run(b):
        ps, gs, tg, rows = _adam_inputs()
        if not row_masters:
            ps, gs, tg, rows = [ps[i] for i in (0, 1, 3)], [gs[i] for i in (0, 1, 3)], [None] * 3, [None] * 3
        ms = [torch.zeros(p.shape) for p in ps]
        vs = [torch.zeros(p.shape) for p in ps]
        for step in range(1, 6):
            masked_adamw_(ps, gs, ms, vs, tg, rows, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          step=step, backend=b)
        return ps + ms + vs + [t for t in tg if t is not None]
    checked = check_backends(run, "cpu", exact=True, has=("reference", "cpu", "cuda"))
    assert ("cpu" in checked) == fusedtune._ext.loaded()


def test_masked_adamw_matches_torch_adamw():
    p = torch.nn.Parameter(torch.randn(200))
    q = torch.nn.Parameter(p.detach().clone())
    a = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.05)
    b = MaskedAdamW([q], lr=1e-2, weight_decay=0.05)
    for i in range(20):
        g = torch.randn(200)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8)
    wr = torch.randn(2, 8, requires_grad=True)
    rows = torch.tensor([1, 4])
    torch.library.opcheck(torch.ops.fusedtune.hft_row_linear.default, (x, w, wr, rows, None, None, "reference"))
    torch.library.opcheck(torch.ops.fusedtune.hft_row_linear.default,
                          (x, w, wr, rows, torch.randn(6), torch.randn(2, requires_grad=True), "reference"))
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fusedtune.hft_row_grad.default,
                              (torch.randn(4, 6), x.detach(), rows, "reference", out_dtype))
    ps, gs, tg, rs = _adam_inputs()
    consts = [1.0, 0.9, 0.1, 0.999, 0.001, 0.03, 1e-8, 0.01]
    torch.library.opcheck(torch.ops.fusedtune.masked_adamw_.default,
                          (ps, gs, [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps], tg, rs,
                           consts, "reference"))
    if fusedtune._ext.loaded():   # the compiled kernel's own schema and fake impl, and the op on "cpu"
        torch.library.opcheck(torch.ops.fusedtune.masked_adamw_kernel_.default,
                              (ps, gs, [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps], tg,
                               rs, consts))
        torch.library.opcheck(torch.ops.fusedtune.masked_adamw_.default,
                              (ps, gs, [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps], tg,
                               rs, consts, "cpu"))
        plain = [0, 1, 3]            # no row master among them: empty target and row lists
        op = torch.ops.fusedtune.masked_adamw_.default
        for fn, tail in ((torch.ops.fusedtune.masked_adamw_kernel_.default, ()), (op, ("cpu",)), (op, ("reference",))):
            zeros = [torch.zeros(ps[i].shape) for i in plain]
            torch.library.opcheck(fn, ([ps[i] for i in plain], [gs[i] for i in plain], zeros,
                                       [z.clone() for z in zeros], [], [], consts) + tail)

    m = RowMaskedLinear.from_linear(torch.nn.Linear(8, 6), rows)
    f = lambda x: m(x).pow(2).sum()  # noqa: E731
    f(x).backward()
    g_eager = m.weight_rows.grad.clone(), m.bias_rows.grad.clone()
    m.weight_rows.grad = m.bias_rows.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    torch.testing.assert_close(m.weight_rows.grad, g_eager[0])
    torch.testing.assert_close(m.bias_rows.grad, g_eager[1])


@pytest.mark.parametrize("call,msg", [
    (lambda: row_grad(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([4])), "rows must lie in \\[0, 4\\)"),
    (lambda: row_grad(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([2, 1])), "sorted and unique"),
    (lambda: row_grad(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([1.0])), "1-D int64"),
    (lambda: row_grad(torch.randn(3, 4), torch.randn(2, 5), torch.tensor([1])), "differ in leading dims"),
    (lambda: row_grad(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([1]), out_dtype=torch.float64),
     "out_dtype must be one of"),
    (lambda: hft_row_linear(torch.randn(3, 5), torch.randn(4, 6), torch.randn(1, 6), torch.tensor([1])),
     "x has 5 features"),
    (lambda: hft_row_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(2, 6), torch.tensor([1])),
     "weight_rows must be \\[1, 6\\]"),
    (lambda: hft_row_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(1, 6), torch.tensor([1]),
                            torch.randn(4), torch.randn(2)), "bias_rows must be \\[1\\]"),
    (lambda: hft_row_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(1, 6), torch.tensor([1]),
                            None, torch.randn(1)), "needs the bias"),
    (lambda: RowMaskedLinear.from_linear(torch.nn.Linear(3, 4), torch.tensor([4])), "rows must lie in \\[0, 4\\)"),
    (lambda: RowMaskedLinear.from_linear(torch.nn.Conv1d(3, 4, 1), torch.tensor([1])), "expected nn.Linear"),
    (lambda: RowMaskedLinear.from_linear(torch.nn.Linear(3, 4), torch.tensor([True, False, True, False])),
     "integer row indices, got a torch.bool tensor \\(a boolean mask"),
    (lambda: RowMaskedLinear.from_linear(torch.nn.Linear(3, 4), torch.tensor([1.7, 2.2])),
     "integer row indices, got a torch.float32"),
    (lambda: MaskedAdamW([torch.zeros(2)], lr=-1), "lr must be >= 0"),
    (lambda: hft_row_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3, device="meta"), torch.tensor([1])),
     "all tensors must be on one device"),          # (the backward failed on a gradient's device)
    (lambda: masked_adamw_([torch.zeros(2)], [torch.zeros(3)], [torch.zeros(2)], [torch.zeros(2)], [torch.empty(0)],
                           [torch.empty(0, dtype=torch.long)], lr=1, beta1=0.9, beta2=0.9, eps=1e-8,
                           weight_decay=0, step=1), "grads\\[0\\] has shape"),
    (lambda: masked_adamw_([torch.zeros(2, 3)], [torch.zeros(2, 3)], [torch.zeros(2, 3)], [torch.zeros(2, 3)],
                           [torch.zeros(5, 3)], [torch.tensor([1, 7])], lr=1, beta1=0.9, beta2=0.9, eps=1e-8,
                           weight_decay=0, step=1), "rows must lie in \\[0, 5\\)"),
])
def test_bad_inputs(call, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        call()


def test_refused_update_leaves_tensors_untouched():
    p, t = torch.randn(2, 3), torch.randn(5, 3)
    p0, t0 = p.clone(), t.clone()
    with pytest.raises(ValueError):
        masked_adamw_([p], [torch.zeros(2, 3)], [torch.zeros(2, 3)], [torch.zeros(2, 3)], [t], [torch.tensor([1, 9])],
                      lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, step=1)
    assert torch.equal(p, p0) and torch.equal(t, t0)


def test_row_linear_under_autocast_and_with_a_trained_bias():
    """HF Trainer bf16=True on an fp32 model runs the row layer under autocast; a bias a user sets to
    train gets its gradient (it was silently dropped)."""
    lin = torch.nn.Linear(40, 24)
    rows = torch.tensor([1, 7, 8, 23])
    m = RowMaskedLinear.from_linear(copy.deepcopy(lin), rows)
    m.bias.requires_grad_(True)
    x, dy = torch.randn(5, 40), torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_ref = lin(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.backward(dy.bfloat16())
    dense = (dy.bfloat16().float().t() @ x.bfloat16().float())
    torch.testing.assert_close(m.weight_rows.grad, dense[rows], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m.bias.grad, dy.bfloat16().float().sum(0), rtol=1e-2, atol=1e-2)
    assert m.bias.grad.dtype == torch.float32 and m.weight.grad is None
    torch.testing.assert_close(m.bias_rows.grad, dy.bfloat16().float().sum(0)[rows], rtol=1e-2, atol=1e-2)
    assert m.bias_rows.grad.dtype == torch.float32


def test_state_dict_round_trip_and_a_state_dict_from_before_bias_rows():
    lin = torch.nn.Linear(12, 10)
    m = RowMaskedLinear.from_linear(copy.deepcopy(lin), torch.tensor([1, 4, 9]))
    with torch.no_grad():
        m.bias_rows.add_(1.0)
        m.bias[m.rows] = m.bias_rows
    sd = m.state_dict()
    assert "bias_rows" in sd
    m2 = RowMaskedLinear.from_linear(copy.deepcopy(lin), torch.tensor([1, 4, 9]))
    m2.load_state_dict(sd)
    assert torch.equal(m2.bias_rows, m.bias_rows) and torch.equal(m2.bias, m.bias)
    old = {k: v for k, v in sd.items() if k != "bias_rows"}     # saved before bias_rows existed
    m3 = RowMaskedLinear.from_linear(copy.deepcopy(lin), torch.tensor([1, 4, 9]))
    m3.load_state_dict(old)                                     # strict: no missing key
    assert torch.equal(m3.bias_rows, m.bias[m.rows].float()) and m3.bias_rows.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_masked_adamw_resumes_from_its_state_dict_exactly(dtype):
    """torch's Optimizer.load_state_dict casts state tensors to the parameter's dtype; the float32
    moments of a bf16/fp16 parameter must come back float32 (a resume, Trainer's included)."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(9, 7, generator=g).to(dtype)
    grads = [torch.randn(9, 7, generator=g).to(dtype) for _ in range(4)]

    def run(resume_at):
        p = torch.nn.Parameter(p0.clone())
        opt = MaskedAdamW([p], lr=1e-2)
        for t, gr in enumerate(grads):
            if t == resume_at:
                sd = copy.deepcopy(opt.state_dict())
                opt = MaskedAdamW([p], lr=1e-2)
                opt.load_state_dict(sd)
                assert opt.state[p]["exp_avg"].dtype == torch.float32
            p.grad = gr.clone()
            opt.step()
        return p.detach()
    assert torch.equal(run(2), run(-1))


def test_dtype_conversion_keeps_the_float32_row_masters():
    """model.to(fp16) converts the weight and bias, not the float32 row masters; the selected rows are
    rewritten as round(master) in the new dtype (not the old rounded rows cast again)."""
    torch.manual_seed(6)
    lin = torch.nn.Linear(12, 10).bfloat16()
    m = RowMaskedLinear.from_linear(lin, torch.tensor([0, 3, 7]))
    w_before = m.weight.detach().clone()
    with torch.no_grad():   # masters off the bf16 grid, as after training
        m.weight_rows.add_(torch.randn(m.weight_rows.shape) * 1e-3)
        m.bias_rows.add_(1e-3)
    masters = [p.detach().clone() for p in m.master_parameters()]
    m.half()
    assert [p.dtype for p in m.master_parameters()] == [torch.float32, torch.float32]
    assert all(torch.equal(a.detach(), b) for a, b in zip(m.master_parameters(), masters))
    assert m.weight.dtype == m.bias.dtype == torch.float16
    assert torch.equal(m.weight[m.rows], masters[0].half()) and torch.equal(m.bias[m.rows], masters[1].half())
    frozen = torch.ones(10, dtype=torch.bool)
    frozen[m.rows] = False
    assert torch.equal(m.weight[frozen], w_before[frozen].half())


@pytest.mark.parametrize("fused", [False, True])
def test_masters_trained_by_another_optimizer_reach_the_forward(fused, monkeypatch):
    """torch.optim.AdamW on the masters (no MaskedAdamW, no write_back_rows): the selected rows are rewritten
    from them (and it warns once) instead of the forward silently running on the stale rows. fused=True
    (Trainer's default) bumps no version counter: nn/masters.py's optimizer step hook rewrites them at the step
    (tests/test_masters_compiled.py: also for a compiled forward)."""
    from fusedtune import backend as fb
    monkeypatch.setattr(fb, "_warned", set())
    torch.manual_seed(7)
    lin = torch.nn.Linear(12, 10).bfloat16()
    m = RowMaskedLinear.from_linear(lin, torch.tensor([2, 5]))
    opt = torch.optim.AdamW(m.master_parameters(), lr=1e-2, fused=fused)
    x = torch.randn(4, 12).bfloat16()
    m(x).float().square().sum().backward()
    with pytest.warns(UserWarning, match="changed outside MaskedAdamW"):
        opt.step()
        y = m(x)
    w = lin.weight.detach().clone()
    w[m.rows] = m.weight_rows.detach().bfloat16()
    b = lin.bias.detach().clone()
    b[m.rows] = m.bias_rows.detach().bfloat16()
    assert torch.equal(y, F.linear(x, w, b))
    assert torch.equal(m.weight, w) and torch.equal(m.bias, b)


def test_masked_adamw_steps_need_no_rewrite(monkeypatch):
    from fusedtune import backend as fb
    monkeypatch.setattr(fb, "_warned", set())
    m = RowMaskedLinear.from_linear(torch.nn.Linear(12, 10), torch.tensor([1, 4]))
    opt = MaskedAdamW(m.master_parameters(), lr=1e-2)
    x = torch.randn(4, 12)
    calls = []
    monkeypatch.setattr(m, "write_rows_", lambda: calls.append(1))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    assert not calls
    assert torch.equal(m.weight[m.rows], m.weight_rows.detach())   # written inside the fused step


def test_set_rows_keeps_the_float32_masters_of_rows_still_selected(monkeypatch):
    """A stage change (set_rows) keeps the float32 master of a row selected before and after, sub-ulp
    updates included; a newly selected row starts from the weight, a row edited in the weight since takes
    the weight, frozen rows stay bit-identical, and masters another optimizer changed reach the weight first."""
    from fusedtune import backend as fb
    monkeypatch.setattr(fb, "_warned", set())
    torch.manual_seed(8)
    lin = torch.nn.Linear(12, 10).bfloat16()
    m = RowMaskedLinear.from_linear(lin, torch.tensor([1, 3, 5, 7]))
    opt = MaskedAdamW(m.master_parameters(), lr=1e-3)
    x = torch.randn(6, 12).bfloat16()
    for _ in range(3):
        opt.zero_grad()
        m(x).float().square().sum().backward()
        opt.step()
    old_w = dict(zip([1, 3, 5, 7], m.weight_rows.detach().clone()))
    old_b = dict(zip([1, 3, 5, 7], m.bias_rows.detach().clone()))
    assert any(not torch.equal(v, v.bfloat16().float()) for v in old_w.values())   # off the bf16 grid
    with torch.no_grad():
        m.weight[5, 0] += 1.0                       # an edit of a selected row in the weight itself
    w_before = m.weight.detach().clone()
    m.set_rows(torch.tensor([0, 3, 5, 7]))
    assert torch.equal(m.weight, w_before)        # set_rows writes nothing into the weight
    got = dict(zip(m.rows.tolist(), m.weight_rows.detach()))
    got_b = dict(zip(m.rows.tolist(), m.bias_rows.detach()))
    for r in (3, 7):                               # kept: the exact float32 masters
        assert torch.equal(got[r], old_w[r]) and torch.equal(got_b[r], old_b[r])
    for r in (0, 5):                               # new, or edited since: from the weight
        assert torch.equal(got[r], m.weight[r].float()) and torch.equal(got_b[r], m.bias[r].float())
    # masters changed by another optimizer: written into the weight before the stage change, then kept
    with torch.no_grad():
        m.weight_rows.add_(0.25)
    want = m.weight_rows.detach().clone()
    with pytest.warns(UserWarning, match="changed outside MaskedAdamW"):
        m.set_rows(torch.tensor([0, 3, 5, 7, 9]))
    assert torch.equal(m.weight_rows.detach()[:4], want)
    assert torch.equal(m.weight[[0, 3, 5, 7]], want.bfloat16())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mixed", [False, True])
def test_masked_adamw_none_targets_equal_empty_ones(backend, mixed):
    """targets[i] None (what MaskedAdamW passes for a plain parameter, so that no empty tensors are made every
    step) is an empty target: the same bits, with row masters among the entries or none, checked or not."""
    from fusedtune import _ext
    from fusedtune.ops.hft import masked_adamw_
    if backend == "cpu" and not _ext.loaded():
        pytest.skip("fusedtune._C is not built")

    def lists(none: bool):
        g = torch.Generator().manual_seed(4)
        ps = [torch.randn(3, 8, generator=g), torch.randn(5, generator=g)]
        gs = [torch.randn(3, 8, generator=g), torch.randn(5, generator=g)]
        tgt = torch.randn(6, 8, generator=g)
        ts = [tgt if mixed else (None if none else torch.empty(0)), None if none else torch.empty(0)]
        rs = [torch.tensor([0, 2, 5]) if mixed else (None if none else torch.empty(0, dtype=torch.int64)),
              None if none else torch.empty(0, dtype=torch.int64)]
        return ps, gs, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], ts, rs

    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=2, backend=backend)
    want, got = lists(False), lists(True)
    masked_adamw_(*want, **kw)
    masked_adamw_(*got, **kw, check=False)
    for a_list, b_list in zip(want[:4], got[:4]):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)
    if mixed:
        assert torch.equal(want[4][0], got[4][0])


def test_row_masters_replaced_by_new_tensors_are_written():
    """New weight_rows (a new Parameter assigned, or torch.func.functional_call) start at the old one's version:
    the layer must see they are other tensors and write them into the weight (found by review: the forward kept
    the old rows, silently)."""
    from fusedtune.nn.hft import RowMaskedLinear
    lin = torch.nn.Linear(40, 24)
    h = RowMaskedLinear.from_linear(lin, torch.tensor([1, 5, 7]))
    x = torch.randn(3, 40)
    y0 = h(x).detach()
    h.weight_rows = torch.nn.Parameter(h.weight_rows.detach() + 1.0)
    w = lin.weight.detach().clone()
    w[[1, 5, 7]] += 1.0
    torch.testing.assert_close(h(x), torch.nn.functional.linear(x, w, lin.bias))
    y = torch.func.functional_call(h, {"weight_rows": h.weight_rows.detach() - 1.0}, (x,))
    torch.testing.assert_close(y, y0)
