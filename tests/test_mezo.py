"""MeZO: three fused passes per step, loss falls, subsets, weight decay, replay, ES, state."""
import pytest
import torch

import fusedtune
from fusedtune.ops import zo_apply_, zo_noise
from fusedtune.optim import MeZO, es_step_, zo_replay_


def _regression(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g)
    m = torch.nn.Linear(16, 1).to(dtype)
    return m, (lambda: ((m(x.to(dtype)).float() - y) ** 2).mean())


@pytest.mark.parametrize("dtype,noise", [(torch.float32, "normal"), (torch.bfloat16, "normal"),
                                         (torch.float32, "rademacher")])
def test_loss_falls(dtype, noise):
    m, loss = _regression(dtype)
    opt = MeZO(m.parameters(), lr=1e-2, eps=1e-2 if dtype == torch.bfloat16 else 1e-3, noise=noise)
    l0 = loss().item()
    for _ in range(300):
        opt.step(loss)
    assert loss().item() < 0.2 * l0


def test_step_equals_direct_update_from_unperturbed_weights():
    # after a step the weights are round(w - lr*g*z) of the original weights (exact where the
    # perturbation is invertible), with g from the two perturbed losses
    w = torch.nn.Parameter((torch.randn(4096) * 0.02).to(torch.bfloat16))
    w0 = w.detach().clone()
    target = torch.randn(4096)
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    opt.step(lambda: ((w.float() - target) ** 2).mean())
    s, g = opt.last["seed"], opt.last["projected_grad"]
    direct = w0.clone()
    zo_apply_(direct, [s], [-1e-2 * g.item()])
    assert (w.detach() == direct).float().mean().item() > 0.85
    # and the losses are those of round(w0 + eps z) and round(w0 - eps z)
    plus, minus = w0.clone(), w0.clone()
    zo_apply_(plus, [s], [1e-3])
    zo_apply_(minus, [s], [-1e-3])
    assert opt.last["loss_plus"].item() == ((plus.float() - target) ** 2).mean().item()
    assert abs(opt.last["loss_minus"].item() - ((minus.float() - target) ** 2).mean().item()) < 1e-6


def test_subset_of_parameters_and_weight_decay():
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    b0 = b.detach().clone()
    a0 = a.detach().clone()
    opt = MeZO([{"params": [a], "weight_decay": 0.5}], lr=0.1, eps=1e-3)
    opt.step(lambda: (a * 0).sum())  # zero projected gradient: only the decay acts
    assert torch.equal(b.detach(), b0)
    assert torch.allclose(a.detach(), a0 * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(rounding="stochastic"), dict(fold=True, weight_decay=0.1)])
def test_backends_agree_on_a_step(kw):
    if not fusedtune._ext.loaded():
        pytest.skip("needs the C++ CPU kernels")
    outs = []
    for b in ("reference", "cpu"):
        torch.manual_seed(0)
        m = torch.nn.Linear(33, 7).to(torch.bfloat16)
        x = torch.randn(5, 33).to(torch.bfloat16)
        opt = MeZO(m.parameters(), lr=1e-2, seed=9, backend=b, **kw)
        for _ in range(3):
            opt.step(lambda: m(x).float().pow(2).mean())
        opt.settle()
        outs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_replay_reproduces_steps_from_seeds():
    # a second machine replays the (seed, projected grad) history in one pass
    w = torch.nn.Parameter(torch.randn(1000))
    w0 = w.detach().clone()
    opt = MeZO([w], lr=1e-3, eps=1e-3, seed=3)
    hist = []
    for _ in range(5):
        opt.step(lambda: (w ** 2).sum())
        hist.append((opt.last["seed"], -1e-3 * opt.last["projected_grad"].item()))
    replica = w0.clone()
    zo_replay_([replica], [s for s, _ in hist], [c for _, c in hist])
    assert torch.allclose(replica, w.detach(), atol=1e-6)
    assert [opt.seed_for(i) for i in range(5)] == [s for s, _ in hist]


def test_es_step_matches_formula():
    w = torch.zeros(2000)
    seeds, rewards = [11, 12, 13], [1.0, -2.0, 4.0]
    coeffs = es_step_([w], seeds, rewards, lr=0.1, sigma=0.01)
    r = torch.tensor(rewards, dtype=torch.float64)
    r = (r - r.mean()) / r.std()
    want = sum((0.1 / (3 * 0.01) * r[j]).float() * zo_noise((2000,), s) for j, s in enumerate(seeds))
    assert torch.allclose(coeffs, 0.1 / 0.03 * r)
    assert torch.allclose(w, want, atol=1e-5)


