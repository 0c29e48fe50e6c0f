"""What torch.optim users rely on, held for MaskedAdamW and SparseDeltaAdamW (optim/fused_adamw.py) and their fused
ops: a refused parameter or step changes nothing, load_state_dict runs its hooks, the ops refuse what
torch.optim.AdamW refuses. (Found by an audit: each case below failed before.)"""
import copy

import pytest
import torch

from fusedtune.nn import SparseDeltaLinear
from fusedtune.ops.hft import masked_adamw_
from fusedtune.ops.sparse_delta import sparse_adamw_
from fusedtune.optim import MaskedAdamW, SparseDeltaAdamW


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(opt, params, snap):
    ps, sd = snap
    now = opt.state_dict()
    same_state = now["state"].keys() == sd["state"].keys() and all(
        torch.equal(torch.as_tensor(now["state"][k][n]), torch.as_tensor(sd["state"][k][n]))
        for k in sd["state"] for n in sd["state"][k])
    return all(torch.equal(p.detach(), q) for p, q in zip(params, ps)) and same_state


def test_masked_adamw_refuses_a_parameter_it_cannot_step_when_it_is_added():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(4, 6).t())          # transposed: not contiguous
    with pytest.raises(ValueError, match=r"shape \(6, 4\) has strides \(1, 6\), not contiguous"):
        MaskedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt = MaskedAdamW([a], lr=0.1)
    for bad, err in ((b, ValueError), (torch.nn.Parameter(torch.randn(3, dtype=torch.float64)), TypeError)):
        with pytest.raises(err, match="MaskedAdamW: a parameter of shape"):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.randn(2))])})   # a generator still works
    assert len(opt.param_groups) == 2 and len(opt.param_groups[1]["params"]) == 1


def test_sparse_delta_adamw_refuses_a_non_delta_in_add_param_group():
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    layer.bias.requires_grad_(True)
    opt = SparseDeltaAdamW([layer.values], lr=0.1)
    with pytest.raises(ValueError, match="takes the `values` of SparseDeltaLinear layers only"):
        opt.add_param_group({"params": [layer.bias]})
    assert len(opt.param_groups) == 1


