"""SparseDeltaAdamW's per-element bias correction: an entry reseeded with zero moments (grown by
regrowth) counts its own Adam steps, so it follows a fresh AdamW while the other entries follow the
layer's; the kernels are bit-identical to the reference with mixed counts; the Regrower keeps the
counts aligned with its ages; bad inputs."""
import copy
import math

import pytest
import torch

import fusedtune
from fusedtune.nn import SparseDeltaLinear
from fusedtune.ops.sparse_delta import sparse_adamw_
from fusedtune.optim import SparseDeltaAdamW
from fusedtune.reference.adamw import pow_f32
from fusedtune.sparse_delta import Regrower
from fusedtune.testing import assert_same_bits, check_backends

LR = 1e-2


def _layer(seed=0, out=24, inp=40, density=0.25, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g))
    return SparseDeltaLinear.from_linear(lin, density=density, seed=seed)


def _grads(k, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, generator=g) for _ in range(n)]


@pytest.mark.parametrize("b", [0.9, 0.999, 0.95, 0.5])
def test_pow_f32_is_the_power_within_its_rounding_bound(b):
    bf = float(torch.tensor(b, dtype=torch.float32))
    n = torch.tensor([0, 1, 2, 3, 7, 8, 100, 1023, 4097, 20000, 2 ** 20 + 3], dtype=torch.int32)
    got = pow_f32(bf, n).double()
    want = torch.tensor([bf ** int(k) for k in n], dtype=torch.float64)
    # each of the <= 2 log2(n) + 1 products rounds once (relative 2^-24), squarings compound through the power
    bound = torch.tensor([(2 * max(1, int(k)).bit_length() + int(k)) * 2.0 ** -24 for k in n], dtype=torch.float64)
    normal = want > 2.0 ** -120
    assert ((got - want).abs() <= bound * want + 1e-45)[normal].all()
    assert got[0] == 1 and got[1] == bf


def _adamw_run(p0, grads, start, wd):
    """torch.optim.AdamW over grads[start:] from p0 (float32, its own fresh moments)."""
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=LR, weight_decay=wd, foreach=False)
    for g in grads[start:]:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("mode", ["element", "tensor"])
def test_reseeded_entries_follow_a_fresh_adamw(backend, mode):
    m = _layer()
    k = m.values.numel()
    grads = _grads(k, 10)
    opt = SparseDeltaAdamW(m.parameters(), lr=LR, weight_decay=0.1, backend=backend, bias_correction=mode)
    grown = torch.arange(0, k, 3)
    for t, g in enumerate(grads, 1):
        m.values.grad = g.clone()
        opt.step()
        if t == 4:
            at4 = m.values.detach().clone()
            opt.reset_state(m.values, grown)   # zero moments, as a grown entry gets
    kept = torch.ones(k, dtype=torch.bool)
    kept[grown] = False
    whole = _adamw_run(torch.zeros(k), grads, 0, 0.1)       # never reset: plain AdamW from step 1
    fresh = _adamw_run(at4, grads, 4, 0.1)                   # reset at step 4: a fresh AdamW from there
    got = m.values.detach()
    torch.testing.assert_close(got[kept], whole[kept], rtol=1e-5, atol=1e-6)
    if mode == "element":
        torch.testing.assert_close(got[grown], fresh[grown], rtol=1e-5, atol=1e-6)
        assert torch.equal(opt.state[m.values]["elem_step"][grown], torch.full((grown.numel(),), 6, dtype=torch.int32))
        assert torch.equal(opt.state[m.values]["elem_step"][kept], torch.full((int(kept.sum()),), 10, dtype=torch.int32))
    else:   # the layer's count for every entry: the reseeded ones do not follow a fresh AdamW
        assert "elem_step" not in opt.state[m.values]
        assert not torch.allclose(got[grown], fresh[grown], rtol=1e-3, atol=1e-4)


def _tensor_ratio(t, b1=0.9, b2=0.999):
    """First update of a zero-seeded entry over lr, with the layer's count t for its bias correction."""
    return (1 - b1) / math.sqrt(1 - b2) * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)


