"""fusedtune.sparse_delta.Regrower (SpIEL prune and regrow): k constant, drop the smallest |delta|, grow
at the best accumulated |grad| (AG) or SM3 score (MA) outside the current indices, seeded moments,
ages, schedule, determinism, dense gradients only on window steps; and regrowth via fusedtune.patch."""
import math

import pytest
import torch
from torch import nn

from fusedtune import sparse_delta as sd
from fusedtune.nn import SparseDeltaLinear
from fusedtune.optim import SparseDeltaAdamW
from fusedtune.sparse_delta import Regrower

OUT, IN, T = 13, 11, 24      # odd sizes


class Net(nn.Module):
    def __init__(self, seed=0, density=0.2, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = SparseDeltaLinear.from_linear(self._lin(IN, OUT, g, dtype), density=density, seed=seed)
        self.b = SparseDeltaLinear.from_linear(self._lin(OUT, 7, g, dtype), density=density, seed=seed + 1)

    @staticmethod
    def _lin(i, o, g, dtype):
        lin = nn.Linear(i, o, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, i, generator=g) * 0.3)
            lin.bias.copy_(torch.randn(o, generator=g) * 0.1)
        return lin

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batches(n, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, IN, generator=g).to(dtype), torch.randn(T, 7, generator=g).to(dtype)) for _ in range(n)]


def loss_of(net, x, y):
    return (net(x).float() - y.float()).square().mean()


def dense_grads(net, x, y):
    """Reference dense weight gradients of both layers at the current merged weights."""
    wa = net.a.weight.detach().clone().requires_grad_()
    wb = net.b.weight.detach().clone().requires_grad_()
    h = torch.tanh(nn.functional.linear(x, wa, net.a.bias))
    loss = (nn.functional.linear(h, wb, net.b.bias).float() - y.float()).square().mean()
    ga, gb = torch.autograd.grad(loss, [wa, wb])
    return {"a": ga, "b": gb}


def train(net, opt, rg, data, probe=None):
    for t, (x, y) in enumerate(data, 1):
        if probe is not None:
            probe(t, x, y)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(net, x, y)
        loss.backward()
        opt.step()
        rg.step()
    return float(loss.detach())


def layers(net):
    return {"a": net.a, "b": net.b}


