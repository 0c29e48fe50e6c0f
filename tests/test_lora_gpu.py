"""LoRA on a GPU: the Triton kernels (autotuned GEMM, shrink, wgrad, NF4) against the fp64 definition
within DESIGN.md's rule, with peft's unfused same-precision computation as the yardstick."""
import math

import pytest
import torch

from fusedtune.ops import lora_linear, lora_linear_multi
from fusedtune.reference.lora import dropout_mask
from fusedtune.testing import assert_within_rule
from lora_cases import exact64

pytestmark = pytest.mark.gpu


def _case(M, K, N, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    W = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).to(dtype)
    A = torch.randn(r, K, device="cuda", generator=g) / math.sqrt(K)
    B = torch.randn(N, r, device="cuda", generator=g) * 0.1
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    return x, W, A, B, dy


def _fb(fn, x, A, B, dy):
    xi, Ai, Bi = (t.clone().requires_grad_() for t in (x, A, B))
    y = fn(xi, Ai, Bi)
    return [y] + list(torch.autograd.grad(y, [xi, Ai, Bi], dy))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,N,r", [(4096, 4096, 4096, 16), (1000, 333, 1029, 7), (300, 4096, 1024, 64)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_within_rule(dtype, M, K, N, r, p):
    _within_rule(dtype, M, K, N, r, p)


@pytest.mark.parametrize("dtype,M,K,N,r,p", [(torch.bfloat16, 4096, 4096, 4096, 16, 0.0),
                                              (torch.bfloat16, 1000, 333, 1029, 7, 0.1),
                                              (torch.float32, 1000, 333, 1029, 7, 0.1),
                                              (torch.float16, 300, 4096, 1024, 64, 0.0)])
def test_cublas_schedule_within_rule(dtype, M, K, N, r, p, monkeypatch):
    """The cublas schedule (torch.mm for the base GEMMs, lora_expand_kernel adding the LoRA term, the dropout
    mask in dX and the bias), forced at every size, within the same rule as the fused GEMM."""
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 0)
    calls = []
    monkeypatch.setattr(tk, "gemm", lambda *a, **k: calls.append("gemm"))   # the fused GEMM must not run
    _within_rule(dtype, M, K, N, r, p)
    assert calls == []


def _within_rule(dtype, M, K, N, r, p):
    x, W, A, B, dy = _case(M, K, N, r, dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    s = 2.0
    got = _fb(lambda xi, Ai, Bi: lora_linear(xi, W, Ai, Bi, s, bias=bias, dropout_p=p, seed=5, backend="triton"),
              x, A, B, dy)
    keep = dropout_mask(M, K, 5, p, "cuda") if p else None

    def unfused(xi, Ai, Bi):   # peft: base GEMM in dtype, fp32 adapters on the dropped-out input, one add
        xd = xi.float() if keep is None else torch.where(keep, xi.float() / (1 - p), 0.0)
        return (torch.nn.functional.linear(xi, W, bias).float() + (xd @ Ai.t()) @ Bi.t() * s).to(dtype)
    unf = _fb(unfused, x, A, B, dy)
    y64, g64 = exact64(x.cpu(), W.cpu(), [A.cpu()], [B.cpu()], [s], bias.cpu(), keep=None if keep is None else
                       keep.cpu(), p=p, dy=dy.cpu())
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (a, e, u) in enumerate(zip(got, [y64] + g64, unf)):
        assert_within_rule(a, e, u, f"{dtype} output {i}", atol=atol)


@pytest.mark.parametrize("dtype,schedule", [(torch.bfloat16, "fused"), (torch.float32, "fused"),
                                            (torch.bfloat16, "cublas")])
def test_transposed_weight_within_rule(dtype, schedule, monkeypatch):
    """A Conv1D base (GPT-2, peft's fan_in_fan_out): the weight comes as the transposed view of an (in, out)
    tensor, and the forward and dX GEMMs read it through its strides."""
    from fusedtune.ops import lora_triton
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 0 if schedule == "cublas" else 2**62)
    M, K, N, r = 1000, 768, 2304, 8
    x, W, A, B, dy = _case(M, K, N, r, dtype, seed=3)
    Wt = W.t().contiguous().t()          # the same values stored (in, out)
    assert Wt.stride() == (1, N)
    got = _fb(lambda xi, Ai, Bi: lora_linear(xi, Wt, Ai, Bi, 2.0, backend="triton"), x, A, B, dy)
    unf = _fb(lambda xi, Ai, Bi: (torch.nn.functional.linear(xi, W).float() + (xi.float() @ Ai.t()) @ Bi.t()
                                  * 2.0).to(dtype), x, A, B, dy)
    y64, g64 = exact64(x.cpu(), W.cpu(), [A.cpu()], [B.cpu()], [2.0], dy=dy.cpu())
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (a, e, u) in enumerate(zip(got, [y64] + g64, unf)):
        assert_within_rule(a, e, u, f"{dtype} transposed weight, output {i}", atol=atol)