def test_a_refused_step_changes_no_group():
    """The lists of every group are built before any group steps: a refusal in the second group (a sparse
    gradient) leaves the first group's parameters, moments and step counts as they were."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()
    snap = _snapshot(opt, [a, b])
    b.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert _unchanged(opt, [a, b], snap)
    b.grad = torch.ones(4)
    opt.step()
    assert opt.state[a]["step"] == opt.state[b]["step"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_state_dict_runs_the_hooks_and_keeps_float32_moments(dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=dtype))
    opt = MaskedAdamW([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(5, dtype=dtype)
        opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    o2 = MaskedAdamW([q], lr=0.1)

    def pre(o, s):
        s = copy.deepcopy(s)
        s["state"][0]["exp_avg"].zero_()
        return s

    o2.register_load_state_dict_pre_hook(pre)
    o2.register_load_state_dict_post_hook(lambda o: o.state[q]["exp_avg_sq"].fill_(7.0))
    o2.load_state_dict(sd)
    st = o2.state[q]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32      # not cast to the parameter's dtype
    assert torch.equal(st["exp_avg"], torch.zeros(5)) and torch.equal(st["exp_avg_sq"], torch.full((5,), 7.0))
    assert st["exp_avg"].data_ptr() != sd["state"][0]["exp_avg"].data_ptr()   # copied, not the caller's tensors
    o3 = MaskedAdamW([q], lr=0.1)
    o3.load_state_dict(sd)                                                      # no hooks: the saved bits
    assert torch.equal(o3.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def _masked_lists():
    p, g = torch.randn(4), torch.randn(4)
    return [p], [g], [torch.zeros(4)], [torch.zeros(4)], [None], [None]


@pytest.mark.parametrize("kw,msg", [({"step": 0}, "step must be an int"), ({"step": -1}, "step must be an int"),
                                    ({"step": 1.0}, "step must be an int"), ({"eps": -1.0}, "eps must be"),
                                    ({"lr": float("nan")}, "lr must be"), ({"beta1": 1.0}, "beta1 must be"),
                                    ({"weight_decay": -0.1}, "weight_decay must be")])
def test_masked_adamw_op_refuses_what_adamw_refuses(kw, msg):
    lists = _masked_lists()
    before = [t.clone() for t in lists[0] + lists[2]]
    args = {**dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1), **kw}
    with pytest.raises(ValueError, match=msg):
        masked_adamw_(*lists, **args)
    assert all(torch.equal(a, b) for a, b in zip(lists[0] + lists[2], before))


def test_the_adamw_ops_refuse_aliased_entries():
    p, v = torch.randn(4), torch.zeros(4)
    p0 = p.clone()
    with pytest.raises(ValueError, match="entry 0 .* share memory"):
        masked_adamw_([p], [torch.ones(4)], [p], [v], [None], [None], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, step=1)
    assert torch.equal(p, p0)
    buf = torch.zeros(6)
    with pytest.raises(ValueError, match="entry 0 .* share memory"):   # overlapping views, not equal pointers
        masked_adamw_([p], [torch.ones(4)], [buf[:4]], [buf[2:]], [None], [None], lr=1e-2, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.0, step=1)
    assert torch.equal(p, p0) and not buf.any()
    buf = torch.zeros(8)   # disjoint views of one buffer are fine
    masked_adamw_([p], [torch.ones(4)], [buf[:4]], [buf[4:]], [None], [None], lr=1e-2, beta1=0.9, beta2=0.999,
                  eps=1e-8, weight_decay=0.0, step=1)
    assert not torch.equal(p, p0)
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    vals = layer.values.detach()
    with pytest.raises(ValueError, match="entry 0 .* share memory"):
        sparse_adamw_([vals], [vals], [torch.zeros_like(vals)], [torch.zeros_like(vals)], [layer.weight.detach()],
                      [layer.base_values], [layer.indices], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="step must be an int"):
        sparse_adamw_([vals], [torch.ones_like(vals)], [torch.zeros_like(vals)], [torch.zeros_like(vals)],
                      [layer.weight.detach()], [layer.base_values], [layer.indices], lr=1e-2, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.0, step=True)


# ---- a second audit (session 40): each case below failed before its fix
@pytest.mark.parametrize("bad", [{"lr": -0.1}, {"lr": float("nan")}, {"betas": (0.9, 1.0)}, {"dtype": torch.float64}])
def test_a_step_refused_in_a_later_group_changes_no_group(bad):
    """Hyperparameters (a scheduler can drive a group's lr negative) and tensors are checked for every group
    before the first one steps."""
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))
    opt = MaskedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(6), torch.ones(3)
    opt.step()
    snap = _snapshot(opt, [a, b])
    if "dtype" in bad:       # the parameter's data changed dtype after it was added
        b.data, b.grad = b.data.double(), b.grad.double()
    else:
        opt.param_groups[1].update(bad)
    with pytest.raises((ValueError, TypeError)):
        opt.step()
    assert opt.state[a]["step"] == opt.state[b]["step"] == 1
    assert torch.equal(a.detach(), snap[0][0]) and torch.equal(opt.state[a]["exp_avg"], snap[1]["state"][0]["exp_avg"])


def test_sparse_delta_adamw_refused_later_group_changes_no_group():
    l1 = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    l2 = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    opt = SparseDeltaAdamW([{"params": [l1.values]}, {"params": [l2.values]}], lr=0.1)
    for lay in (l1, l2):
        lay(torch.randn(3, 8)).sum().backward()
    opt.param_groups[1]["lr"] = -1.0
    w1, v1 = l1.weight.detach().clone(), l1.values.detach().clone()
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    assert torch.equal(l1.weight.detach(), w1) and torch.equal(l1.values.detach(), v1)
    assert all(st["step"] == 0 and not st["exp_avg"].any() for st in opt.state.values())


def test_named_parameters_and_frozen_parameters_are_taken():
    """(name, tensor) pairs as torch.optim takes them; frozen parameters MaskedAdamW cannot step (packed 4-bit
    bytes, a transposed view) are accepted, as torch.optim.AdamW accepts them, and never stepped."""
    net = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    opt = MaskedAdamW(list(net.named_parameters()) + [("packed", frozen)], lr=0.1)
    w0 = net.weight.detach().clone()
    net(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(net.weight.detach(), w0) and frozen.eq(0).all()
    lay = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    assert len(SparseDeltaAdamW(lay.named_parameters(), lr=0.1).param_groups[0]["params"]) == 3


@pytest.mark.parametrize("option", ["maximize", "amsgrad", "capturable", "differentiable", "foreach", "fused"])
def test_adamw_options_in_a_param_group_are_refused_not_ignored(option):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=f"param group option {option}=True is not supported"):
        MaskedAdamW([{"params": [a]}, {"params": [b], option: True}], lr=0.1)
    opt = MaskedAdamW([a], lr=0.1)
    with pytest.raises(TypeError, match=f"param group option {option}"):
        opt.add_param_group({"params": [b], option: True})
    opt.add_param_group({"params": [b], "maximize": False, "foreach": None})   # the defaults are fine
    assert len(opt.param_groups) == 2


def test_tensor_bias_correction_stays_tensor_after_loading_an_element_state():
    """bias_correction is the constructor's: a "tensor" optimizer does not use an "element" checkpoint's
    per-entry counts (it steps as if they were not there; an "element" optimizer's step differs)."""
    def run(mode, opt_state=None, first=None):
        torch.manual_seed(0)
        lay = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.5)
        opt = SparseDeltaAdamW([lay.values], lr=0.1, bias_correction=mode)
        x = torch.randn(3, 8)
        if first is not None:
            lay.load_state_dict(first)
            opt.load_state_dict(opt_state)
            steps = 1
        else:
            steps = 3
        for i in range(steps):
            opt.zero_grad()
            lay(x).sum().backward()
            opt.step()
            if i == 0 and first is None:
                opt.reset_state(lay.values, torch.tensor([0, 1]))
        return lay, opt
    lay, opt = run("element")
    sd, model = copy.deepcopy(opt.state_dict()), copy.deepcopy(lay.state_dict())
    assert "elem_step" in sd["state"][0]
    plain = copy.deepcopy(sd)
    del plain["state"][0]["elem_step"]
    tensor_loaded = run("tensor", sd, model)[0].values.detach()
    tensor_plain = run("tensor", plain, model)[0].values.detach()
    element_loaded = run("element", sd, model)[0].values.detach()
    assert torch.equal(tensor_loaded, tensor_plain) and not torch.equal(tensor_loaded, element_loaded)


def test_a_torch_adamw_checkpoint_loads_and_steps_like_torch():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(5)
        ref.step()
    q.data.copy_(p.detach())
    opt = MaskedAdamW([q], lr=0.1)
    opt.load_state_dict(ref.state_dict())
    g = torch.randn(5)
    p.grad, q.grad = g, g.clone()
    ref.step()
    opt.step()
    assert opt.state[q]["step"] == 3
    torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_a_tensor_lr_gives_no_warnings():
    import warnings
    p = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW([p], lr=torch.tensor(0.01), backend="reference")
    p.grad = torch.ones(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_in_place_ops_refuse_inference_tensors_outside_inference_mode(backend):
    """As torch refuses an in-place update of an inference tensor outside inference mode (found by audit: the
    C++ kernels updated them, the reference wrote every other tensor and then raised)."""
    from fusedtune.ops import zo_apply_
    if backend == "cpu" and not fusedtune_ext_loaded():
        pytest.skip("no extension")
    normal = torch.zeros(8)
    with torch.inference_mode():
        frozen, p = torch.zeros(8), torch.ones(3)
        w = torch.zeros(8)
    with pytest.raises(RuntimeError, match="entry 1 is an inference tensor"):
        zo_apply_([normal, frozen], [1], [1.0], backend=backend)
    assert not normal.any() and not frozen.any()
    m, v = torch.zeros(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        masked_adamw_([p], [torch.ones(3)], [m], [v], [None], [None], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, step=1, backend=backend)
    assert torch.equal(p, torch.ones(3)) and not m.any()
    vals, idx = torch.zeros(2), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="inference tensor"):
        sparse_adamw_([vals], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], [w], [torch.zeros(2)], [idx],
                      lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, backend=backend)
    assert not vals.any() and not w.any()
    with torch.inference_mode():          # inside inference mode they are writable, as torch's own ops
        zo_apply_([frozen], [1], [1.0], backend=backend)
    assert frozen.any()


def fusedtune_ext_loaded():
    import fusedtune
    return fusedtune._ext.loaded()


@pytest.mark.parametrize("cls", [MaskedAdamW, SparseDeltaAdamW])
@pytest.mark.parametrize("make,kw,msg", [(torch.optim.AdamW, {"maximize": True}, "maximize=True"),
                                         (torch.optim.AdamW, {"amsgrad": True}, "amsgrad=True"),
                                         (torch.optim.Adam, {"weight_decay": 0.1}, "decoupled_weight_decay=False")])
def test_a_torch_checkpoint_with_options_the_constructor_refuses_is_refused_by_the_load(cls, make, kw, msg):
    """torch's load copied the saved groups' options in and the fused step ignored them (maximize minimised;
    Adam's L2 decay ran as AdamW's); found by review."""
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 4), density=0.5)   # (alive: it owns the deltas)
    p = layer.values if cls is SparseDeltaAdamW else torch.nn.Parameter(torch.randn(16))
    src = make([p], lr=0.1, **kw)
    p.grad = torch.ones_like(p)
    src.step()
    opt = cls([p], lr=0.1)
    snap, keys = _snapshot(opt, [p]), set(opt.param_groups[0])
    with pytest.raises(TypeError, match=msg):
        opt.load_state_dict(src.state_dict())
    assert _unchanged(opt, [p], snap) and set(opt.param_groups[0]) == keys
    with pytest.raises(TypeError, match="decoupled_weight_decay=False"):
        cls([{"params": [p], "decoupled_weight_decay": False, "weight_decay": 0.1}])