def test_ag_prune_regrow_exact():
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=4, rate=0.25, decay="constant", variant="ag", accumulate_steps=2,
                  candidates=None)   # the exact (dense accumulator) mode
    data = batches(4)
    acc = {"a": 0, "b": 0}
    w0 = {n: l.weight.detach().clone() for n, l in layers(net).items()}   # values are 0: weight == W0

    def probe(t, x, y):
        if t in (3, 4):
            for n, g in dense_grads(net, x, y).items():
                acc[n] = acc[n] + g.abs().reshape(-1)

    for t, (x, y) in enumerate(data, 1):
        probe(t, x, y)
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y).backward()
        if t == 3:   # a window step: the deltas still get their gradient (gathered from the dense dW)
            for n, l in layers(net).items():
                assert torch.allclose(l.values.grad, dense_grads(net, x, y)[n].reshape(-1)[l.indices.long()],
                                      rtol=1e-5, atol=1e-7)
        opt.step()
        if t < 4:
            rg.step()
    before = {n: (l.indices.long().clone(), l.values.detach().clone(), opt.state[l.values]["exp_avg"].clone(),
                  opt.state[l.values]["exp_avg_sq"].clone(), rg.ages[n].clone()) for n, l in layers(net).items()}
    params_before = {n: l.values for n, l in layers(net).items()}
    summary = rg.step()           # t = 4: selection
    # the same Parameter objects, rewritten in place: what DDP / FSDP buckets and EMA copies hold stays valid
    assert all(l.values is params_before[n] for n, l in layers(net).items())
    assert rg.dense_grad_steps == [3, 4]
    for n, l in layers(net).items():
        idx, val, m, v, age = before[n]
        k = idx.numel()
        n_move = int(0.25 * k)
        assert n_move >= 2 and l.indices.numel() == k and l.values.numel() == k       # k constant
        drop = torch.argsort(val.abs())[:n_move]                                         # smallest |delta|
        score = acc[n].clone()
        score[idx] = -1
        grow = torch.argsort(score, descending=True)[:n_move]                           # top accumulated |grad|
        keep = torch.ones(k, dtype=torch.bool)
        keep[drop] = False
        want = torch.cat([idx[keep], grow]).sort()
        assert torch.equal(l.indices.long(), want.values)
        assert set(summary["layers"][n]["dropped"].tolist()) == set(idx[drop].tolist())
        grown = want.indices >= k - n_move
        assert torch.equal(l.values.detach()[~grown], val[keep]) and (l.values.detach()[grown] == 0).all()
        st = opt.state[l.values]
        assert torch.equal(st["exp_avg"][~grown], m[keep]) and (st["exp_avg"][grown] == 0).all()
        assert torch.equal(st["exp_avg_sq"][~grown], v[keep]) and (st["exp_avg_sq"][grown] == 0).all()
        assert torch.equal(rg.ages[n][~grown], age[keep] + 1) and (rg.ages[n][grown] == 0).all()
        assert (rg.ages[n][~grown] == 4).all()
        # the weight is W0 at dropped and grown positions, round(W0 + delta) at kept ones
        wf = l.weight.detach().view(-1)
        assert torch.equal(wf[idx[drop]], w0[n].view(-1)[idx[drop]])
        assert torch.equal(wf[grow], w0[n].view(-1)[grow])
        assert torch.equal(l.base_values, w0[n].view(-1)[l.indices.long()])
        assert any(p is l.values for p in opt.param_groups[0]["params"])
    trained = [p for p in opt.param_groups[0]["params"] if p.requires_grad]
    assert len(trained) == 2 and trained[0] is net.a.values and trained[1] is net.b.values   # old ones gone
    # training goes on with the new entries (they move away from 0)
    train(net, opt, rg, batches(3, seed=9))
    assert all((l.values.detach() != 0).all() for l in layers(net).values())


def test_dense_gradient_only_on_window_steps(monkeypatch):
    import fusedtune.nn.sparse_delta as layer_mod
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=5, rate=0.3, decay="linear", total_steps=12, accumulate_steps=2)
    steps, formed = [], []
    hook = net.a.register_forward_pre_hook(lambda mod, args: steps.append(len(steps) + 1))
    dense_dw = layer_mod.dense_fp32_dw
    monkeypatch.setattr(layer_mod, "dense_fp32_dw", lambda dy, x: formed.append(steps[-1]) or dense_dw(dy, x))
    train(net, opt, rg, batches(16))
    hook.remove()
    # windows end at 5 and 10; the selection at 15 moves nothing (rate reached 0): no window there
    assert rg.dense_grad_steps == [4, 5, 9, 10]
    assert formed == [4, 4, 5, 5, 9, 9, 10, 10], "one dense dW per layer on window steps, none elsewhere"
    assert net.a.weight.grad is None and net.b.weight.grad is None and not net.a.weight.requires_grad
    assert [h["step"] for h in rg.history] == [5, 10]
    assert rg.rate_at(5) == pytest.approx(0.3 * 7 / 12) and rg.rate_at(12) == 0
    for h in rg.history:
        assert h["moved"] == sum(int(h["rate"] * l.indices.numel()) for l in layers(net).values())


