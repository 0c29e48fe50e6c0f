"""sparse_delta on a GPU: Triton SDDMM within the tolerance rule; the tiled CUDA SDDMM bit-identical to
its CPU twin for the same plan (a race or a missing barrier would show) and within the rule; the dense
schedule within the rule and taken by the layer as the rule says; the CUDA optimizer kernel
bit-identical to the reference and to the CPU kernel."""
import pytest
import torch

from fusedtune.ops import sparse_delta as sd
from fusedtune.ops.sparse_delta import sddmm, sparse_adamw_
from fusedtune.testing import assert_same_bits, assert_within_rule, check_backends

pytestmark = pytest.mark.gpu


def _exact_and_unfused(dy, x, idx):
    """The gradient at the indices in float64 and as plain float32 PyTorch computes it, 8192 at a time."""
    r, c = idx.long() // x.shape[1], idx.long() % x.shape[1]
    parts = [(dy[:, r[s:s + 8192]], x[:, c[s:s + 8192]]) for s in range(0, idx.numel(), 8192)]
    return (torch.cat([(a.double() * b.double()).sum(0) for a, b in parts]),
            torch.cat([(a.float() * b.float()).sum(0) for a, b in parts]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,out,inp,k", [(4096, 4096, 4096, 167772), (333, 77, 129, 500)])
def test_triton_sddmm(dtype, T, out, inp, k):
    dy = torch.randn(T, out, device="cuda").to(dtype)
    x = torch.randn(T, inp, device="cuda").to(dtype)
    idx = torch.randperm(out * inp, device="cuda")[:k].sort().values.to(torch.int32)
    got = sddmm(dy, x, idx, backend="triton")
    exact, unfused = _exact_and_unfused(dy, x, idx)
    assert_within_rule(got, exact, unfused, "sddmm", atol=1e-3)


@pytest.mark.parametrize("dtype,T,out,inp,k,plan", [
    (torch.bfloat16, 4096, 4096, 4096, 167772, None),           # the device's own plan, q/o_proj at 1%
    (torch.bfloat16, 4096, 4096, 4096, 167772, [128, 256, 7, 300, 608]),  # many batches and splits
    (torch.float16, 333, 77, 129, 500, None),
    (torch.float32, 333, 77, 129, 500, [64, 64, 3, 37, 112]),
    (torch.float32, 1000, 300, 2000, 30000, None),
])
def test_cuda_sddmm_bit_identical_to_cpu_twin(dtype, T, out, inp, k, plan):
    g = torch.Generator(device="cuda").manual_seed(k)
    dy = torch.randn(T, out, device="cuda", generator=g).to(dtype)
    x = torch.randn(T, inp, device="cuda", generator=g).to(dtype)
    idx = torch.randperm(out * inp, device="cuda", generator=g)[:k].sort().values.to(torch.int32)
    if plan is None:
        plan = sd._device_plan(dy, x, idx)
        got = sddmm(dy, x, idx, backend="cuda")
    else:
        got = torch.ops.fusedtune.sddmm_kernel(dy, x, idx, plan)
    torch.cuda.synchronize()
    twin = torch.ops.fusedtune.sddmm_kernel(dy.cpu(), x.cpu(), idx.cpu(), plan)
    assert_same_bits(got.cpu(), twin, f"cuda vs cpu twin, plan {plan}")
    exact, unfused = _exact_and_unfused(dy, x, idx)
    assert_within_rule(got, exact, unfused, "cuda sddmm", atol=1e-3)


@pytest.mark.parametrize("dtype,T,out,inp,k,block_rows", [
    (torch.bfloat16, 4096, 4096, 4096, 167772, None),     # q/o_proj at 1%: one block
    (torch.bfloat16, 1000, 4096, 1536, 62915, 1000),      # blocks of 1000 rows, a ragged last one
    (torch.float16, 333, 77, 129, 500, 7),
])
def test_dense_delta_grad_within_rule(dtype, T, out, inp, k, block_rows, monkeypatch):
    """The dense schedule (torch.mm with out_dtype=float32 a block of rows at a time, then gathered)."""
    g = torch.Generator(device="cuda").manual_seed(k)
    dy = torch.randn(T, out, device="cuda", generator=g).to(dtype)
    x = torch.randn(T, inp, device="cuda", generator=g).to(dtype)
    idx = torch.randperm(out * inp, device="cuda", generator=g)[:k].sort().values.to(torch.int32)
    if block_rows is not None:
        monkeypatch.setattr(sd, "DENSE_BLOCK_BYTES", 4 * inp * block_rows)
    got = sddmm(dy, x, idx, schedule="dense")
    exact, unfused = _exact_and_unfused(dy, x, idx)
    assert_within_rule(got, exact, unfused, "dense delta gradient", atol=1e-3)


def test_layer_auto_takes_the_dense_schedule_by_the_rule(monkeypatch):
    """A bf16 SparseDeltaLinear 768 x 1024 and a 256 x 2048 one (density over out * in, not in * in) on auto,
    512 tokens: dense at 2.5% density on this GPU, the SDDMM at 0.1% (the rule's thresholds for this GPU
    decide); gradients within the rule either way."""
    from fusedtune.nn import SparseDeltaLinear
    ran = []
    real = sd._dense_delta_grad
    monkeypatch.setattr(sd, "_dense_delta_grad", lambda *a: ran.append(1) or real(*a))
    p = torch.cuda.get_device_properties(0)
    name = sd.sparse_delta_backend("cuda")["sddmm"]["backend"]
    need = sd.dense_min_density((p.major, p.minor), name)
    g = torch.Generator().manual_seed(5)
    for (out, inp), dens in [((768, 1024), 0.001), ((768, 1024), 0.025), ((256, 2048), 0.025)]:
        x = torch.randn(512, inp, generator=g).to("cuda", torch.bfloat16)
        dy = torch.randn(512, out, generator=g).to("cuda", torch.bfloat16)
        ran.clear()
        layer = SparseDeltaLinear.from_linear(torch.nn.Linear(inp, out, bias=False).to("cuda", torch.bfloat16),
                                              density=dens)
        layer(x).backward(dy)
        assert ran == ([1] if dens >= need else []), (out, inp, dens, need)
        idx = layer.indices
        exact, unfused = _exact_and_unfused(dy, x, idx)
        assert_within_rule(layer.values.grad, exact, unfused, f"layer delta gradient at {dens}", atol=1e-3)


def test_compiled_layer_on_auto_takes_the_dense_schedule(monkeypatch):
    """torch.compile over a bf16 layer whose rule says dense (2.5%, 512 tokens): the wrapper's device query
    folds under compile, the dense schedule runs, its gradient within the rule."""
    from fusedtune.nn import SparseDeltaLinear
    ran = []
    real = sd._dense_delta_grad
    monkeypatch.setattr(sd, "_dense_delta_grad", lambda *a: ran.append(1) or real(*a))
    p = torch.cuda.get_device_properties(0)
    assert 0.025 >= sd.dense_min_density((p.major, p.minor), sd.sparse_delta_backend("cuda")["sddmm"]["backend"])
    g = torch.Generator().manual_seed(9)
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(1024, 512, bias=False).to("cuda", torch.bfloat16),
                                          density=0.025)
    x = torch.randn(512, 1024, generator=g).to("cuda", torch.bfloat16)
    dy = torch.randn(512, 512, generator=g).to("cuda", torch.bfloat16)
    torch.compile(layer)(x).backward(dy)
    assert ran == [1]
    exact, unfused = _exact_and_unfused(dy, x, layer.indices)
    assert_within_rule(layer.values.grad, exact, unfused, "compiled layer delta gradient", atol=1e-3)


def test_sparse_adamw_cuda_bit_identical():
    def inputs(dev):
        g = torch.Generator().manual_seed(6)
        ws = [torch.randn(500, 300, generator=g).bfloat16(), torch.randn(77, 5, generator=g)] + \
             [torch.randn(20 + i, generator=g).half() for i in range(120)]
        idx = [torch.randperm(w.numel(), generator=g)[: max(1, w.numel() // 50)].sort().values.to(torch.int32)
               for w in ws]
        vals = [torch.randn(i.shape, generator=g) * 1e-2 for i in idx]
        grads = [torch.randn(i.shape, generator=g) for i in idx]
        bases = [w.view(-1)[i.long()].clone() for w, i in zip(ws, idx)]
        mv = [torch.zeros_like(v) for v in vals]
        return [[t.to(dev) for t in lst] for lst in (vals, grads, mv, [m.clone() for m in mv], ws, bases, idx)]

    def run(b, dev="cuda"):
        vals, grads, ms, vs, ws, bases, idx = inputs(dev)
        # per-element counts on every other tensor: at the step (2), fresh, young, old (powers underflow)
        g = torch.Generator().manual_seed(7)
        pool = torch.tensor([2, 0, 1, 9, 17000, 2 ** 20], dtype=torch.int32)
        steps = [pool[torch.randint(0, 6, i.shape, generator=g)].to(dev) if j % 2 else None
                 for j, i in enumerate(idx)]
        for step in range(3, 6):
            sparse_adamw_(vals, grads, ms, vs, ws, bases, idx, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, step=step, steps=steps, backend=b)
        return vals + ms + vs + ws + [s for s in steps if s is not None]
    assert "cuda" in check_backends(run, "cuda", exact=True, has=("reference", "cpu", "cuda"))
    assert_same_bits([t.cpu() for t in run("cuda")], run("auto", "cpu"), "cuda vs cpu")


def test_regrowth_window_on_cuda_bf16():
    """A bf16 model regrowing on the GPU: on a window step the deltas' gradient is the dense dW (one float32
    GEMM of the 16-bit dy and x, torch.mm(out_dtype=float32)) at their positions, within the rule of the
    float64 product; the selection moves entries and leaves no dense gradient behind."""
    from fusedtune.nn import SparseDeltaLinear
    from fusedtune.optim import SparseDeltaAdamW
    from fusedtune.sparse_delta import Regrower
    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(512, 384, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 512, generator=g) * 0.05)
    layer = SparseDeltaLinear.from_linear(lin.to("cuda", torch.bfloat16), density=0.01, seed=3)
    opt = SparseDeltaAdamW([layer.values], lr=1e-3)
    rg = Regrower(layer, opt, every=2, rate=0.5, decay="constant", accumulate_steps=1)
    x = torch.randn(256, 512, generator=g).to("cuda", torch.bfloat16)
    dy = torch.randn(256, 384, generator=g).to("cuda", torch.bfloat16)
    before = layer.indices.clone()
    for t in (1, 2):
        opt.zero_grad(set_to_none=True)
        layer(x).backward(dy)
        if t == 2:     # the window step
            idx = layer.indices.long()
            exact = (dy.double().t() @ x.double()).reshape(-1)[idx]
            unfused = (dy.float().t() @ x.float()).reshape(-1)[idx]
            assert_within_rule(layer.values.grad, exact, unfused, "window-step delta gradient", atol=1e-3)
        opt.step()
        rg.step()
    assert rg.dense_grad_steps == [2] and rg.history[0]["moved"] == int(0.5 * before.numel())
    assert not torch.equal(layer.indices, before) and layer.weight.grad is None


def _tie_heavy(out, inp, gen):
    """Gradient-like float32 values rounded to bf16 (many equal scores), NaN and inf sprinkled in."""
    g = (torch.randn(out, inp, generator=gen) * torch.rand(out, 1, generator=gen)).bfloat16().float()
    g.view(-1)[torch.randperm(out * inp, generator=gen)[:50]] = float("nan")
    g.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), -0.0])
    return g