def test_state_dict_round_trip():
    w = torch.nn.Parameter(torch.randn(10))
    opt = MeZO([w], lr=1e-3, seed=5)
    opt.step(lambda: w.sum())
    sd = opt.state_dict()
    opt2 = MeZO([w], lr=1e-3, seed=0)
    opt2.load_state_dict(sd)
    assert (opt2.seed, opt2.steps) == (5, 1) and opt2.seed_for(1) == opt.seed_for(1)


def test_backend_report():
    w = torch.nn.Parameter(torch.randn(10))
    rows = MeZO([w], lr=1e-3).backend_report()
    assert rows[0]["backend"] == ("cpu" if fusedtune._ext.loaded() else "reference")


def test_report_follows_the_parameters_to_another_device():
    """fusedtune.report of method="mezo" after model.to(device) names the device the parameters are on now and its
    backend (found by review: it gave the device of the last step's buckets). The swap conversion mode keeps the
    parameter objects, as a CPU -> GPU .to() does; meta stands in for the GPU."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    fusedtune.patch(model, "mezo", lr=1e-3)
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)
    [row] = fusedtune.report(model).rows
    assert row.name.endswith("meta") and row.backend == "reference"


def test_frozen_parameters_are_left_alone():
    """MeZO(model.parameters()) with a frozen base (LoRA-style) must not perturb or update the base."""
    base = torch.nn.Linear(8, 8)
    head = torch.nn.Linear(8, 1)
    base.requires_grad_(False)
    w0, h0 = base.weight.detach().clone(), head.weight.detach().clone()
    x = torch.randn(32, 8)
    opt = MeZO(list(base.parameters()) + list(head.parameters()), lr=1e-2)
    for _ in range(3):
        opt.step(lambda: head(base(x)).pow(2).mean())
    assert torch.equal(base.weight, w0)
    assert not torch.equal(head.weight, h0)
    # the trainable parameters keep the noise streams of their positions in the list (2 and 3)
    assert [ids for _, _, _, ids in opt._buckets] == [[2, 3]]


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_failing_closure_leaves_the_weights_exact(fail_on):
    w = torch.nn.Parameter((torch.randn(1000) * 0.02).to(torch.bfloat16))
    w0 = w.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_on:
            raise RuntimeError("out of memory in the forward")
        return w.float().pow(2).sum()
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    # the weights are undone as the step itself undoes them (docs/zo_noise.md): exact wherever the
    # preimage is unique, which is almost everywhere; never left perturbed by eps
    s, want = opt.seed_for(0), w0.clone()
    zo_apply_(want, [s], [1e-3])
    if fail_on == 2:
        zo_apply_(want, [s], [-1e-3], undo=([s], [1e-3]))
    zo_apply_(want, [s], [0.0], undo=([s], [1e-3] if fail_on == 1 else [-1e-3]))
    assert torch.equal(w.detach(), want) and opt.steps == 0
    assert (w.detach() == w0).float().mean().item() > 0.85


@pytest.mark.parametrize("bad_on", [1, 2])
def test_a_closure_returning_several_values_is_refused_and_undone(bad_on):
    """The check runs inside the step's undo: the weights never stay at round(w - eps z)."""
    w = torch.nn.Parameter(torch.randn(200) * 0.02)
    w0 = w.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        loss = w.pow(2)
        return loss if len(calls) == bad_on else loss.sum()
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    with pytest.raises(ValueError, match=r"one loss value, got a tensor of shape \(200,\)"):
        opt.step(closure)
    # undone as a step undoes (one ulp where the preimage is not unique); left perturbed would be ~eps|z|
    assert opt.steps == 0 and (w.detach() - w0).abs().max().item() < 1e-7


def test_freezing_after_the_optimizer_is_made_takes_effect():
    """As torch.optim: requires_grad is read at each step, and the noise streams stay by position."""
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    opt = MeZO([a, b], lr=1e-2)
    a.requires_grad_(False)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step(lambda: (a * b).sum())
    assert torch.equal(a.detach(), a0) and not torch.equal(b.detach(), b0)
    assert [ids for _, _, _, ids in opt._buckets] == [[1]]
    a.requires_grad_(True)
    a1 = a.detach().clone()
    opt.step(lambda: (a * b).sum())
    assert not torch.equal(a.detach(), a1)