def test_schedules():
    net = Net()
    opt = SparseDeltaAdamW(net.parameters())
    cos = Regrower(net, opt, rate=0.2, decay="cosine", total_steps=100)
    assert cos.rate_at(0) == pytest.approx(0.2) and cos.rate_at(50) == pytest.approx(0.1)
    assert cos.rate_at(100) == pytest.approx(0) and cos.rate_at(150) == pytest.approx(0)
    assert cos.n_regrow(25, 100, 10_000) == int(0.2 * (1 + math.cos(math.pi / 4)) / 2 * 100)
    assert cos.n_regrow(0, 90, 100) == 10            # never more than the free positions
    cos.detach()
    with pytest.raises(ValueError, match="needs total_steps"):
        Regrower(net, opt, decay="cosine")
    with pytest.raises(ValueError, match="variant"):
        Regrower(net, opt, decay="constant", variant="xx")
    with pytest.raises(ValueError, match="does not hold the deltas"):
        Regrower(net, SparseDeltaAdamW([net.a.values]), decay="constant")
    with pytest.raises(ValueError, match="no fusedtune.nn.SparseDeltaLinear"):
        Regrower(nn.Linear(2, 2), opt, decay="constant")


def _run(variant, seed=0, **kw):
    torch.manual_seed(123)   # the regrower must not depend on the global RNG
    net = Net(seed=1)
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=3, rate=0.3, decay="cosine", total_steps=30, variant=variant,
                  accumulate_steps=2, seed=seed, **kw)
    torch.manual_seed(seed + 7)
    train(net, opt, rg, batches(12))
    return net, rg


@pytest.mark.parametrize("variant", ["ag", "ma"])
def test_deterministic(variant):
    (n1, r1), (n2, r2) = _run(variant), _run(variant)
    for a, b in ((n1.a, n2.a), (n1.b, n2.b)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert torch.equal(a.weight, b.weight)
    assert [h["moved"] for h in r1.history] == [h["moved"] for h in r2.history] and r1.history[0]["moved"] > 0
    for n in r1.ages:
        assert torch.equal(r1.ages[n], r2.ages[n])
    r3 = Regrower(n2, r2.optimizer, every=3, rate=0.3, decay="cosine", total_steps=30, variant=variant,
                  accumulate_steps=2)
    r2.detach()
    r3.load_state_dict(r1.state_dict())
    assert r3.t == 12 and all(torch.equal(r3.ages[n], r1.ages[n]) for n in r1.ages)
    assert [h["step"] for h in r3.history] == [3, 6, 9, 12]
    assert bool(r3._dense) == r3.in_window(13) and r3.in_window(14) and not r3.in_window(13)
    r3.detach()
    with pytest.raises(ValueError, match="other layers"):
        r3.load_state_dict({**r1.state_dict(), "ages": {"x": torch.zeros(1)}})
    good = r1.state_dict()
    name = next(iter(good["ages"]))
    for bad in (good["ages"][name][:-1], good["ages"][name].float(), good["ages"][name][None]):
        before = {n: a.clone() for n, a in r3.ages.items()}
        with pytest.raises(ValueError, match=f"ages\\['{name}'\\] must be an integer tensor"):
            r3.load_state_dict({**good, "ages": {**good["ages"], name: bad}, "t": 99})
        assert r3.t == 12 and all(torch.equal(r3.ages[n], before[n]) for n in before)   # nothing changed
    r3.load_state_dict({**good, "ages": {n: a.long() for n, a in good["ages"].items()}})   # int64: taken as int32
    assert all(r3.ages[n].dtype == torch.int32 and torch.equal(r3.ages[n], r1.ages[n]) for n in r1.ages)


def test_ma_sm3_scores():
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=3, rate=0.3, decay="constant", variant="ma", accumulate_steps=3)
    acc = {n: (torch.zeros(l.out_features), torch.zeros(l.in_features)) for n, l in layers(net).items()}

    def probe(t, x, y):
        for n, g in dense_grads(net, x, y).items():        # SM3-II, written out loop by loop
            row, col = acc[n]
            nu = torch.empty_like(g)
            for r in range(g.shape[0]):
                for c in range(g.shape[1]):
                    nu[r, c] = min(row[r], col[c]) + g[r, c] ** 2
            acc[n] = (nu.max(1).values, nu.max(0).values)

    before = {}
    data = batches(3)
    for t, (x, y) in enumerate(data, 1):
        probe(t, x, y)
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y).backward()
        opt.step()
        if t == 3:
            before = {n: l.indices.long().clone() for n, l in layers(net).items()}
        rg.step()
    for n, l in layers(net).items():
        row, col = acc[n]
        score = torch.minimum(row[:, None], col[None, :]).reshape(-1)
        score[before[n]] = -1
        grown = sorted(set(l.indices.tolist()) - set(before[n].tolist()))
        n_move = int(0.3 * before[n].numel())
        assert len(grown) == n_move and l.indices.numel() == before[n].numel()
        thr = score.sort(descending=True).values[n_move - 1]
        assert (score[grown] >= thr * (1 - 1e-5)).all()                       # only top-scoring positions
        assert set((score > thr * (1 + 1e-5)).nonzero().flatten().tolist()) <= set(grown)   # all strictly better


