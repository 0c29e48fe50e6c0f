"""sparse_delta core: SDDMM delta gradients equal the dense gradient at the indices, the fused
optimizer matches a dense masked AdamW and is bit-identical across backends, exact revert,
opcheck, compile, bad inputs."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedtune
from fusedtune.nn import SparseDeltaLinear
from fusedtune.ops.sparse_delta import sddmm, sparse_adamw_, sparse_delta_linear
from fusedtune.optim import SparseDeltaAdamW
from fusedtune.testing import check_backends


def _idx(numel, k, seed=0):
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values.to(torch.int32)


@pytest.mark.parametrize("lead,out,inp", [((37,), 13, 11), ((2, 9), 33, 17)])
def test_sddmm_is_dense_grad_at_indices(lead, out, inp):
    x = torch.randn(*lead, inp, dtype=torch.float64)
    w = torch.randn(out, inp, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*lead, out, dtype=torch.float64)
    F.linear(x, w).backward(dy)
    idx = _idx(out * inp, 29)
    got = sddmm(dy.float(), x.float(), idx, backend="reference")
    torch.testing.assert_close(got.double(), w.grad.reshape(-1)[idx.long()], rtol=1e-5, atol=1e-5)


def test_layer_delta_gradient_and_input_gradient():
    lin = torch.nn.Linear(40, 24)
    m = SparseDeltaLinear.from_linear(lin, density=0.03, seed=1)
    x = torch.randn(5, 7, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(5, 7, 24)
    m(x).backward(dy)
    lin.weight.requires_grad_(True)
    F.linear(x2, lin.weight.detach().requires_grad_(), lin.bias).backward(dy)
    dense = torch.einsum("...o,...i->oi", dy, x2.detach())
    torch.testing.assert_close(m.values.grad, dense.reshape(-1)[m.indices.long()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad)
    assert m.weight.grad is None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_gives_a_trained_weight_its_dense_gradient(backend):
    """A caller that trains the base too (weight.requires_grad) gets F.linear's dW, beside the deltas'."""
    x = torch.randn(3, 5, 19, requires_grad=True)
    w = torch.randn(11, 19, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    idx = _idx(11 * 19, 17)
    vals = torch.zeros(17, requires_grad=True)
    dy = torch.randn(3, 5, 11)
    sparse_delta_linear(x, w, vals, idx, b, backend=backend).backward(dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    F.linear(*leaves).backward(dy)
    for got, want in zip((x, w, b), leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals.grad, leaves[1].grad.reshape(-1)[idx.long()], rtol=1e-5, atol=1e-5)


def test_layer_with_an_unfrozen_base_trains_base_and_deltas():
    """The layer's base unfrozen by the user: dW for the weight and the SDDMM gradient for the deltas (the
    layer took a plain F.linear then, which left the deltas without a gradient off regrowth windows)."""
    lin = torch.nn.Linear(20, 12)
    m = SparseDeltaLinear.from_linear(copy.deepcopy(lin), density=0.1, seed=2)
    m.weight.requires_grad_(True)
    x, dy = torch.randn(6, 20), torch.randn(6, 12)
    m(x).backward(dy)
    dense = dy.t() @ x
    torch.testing.assert_close(m.weight.grad, dense, rtol=1e-5, atol=1e-5)
    assert m.values.grad is not None
    torch.testing.assert_close(m.values.grad, dense.reshape(-1)[m.indices.long()], rtol=1e-5, atol=1e-5)



def test_matches_dense_masked_adamw_and_reverts_exactly():
    torch.manual_seed(2)
    lin = torch.nn.Linear(20, 12)
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear.from_linear(lin, density=0.1, seed=3)
    mask = torch.zeros(12 * 20, dtype=torch.bool)
    mask[m.indices.long()] = True
    mask = mask.view(12, 20)
    delta = torch.nn.Parameter(torch.zeros(12, 20))
    opt_ref = torch.optim.AdamW([delta], lr=1e-2, weight_decay=0.1)
    opt = SparseDeltaAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x, t = torch.randn(64, 20), torch.randn(64, 12)
    for _ in range(10):
        opt.zero_grad()
        (m(x) - t).pow(2).mean().backward()
        opt.step()
        opt_ref.zero_grad()
        (F.linear(x, w0 + delta, lin.bias) - t).pow(2).mean().backward()
        delta.grad *= mask
        opt_ref.step()
    torch.testing.assert_close(m.weight, w0 + delta.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(m.weight[~mask], w0[~mask])
    m.revert_()
    assert torch.equal(m.weight, w0)
    m.merge_()
    torch.testing.assert_close(m.weight, w0 + delta.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_updates_are_not_lost():
    lin = torch.nn.Linear(64, 64).bfloat16()
    with torch.no_grad():
        lin.weight.fill_(1.0)  # ulp(1) = 2^-7: updates of 1e-3 vanish in a bf16 weight
    m = SparseDeltaLinear.from_linear(lin, density=0.05)
    m.values.grad = torch.ones_like(m.values)
    opt = SparseDeltaAdamW(m.parameters(), lr=1e-3)
    for _ in range(10):
        opt.step()
    assert torch.allclose(m.values, torch.full_like(m.values, -1e-2), rtol=1e-3)
    assert (m.weight.view(-1)[m.indices.long()] < 1.0).all()  # 10 steps of 1e-3 crossed an ulp


def _adam_inputs():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(30, 17, generator=g).bfloat16(), torch.randn(9, 5, generator=g), torch.randn(40, generator=g).half()]
    idx = [_idx(w.numel(), max(1, w.numel() // 7), i) for i, w in enumerate(ws)]
    vals = [torch.randn(i.shape, generator=g) * 1e-2 for i in idx]
    grads = [torch.randn(i.shape, generator=g) for i in idx]
    bases = [w.view(-1)[i.long()].clone() for w, i in zip(ws, idx)]
    return vals, grads, ws, bases, idx


def test_sparse_adamw_bit_identical_across_backends():
    def run(b):
        vals, grads, ws, bases, idx = _adam_inputs()
        ms, vs = [torch.zeros_like(v) for v in vals], [torch.zeros_like(v) for v in vals]
        for step in range(1, 5):
            sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.05, step=step, backend=b)
        return vals + ms + vs + ws
    checked = check_backends(run, "cpu", exact=True, has=("reference", "cpu", "cuda"))
    assert ("cpu" in checked) == fusedtune._ext.loaded()


def test_opcheck_and_compile():
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(8, 10)
    idx = _idx(80, 9)
    v = torch.zeros(9, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedtune.sparse_delta_linear.default, (x, w, v, idx, None, "reference"))
    torch.library.opcheck(torch.ops.fusedtune.sddmm.default, (torch.randn(6, 8), x.detach(), idx, "reference"))
    vals, grads, ws, bases, ids = _adam_inputs()
    consts = [1.0, 0.9, 0.1, 0.999, 0.001, 0.03, 1e-8, 0.01, 0.01, 3.0]   # AdamConsts, lr, step

    def steps():   # per-element counts (some at the step, some not) for two tensors, none for one
        return [torch.tensor([2, 0, 5] * 30, dtype=torch.int32)[: ids[0].numel()], torch.empty(0, dtype=torch.int32),
                torch.full(ids[2].shape, 1, dtype=torch.int32)]
    zeros = lambda: [torch.zeros_like(t) for t in vals]  # noqa: E731
    torch.library.opcheck(torch.ops.fusedtune.sparse_adamw_.default,
                          (vals, grads, zeros(), zeros(), ws, bases, ids, steps(), consts, "reference"))
    if fusedtune._ext.loaded():   # the compiled kernel's own schema and fake impl
        torch.library.opcheck(torch.ops.fusedtune.sparse_adamw_kernel_.default,
                              (vals, grads, zeros(), zeros(), ws, bases, ids, steps(), consts))
        for op, tail in ((torch.ops.fusedtune.sparse_adamw_kernel_.default, ()),     # no counts: steps []
                         (torch.ops.fusedtune.sparse_adamw_.default, ("cpu",))):
            torch.library.opcheck(op, (vals, grads, zeros(), zeros(), ws, bases, ids, [], consts) + tail)
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(10, 8), density=0.2)
    f = lambda x: m(x).pow(2).sum()  # noqa: E731
    f(x).backward()
    g = m.values.grad.clone()
    m.values.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    torch.testing.assert_close(m.values.grad, g)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("bad", ["grad_dtype", "moment_size", "base_dtype", "steps_size"])
def test_sparse_adamw_refuses_bad_tensors_untouched(backend, check, bad):
    """Without the host checks (check=False, as SparseDeltaAdamW calls it) the extension's kernel still
    refuses every malformed tensor before writing anything; the reference keeps the Python checks."""
    if backend == "cpu" and not fusedtune._ext.loaded():
        pytest.skip("fusedtune._C is not built")
    vals, grads, ws, bases, idx = _adam_inputs()
    ms, vs = [torch.zeros_like(v) for v in vals], [torch.zeros_like(v) for v in vals]
    steps = [None] * len(vals)
    if bad == "grad_dtype":
        grads[1] = grads[1].double()
    elif bad == "moment_size":
        vs[2] = vs[2][:-1].clone()
    elif bad == "base_dtype":
        bases[0] = bases[0].to(torch.float16 if ws[0].dtype != torch.float16 else torch.float32)
    else:
        steps[1] = torch.zeros(idx[1].numel() + 1, dtype=torch.int32)
    keep = [t.clone() for t in vals + ms + vs + ws]
    with pytest.raises((ValueError, RuntimeError), match="sparse_adamw"):
        sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, step=1, steps=steps, backend=backend, check=check)
    assert all(torch.equal(a, b) for a, b in zip(vals + ms + vs + ws, keep))


@pytest.mark.parametrize("idx,msg", [
    (torch.tensor([1, 1, 5], dtype=torch.int32), "duplicates"),
    (torch.tensor([5, 1], dtype=torch.int32), "must be sorted"),
    (torch.tensor([0, 80], dtype=torch.int32), "must lie in \\[0, 80\\)"),
    (torch.tensor([-1, 3], dtype=torch.int32), "must lie in"),
    (torch.tensor([1, 2]), "1-D int32"),
])
def test_bad_indices_refused_and_untouched(idx, msg):
    lin = torch.nn.Linear(10, 8)
    w0 = lin.weight.detach().clone()
    with pytest.raises((ValueError, TypeError), match=msg):
        SparseDeltaLinear.from_linear(lin, indices=idx)
    assert torch.equal(lin.weight, w0)
    m = SparseDeltaLinear.from_linear(lin, density=0.1)
    before = m.weight.detach().clone()
    with pytest.raises((ValueError, TypeError), match=msg):
        m.set_indices(idx)
    assert torch.equal(m.weight, before)
    with pytest.raises((ValueError, TypeError), match=msg):
        sddmm(torch.randn(3, 8), torch.randn(3, 10), idx)


def test_bad_arguments():
    with pytest.raises(ValueError, match="density must be in"):
        SparseDeltaLinear.from_linear(torch.nn.Linear(4, 4), density=0)
    with pytest.raises(TypeError, match="expected nn.Linear"):
        SparseDeltaLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="`values` of SparseDeltaLinear layers only"):
        SparseDeltaAdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="values must be float32"):
        sparse_delta_linear(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2).half(), torch.tensor([0, 1],
                            dtype=torch.int32))
    with pytest.raises(ValueError, match="all tensors must be on one device"):   # (the backward failed)
        sparse_delta_linear(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, device="meta"),
                            torch.tensor([0, 1], dtype=torch.int32))


def test_layer_under_autocast_and_with_a_trained_bias():
    """HF Trainer bf16=True on an fp32 model runs the layer under autocast (its backward used to fail on
    mixed dtypes); a bias a user sets to train gets its gradient (it was silently dropped)."""
    import copy
    lin = torch.nn.Linear(40, 24)
    m = SparseDeltaLinear.from_linear(copy.deepcopy(lin), density=0.05, seed=4)
    m.bias.requires_grad_(True)
    x, dy = torch.randn(6, 40), torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_ref = lin(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.backward(dy.bfloat16())
    dense = dy.bfloat16().float().t() @ x.bfloat16().float()
    torch.testing.assert_close(m.values.grad, dense.reshape(-1)[m.indices.long()], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(m.bias.grad, dy.bfloat16().float().sum(0), rtol=1e-2, atol=1e-2)
    assert m.values.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32


_TORCH_ADAMW = {"foreach": {}, "for-loop": {"foreach": False}, "fused": {"fused": True}}


@pytest.mark.parametrize("kind", sorted(_TORCH_ADAMW))
def test_other_optimizers_and_edits_of_values_reach_the_forward(kind, monkeypatch):
    """values updated by torch.optim.AdamW used to leave the merged weight stale: training silently did
    nothing. They are merged again (at the step, or at the next forward after an edit), and it says so once.
    fused=True (transformers.Trainer's default, adamw_torch_fused) does not bump the version counters the layer
    watched (found by audit): a global optimizer step hook (nn/masters.py) has the layer merge them."""
    from fusedtune import backend as fb
    monkeypatch.setattr(fb, "_warned", set())
    lin = torch.nn.Linear(20, 12)
    m = SparseDeltaLinear.from_linear(lin, density=0.2, seed=1)
    opt = torch.optim.AdamW([m.values], lr=1e-2, **_TORCH_ADAMW[kind])
    x = torch.randn(8, 20)
    with pytest.warns(UserWarning, match="changed outside SparseDeltaAdamW"):
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        y = m(x)
    w = m.weight.detach().clone().view(-1)
    w[m.indices.long()] = (m.base_values.float() + m.values.detach()).to(w.dtype)
    assert torch.equal(m.weight.detach().view(-1), w) and m.values.detach().abs().sum() > 0
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias))
    # SparseDeltaAdamW keeps the weight current itself: no re-merge, no warning
    m2 = SparseDeltaLinear.from_linear(torch.nn.Linear(20, 12), density=0.2, seed=1)
    opt2 = SparseDeltaAdamW([m2.values], lr=1e-2)
    m2(x).pow(2).mean().backward()
    opt2.step()
    assert m2._merged_stamp.matches(m2.values)


def test_to_linear_takes_values_changed_outside_sparse_delta_adamw():
    """to_linear (unpatch(merge=True)) after another optimizer's step, without a forward in between:
    the plain layer holds W0 + delta, not the weight merged before that step."""
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(20, 12), density=0.2, seed=1)
    with torch.no_grad():
        m.values.add_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # (said once per process: test_other_optimizers... may have)
        lin = m.to_linear()
    got = lin.weight.detach().view(-1)[m.indices.long()]
    assert torch.equal(got, (m.base_values.float() + m.values.detach()).to(got.dtype))


def test_float64_weights_stay_exact():
    """A float64 layer merges in float64: zero deltas leave W0 exact, and the forward is nn.Linear's."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 24).double()
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear.from_linear(lin, density=0.2, seed=2)
    assert torch.equal(m.weight.detach(), w0)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.linear(x, w0, lin.bias), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        m.values.fill_(0.25)
    m.merge_()
    idx = m.indices.long()
    assert torch.equal(m.weight.detach().view(-1)[idx], w0.view(-1)[idx] + 0.25)


def test_from_linear_shares_the_weight_and_revert_gives_w0_back():
    """Documented: no copy of the base weight; merged deltas show in the original linear, and
    revert_() restores it bit for bit (a bf16 weight: the merge rounds, the revert does not)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16).bfloat16()
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear.from_linear(lin, density=0.1, seed=3)
    assert m.weight.data_ptr() == lin.weight.data_ptr()
    with torch.no_grad():
        m.values.copy_(torch.randn_like(m.values) * 1e-1 + 1e-3)
    m.merge_()
    flat = lin.weight.detach().view(-1)
    idx = m.indices.long()
    assert torch.equal(flat[idx], (w0.view(-1)[idx].float() + m.values.detach()).bfloat16())
    others = torch.ones_like(flat, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(flat[others], w0.view(-1)[others])
    m.revert_()
    assert torch.equal(lin.weight.detach().view(torch.int16), w0.view(torch.int16))


@pytest.mark.parametrize("convert,dtype", [(lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                           (lambda m: m.half(), torch.float16)])
def test_dtype_conversion_keeps_the_float32_deltas(convert, dtype):
    """model.to(bf16) after patching converts the weight, bias and base, not the float32 deltas (the
    truth), and merges them again in the new dtype; the optimizer keeps training the same Parameter."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(20, 12)
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear.from_linear(lin, density=0.2, seed=1)
    opt = SparseDeltaAdamW(m.parameters(), lr=1e-3)
    x = torch.randn(16, 20)
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    vals = m.values.detach().clone()
    param = m.values
    convert(m)
    assert m.values is param and m.values.dtype == torch.float32 and torch.equal(m.values.detach(), vals)
    assert m.values.grad.dtype == torch.float32
    assert m.weight.dtype == m.base_values.dtype == m.bias.dtype == dtype
    idx = m.indices.long()
    assert torch.equal(m.base_values, w0.view(-1)[idx].to(dtype))
    assert torch.equal(m.weight.view(-1)[idx], (w0.view(-1)[idx].to(dtype).float() + vals).to(dtype))
    frozen = torch.ones(w0.numel(), dtype=torch.bool)
    frozen[idx] = False
    assert torch.equal(m.weight.view(-1)[frozen], w0.view(-1)[frozen].to(dtype))
    opt.zero_grad()
    m(x.to(dtype)).float().square().mean().backward()
    opt.step()                                    # the fused step takes the converted layer
    assert not torch.equal(m.values.detach(), vals)
    m.revert_()
    assert torch.equal(m.weight, w0.to(dtype))


def test_an_unfrozen_base_gets_its_gradient_in_window_steps():
    """Inside dense_grad (regrowth's window steps) a base weight the user unfroze still gets its dense
    gradient, as it does outside (F.linear), and the sink sees the same dW."""
    torch.manual_seed(2)
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(16, 8), density=0.25, seed=1)
    m.weight.requires_grad_(True)
    x = torch.randn(5, 16)
    m(x).square().sum().backward()
    want = m.weight.grad.clone()
    m.weight.grad = None
    seen = []
    with m.dense_grad(lambda dW: seen.append(dW.clone())):
        m(x).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)