@pytest.mark.parametrize("mode,ratio", [("element", 1.0), ("tensor", _tensor_ratio(31))])
def test_first_update_of_a_grown_entry(mode, ratio):
    """After regrowth, a zero-seeded entry's first update is lr * sign(g) (Adam's first step) with
    per-element counts; with the layer's count t it is (1 - b1) / sqrt(1 - b2) * sqrt(1 - b2^t) /
    (1 - b1^t) times that (0.57 at t = 31, 3.2 once t is large)."""
    m = _layer(density=0.1)
    opt = SparseDeltaAdamW(m.parameters(), lr=LR, bias_correction=mode)
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(3))
    rg = Regrower(m, opt, every=30, rate=0.3, decay="constant", variant="ag", accumulate_steps=2)
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        opt.step()
        before = m.indices.clone()
        rg.step()
    grown = ~torch.isin(m.indices, before)
    assert int(grown.sum()) == int(0.3 * m.indices.numel())
    opt.zero_grad(set_to_none=True)
    m(x).square().mean().backward()
    g = m.values.grad[grown].clone()
    opt.step()
    step = m.values.detach()[grown]
    want = -LR * ratio * torch.sign(g)
    live = g.abs() > 1e-3   # eps (1e-8) is negligible against these |g|
    assert live.sum() > 0
    torch.testing.assert_close(step[live], want[live], rtol=1e-4, atol=0)