def test_candidates_and_seeded_moments():
    net = Net(density=0.15)
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=4, rate=0.3, decay="constant", variant="ag", accumulate_steps=3,
                  candidates=1.0, seed_moments="grad")
    data = batches(4)
    cands, acc = {}, {}
    for t, (x, y) in enumerate(data, 1):
        if t >= 2:
            for n, g in dense_grads(net, x, y).items():
                acc[n] = acc.get(n, 0) + g.abs().reshape(-1)
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y).backward()
        if t == 2:
            cands = {n: c for n, (c, _) in rg._acc.items()}
        opt.step()
        if t == 4:
            before = {n: l.indices.long().clone() for n, l in layers(net).items()}
        rg.step()
    for n, l in layers(net).items():
        k = before[n].numel()
        assert cands[n].numel() == k and not set(cands[n].tolist()) & set(before[n].tolist())
        grown = torch.tensor(sorted(set(l.indices.tolist()) - set(before[n].tolist())))
        assert set(grown.tolist()) <= set(cands[n].tolist()) and grown.numel() == int(0.3 * k)
        pos = torch.searchsorted(l.indices.long(), grown)
        st = opt.state[l.values]
        assert torch.allclose(st["exp_avg_sq"][pos], (acc[n][grown] / 3).square(), rtol=1e-5)
        assert (st["exp_avg"][pos] == 0).all()


def test_regrow_through_patch_trains_and_restores():
    transformers = pytest.importorskip("transformers")
    import fusedtune.methods.sparse_delta  # noqa: F401  (registers method "sparse_delta")
    from fusedtune import patch, unpatch
    from fusedtune.patch import PatchError
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    modules = {n: id(x) for n, x in m.named_modules()}
    with pytest.raises(PatchError, match="unknown"):
        patch(m, "sparse_delta", regrow={"evry": 3})
    with pytest.raises(PatchError, match="needs total_steps"):
        patch(m, "sparse_delta", regrow=True)
    with pytest.raises(PatchError, match="bias_correction must be"):
        patch(m, "sparse_delta", bias_correction="row")
    assert {n: id(x) for n, x in m.named_modules()} == modules     # refused before anything was swapped
    rep = patch(m, "sparse_delta", density=0.05, lr=3e-2,
                regrow={"every": 5, "rate": 0.3, "total_steps": 40, "accumulate_steps": 2})
    assert rep.regrower is not None and "SpIEL-AG" in str(rep) and "their own step counts" in str(rep)
    assert rep.optimizer.bias_correction == "element"
    k0 = {n: l.indices.numel() for n, l in sd.sparse_layers(m)}
    idx0 = {n: l.indices.clone() for n, l in sd.sparse_layers(m)}
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [6, 6, 0, 13, 21, 8, 1, 30]])
    losses = [float(rep.step(lambda: m(input_ids=ids, labels=ids).loss)) for _ in range(25)]
    assert losses[-1] < losses[0] - 0.1
    rg = rep.regrower
    assert rg.t == 25 and [h["step"] for h in rg.history] == [5, 10, 15, 20, 25]
    assert {n: l.indices.numel() for n, l in sd.sparse_layers(m)} == k0
    assert any(not torch.equal(idx0[n], l.indices) for n, l in sd.sparse_layers(m))
    for n, lay in sd.sparse_layers(m):   # the optimizer's per-entry counts are the Regrower's ages
        assert torch.equal(rep.optimizer.state[lay.values]["elem_step"], rg.ages[n])
    unpatch(m, merge=False)
    st = m.state_dict()
    assert all(torch.equal(st[k], base[k]) for k in base)
    assert rg._post_hook is None and rg._dense == []