def test_a_float64_layer_trains_on_the_reference_and_a_named_kernel_refuses_float64():
    """Found by audit: the forward of a float64 SparseDeltaLinear ran, its backward raised in the C++ SDDMM
    ("dy and x must be float32, bfloat16 or float16") with no gradient made."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24).double()
    m = SparseDeltaLinear.from_linear(lin, density=0.2, seed=2)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x).square().sum().backward()
    y = F.linear(x.detach(), lin.weight.detach(), lin.bias.detach())
    dense = (2 * y).t() @ x.detach()
    torch.testing.assert_close(m.values.grad, dense.reshape(-1)[m.indices.long()].float())
    if fusedtune._ext.loaded():
        with pytest.raises(TypeError, match="not float64"):
            sddmm(torch.randn(5, 24, dtype=torch.float64), x.detach(), m.indices, backend="cpu")


def test_masters_swapped_in_one_process_are_not_refused():
    """The FSDP check of the masters runs under torch.distributed only: nn.DataParallel's replicas and accelerate's
    hooks hand a layer Parameters it did not make, in one process (found by review: refused there)."""
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 6), density=0.25)
    x = torch.randn(3, 8)
    want = layer(x)
    layer._parameters["values"] = torch.nn.Parameter(layer.values.detach().clone())   # as a replica gets it
    assert torch.equal(layer(x), want)


def test_values_replaced_by_a_new_tensor_are_merged():
    """A new `values` tensor (a new Parameter assigned, or torch.func.functional_call) starts at the old one's
    version: the layer must see it is another tensor and merge it (found by review: the forward kept the old
    merged weight, silently)."""
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(40, 24), density=0.1)
    x = torch.randn(3, 40)
    y0 = m(x).detach()
    m.values = torch.nn.Parameter(torch.full_like(m.values, 0.5))
    w = m.weight.detach().clone()
    w.view(-1)[m.indices.long()] = (m.base_values.float() + 0.5).to(w.dtype)
    torch.testing.assert_close(m(x), F.linear(x, w, m.bias))
    assert not torch.equal(m(x), y0)
    y = torch.func.functional_call(m, {"values": torch.zeros_like(m.values)}, (x,))
    torch.testing.assert_close(y, y0)


@pytest.mark.parametrize("kind", ["sparse_delta", "hft_row"])
def test_masters_given_new_memory_through_data_reach_the_forward(kind, monkeypatch):
    """`p.data = new` (vector_to_parameters, MeZO-style hand-written updates) keeps the Parameter and its version
    counter: the forward kept the old merged weight, silently (found by audit: training did nothing). The layer
    also watches the masters' memory now."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from fusedtune import backend as fb
    from fusedtune.nn import RowMaskedLinear
    monkeypatch.setattr(fb, "_warned", set())
    lin = torch.nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    m = SparseDeltaLinear.from_linear(lin, density=0.25, seed=0) if kind == "sparse_delta" else \
        RowMaskedLinear.from_linear(lin, torch.tensor([1, 4, 6]))
    masters = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(4, 16)
    m(x)
    vector_to_parameters(parameters_to_vector(masters) + 0.5, masters)
    with pytest.warns(UserWarning, match="changed outside"):
        y = m(x)
    plain = m.to_linear()
    torch.testing.assert_close(y, F.linear(x, plain.weight, plain.bias), rtol=0, atol=0)
    assert not torch.equal(plain.weight, w0)


