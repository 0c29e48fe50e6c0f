"""The Hopper LoRA GEMM (triton_kernels/lora_tma.py) on an sm_90 GPU: lora_linear's fused schedule through it,
forward and dX (dropout included), within DESIGN.md's rule of the exact product like the classic kernel
(test_lora_gpu.py); its backward runs on the autograd engine's device thread, whose context starts without
a Triton allocator; and it captures in a CUDA graph (the descriptors' scratch memory comes from the graph's
pool). Every autotune config launched directly; a Conv1D base, a float32 bias and 16-bit adapters. Run by
bench/gpu_check.sh as a test group of its own (in parallel with the others: its compiles take time)."""
import pytest
import torch

from fusedtune.bench.lora import capture
from fusedtune.triton_kernels.lora_tma import _HOPPER_CONFIGS
from test_lora_gpu import _case, _within_rule

pytestmark = pytest.mark.gpu


@pytest.fixture
def tma(monkeypatch):
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora_tma
    if not lora_tma.available("cuda"):
        pytest.skip("lora_gemm_tma_kernel needs an sm_90 GPU")
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 2**62)
    monkeypatch.setattr(lora_tma, "ENABLED", True)
    calls = []
    real = lora_tma.gemm
    monkeypatch.setattr(lora_tma, "gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype,M,K,N,r,p", [(torch.bfloat16, 4096, 4096, 4096, 16, 0.0),
                                              (torch.bfloat16, 1000, 336, 1032, 7, 0.1),
                                              (torch.float16, 300, 4096, 1024, 64, 0.0),
                                              (torch.bfloat16, 777, 1024, 14336, 40, 0.1)])
def test_tma_schedule_within_rule(dtype, M, K, N, r, p, tma):
    _within_rule(dtype, M, K, N, r, p)
    assert len(tma) == 2, "the forward and the dX GEMM took lora_gemm_tma_kernel"


def test_tma_schedule_captures_in_a_cuda_graph(tma):
    from fusedtune.ops import lora_linear
    x, W, A, B, dy = _case(512, 1024, 768, 16, torch.bfloat16, seed=3)
    xs = x.clone().requires_grad_()
    A, B = A.requires_grad_(), B.requires_grad_()

    def fb():
        y = lora_linear(xs, W, A, B, 2.0)
        return (y,) + torch.autograd.grad(y, [xs, A, B], dy)

    graph, out = capture(fb)
    with torch.no_grad():
        xs.copy_(torch.randn(xs.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)))
    graph.replay()
    torch.cuda.synchronize()
    want = fb()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])     # y and dX: no atomics
    assert len(tma) >= 2


@pytest.mark.parametrize("config", range(len(_HOPPER_CONFIGS)))
@pytest.mark.parametrize("q_t,dropout", [(False, False), (True, True)])
def test_every_config_within_rule(config, q_t, dropout, tma):
    """Every autotune config of the kernel (the GPU tests pick one, FUSEDTUNE_AUTOTUNE=one; the bench may
    pick any), launched directly, forward (Q = W, bias) and dX (Q = W^T, dropout) orientations, against the
    same product in float64; edge tiles on every side (M, N, K not multiples of any block)."""
    from fusedtune.triton_kernels import lora_tma
    from lora_cases import tma_direct
    c, want = tma_direct(lora_tma._HOPPER_CONFIGS[config], q_t, dropout, 1000, 4104, 1032, 16, torch.bfloat16,
                         "cuda", 132, seed=config)
    err = (c.double() - want).abs().max().item()
    assert err <= 2 ** -7 * want.abs().max().item() + 1e-2, (config, q_t, err)


def test_transposed_weight_and_float32_bias_and_16bit_adapters(tma):
    """A Conv1D base (W stored (in, out): the forward reads it as Q_T, dX as Q), a float32 bias and bf16
    adapters through the TMA kernel, within the rule like the classic kernel."""
    from fusedtune.ops import lora_linear
    from fusedtune.testing import assert_within_rule
    from lora_cases import exact64
    M, K, N, r = 1000, 768, 2304, 8
    x, W, A, B, dy = _case(M, K, N, r, torch.bfloat16, seed=3)
    A16, B16 = A.to(torch.bfloat16), B.to(torch.bfloat16)
    Wt = W.t().contiguous().t()
    bias = torch.randn(N, device="cuda")
    got = [lora_linear(x, Wt, A16, B16, 2.0, bias=bias, backend="triton")]
    assert len(tma) == 1
    y64 = exact64(x.cpu(), W.cpu(), [A16.float().cpu()], [B16.float().cpu()], [2.0], bias.cpu())
    unf = (torch.nn.functional.linear(x, W).float() + (x.float() @ A16.float().t()) @ B16.float().t() * 2.0
           + bias).to(torch.bfloat16)
    assert_within_rule(got[0], y64, unf, "Conv1D forward", atol=2e-2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_through_tma_agrees_with_the_classic_kernel(p, tma, monkeypatch):
    """DoRA (F and the column-scaled output from one accumulator) on the TMA kernel against the same call on
    lora_gemm_kernel, which the DoRA GPU tests check against peft: the same sums in another order, so within
    a unit or two of bf16's last place."""
    from fusedtune.ops.dora import dora_linear
    from fusedtune.triton_kernels import lora_tma
    M, K, N, r = 1000, 1024, 2056, 16
    x, W, A, B, dy = _case(M, K, N, r, torch.bfloat16, seed=9)
    mag = torch.rand(N, device="cuda") + 0.5
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(lora_tma, "ENABLED", on)
        xi, Ai, Bi, mi = (t.clone().requires_grad_() for t in (x, A, B, mag))
        y = dora_linear(xi, W, Ai, Bi, 2.0, mi, bias, p, 3, None, "triton")
        runs[on] = [y] + list(torch.autograd.grad(y, [xi, Ai, Bi, mi], dy))
    assert tma, "the TMA kernel ran"
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2 ** -6 * scale, f"output {i}"