def test_ag_defaults_to_k_candidates_not_a_dense_accumulator():
    """SpIEL accumulates at k candidates; a dense float32 accumulator per layer (26 GB at 7B) is opt-in."""
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    assert Regrower(net, opt, every=4, rate=0.25, decay="constant").candidates == 1.0
    assert Regrower(net, opt, every=4, rate=0.25, decay="constant", variant="ma").candidates is None
    with pytest.raises(ValueError, match="applies to variant='ag' only"):
        Regrower(net, opt, every=4, rate=0.25, decay="constant", variant="ma", candidates=1.0)


def test_a_process_group_without_torch_distributed_is_refused():
    """process_group names a group to reduce the scores over: given without torch.distributed initialized it
    is refused (Regrower and patch, the latter before anything is swapped). Under DDP, regrowth is tested
    with two processes in test_sparse_delta_regrow_ddp.py."""
    transformers = pytest.importorskip("transformers")
    from fusedtune import patch
    from fusedtune.patch import PatchError
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    group = object()    # stands for a ProcessGroup
    with pytest.raises(RuntimeError, match="Regrower: process_group is set but torch.distributed is not initialized"):
        Regrower(net, opt, every=4, decay="constant", process_group=group)
    assert Regrower(net, opt, every=4, decay="constant", process_group=None).process_group is None
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(PatchError, match="process_group is set"):
        patch(m, "sparse_delta", regrow={"every": 5, "decay": "constant", "process_group": group})
    assert all(type(mod) is not SparseDeltaLinear for mod in m.modules())


