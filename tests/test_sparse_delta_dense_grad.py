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
    """The rule: 16-bit inputs, >= DENSE_MIN_TOKENS tokens, density >= the threshold of the SDDMM kernel it
    replaces on that capability; no GPU (capability None) never."""
    N = K = 4096
    one_pct = round(0.01 * N * K)
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    rule = lambda *a, **kw: delta_grad_schedule(*a, **kw)[0]  # noqa: E731
    assert rule(N, K, 4096, one_pct, bf16, (9, 0)) == "dense"
    assert rule(N, K, 4096, one_pct, f16, (10, 0)) == "dense"       # newer: sm_90's threshold
    assert rule(N, K, 4096, one_pct, f32, (9, 0)) == "sddmm"        # no float32-output GEMM gain
    assert rule(N, K, 4096, one_pct, bf16, None) == "sddmm"
    assert rule(N, K, sd.DENSE_MIN_TOKENS - 1, one_pct, bf16, (9, 0)) == "sddmm"
    assert rule(N, K, sd.DENSE_MIN_TOKENS, one_pct, bf16, (9, 0)) == "dense"
    assert rule(N, K, None, one_pct, bf16, (9, 0)) == "dense"       # tokens not known yet (the report)
    at = lambda d, cap, kern="cuda": rule(N, K, 4096, math.ceil(d * N * K), bf16, cap, kern)  # noqa: E731
    # sm_90, measured on an H200: the CUDA kernel's crossovers 0.34-0.41%, Triton's 0.10-0.18%
    assert (at(0.003, (9, 0)), at(0.0035, (9, 0))) == ("sddmm", "dense")
    assert (at(0.001, (9, 0), "triton"), at(0.0015, (9, 0), "triton")) == ("sddmm", "dense")
    assert (at(0.0069, (8, 0)), at(0.007, (8, 0))) == ("sddmm", "dense")     # estimated: 2x, 4x
    assert (at(0.0139, (8, 9)), at(0.014, (8, 9)), at(0.0139, (8, 6))) == ("sddmm", "dense", "sddmm")
    # the density is k / (N * K): a non-square weight
    assert rule(1024, 4096, 4096, math.ceil(0.0035 * 1024 * 4096), bf16, (9, 0)) == "dense"
    assert rule(1024, 4096, 4096, math.ceil(0.0035 * 1024 * 4096) - 1, bf16, (9, 0)) == "sddmm"


class _Sm90:
    major, minor = 9, 0


def test_auto_takes_dense_only_on_a_gpu_kernel_left_on_auto(monkeypatch):
    """choose_delta_grad: 'auto' goes dense only where the backend resolved to a GPU kernel on auto; a named
    backend (a test of the CUDA kernel, use_backend) keeps its kernel; 'sddmm' never goes dense."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _Sm90)
    k = 64 * 64 // 10
    pick = lambda mode, name, backend, k=k, T=4096: sd.choose_delta_grad(  # noqa: E731
        mode, name, backend, 64, 64, T, k, torch.bfloat16, "cpu")[0]
    assert pick("auto", "cuda", None) == pick("auto", "triton", None) == sd.DENSE
    assert pick("auto", "cuda", "cuda") == "cuda"
    assert pick("auto", "cpu", None) == "cpu"
    assert pick("sddmm", "cuda", None) == "cuda"
    assert pick("dense", "cpu", "cpu") == sd.DENSE
    assert pick("auto", "cuda", None, k=1) == "cuda"                 # low density
    assert pick("auto", "cuda", None, T=1) == "cuda"                 # few tokens
    with fusedtune.use_backend("cuda"):
        assert pick("auto", "cuda", None) == "cuda"


def test_the_layer_path_measures_density_over_its_own_weight(monkeypatch):
    """sparse_delta_linear decides on k / (out * in) of its weight: a 256 x 2048 weight at 2.5% is dense on
    sm_90 (k / in^2 would be 0.31%, below the threshold); 0.3% is not."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _Sm90)
    monkeypatch.setattr(sd._backend, "resolve", lambda *a, **kw: "cuda")
    names = []
    monkeypatch.setattr(sd, "_linear", lambda x, w, v, i, b, name: names.append(name) or x @ w.t())
    x, w = torch.zeros(512, 2048, dtype=torch.bfloat16), torch.zeros(256, 2048, dtype=torch.bfloat16)
    for dens in (0.025, 0.003):
        k = math.ceil(dens * w.numel())
        sparse_delta_linear(x, w, torch.zeros(k), torch.arange(k, dtype=torch.int32), check=False)
    assert names == [sd.DENSE, "cuda"]


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
    name = sd.sparse_delta_backend("cpu")["sddmm"]["backend"]     # cpu, or the reference without the extension
    assert f"delta grad: SDDMM at the 12 positions ({name});" in layer._fusedtune_report()["path"]


def test_report_on_a_gpu_says_which_schedule_auto_takes(monkeypatch):
    class Props:
        major, minor = 8, 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props)
    monkeypatch.setattr(sd._backend, "explain", lambda *a, **k: {"backend": "cuda", "why_not": {}})
    d = lambda k, dtype=torch.bfloat16, **kw: sd.describe_delta_grad("cpu", 100, 100, k, dtype, **kw)  # noqa: E731
    assert d(70).startswith("dW in float32 blocks") and ">= 0.70% on sm_80" in d(70)
    assert d(69).startswith("SDDMM at the 69 positions (cuda) (density 0.690% < 0.70%, where dense dW starts to "
                            "beat the cuda SDDMM on sm_80)")
    assert "16-bit inputs" in d(500, torch.float32)
    assert d(500, backend="cuda") == "SDDMM at the 500 positions (cuda) (backend 'cuda' named)"
    assert d(5, delta_grad="dense").endswith("(delta_grad='dense')")