def test_an_optimizer_holding_replaced_deltas_is_refused():
    """set_indices (keep_parameter=False) gives the layer a new `values` Parameter: the optimizer held the old one,
    which gets no gradient, and skipped it -- the layer never trained again, silently (found by audit)."""
    m = SparseDeltaLinear.from_linear(torch.nn.Linear(8, 8), density=0.25, seed=0)
    opt = SparseDeltaAdamW([m.values], lr=1e-2)
    x = torch.randn(4, 8)
    m(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    m.set_indices(torch.arange(0, 64, 4, dtype=torch.int32))
    m(x).pow(2).sum().backward()
    w = m.weight.detach().clone()
    with pytest.raises(RuntimeError, match="SparseDeltaAdamW: it holds a parameter of shape \\(16,\\) that its "
                                           "SparseDeltaLinear has replaced"):
        opt.step()
    assert torch.equal(m.weight, w)
    opt.add_param_group({"params": [m.values]})      # the cure (the old one, without a gradient, is skipped)
    opt.step()
    assert not torch.equal(m.weight, w)


def test_a_row_stage_change_with_only_some_new_masters_added_is_refused():
    """Found by review: RowMaskedLinear.set_rows replaces weight_rows and bias_rows; adding only the new weight_rows
    to the optimizer left the new bias_rows untrained, silently."""
    from fusedtune.nn import RowMaskedLinear
    from fusedtune.optim import MaskedAdamW
    m = RowMaskedLinear.from_linear(torch.nn.Linear(8, 6), torch.tensor([1, 3]))
    opt = MaskedAdamW(m.master_parameters(), lr=1e-2)
    m.set_rows(torch.tensor([0, 2, 4]))
    opt.add_param_group({"params": [m.weight_rows]})
    m(torch.randn(4, 8)).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match=r"MaskedAdamW: it holds a parameter of shape \(2, 8\) that its "
                                           r"RowMaskedLinear has replaced"):
        opt.step()
    opt.add_param_group({"params": [m.bias_rows]})
    opt.step()
    assert len(opt.state) == 2      # the old masters' moments are dropped