class Stack(nn.Module):
    """Three layers of one shape (a compiled forward once ran one layer's window sink for another's)."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a, self.b, self.c = (SparseDeltaLinear.from_linear(Net._lin(IN, IN, g, torch.float32), density=0.2,
                                                                seed=i) for i in range(3))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))[:, :7]


@pytest.mark.parametrize("model", [Net, Stack])
def test_regrowth_under_compile_equals_eager(model):
    """torch.compile of the model: window steps still form the dense gradient (scores) of every layer, the
    selection and the deltas equal eager's (found by review: with three layers of one shape, the compiled
    window steps fed one layer's gradient to another's sink and left a third untrained)."""
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = model()
        opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
        rg = Regrower(net, opt, every=3, rate=0.3, decay="constant", accumulate_steps=2)
        run = torch.compile(net, backend="aot_eager") if compiled else net
        for x, y in batches(6):
            opt.zero_grad(set_to_none=True)
            (run(x) - y).square().mean().backward()
            opt.step()
            rg.step()
        out.append(([h["moved"] for h in rg.history], [l.indices.clone() for l in net.modules() if isinstance(l, SparseDeltaLinear)],
                    [l.values.detach().clone() for l in net.modules() if isinstance(l, SparseDeltaLinear)]))
    assert out[0][0] == out[1][0] and all(m > 0 for m in out[0][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    for a, b in zip(out[0][2], out[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_scores_and_seeds_the_unscaled_gradient_and_skips_overflowing_steps():
    """Under torch.amp.GradScaler (grad_scaler=): the window's scores and the seeded moments are the unscaled
    gradient's, and a step the scaler skips (non-finite gradient) is left out of the window: the run equals
    one without a scaler and without that batch (found by review: seeds 2^32 too large, and an overflowing
    window step's inf entered the scores)."""
    out = []
    for scaled in (False, True):
        net = Net()
        opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if scaled else None
        rg = Regrower(net, opt, every=4, rate=0.3, decay="constant", accumulate_steps=2, seed_moments="grad",
                      attach=True, grad_scaler=scaler)
        data = batches(8)
        for i, (x, y) in enumerate(data):
            opt.zero_grad(set_to_none=True)
            if not scaled:
                if i != 2:
                    loss_of(net, x, y).backward()
                    opt.step()
                continue
            loss = loss_of(net, x, y) * (1e36 if i == 2 else 1.0)    # i = 2: step 3, in the window, overflows
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert rg.t == 7 and [h["step"] for h in rg.history] == [4]
        st = [opt.state[l.values]["exp_avg_sq"].clone() for l in layers(net).values()]
        out.append(([l.indices.clone() for l in layers(net).values()], st, rg.skipped_grads))
    assert out[1][2] == 2 and out[0][2] == 0            # both layers' dense gradients of the skipped step
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_an_overflowing_window_step_without_a_scaler_leaves_the_scores_finite():
    """Under a GradScaler the Regrower was not given (Trainer(fp16=True) with patch(..., regrow=...)), an overflowing
    window step's non-finite entries are left out of the scores (found by review: every score became NaN or inf,
    and the selection chose nothing useful)."""
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=4, rate=0.3, decay="constant", accumulate_steps=4, attach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_of(net, x, y) * (1e36 if i == 1 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
    state = [t for d in vars(rg).values() if isinstance(d, dict) for v in d.values()
             for t in (v if isinstance(v, (tuple, list)) else (v,)) if torch.is_tensor(t) and t.is_floating_point()]
    assert state and all(torch.isfinite(t).all() for t in state)


def test_a_dropped_regrower_is_freed_and_its_window_ends():
    """A layer's sink holds the Regrower weakly: dropped in a window, it is freed, and the layers
    train on the SDDMM path again (no dense gradient formed)."""
    import gc
    import weakref

    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=2, rate=0.3, decay="constant", accumulate_steps=2)   # steps 1-2: a window
    assert all(l._dense_sink is not None for l in layers(net).values())
    ref = weakref.ref(rg)
    del rg
    gc.collect()
    assert ref() is None, "the sink table kept the Regrower alive"
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    assert all(l._dense_sink is None for l in layers(net).values())
    for n, g in dense_grads(net, x, y).items():
        l = layers(net)[n]
        torch.testing.assert_close(l.values.grad, g.reshape(-1)[l.indices.long()], rtol=1e-5, atol=1e-7)


def test_one_attached_regrower_per_optimizer_and_its_state_travels_with_the_optimizer():
    """The optimizer's state_dict carries the attached Regrower's state (Trainer saves only the optimizer); a
    second Regrower attached to the same optimizer would share its one entry (each resumed with the other's
    state): refused until the first detaches."""
    net = Net()
    opt = SparseDeltaAdamW([net.a.values, net.b.values], lr=1e-2)
    rg = Regrower(net, opt, every=3, rate=0.3, decay="constant", accumulate_steps=1, attach=True)
    with pytest.raises(ValueError, match="attached Regrower already"):
        Regrower(net.a, opt, every=3, rate=0.3, decay="constant", accumulate_steps=1, attach=True)
    for x, y in batches(4):
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["fusedtune_regrower"]["t"] == rg.t == 4
    other = Regrower(net, opt, every=3, rate=0.3, decay="constant", accumulate_steps=1)
    rg.detach()
    other.attach()
    opt.load_state_dict(sd)
    assert other.t == 4 and torch.equal(other.ages["a"], rg.ages["a"])
    sd.pop("fusedtune_regrower")
    with pytest.warns(UserWarning, match="no Regrower state") as caught:
        opt.load_state_dict(sd)     # the warning names this line, not torch's hook runner
    assert [w.filename for w in caught] == [__file__]


def test_a_refused_optimizer_load_leaves_the_attached_regrower_as_it_was():
    """The Regrower's entry is checked in the load pre-hook and applied after torch has loaded the optimizer:
    a load torch refuses (another group count) does not move the Regrower to the checkpoint's step."""
    net = Net()
    opt = SparseDeltaAdamW([net.a.values, net.b.values], lr=1e-2)
    rg = Regrower(net, opt, every=3, rate=0.3, decay="constant", accumulate_steps=1, attach=True)
    for x, y in batches(4):
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y).backward()
        opt.step()
    sd = opt.state_dict()
    net2 = Net()
    opt2 = SparseDeltaAdamW([{"params": [net2.a.values]}, {"params": [net2.b.values]}], lr=1e-2)
    rg2 = Regrower(net2, opt2, every=3, rate=0.3, decay="constant", accumulate_steps=1, attach=True)
    ages = {n: a.clone() for n, a in rg2.ages.items()}
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt2.load_state_dict(sd)
    assert rg2.t == 0 and all(torch.equal(rg2.ages[n], a) for n, a in ages.items())
    bad = {**sd, "fusedtune_regrower": {**sd["fusedtune_regrower"], "ages": {"a": torch.zeros(3, dtype=torch.int32)}}}
    with pytest.raises(ValueError, match="the state is for other layers"):
        opt.load_state_dict(bad)       # checked before the optimizer loads anything
    assert rg.t == 4


