"""MeZO / zo op edges found by review (each test fails on the code before): replay of a run with frozen parameters
and groups, stochastic rounding's default seed over a fixed seed pool, a step that fails in a later group,
per-group settings, the precision of the loss difference, numpy seeds."""
import numpy as np
import pytest
import torch

from fusedtune.ops import zo_apply_, zo_noise
from fusedtune.optim import MeZO, zo_replay_


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    m[0].bias.requires_grad_(False)                       # a frozen parameter among the given ones
    return m


def _closure(m):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    return lambda: m(x).square().mean()


def test_a_run_with_frozen_parameters_and_groups_replays_through_replay_args():
    m = _model()
    start = [p.detach().clone() for p in m.parameters()]
    groups = [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters())}]
    opt = MeZO(groups, lr=1e-2, eps=1e-3)
    history = []
    for _ in range(4):
        opt.step(_closure(m))
        history.append((opt.last["seed"], -1e-2 * float(opt.last["projected_grad"])))
    replica = _model()
    with torch.no_grad():
        for p, s in zip(replica.parameters(), start):
            p.copy_(s)
    ropt = MeZO([{"params": list(replica[0].parameters())}, {"params": list(replica[2].parameters())}], lr=1e-2)
    params, ids = ropt.replay_args()
    assert ids == [0, 2, 3]                               # the frozen bias (id 1) is counted, not moved
    for seed, coeff in history:
        zo_replay_(params, [seed], [coeff], tensor_ids=ids)
    for a, b in zip(replica.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(replica[0].bias, start[1])


def test_default_stochastic_rounding_seed_is_fresh_when_a_seed_repeats():
    """A fixed seed pool (FedKSeed, a replay): the rounding bits must differ between rounds, else the rounding
    errors add up. 150 rounds of sub-ulp bf16 updates along one seed's noise."""
    n, rounds = 1 << 14, 150
    z = zo_noise((n,), 7).double()
    cs = (torch.rand(rounds, generator=torch.Generator().manual_seed(1)) * 0.2e-3 + 0.1e-3).tolist()
    w = torch.ones(n, dtype=torch.bfloat16)
    for c in cs:
        zo_replay_([w], [7], [c], rounding="stochastic")
    move = sum(cs) * z
    err = (w.double() - 1.0 - move).pow(2).mean().sqrt()
    assert err < 0.5 * move.pow(2).mean().sqrt(), f"rms error {err:.3g}"


def test_a_step_that_fails_in_a_later_group_changes_nothing():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(4, 4), torch.nn.Conv2d(3, 4, 3)
    opt = MeZO([{"params": lin.parameters()}, {"params": conv.parameters()}], lr=1e-2)
    before = lin.weight.detach().clone()
    conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last)   # made after the optimizer
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step(lambda: lin.weight.sum())
    assert torch.equal(lin.weight, before)


def test_group_settings_are_checked():
    w = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="eps is the optimizer's"):
        MeZO([{"params": [w], "eps": 0.1}], lr=1e-2)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        MeZO([{"params": [w], "lr": float("nan")}], lr=1e-2)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        MeZO([{"params": [w], "weight_decay": -5.0}], lr=1e-2)
    opt = MeZO([w], lr=1e-2)
    opt.param_groups[0]["lr"] = float("inf")              # (a scheduler's value)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        opt.step(lambda: w.sum())
    assert not w.detach().any()


def test_the_loss_difference_keeps_float64_and_python_floats():
    w = torch.nn.Parameter(torch.zeros(4))
    losses = iter([2.5000004, 2.5])
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    opt.step(lambda: next(losses))
    want = (2.5000004 - 2.5) / 2e-3
    assert float(opt.last["projected_grad"]) == pytest.approx(want, rel=1e-6)


def test_numpy_integer_seeds_are_taken():
    a, b = torch.zeros(64), torch.zeros(64)
    zo_apply_([a], [np.int64(5)], [1e-3])
    zo_apply_([b], [5], [1e-3])
    assert torch.equal(a, b) and a.any()