def test_masked_adamw_refuses_another_layers_master_and_a_parameter_twice():
    """A SparseDeltaLinear's deltas were taken and the first step failed with an AttributeError; one tensor twice
    in a group stepped twice in one pass (found by review)."""
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 4), density=0.5)
    with pytest.raises(TypeError, match="master of a SparseDeltaLinear.*SparseDeltaAdamW"):
        MaskedAdamW([layer.values])
    a = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="appears twice in one param group"):
        MaskedAdamW([a, a])


def test_row_masked_linear_refuses_a_non_contiguous_weight_by_name():
    from fusedtune.nn import RowMaskedLinear
    lin = torch.nn.Linear(8, 4)
    lin.weight = torch.nn.Parameter(torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="weight \\(or bias\\) is not contiguous"):
        RowMaskedLinear.from_linear(lin, torch.tensor([0, 2]))


@pytest.mark.parametrize("betas", [(0.9, 0.999, 0.5), (0.9,), 0.9])
def test_betas_other_than_two_numbers_are_refused(betas):
    """(a third beta was taken and silently ignored)"""
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 8), density=0.5, seed=0)
    for cls, params in ((MaskedAdamW, [torch.nn.Parameter(torch.zeros(3))]),
                        (SparseDeltaAdamW, layer.master_parameters())):
        with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
            cls(params, lr=1e-3, betas=betas)


def test_moments_of_another_shape_are_refused_at_the_load():
    """The state dict of another selection (here another HFT seed) failed at the first step with a raw
    'masked_adamw: tensors[1] differ in size'; now the load names it and leaves the optimizer as it was."""
    import fusedtune
    from tiny_models import tiny_llama
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    a, b = tiny_llama(), tiny_llama()
    ra, rb = fusedtune.patch(a, "hft", seed=0), fusedtune.patch(b, "hft", seed=1)
    ra.step(lambda: a(ids, labels=ids).loss)
    rb.step(lambda: b(ids, labels=ids).loss)
    params = [p for g in rb.optimizer.param_groups for p in g["params"]]
    snap = _snapshot(rb.optimizer, params)
    with pytest.raises(ValueError, match=r"MaskedAdamW.load_state_dict: the saved moments of parameter \d+ of group "
                                         r"\d+ have shape .*another selection.*Nothing was loaded"):
        rb.optimizer.load_state_dict(ra.optimizer.state_dict())
    assert _unchanged(rb.optimizer, params, snap)
