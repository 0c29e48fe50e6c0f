"""hft on a GPU: the Triton row-gradient GEMM within the tolerance rule, MaskedAdamW's CUDA kernel
bit-identical to the reference and to the CPU kernel."""
import pytest
import torch

from fusedtune.nn import RowMaskedLinear
from fusedtune.ops.hft import masked_adamw_, row_grad
from fusedtune.optim import MaskedAdamW
from fusedtune.testing import assert_same_bits, assert_within_rule, check_backends

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,out,inp,nrows", [(4096, 4096, 4096, 2048), (1000, 333, 129, 77)])
def test_gpu_row_grad(dtype, T, out, inp, nrows, backend):
    """The Triton gathered-load kernel and the cuda backend (gather + cuBLAS) within the rule."""
    dy = torch.randn(T, out, device="cuda").to(dtype)
    x = torch.randn(T, inp, device="cuda").to(dtype)
    rows = torch.randperm(out, device="cuda")[:nrows].sort().values
    got = row_grad(dy, x, rows, backend=backend)
    exact = dy.double()[:, rows].t() @ x.double()
    # the unfused computation in the kernel's own precision: a 16-bit GEMM on the tensor cores with a
    # float32 result (cuBLAS through mm's out_dtype), not a 16-bit rounded result. (Not an IEEE float32
    # matmul of the upcast inputs: tensor cores accumulate float32 with truncating adds, 4-6x the error
    # of FMA sums at K = 4096 -- seen on an H200, where that yardstick failed a correct kernel.)
    g = dy[:, rows].t().contiguous()
    unfused = torch.mm(g, x, out_dtype=torch.float32) if dtype != torch.float32 else g @ x
    assert_within_rule(got, exact, unfused, "row_grad", atol=1e-3)
    for out_dtype in (torch.bfloat16, torch.float16):   # the float32 sum rounded once in the store (the
        low = row_grad(dy, x, rows, backend=backend, out_dtype=out_dtype)   # autotuner may pick another tile
        assert low.dtype == out_dtype                                         # order: the rule, not the bits)
        assert_within_rule(low, exact, unfused.to(out_dtype), "row_grad 16-bit out", atol=1e-3)


def test_masked_adamw_cuda_bit_identical():
    def inputs(dev):
        g = torch.Generator().manual_seed(5)
        ps = [torch.randn(1000, 33, generator=g), torch.randn(4099, generator=g).bfloat16(),
              torch.randn(40, 33, generator=g)] + [torch.randn(7 * i + 1, generator=g) for i in range(150)]
        gs = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]
        tg = [torch.empty(0), torch.empty(0), torch.randn(100, 33, generator=g).bfloat16()] + [torch.empty(0)] * 150
        rows = [torch.empty(0, dtype=torch.long)] * 2 + [torch.arange(40) * 2] + [torch.empty(0, dtype=torch.long)] * 150
        mv = [torch.zeros(p.shape) for p in ps]
        return [[t.to(dev) for t in lst] for lst in (ps, gs, mv, [m.clone() for m in mv], tg, rows)]

    def run(b, dev="cuda"):
        ps, gs, ms, vs, tg, rows = inputs(dev)
        for step in range(1, 4):
            masked_adamw_(ps, gs, ms, vs, tg, rows, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          step=step, backend=b)
        return ps + ms + vs + tg
    assert "cuda" in check_backends(run, "cuda", exact=True, has=("reference", "cpu", "cuda"))
    assert_same_bits([t.cpu() for t in run("cuda")], run("auto", "cpu"), "cuda vs cpu")


def test_row_layer_trains_on_gpu():
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = RowMaskedLinear.from_linear(lin, torch.arange(0, 512, 2, device="cuda"))
    opt = MaskedAdamW(m.parameters(), lr=1e-3)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        m(x).float().pow(2).mean().backward()
        opt.step()
    assert torch.equal(m.weight[1::2], w0[1::2]) and not torch.equal(m.weight[::2], w0[::2])
    assert torch.equal(m.bias[1::2], b0[1::2]) and not torch.equal(m.bias[::2], b0[::2])     # bias rows train too
    assert torch.equal(m.bias[::2], m.bias_rows.detach().bfloat16())


def test_block_layer_trains_in_place_on_gpu():
    """masters=False on CUDA, bf16: the Triton row gradient written in bf16 is the dense gradient's block
    within the rule, and torch's fused AdamW on the views moves exactly the block of the weight."""
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = RowMaskedLinear.from_linear(lin, torch.arange(100, 356, device="cuda"), masters=False)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    m(x).backward(dy)
    assert m.weight_rows.grad.dtype == torch.bfloat16
    exact = dy.double()[:, 100:356].t() @ x.double()
    unfused = (dy[:, 100:356].t().float() @ x.float()).bfloat16()
    assert_within_rule(m.weight_rows.grad, exact, unfused, "block dW", atol=1e-3)
    opt = torch.optim.AdamW([m.weight_rows, m.bias_rows], lr=1e-3, fused=True)
    for _ in range(3):
        opt.zero_grad()
        m(x).float().pow(2).mean().backward()
        opt.step()
    keep = torch.ones(512, dtype=torch.bool, device="cuda")
    keep[100:356] = False
    assert torch.equal(m.weight[keep], w0[keep]) and not torch.equal(m.weight[~keep], w0[~keep])
    assert torch.equal(m.bias[keep], b0[keep]) and not torch.equal(m.bias[~keep], b0[~keep])
    assert m.weight_rows.data_ptr() == m.weight[100].data_ptr()
