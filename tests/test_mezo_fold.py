"""MeZO(fold=True): two passes a step, the next step's +eps carried between steps, settle(), resume."""
import pytest
import torch

import fusedtune
from fusedtune.ops import zo_apply_
from fusedtune.optim import MeZO

LR, EPS = 1e-2, 1e-3


def _weights(n=4096, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(dtype)), torch.randn(n, generator=g)


def _loss(w, target):
    return lambda: ((w.float() - target) ** 2).mean()


def test_two_passes_a_step_after_the_first(monkeypatch):
    import fusedtune.optim.mezo as mz
    calls = []
    real = mz.zo_apply_
    monkeypatch.setattr(mz, "zo_apply_", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    w, target = _weights()
    opt = MeZO([w], lr=LR, eps=EPS, fold=True)
    opt.step(_loss(w, target))
    assert calls == [1, 1, 2]          # +eps; -eps; update with the next step's +eps (two seeds)
    calls.clear()
    opt.step(_loss(w, target))
    assert calls == [1, 2] and opt.pending_seed == opt.seed_for(2)
    calls.clear()
    opt.settle()
    assert calls == [1] and opt.pending_seed is None


def test_steps_are_the_documented_passes():
    """Three folded steps and a settle give the bits of the zo_apply_ calls docs/zo_noise.md lists, and each
    forward saw the weights those calls give at that point."""
    w, target = _weights()
    w0 = w.detach().clone()
    opt = MeZO([w], lr=LR, eps=EPS, fold=True, seed=4)
    seen, hist = [], []

    def closure():
        seen.append(w.detach().clone())
        return _loss(w, target)()
    for _ in range(3):
        opt.step(closure)
        hist.append((opt.last["seed"], opt.last["projected_grad"].item()))
    opt.settle()
    from fusedtune.optim.mezo import splitmix64
    x = w0.clone()
    zo_apply_(x, [hist[0][0]], [EPS])
    for k, (s, g) in enumerate(hist):
        assert torch.equal(seen[2 * k], x)
        zo_apply_(x, [s], [-EPS], undo=([s], [EPS]))
        assert torch.equal(seen[2 * k + 1], x)
        zo_apply_(x, [s, opt.seed_for(k + 1)], torch.tensor([-LR * g, EPS]), undo=([s], [-EPS]),
                  rounding_seed=splitmix64(s ^ 0x726F756E64))
    zo_apply_(x, [opt.seed_for(3)], [0.0], undo=([opt.seed_for(3)], [EPS]))
    assert torch.equal(w.detach(), x)


def test_settled_weights_are_within_one_step_of_the_unfolded_steps():
    """One step: the same losses, so the same projected gradient; after settle() each weight is within one
    bf16 step of the unfolded step's round(w - lr g z) at the perturbed magnitude |w| + eps |z'|: the next
    +eps is added before the one rounding, and the undo takes the preimage of that sum (docs/zo_noise.md,
    "Folding")."""
    outs = []
    for fold in (False, True):
        w, target = _weights()
        opt = MeZO([w], lr=LR, eps=EPS, fold=fold)
        opt.step(_loss(w, target))
        opt.settle()
        outs.append((w.detach().clone(), opt.last["projected_grad"].item()))
    (a, ga), (b, gb) = outs
    assert ga == gb
    z_next = fusedtune.ops.zo_noise(a.shape, MeZO([torch.zeros(1, requires_grad=True)], lr=LR).seed_for(1))
    step = 2.0 ** -7 * (a.double().abs() + EPS * z_next.double().abs())   # a bf16 step at that magnitude, or more
    assert ((a.double() - b.double()).abs() <= step).all()
    assert 0.5 < (a == b).float().mean().item() < 1.0


@pytest.mark.parametrize("fold", [False, True])
def test_updates_below_half_a_step_are_kept_on_average_only_when_folded(fold):
    """A bf16 update of about 1/120 of a step (|w| in [0.015, 0.025]): rounded to nearest on its own it is
    lost (but where an undo's preimage is not unique); folded with the next +eps (about 8 steps, spread over
    the grid) it lands as a dithered rounding, unbiased: the regression of the settled change on z
    recovers the coefficient."""
    g = torch.Generator().manual_seed(3)
    n = 1 << 18
    w0 = ((0.015 + 0.01 * torch.rand(n, generator=g)) * torch.sign(torch.randn(n, generator=g))).to(torch.bfloat16)
    c, s, nxt = 1e-6, 11, 12
    x = w0.clone()
    zo_apply_(x, [s], [-EPS], undo=None)                 # as after pass 2 (round(w - eps z))
    zo_apply_(x, [s, nxt] if fold else [s], [c, EPS] if fold else [c], undo=([s], [-EPS]))
    if fold:
        zo_apply_(x, [nxt], [0.0], undo=([nxt], [EPS]))  # settle
    z = fusedtune.ops.zo_noise((n,), s)
    est = ((x.float() - w0.float()) * z).sum().item() / (z * z).sum().item()
    if fold:
        assert abs(est - c) < 0.2 * c, est
    else:
        assert abs(est) < 0.15 * c, est      # (only where an undo's preimage was not unique)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_falls(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g)
    m = torch.nn.Linear(16, 1).to(dtype)
    loss = lambda: ((m(x.to(dtype)).float() - y) ** 2).mean()  # noqa: E731
    opt = MeZO(m.parameters(), lr=1e-2, eps=1e-2 if dtype == torch.bfloat16 else 1e-3, fold=True)
    l0 = loss().item()
    for _ in range(300):
        opt.step(loss)
    opt.settle()
    assert loss().item() < 0.2 * l0


def test_checkpoint_of_model_and_optimizer_resumes_exactly():
    w, target = _weights()
    opt = MeZO([w], lr=LR, eps=EPS, fold=True, seed=7)
    for _ in range(2):
        opt.step(_loss(w, target))
    saved_w, saved_opt = w.detach().clone(), opt.state_dict()
    assert saved_opt["mezo"]["pending"] == {"seed": opt.seed_for(2), "eps": EPS, "tensor_ids": [0]}
    for _ in range(2):
        opt.step(_loss(w, target))
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = MeZO([w2], lr=LR, eps=EPS, fold=True)
    opt2.load_state_dict(saved_opt)
    for _ in range(2):
        opt2.step(_loss(w2, target))
    assert torch.equal(w2.detach(), w.detach()) and opt2.pending_seed == opt.pending_seed


@pytest.mark.parametrize("copy", ["none", "state_dict", "deepcopy"])
def test_freezing_between_steps_settles_the_carried_perturbation_first(copy):
    """The tensors that carry the perturbation are recorded: a freeze settles them, also when the optimizer was
    reloaded or copied after the freeze (which rebuilds its tensor lists from the new flags)."""
    import copy as copy_module
    runs = []
    for explicit in (False, True):
        a, _ = _weights(300, seed=1)
        b, _ = _weights(300, seed=2)
        opt = MeZO([a, b], lr=LR, eps=EPS, fold=True)
        loss = lambda: (a.float() * b.float()).sum()  # noqa: E731
        opt.step(loss)
        if explicit:
            opt.settle()
        a.requires_grad_(False)
        a_settled = a.detach().clone() if explicit else None
        if copy == "state_dict":
            opt.load_state_dict(opt.state_dict())
        elif copy == "deepcopy" and not explicit:
            opt, (a, b) = copy_module.deepcopy((opt, (a, b)))
            loss = lambda: (a.float() * b.float()).sum()  # noqa: E731
        opt.step(loss)
        runs.append((a.detach().clone(), b.detach().clone(), a_settled))
    (a1, b1, _), (a2, b2, a_settled) = runs
    assert torch.equal(a1, a2) and torch.equal(a2, a_settled) and torch.equal(b1, b2)


def test_settle_uses_the_eps_the_perturbation_was_added_with():
    runs = []
    for explicit in (False, True):
        w, target = _weights()
        opt = MeZO([w], lr=LR, eps=EPS, fold=True)
        opt.step(_loss(w, target))
        if explicit:
            opt.settle()
        opt.eps = 2 * EPS
        opt.step(_loss(w, target))
        opt.settle()
        runs.append(w.detach().clone())
    assert torch.equal(*runs)


def test_stochastic_rounding_is_refused():
    with pytest.raises(ValueError, match="fold=True needs rounding='nearest'"):
        MeZO([torch.nn.Parameter(torch.zeros(3))], lr=LR, fold=True, rounding="stochastic")


def test_a_failing_second_forward_restores_what_the_step_would_use():
    """After a fold, a closure raising in the -eps forward leaves the weights the step's own undo would give:
    the carried state's preimage (not bit-equal to settle() of the carried state everywhere)."""
    w, target = _weights()
    opt = MeZO([w], lr=LR, eps=EPS, fold=True)
    opt.step(_loss(w, target))
    s = opt.pending_seed
    want = w.detach().clone()
    zo_apply_(want, [s], [-EPS], undo=([s], [EPS]))
    zo_apply_(want, [s], [0.0], undo=([s], [-EPS]))
    calls = []

    def second_fails():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the forward")
        return _loss(w, target)()
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(second_fails)
    assert torch.equal(w.detach(), want) and opt.pending_seed is None and opt.steps == 1


def test_a_failing_closure_restores_the_settled_weights():
    w, target = _weights()
    opt = MeZO([w], lr=LR, eps=EPS, fold=True)
    opt.step(_loss(w, target))
    ref_w = torch.nn.Parameter(w.detach().clone())
    ref = MeZO([ref_w], lr=LR, eps=EPS, fold=True)
    ref.load_state_dict(opt.state_dict())
    ref.settle()

    def fails():
        raise RuntimeError("out of memory in the forward")
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(fails)
    assert torch.equal(w.detach(), ref_w.detach()) and opt.pending_seed is None and opt.steps == 1


def test_patch_option_and_unpatch_settles():
    from tiny_models import tiny_llama
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    rep = fusedtune.patch(model, "mezo", lr=1e-4, fold=True)
    rep.step(lambda: model(ids, labels=ids).loss)
    assert rep.optimizer.fold and rep.optimizer.pending_seed is not None
    fusedtune.unpatch(model)
    assert rep.optimizer.pending_seed is None