def test_a_non_finite_loss_moves_nothing():
    w = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    w0 = w.detach().clone()
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    opt.step(lambda: torch.tensor(float("nan")))
    assert torch.isnan(opt.last["loss_plus"]) and opt.last["projected_grad"].item() == 0.0   # what was applied
    assert not torch.isnan(w.detach()).any()
    assert (w.detach() == w0).float().mean().item() > 0.85     # undone as a step undoes (see above)
    opt.step(lambda: w.float().pow(2).sum())
    assert torch.isfinite(w.detach()).all() and opt.steps == 2


def test_bad_parameters_refused_when_made():
    with pytest.raises(ValueError, match="not contiguous"):
        MeZO([torch.nn.Parameter(torch.zeros(4, 3).t())], lr=1e-3)
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.float64, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_both_passes_see_the_same_random_numbers():
    """Dropout (any torch RNG use) is the same in the +eps and -eps forwards unless same_rng=False."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = MeZO([w], lr=1e-3)
    opt.step(lambda: torch.rand(()))
    assert opt.last["loss_plus"] == opt.last["loss_minus"]
    opt = MeZO([w], lr=1e-3, same_rng=False)
    opt.step(lambda: torch.rand(()))
    assert opt.last["loss_plus"] != opt.last["loss_minus"]


def test_three_passes_per_step(monkeypatch):
    import fusedtune.optim.mezo as mz
    calls = []
    real = mz.zo_apply_
    monkeypatch.setattr(mz, "zo_apply_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    m, loss = _regression()
    opt = MeZO(m.parameters(), lr=1e-3)
    opt.step(loss)
    assert len(calls) == 3   # one group, one device: +eps, -eps (with undo), undo + update


def test_es_step_takes_a_seed_tensor():
    a, b = torch.zeros(50), torch.zeros(50)
    es_step_([a], [3, 9, 4], [1.0, -2.0, 0.5], lr=0.1, sigma=1e-2)
    es_step_([b], torch.tensor([3, 9, 4]), [1.0, -2.0, 0.5], lr=0.1, sigma=1e-2)
    assert torch.equal(a, b) and a.abs().sum() > 0


@pytest.mark.parametrize("out,hint", [(None, "NoneType"), ((1.0, 2.0), "tuple"), ("1.0", "str"),
                                      ({"loss": 1.0}, "dict")])
def test_a_closure_returning_no_loss_is_named(out, hint):
    w = torch.nn.Parameter(torch.randn(50))
    w0 = w.detach().clone()
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    with pytest.raises(TypeError, match=f"closure must return the loss as a tensor or a number, got {hint}"):
        opt.step(lambda: out)
    assert opt.steps == 0 and (w.detach() - w0).abs().max().item() < 1e-6


def test_a_model_output_closure_is_told_to_return_its_loss():
    class Out:
        loss = torch.tensor(1.0)
    w = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(TypeError, match=r"got Out \(a model output: return its .loss\)"):
        MeZO([w], lr=1e-2).step(lambda: Out())


def test_state_dict_hooks_see_the_mezo_state():
    w = torch.nn.Parameter(torch.randn(20))
    opt = MeZO([w], lr=1e-2, seed=5)
    opt.step(lambda: w.pow(2).sum())
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(saved=dict(sd["mezo"])))
    sd = opt.state_dict()
    assert seen["saved"]["seed"] == 5 and seen["saved"]["steps"] == 1 and sd["mezo"]["steps"] == 1
    other = MeZO([torch.nn.Parameter(w.detach().clone())], lr=1e-2, seed=0)

    def pre(o, s):
        s = dict(s)
        s["mezo"] = {**s["mezo"], "seed": 9}
        return s
    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda o: seen.update(post=(o.seed, o.steps)))
    other.load_state_dict(sd)
    assert other.seed == 9 and seen["post"] == (9, 1)
    bad = MeZO([torch.nn.Parameter(torch.randn(20)), torch.nn.Parameter(torch.randn(3))], lr=1e-2, seed=0)
    bad.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    with pytest.raises(ValueError):        # torch refuses the group count: the MeZO state is not taken either
        bad.load_state_dict(sd)
    assert bad.seed == 0 and bad.steps == 0


def test_es_step_refuses_non_finite_rewards():
    w = torch.randn(30)
    w0 = w.clone()
    with pytest.raises(ValueError, match="rewards must be finite"):
        es_step_([w], [1, 2, 3], [1.0, float("nan"), 0.5], lr=0.1, sigma=0.01)
    assert torch.equal(w, w0)