def _inputs(dev="cpu"):
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(30, 17, generator=g).bfloat16(), torch.randn(9, 5, generator=g), torch.randn(40, generator=g).half()]
    idx = [torch.randperm(w.numel(), generator=g)[: max(1, w.numel() // 7)].sort().values.to(torch.int32) for w in ws]
    vals = [torch.randn(i.shape, generator=g) * 1e-2 for i in idx]
    grads = [torch.randn(i.shape, generator=g) for i in idx]
    bases = [w.view(-1)[i.long()].clone() for w, i in zip(ws, idx)]
    # counts before step 5: at the tensor's step (4: host constants), fresh, young, ahead of the step,
    # old, so old that the powers underflow, near int32's end
    pool = torch.tensor([4, 0, 1, 2, 6, 19, 999, 17000, 2 ** 20, 2 ** 31 - 9], dtype=torch.int32)
    steps = [pool[torch.randint(0, pool.numel(), i.shape, generator=g)] for i in idx]
    steps[1] = None   # a tensor without counts in the same call
    out = [vals, grads, [torch.zeros_like(v) for v in vals], [torch.zeros_like(v) for v in vals], ws, bases, idx, steps]
    return [[None if t is None else t.to(dev) for t in lst] for lst in out]


def _run_mixed(b, dev="cpu"):
    vals, grads, ms, vs, ws, bases, idx, steps = _inputs(dev)
    for step in range(5, 9):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.05, step=step, steps=steps, backend=b)
    return vals + ms + vs + ws + [s for s in steps if s is not None]


def test_mixed_counts_bit_identical_across_backends():
    checked = check_backends(_run_mixed, "cpu", exact=True, has=("reference", "cpu", "cuda"))
    assert ("cpu" in checked) == fusedtune._ext.loaded()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_counts_at_the_step_give_the_plain_bits(backend):
    """Entries whose count equals the step take the host constants: the same bits as no counts."""
    def run(with_counts):
        vals, grads, ms, vs, ws, bases, idx, _ = _inputs()
        steps = [torch.full(i.shape, 4, dtype=torch.int32) for i in idx] if with_counts else None
        for step in range(5, 8):
            sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.05, step=step, steps=steps, backend=backend)
        return vals + ms + vs + ws, steps
    got, counts = run(True)
    assert_same_bits(got, run(False)[0], "counts at the step vs none")
    assert all(torch.equal(s, torch.full_like(s, 7)) for s in counts)


def test_regrower_keeps_counts_with_its_ages():
    torch.manual_seed(0)
    m = _layer(density=0.15)
    opt = SparseDeltaAdamW(m.parameters(), lr=LR)
    rg = Regrower(m, opt, every=4, rate=0.3, decay="constant", variant="ag", accumulate_steps=2)
    x = torch.randn(16, 40)
    for t in range(1, 13):
        opt.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        opt.step()
        rg.step()
        if t >= 4:   # allocated at the first selection; the same counts as the Regrower's ages since
            assert torch.equal(opt.state[m.values]["elem_step"], rg.ages[rg.layers[0][0]]), t
    assert {0, 12} <= set(opt.state[m.values]["elem_step"].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_the_state_dict_is_exact(dtype):
    """Counts stay int32 and moments float32 through state_dict / load_state_dict (torch casts state
    tensors to the parameter's dtype); the resumed run has the uninterrupted run's bits."""
    grads = _grads(_layer().values.numel(), 6)

    def run(resume_at):
        m = _layer(dtype=dtype)
        opt = SparseDeltaAdamW(m.parameters(), lr=LR)
        for t, g in enumerate(grads, 1):
            if t == 3:
                opt.reset_state(m.values, torch.tensor([0, 5]))
            if t == resume_at:
                sd = copy.deepcopy(opt.state_dict())
                opt = SparseDeltaAdamW(m.parameters(), lr=LR)
                opt.load_state_dict(sd)
                es = opt.state[m.values]["elem_step"]
                assert es.dtype == torch.int32 and es[0] == 1 and es[5] == 1 and es[1] == 3   # reseeded before step 3
            m.values.grad = g.clone()
            opt.step()
        return m.values.detach(), m.weight.detach()
    for a, b in zip(run(4), run(-1)):
        assert torch.equal(a, b)


def test_seeded_moments_keep_the_layer_count():
    m = _layer()
    opt = SparseDeltaAdamW(m.parameters(), lr=LR)
    m.values.grad = torch.ones_like(m.values)
    opt.step()
    opt.reset_state(m.values, torch.tensor([3]), exp_avg_sq=torch.tensor([0.5]))
    assert "elem_step" not in opt.state[m.values]          # nothing reseeded fresh: no counts needed
    opt.reset_state(m.values, torch.tensor([4]))
    opt.reset_state(m.values, torch.tensor([4]), exp_avg_sq=torch.tensor([0.5]))
    assert opt.state[m.values]["elem_step"][4] == 1 and opt.state[m.values]["elem_step"][0] == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="bias_correction"):
        SparseDeltaAdamW(_layer().parameters(), bias_correction="row")
    vals, grads, ms, vs, ws, bases, idx, steps = _inputs()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    before = [v.clone() for v in vals]
    bad = [steps[0].long(), None, steps[2]]
    with pytest.raises(ValueError, match=r"steps\[0\] must be None or contiguous int32"):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, step=1, steps=bad, **kw)
    with pytest.raises(ValueError, match=r"steps\[2\]"):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, step=1, steps=[steps[0], None, steps[2][:-1]], **kw)
    with pytest.raises(ValueError, match="lists differ"):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, step=1, steps=[None], **kw)
    with pytest.raises(ValueError, match="step must be an int"):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, step=0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(vals, before))
    if fusedtune._ext.loaded():   # the kernel's own checks
        consts = [1.0, 0.9, 0.1, 0.999, 0.001, 0.03, 1e-8, 0.01, 1e-2, 1.0]
        with pytest.raises(RuntimeError, match="steps 0 must be empty or contiguous int32"):
            torch.ops.fusedtune.sparse_adamw_kernel_(vals, grads, ms, vs, ws, bases, idx,
                                                     [steps[0].float(), torch.empty(0, dtype=torch.int32),
                                                      steps[2]], consts)
        with pytest.raises(RuntimeError, match="expected 10 constants"):
            torch.ops.fusedtune.sparse_adamw_kernel_(vals, grads, ms, vs, ws, bases, idx, [s if s is not None else
                                                     torch.empty(0, dtype=torch.int32) for s in steps], consts[:8])
        assert all(torch.equal(a, b) for a, b in zip(vals, before))
