"""Every public zo entry point refuses bad input clearly and leaves the tensors untouched."""
import pytest
import torch

import fusedtune
from fusedtune.ops import zo_apply_, zo_noise
from fusedtune.optim import MeZO, es_step_, zo_replay_


def _good():
    return [torch.randn(10), torch.randn(3, 4).bfloat16()]


BAD = [
    ("integer", lambda ts: dict(tensors=ts + [torch.arange(5)]), "tensors\\[2\\] has dtype torch.int64"),
    ("float64", lambda ts: dict(tensors=ts + [torch.randn(3, dtype=torch.float64)]), "needs float32, bfloat16"),
    ("non-contiguous", lambda ts: dict(tensors=ts + [torch.randn(4, 6).t()]), "tensors\\[2\\].*not contiguous"),
    ("mixed devices", lambda ts: dict(tensors=ts + [torch.empty(3, device="meta")]), "tensors\\[2\\] is on meta"),
    ("duplicate", lambda ts: dict(tensors=ts + [ts[0]]), "tensors\\[2\\] overlaps tensors\\[0\\]"),
    ("overlapping views", lambda ts: dict(tensors=[ts[0][0:6], ts[1], ts[0][4:10]]), "tensors\\[2\\] overlaps tensors\\[0\\]"),
    ("empty list", lambda ts: dict(tensors=[]), "tensors is empty"),
    ("not a tensor", lambda ts: dict(tensors=ts + [[1.0]]), "tensors\\[2\\] is a list"),
    ("noise", lambda ts: dict(noise="uniform"), "noise='uniform'"),
    ("rounding", lambda ts: dict(rounding="up"), "rounding='up'"),
    ("length mismatch", lambda ts: dict(seeds=[1, 2], coeffs=[1.0]), "as many seeds as coeffs"),
    ("no pairs", lambda ts: dict(seeds=[], coeffs=[]), "as many seeds as coeffs"),
    ("seed range", lambda ts: dict(seeds=[1 << 64]), "seeds must be integers"),
    ("seed type", lambda ts: dict(seeds=[1.5]), "seeds must be integers"),
    ("seed tensor dtype", lambda ts: dict(seeds=torch.tensor([1.0])), "seeds must be a 1-D int64 tensor"),
    ("coeff tensor dtype", lambda ts: dict(coeffs=torch.tensor([1])), "coeffs must be a 1-D floating tensor"),
    ("undo shape", lambda ts: dict(undo=([1],)), "undo must be a \\(seeds, coeffs\\) pair"),
    ("undo lengths", lambda ts: dict(undo=([1, 2], [1.0])), "undo needs as many seeds"),
    ("tensor_ids length", lambda ts: dict(tensor_ids=[0]), "2 tensors but 1 tensor_ids"),
    ("tensor_ids range", lambda ts: dict(tensor_ids=[0, -1]), "tensor_ids must be in"),
    ("sr needs seed", lambda ts: dict(seeds=torch.tensor([1]), rounding="stochastic"), "pass rounding_seed"),
    ("unknown backend", lambda ts: dict(backend="cudnn"), "unknown backend 'cudnn'"),
    ("cuda on cpu", lambda ts: dict(backend="cuda"), "backend 'cuda' cannot run here"),
]


@pytest.mark.parametrize("name,make,msg", BAD, ids=[b[0] for b in BAD])
def test_refused_and_untouched(name, make, msg):
    ts = _good()
    kw = dict(tensors=ts, seeds=[1], coeffs=[1e-3])
    kw.update(make(ts))
    before = [t.clone() for t in kw["tensors"] if torch.is_tensor(t) and t.device.type == "cpu"]
    with pytest.raises((ValueError, TypeError, fusedtune.BackendError), match=msg):
        zo_apply_(**kw)
    after = [t for t in kw["tensors"] if torch.is_tensor(t) and t.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_adjacent_views_of_one_storage_are_fine():
    b = torch.zeros(10)
    zo_apply_([b[0:5], b[5:10]], [1], [1.0])
    assert torch.equal(b[0:5], zo_noise(5, 1, tensor_id=0)) and torch.equal(b[5:10], zo_noise(5, 1, tensor_id=1))


def test_env_backend_checked(monkeypatch):
    monkeypatch.setenv("FUSEDTUNE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDTUNE_BACKEND: unknown backend 'fast'"):
        zo_apply_(torch.zeros(3), [1], [1.0])


def test_scope_backend():
    t = torch.zeros(5)
    with fusedtune.use_backend("reference"):
        zo_apply_(t, [1], [1.0])
    assert torch.equal(t, zo_noise((5,), 1, backend="reference"))
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with fusedtune.use_backend("gpu"):
            pass


def test_kernel_op_checks_direct_callers():
    if not fusedtune._ext.loaded():
        pytest.skip("needs the C++ CPU kernels")
    with pytest.raises(RuntimeError, match="seeds must be int64"):
        torch.ops.fusedtune.zo_apply_kernel_([torch.zeros(3)], [0], torch.tensor([1.0]), torch.tensor([1.0]),
                                             torch.zeros(0, dtype=torch.long), torch.zeros(0), 1.0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.fusedtune.zo_apply_kernel_([torch.zeros(4, 4).t()], [0], torch.tensor([1]), torch.tensor([1.0]),
                                             torch.zeros(0, dtype=torch.long), torch.zeros(0), 1.0, 0, 0, 0)
    # no seed at all, with and without an undo (the kernels read the first seed to pick their compiled path:
    # this crashed the process before the check)
    w = torch.ones(5)
    for n_prev in (0, 1):
        with pytest.raises(RuntimeError, match="at least one seed"):
            torch.ops.fusedtune.zo_apply_kernel_([w], [0], torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                                 torch.zeros(n_prev, dtype=torch.long), torch.zeros(n_prev), 0.5, 0, 0, 0)
    assert torch.equal(w, torch.ones(5))


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=0), "lr must be > 0"), (dict(lr=1e-3, eps=0), "eps must be > 0"),
    (dict(lr=1e-3, weight_decay=-1), "weight_decay must be >= 0"),
    (dict(lr=1e-3, noise="cauchy"), "noise='cauchy'"), (dict(lr=1e-3, rounding="floor"), "rounding='floor'"),
])
def test_mezo_bad_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MeZO([torch.zeros(3)], **kw)


def test_mezo_needs_closure():
    with pytest.raises(ValueError, match="needs a closure"):
        MeZO([torch.zeros(3)], lr=1e-3).step(None)


def test_replay_and_es_bad_args():
    with pytest.raises(ValueError, match="params is empty"):
        zo_replay_([], [1], [1.0])
    with pytest.raises(ValueError, match="2 seeds but 3 rewards"):
        es_step_([torch.zeros(3)], [1, 2], [1.0, 2.0, 3.0], lr=1e-3, sigma=1e-3)


def test_zo_noise_bad_args():
    with pytest.raises(TypeError, match="has dtype torch.int32"):
        zo_noise((3,), 1, dtype=torch.int32)