def test_triton_multi_adapter_matches_reference():
    x, W, _, _, _ = _case(2048, 1024, 768, 1, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    ads = [(torch.randn(r, 1024, device="cuda", generator=g) / 32, torch.randn(768, r, device="cuda", generator=g)
            * 0.1, s) for r, s in ((8, 1.0), (16, 2.0), (64, 0.5))]
    idx = torch.randint(-1, 3, (2048,), device="cuda", generator=g)
    got = lora_linear_multi(x, W, ads, idx, backend="triton")
    want = lora_linear_multi(x, W, ads, idx, backend="reference")
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("M,K,N,r", [(1000, 333, 1029, 7), (2048, 1024, 4096, 64), (48, 1024, 4096, 16)])
def test_backward_schedules_agree_and_deterministic_mode_reproduces(M, K, N, r):
    """The one-dy-read backward (lora_dy_kernel, dB by atomics; stored, at 48 rows: one row block) and the
    deterministic-mode schedule (shrink + wgrad) both stay within the rule; the deterministic one repeats bit
    for bit."""
    x, W, A, B, dy = _case(M, K, N, r, torch.bfloat16, seed=3)
    fn = lambda xi, Ai, Bi: lora_linear(xi, W, Ai, Bi, 2.0, dropout_p=0.1, seed=9, backend="triton")  # noqa: E731
    fused = _fb(fn, x, A, B, dy)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det1, det2 = _fb(fn, x, A, B, dy), _fb(fn, x, A, B, dy)
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(det1, det2):
        assert torch.equal(a, b)
    keep = dropout_mask(M, K, 9, 0.1, "cuda")
    y64, g64 = exact64(x.cpu(), W.cpu(), [A.cpu()], [B.cpu()], [2.0], keep=keep.cpu(), p=0.1, dy=dy.cpu())
    for i, (f, d, e) in enumerate(zip(fused, det1, [y64] + g64)):
        assert_within_rule(f, e, d, f"one-read vs deterministic, output {i}", atol=2e-2)


def test_triton_multi_adapter_backward_matches_reference():
    """Mixed-adapter rows through lora_dy_kernel's scale-table path (-1 rows, ranks 8/16/32)."""
    x, W, _, _, dy = _case(2048, 1024, 768, 1, torch.bfloat16, seed=4)
    g = torch.Generator(device="cuda").manual_seed(2)
    ads = [(torch.randn(r, 1024, device="cuda", generator=g) / 32, torch.randn(768, r, device="cuda", generator=g)
            * 0.1, s) for r, s in ((8, 1.0), (16, 2.0), (32, 0.5))]
    idx = torch.randint(-1, 3, (2048,), device="cuda", generator=g)
    outs = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for a in ads for t in a[:2]]
        it = iter(leaves[1:])
        y = lora_linear_multi(leaves[0], W, [(next(it), next(it), a[2]) for a in ads], idx, backend=backend)
        outs.append([y] + list(torch.autograd.grad(y, leaves, dy)))
    for i, (a, b) in enumerate(zip(*outs)):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=f"output {i}")