def test_a_gradient_penalty_inside_a_regrowth_window_is_refused():
    """Found by review: the window's dense-gradient path (_WindowLinear) took a double backward without the
    deltas' term through the merged weight (silently wrong), where the op path refuses it."""
    net = Net()
    opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
    rg = Regrower(net, opt, every=2, rate=0.3, decay="constant", accumulate_steps=2)   # steps 1-2: a window
    x, y = batches(1)[0]
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss_of(net, x, y), x, create_graph=True)
    assert rg is not None


@pytest.mark.parametrize("variant", ["ag", "ma"])
def test_seeded_moments_do_not_shrink_with_gradient_accumulation(variant):
    """Found by audit: the seed divided the score by the backward passes, not the optimizer steps, so 4 equal
    micro-batches of 1/4 the loss (the same accumulated gradient) seeded exp_avg_sq 16x smaller and grown
    entries' first updates ~4x larger. The same gradients now seed the same moments."""
    seeds, grown = [], []
    for micro in (1, 4):
        net = Net(density=0.15)
        opt = SparseDeltaAdamW(net.parameters(), lr=1e-2)
        rg = Regrower(net, opt, every=3, rate=0.3, decay="constant", variant=variant, accumulate_steps=2,
                      seed_moments="grad")
        for x, y in batches(3):
            opt.zero_grad(set_to_none=True)
            for _ in range(micro):
                (loss_of(net, x, y) / micro).backward()
            opt.step()
            before = {n: l.indices.long().clone() for n, l in layers(net).items()}
            rg.step()
        new = {n: sorted(set(l.indices.tolist()) - set(before[n].tolist())) for n, l in layers(net).items()}
        grown.append(new)
        seeds.append({n: opt.state[l.values]["exp_avg_sq"][torch.searchsorted(l.indices.long(), torch.tensor(new[n]))]
                      for n, l in layers(net).items()})
    assert grown[0] == grown[1] and all(len(v) for v in grown[0].values())
    for n in seeds[0]:
        torch.testing.assert_close(seeds[1][n], seeds[0][n], rtol=1e-4, atol=0)


@pytest.mark.parametrize("rate", ["0.2", None, True])
def test_a_rate_that_is_not_a_number_gets_the_regrowers_message(rate):
    with pytest.raises(ValueError, match=r"Regrower: rate must be in \[0, 1\]"):
        Regrower.check_settings(every=5, rate=rate, decay="constant", variant="ag", accumulate_steps=1,
                                total_steps=None, candidates="auto", seed_moments="zero")


@pytest.mark.parametrize("seed", [1.5, True])
def test_a_seed_that_is_not_an_int_is_refused(seed):
    """(seed=1.5 picked exactly the positions of seed=1)"""
    import fusedtune
    from fusedtune.patch import PatchError
    from tiny_models import tiny_llama
    model = tiny_llama()
    with pytest.raises(PatchError, match=r"seed must be an int|seed=True: takes a number"):
        fusedtune.patch(model, "sparse_delta", seed=seed)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