@pytest.mark.parametrize("mode", ["abs", "dense", "rowcol"])
def test_regrow_candidates_triton_equals_reference_on_cuda(mode, monkeypatch):
    """The radix selection on the GPU returns the reference's positions and score bits (atomics order the
    compaction differently on every run; the sort after it must not). deep: KEEP_SLACK 0 makes the tie-heavy
    bf16 scores go through all three histogram levels."""
    from fusedtune.ops.sparse_delta_select import regrow_candidates
    from fusedtune.triton_kernels import sparse_delta_select as tk
    gen = torch.Generator().manual_seed(4)
    out, inp = 2048, 3072
    g = _tie_heavy(out, inp, gen)
    ex = torch.randperm(out * inp, generator=gen)[: out * inp // 100].sort().values.int()
    kw = {"abs": dict(scores=g, absolute=True), "dense": dict(scores=g),
          "rowcol": dict(row=g[:, 0].abs().contiguous(), col=g[0, :].abs().contiguous())}[mode]
    for slack in ((1 << 16, 0) if mode == "abs" else (1 << 16,)):
        monkeypatch.setattr(tk, "KEEP_SLACK", slack)
        for n in (ex.numel(), ex.numel() // 5):
            want = regrow_candidates(n, ex, backend="reference", **kw)
            got = regrow_candidates(n, ex.cuda(), backend="triton", **{k: v.cuda() if torch.is_tensor(v) else v
                                                                       for k, v in kw.items()})
            assert torch.equal(got[0].cpu(), want[0]), (slack, n)
            assert_same_bits(got[1].cpu(), want[1], f"{mode} scores, slack {slack}, n {n}")


def test_sm3_update_triton_bit_identical_on_cuda():
    from fusedtune.ops.sparse_delta_select import sm3_update
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(1031, 2050, generator=gen) * 0.01
    row, col = torch.rand(1031, generator=gen) * 1e-4, torch.rand(2050, generator=gen) * 1e-4
    want = sm3_update(g, row, col, backend="reference")
    got = sm3_update(g.cuda(), row.cuda(), col.cuda(), backend="triton")
    assert_same_bits([t.cpu() for t in got], list(want), "sm3 update, triton on cuda vs reference")


@pytest.mark.parametrize("variant,candidates", [("ag", 1.0), ("ma", None)])
def test_regrower_on_cuda_selects_as_the_reference(monkeypatch, variant, candidates):
    """A Regrower on the GPU (auto: the Triton selection) moves the same entries as with the reference ops."""
    import functools

    from fusedtune.nn import SparseDeltaLinear
    from fusedtune.ops import sparse_delta_select as sel
    from fusedtune.optim import SparseDeltaAdamW
    from fusedtune.sparse_delta import Regrower
    from fusedtune.sparse_delta import regrow as regrow_mod

    def run(backend):
        monkeypatch.setattr(regrow_mod, "regrow_candidates", functools.partial(sel.regrow_candidates, backend=backend))
        monkeypatch.setattr(regrow_mod, "sm3_update", functools.partial(sel.sm3_update, backend=backend))
        g = torch.Generator().manual_seed(2)
        lin = torch.nn.Linear(768, 640, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(640, 768, generator=g) * 0.05)
        layer = SparseDeltaLinear.from_linear(lin.cuda(), density=0.02, seed=1)
        opt = SparseDeltaAdamW([layer.values], lr=1e-3)
        rg = Regrower(layer, opt, every=2, rate=0.3, decay="constant", variant=variant, accumulate_steps=2,
                      candidates=candidates, seed_moments="grad")
        for _ in range(4):
            x, dy = torch.randn(128, 768, generator=g).cuda(), torch.randn(128, 640, generator=g).cuda()
            opt.zero_grad(set_to_none=True)
            layer(x).backward(dy)
            opt.step()
            rg.step()
        monkeypatch.undo()
        return [layer.indices, layer.values.detach(), opt.state[layer.values]["exp_avg_sq"]]
    assert_same_bits(run("triton"), run("reference"), f"{variant} regrowth on cuda, triton vs reference")
