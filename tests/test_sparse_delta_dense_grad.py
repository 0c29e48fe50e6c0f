"""The delta gradient's dense schedule (dW in float32 blocks of rows, gathered at the k positions) and the
rule that picks it (delta_grad="auto": on a GPU, 16-bit inputs, enough tokens and density)."""
import math

import pytest
import torch

import fusedtune
from fusedtune.nn import SparseDeltaLinear
from fusedtune.ops import sparse_delta as sd
from fusedtune.ops.sparse_delta import delta_grad_schedule, sddmm, sparse_delta_linear


def _integer_problem(T, N, K, k, seed=0, dtype=torch.float32):
    """Small-integer dy and x: every sum of products is exact in float32 whatever its order, so any
    schedule must give the float64 reference's bits; a wrong block offset or gather gives other numbers."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(-3, 4, (T, N), generator=g).to(dtype)
    x = torch.randint(-3, 4, (T, K), generator=g).to(dtype)
    idx = torch.randperm(N * K, generator=g)[:k].sort().values.to(torch.int32)
    return dy, x, idx


def _expected(dy, x, idx):
    return (dy.double().t() @ x.double()).view(-1)[idx.long()].float()


@pytest.mark.parametrize("block_rows", [None, 1, 5, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_schedule_equals_the_reference_in_every_block_layout(block_rows, dtype, monkeypatch):
    T, N, K = 40, 37, 23
    dy, x, idx = _integer_problem(T, N, K, 300, dtype=dtype)
    # every block's first and last entries are among the positions (the edges of the row blocks)
    idx = torch.unique(torch.cat([idx, torch.tensor([0, K - 1, K, 5 * K - 1, 5 * K, 7 * K, N * K - 1],
                                                    dtype=torch.int32)])).to(torch.int32)
    if block_rows is not None:
        monkeypatch.setattr(sd, "DENSE_BLOCK_BYTES", 4 * K * block_rows)
    got = sddmm(dy, x, idx, schedule="dense")
    assert got.dtype == torch.float32 and got.shape == idx.shape
    assert torch.equal(got, _expected(dy, x, idx))


def test_dense_schedule_over_leading_dims_and_random_data():
    g = torch.Generator().manual_seed(1)
    dy, x = torch.randn(3, 5, 48, generator=g), torch.randn(3, 5, 72, generator=g)
    idx = torch.randperm(48 * 72, generator=g)[:400].sort().values.to(torch.int32)
    want = sddmm(dy, x, idx, backend="reference")
    got = sddmm(dy, x, idx, schedule="dense")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_backward_takes_the_schedule_asked_for(monkeypatch):
    """delta_grad='dense' on the layer and the op: the same gradients as the SDDMM (exact data), and the
    dense path really ran (counted); 'auto' on the CPU stays on the SDDMM."""
    T, N, K = 24, 16, 12
    dy, x, idx = _integer_problem(T, N, K, 40)
    lin = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-2, 3, (N, K)).float())
    calls = []
    real = sd._dense_delta_grad
    monkeypatch.setattr(sd, "_dense_delta_grad", lambda *a: calls.append(1) or real(*a))
    grads = {}
    for mode in ("sddmm", "dense", "auto"):
        layer = SparseDeltaLinear.from_linear(torch.nn.Linear(K, N).requires_grad_(False), indices=idx,
                                              delta_grad=mode)
        with torch.no_grad():
            layer.weight.copy_(lin.weight)
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(dy)
        grads[mode] = (layer.values.grad.clone(), xi.grad.clone())
        assert len(calls) == {"sddmm": 0, "dense": 1, "auto": 1}[mode], f"{mode}: only 'dense' runs it on the CPU"
    want = _expected(dy, x, idx)
    for mode, (dv, dx) in grads.items():
        assert torch.equal(dv, want), mode
        assert torch.equal(dx, grads["sddmm"][1]), mode


def test_auto_rule():
    """The rule: 16-bit inputs, >= DENSE_MIN_TOKENS tokens, density >= the capability's threshold; no GPU
    (capability None) never."""
    N = K = 4096
    one_pct = round(0.01 * N * K)
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert delta_grad_schedule(N, K, 4096, one_pct, bf16, (9, 0)) == "dense"
    assert delta_grad_schedule(N, K, 4096, one_pct, f16, (10, 0)) == "dense"    # newer: sm_90's threshold
    assert delta_grad_schedule(N, K, 4096, one_pct, f32, (9, 0)) == "sddmm"     # no float32-output GEMM gain
    assert delta_grad_schedule(N, K, 4096, one_pct, bf16, None) == "sddmm"
    assert delta_grad_schedule(N, K, sd.DENSE_MIN_TOKENS - 1, one_pct, bf16, (9, 0)) == "sddmm"
    assert delta_grad_schedule(N, K, sd.DENSE_MIN_TOKENS, one_pct, bf16, (9, 0)) == "dense"
    at = lambda d, cap: delta_grad_schedule(N, K, 4096, math.ceil(d * N * K), bf16, cap)  # noqa: E731
    assert (at(0.003, (9, 0)), at(0.005, (9, 0))) == ("sddmm", "dense")      # the measured crossover
    assert (at(0.009, (8, 0)), at(0.01, (8, 0))) == ("sddmm", "dense")
    assert (at(0.019, (8, 9)), at(0.02, (8, 9)), at(0.019, (8, 6))) == ("sddmm", "dense", "sddmm")


def test_auto_takes_dense_only_on_a_gpu_kernel_left_on_auto(monkeypatch):
    """_pick: 'auto' goes dense only where the backend resolved to a GPU kernel on auto; a named backend
    (a test of the CUDA kernel, use_backend) keeps its kernel; 'sddmm' never goes dense."""
    class Props:
        major, minor = 9, 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props)
    x = torch.zeros(4096, 64, dtype=torch.bfloat16)
    k = 64 * 64 // 10
    assert sd._pick("auto", "cuda", None, (4096, 64), x, k) == sd.DENSE
    assert sd._pick("auto", "triton", None, (4096, 64), x, k) == sd.DENSE
    assert sd._pick("auto", "cuda", "cuda", (4096, 64), x, k) == "cuda"
    assert sd._pick("auto", "cpu", None, (4096, 64), x, k) == "cpu"
    assert sd._pick("sddmm", "cuda", None, (4096, 64), x, k) == "cuda"
    assert sd._pick("dense", "cpu", "cpu", (4096, 64), x, k) == sd.DENSE
    assert sd._pick("auto", "cuda", None, (4096, 64), x, 1) == "cuda"          # low density
    with fusedtune.use_backend("cuda"):
        assert sd._pick("auto", "cuda", None, (4096, 64), x, k) == "cuda"


def test_bad_schedule_names_are_refused():
    dy, x, idx = _integer_problem(4, 3, 5, 4)
    with pytest.raises(ValueError, match="delta_grad must be one of 'auto', 'sddmm', 'dense'"):
        sddmm(dy, x, idx, schedule="gemm")
    with pytest.raises(ValueError, match="delta_grad must be one of"):
        sparse_delta_linear(x, torch.zeros(3, 5), torch.zeros(4), idx, delta_grad="Dense")
    with pytest.raises(ValueError, match="delta_grad must be one of"):
        SparseDeltaLinear.from_linear(torch.nn.Linear(5, 3), delta_grad="")


def test_dense_schedule_opcheck_and_compile():
    dy, x, idx = _integer_problem(8, 6, 10, 12)
    torch.library.opcheck(torch.ops.fusedtune.sddmm.default, (dy, x, idx, sd.DENSE))
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(10, 6), indices=idx, delta_grad="dense")
    xi = x.clone().requires_grad_(True)
    torch.compile(layer, backend="aot_eager", fullgraph=True)(xi).backward(dy)
    assert torch.equal(layer.values.grad, _expected(dy, x, idx))


def test_report_names_the_schedule():
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(10, 6), density=0.2, delta_grad="dense")
    assert "dW in float32 blocks" in layer._fusedtune_report()["path"]
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(10, 6), density=0.2)
    assert "SDDMM at the 12 positions (cpu)" in layer._fusedtune_report()["path"]


def test_report_on_a_gpu_says_which_schedule_auto_takes(monkeypatch):
    class Props:
        major, minor = 8, 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props)
    monkeypatch.setattr(sd._backend, "explain", lambda *a, **k: {"backend": "cuda", "why_not": {}})
    d = lambda k, dtype=torch.bfloat16, **kw: sd.describe_delta_grad("cpu", 100, 100, k, dtype, **kw)  # noqa: E731
    assert d(100).startswith("dW in float32 blocks") and ">= 1.00% on sm_80" in d(100)
    assert d(99).startswith("SDDMM at the 99 positions (cuda) (density 0.990% < 1.00%")
    assert "16-bit inputs" in d(500, torch.float32)
    assert d(500, backend="cuda") == "SDDMM at the 500 positions (cuda)"         # a named backend keeps its kernel
    assert d(5, delta_grad="dense").endswith("(delta_grad='dense')")
