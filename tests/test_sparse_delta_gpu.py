"""sparse_delta on a GPU: Triton SDDMM within the tolerance rule; the tiled CUDA SDDMM bit-identical to
its CPU twin for the same plan (a race or a missing barrier would show) and within the rule; the CUDA
optimizer kernel bit-identical to the reference and to the CPU kernel."""
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