@pytest.mark.parametrize("M", [16, 4096])
def test_triton_nf4_both_paths_within_rule(M, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from fusedtune.nn import LoRALinear
    from fusedtune.ops import lora as lora_ops
    from fusedtune.ops.lora import nf4_path
    monkeypatch.setattr(lora_ops, "NF4_FUSED_MAX_ROWS", 256)   # 16 rows: in-GEMM dequant, 4096: the buffer
    lin = torch.nn.Linear(4096, 1024, bias=False, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, quant_type="nf4")
    q = q.cuda()
    layer = LoRALinear.from_linear(q, r=16, init_lora_weights=False, backend="triton")
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    import bitsandbytes.functional as bnbf
    Wd = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y64 = exact64(x.cpu(), Wd.cpu(), [A.detach().cpu()], [B.detach().cpu()], [layer.scaling["default"]])
    unf = (x @ Wd.t()).float() + (x.float() @ A.t()) @ B.t() * layer.scaling["default"]
    assert_within_rule(y, y64, unf.bfloat16(), f"nf4 {nf4_path(M, True)}", atol=2e-2)


@pytest.mark.parametrize("gather", [False, True])
def test_triton_nf4_in_gemm_split_k_backward_within_rule(gather, monkeypatch):
    """The in-GEMM NF4 dequant at 16 rows, forward and dX: split-K (float32 partials summed by the expand
    pass) with the contiguous byte-tile loads, and with per-element gathers; within the rule of the exact
    float64 product over bitsandbytes' own dequantized weight."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from fusedtune.nn import LoRALinear
    from fusedtune.ops import lora as lora_ops
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(lora_ops, "NF4_FUSED_MAX_ROWS", 256)
    monkeypatch.setattr(tk, "FORCE_GATHER_TILE", gather)
    N, K, M = 1024, 4096, 16
    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, quant_type="nf4")
    q = q.cuda()
    layer = LoRALinear.from_linear(q, r=16, init_lora_weights=False, backend="triton")
    nf4 = layer._nf4_weight()[0].state()
    assert tk._k_splits(M, N, K, "cuda") > 1 and tk._k_splits(M, K, N, "cuda") > 1      # forward and dX split
    assert [tk._nf4_vec(nf4, qs) for qs in ((K, 1), (1, K))] == ([0, 0] if gather else [1, 2])
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    y = layer(x)
    dx, = torch.autograd.grad(y, [x], dy)
    Wd = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    y64, g64 = exact64(x.detach().cpu(), Wd.cpu(), [A.cpu()], [B.cpu()], [s], dy=dy.cpu())
    xf = x.detach().float()
    unf_y = (x.detach() @ Wd.t()).float() + (xf @ A.t()) @ B.t() * s          # bf16 GEMM + float32 LoRA
    unf_dx = (dy @ Wd).float() + ((dy.float() @ B) * s) @ A
    assert_within_rule(y, y64, unf_y.bfloat16(), "nf4 in-GEMM forward", atol=2e-2)
    assert_within_rule(dx, g64[0], unf_dx.bfloat16(), "nf4 in-GEMM dX", atol=2e-2)


def test_expand_kernel_first_call_under_timed_autotuning():
    """lora_expand_kernel adds into C in place. Under timed autotuning (not the GPU tests' untimed mode) every
    config's timed runs must restore C (restore_value, as the shipped kernels have), else the first call of a
    shape adds the LoRA term once per timed launch: checked with a timed autotuner of the kernel, with and
    without restore_value."""
    import triton
    from fusedtune.triton_kernels import lora as tk
    assert tk.lora_expand_kernel.restore_value == ["c_ptr"] == tk.lora_expand_ieee_kernel.restore_value
    g = torch.Generator(device="cuda").manual_seed(0)
    M, N, R = 512, 1024, 16
    t = torch.randn(M, R, device="cuda", generator=g)
    B = torch.randn(N, R, device="cuda", generator=g)
    base = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    want = base.float() + t @ B.t()

    def first_call(restore: bool):
        cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 16}, num_warps=4, num_stages=1)
                for m, n in ((64, 64), (32, 128))]
        k = triton.autotune(configs=cfgs, key=["M", "N", "K", "R", "stride_qk"],
                            **({"restore_value": ["c_ptr"]} if restore else {}))(tk.lora_gemm_kernel.fn)
        c = base.clone()
        tk._launch(k, c, c, (0, 0), 1, t, B, B.stride(), None, c, tk.Dropout(0.0, 0), "tf32", None, None, None, 1)
        return c.float()
    torch.testing.assert_close(first_call(True), want, atol=0.15, rtol=2e-2)
    assert not torch.allclose(first_call(False), want, atol=0.15, rtol=2e-2)   # what restore_value prevents


@pytest.mark.parametrize("gather", [False, True])
def test_nf4_dequant_kernel_equals_bitsandbytes_on_the_gpu(gather, monkeypatch):
    """Both paths of the Triton dequant kernel (vector and per-element gather) give bitsandbytes' CUDA
    dequantization bit for bit, double-quantized NF4 to bf16."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from fusedtune.reference.nf4 import Nf4Weight
    from fusedtune.triton_kernels import lora as tk
    monkeypatch.setattr(tk, "FORCE_GATHER_DEQUANT", gather)
    w = (torch.randn(1024, 4096, device="cuda") * 0.02).bfloat16()
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    got = tk.nf4_dequant(Nf4Weight.from_bnb(q, st).state(), (1024, 4096), torch.bfloat16)
    assert torch.equal(got, bnbf.dequantize_4bit(q, st))


def test_forward_has_no_host_copy_and_captures_in_a_cuda_graph():
    """A single-adapter forward builds its scale table on the device (no blocking host-to-device copy per
    call): after a warm-up (autotuning) it captures in a CUDA graph and replays exactly."""
    x, W, A, B, _ = _case(512, 1024, 768, 16, torch.bfloat16, seed=6)
    fn = lambda: lora_linear(x, W, A, B, 2.0, backend="triton")   # noqa: E731
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    x.mul_(0.5)
    g.replay()
    assert torch.equal(out, fn())
