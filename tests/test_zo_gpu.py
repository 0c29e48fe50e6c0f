"""zo on a GPU: cuda and triton kernels bit-identical to the reference and to the CPU kernel,
unaligned and many-tensor launches, CUDA-graph capture, no host sync in a MeZO step."""
import pytest
import torch

import fusedtune
from fusedtune.ops import zo_apply_
from fusedtune.optim import MeZO
from fusedtune.testing import assert_same_bits, check_backends

pytestmark = pytest.mark.gpu


def _mixed(device, n=60):
    g = torch.Generator().manual_seed(2)
    ts = []
    for i in range(n):  # many tensors in one grid; odd sizes; all three dtypes
        dt = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        ts.append((torch.randn(1 + 977 * i, generator=g) * 0.05).to(dt).to(device))
    big = torch.randn(3 * 32768 + 13, generator=g).bfloat16().to(device)
    base = torch.randn(2 * 4099, generator=g).bfloat16().to(device)
    wide = torch.randn(3 * 32768 + 5, generator=g).to(device)   # float32: whole chunks of an unaligned view
    # disjoint unaligned views (byte offsets 2 and 8204; 4); zo_apply_ refuses views sharing a data_ptr
    return ts + [big, base[1:4099], base[4099 + 3:2 * 4099 - 8], wide[1:]]


@pytest.mark.parametrize("kw", [dict(seeds=[3], coeffs=[1e-3]),
                                dict(seeds=[3], coeffs=[-1e-3], undo=([3], [1e-3])),  # MeZO's one-draw path
                                dict(seeds=[3, 4], coeffs=[1e-3, -1e-5], undo=([3], [2e-3]), alpha=0.99),
                                dict(seeds=[8], coeffs=[1e-4], rounding="stochastic", rounding_seed=5,
                                     noise="rademacher"),
                                # MeZO's one-draw path with stochastic rounding and a decay; one Rademacher seed
                                dict(seeds=[6], coeffs=[-2e-3], undo=([6], [1e-3]), rounding="stochastic",
                                     rounding_seed=9, alpha=0.999),
                                dict(seeds=[7], coeffs=[5e-4], noise="rademacher"),
                                # a folded MeZO's last pass: the same-seed undo plus the next seed
                                dict(seeds=[6, 7], coeffs=[-2e-3, 1e-3], undo=([6], [-1e-3]), rounding="stochastic",
                                     rounding_seed=9, alpha=0.999),
                                dict(seeds=[6, 7], coeffs=[-2e-3, 1e-3], undo=([6], [-1e-3])),
                                # the generic path in each kernel: two seeds undoing a third (the MODE_NEXT
                                # kernel), and an undo of two seeds (the common kernel)
                                dict(seeds=[3, 4], coeffs=[1e-3, -1e-5], undo=([5], [2e-3]), alpha=0.99),
                                dict(seeds=[9, 10], coeffs=[-1e-6, 1e-3], undo=([9, 4], [-1e-3, 2e-3]))])
def test_gpu_backends_and_cpu_bit_identical(kw):
    if kw.get("rounding") == "stochastic":   # float16's stochastic rounding at every edge too
        from test_zo_apply import fp16_edge_values
        mk = lambda d: _mixed(d) + [fp16_edge_values().to(d)]  # noqa: E731
    else:
        mk = _mixed

    def run(b):
        ts = mk("cuda")
        zo_apply_(ts, backend=b, **kw)
        return ts
    checked = check_backends(run, "cuda", exact=True)
    assert "cuda" in checked and "triton" in checked
    cpu = mk("cpu")
    zo_apply_(cpu, **kw)
    assert_same_bits([t.cpu() for t in run("cuda")], cpu, "cuda vs cpu")


@pytest.mark.parametrize("coeff", [16.0, 40.0, -40.0])
def test_float16_nearest_rounding_at_the_overflow_edge_cuda_equals_cpu(coeff):
    """The hardware's cvt.rn (common.h, sm_80+) at float16's edges under nearest rounding: values pushed past
    65504 (to inf or back), subnormals, zeros, inf and NaN, one-seed and same-seed paths, bit-equal to the CPU
    kernel's integer rounding. (A NaN's sign is the hardware's.)"""
    from test_zo_apply import fp16_edge_values
    for kw in (dict(seeds=[11], coeffs=[coeff]), dict(seeds=[11], coeffs=[coeff], undo=([11], [coeff / 2]))):
        cpu = fp16_edge_values()
        gpu = cpu.cuda()
        zo_apply_(cpu, **kw)
        zo_apply_(gpu, backend="cuda", **kw)
        got, want = gpu.cpu(), cpu
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), kw
        assert torch.isinf(want).sum() > 2 * 64          # values were pushed past the edge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_undo_neighbour_search_cuda_equals_cpu_over_every_pattern(dtype):
    """The undo's one-sided neighbour search (zo_math.h invert) on the GPU: every non-NaN 16-bit
    pattern and its forward image under dyadic deltas (ties, both zeros, subnormals), whole chunks, bit-equal
    to the CPU kernel. (A NaN's sign is the hardware's: x86 keeps it, the GPU gives +NaN.)"""
    from fusedtune.reference import zo as zref
    every = torch.arange(1 << 16, dtype=torch.int64)
    every = every[~torch.isnan(zref.from_bits(every, dtype))]
    for pc in (2.0 ** -25, -3 * 2.0 ** -26, 2.0 ** -9, 3 * 2.0 ** -12, -5 * 2.0 ** -134):
        start = zref.as_dtype(every, dtype)
        image = start.clone()
        zo_apply_(image, [4], [pc], noise="rademacher", backend="reference")
        x = torch.cat([start, image])
        cpu, gpu = x.clone(), x.cuda()
        zo_apply_(cpu, [4], [0.0], undo=([4], [pc]), noise="rademacher", backend="cpu")
        zo_apply_(gpu, [4], [0.0], undo=([4], [pc]), noise="rademacher", backend="cuda")
        assert_same_bits([gpu.cpu()], [cpu], f"undo of {pc}, cuda vs cpu")


def test_more_tensors_than_one_launch_holds():
    def mk(d):
        g = torch.Generator().manual_seed(4)
        return [torch.randn(5 + i % 7, generator=g).bfloat16().to(d) for i in range(700)]
    gpu, cpu = mk("cuda"), mk("cpu")
    zo_apply_(gpu, [1, 2], [1e-3, -2e-3], backend="cuda", undo=([1], [5e-4]))
    zo_apply_(cpu, [1, 2], [1e-3, -2e-3], undo=([1], [5e-4]))
    assert_same_bits([t.cpu() for t in gpu], cpu, "700 tensors, cuda vs cpu")


def test_cuda_graph_capture_with_device_coeffs():
    w = (torch.randn(1 << 20, device="cuda") * 0.02).bfloat16()
    ref = w.clone()
    seeds = torch.tensor([7], device="cuda")
    coeffs = torch.tensor([1e-3], device="cuda")
    zo_apply_(w.clone(), seeds, coeffs, backend="cuda", rounding_seed=1)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        zo_apply_(w, seeds, coeffs, backend="cuda", rounding_seed=1)
    coeffs.fill_(-2e-3)
    graph.replay()
    torch.cuda.synchronize()
    zo_apply_(ref, [7], [-2e-3], backend="reference")
    assert torch.equal(w, ref)


def test_capture_refuses_host_values():
    w = torch.zeros(1024, device="cuda")
    zo_apply_(w, torch.tensor([1], device="cuda"), torch.tensor([1.0], device="cuda"), backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="under CUDA-graph capture pass seeds, coeffs"):
        with torch.cuda.graph(graph):
            zo_apply_(w, [1], [1.0], backend="cuda")


def test_mezo_step_has_no_host_sync():
    m = torch.nn.Linear(256, 256).cuda().bfloat16()
    x = torch.randn(8, 256, device="cuda").bfloat16()
    opt = MeZO(m.parameters(), lr=1e-3, backend="cuda")
    opt.step(lambda: m(x).float().pow(2).mean())  # warm up (allocations, table upload)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(lambda: m(x).float().pow(2).mean())
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_mezo_step_allocates_nothing_parameter_sized():
    params = [torch.nn.Parameter(torch.randn(4096, 4096, device="cuda").bfloat16())]
    opt = MeZO(params, lr=1e-3, backend="cuda")
    opt.step(lambda: params[0][0, 0].float())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step(lambda: params[0][0, 0].float())
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20


def test_doctor_sees_gpu():
    b = fusedtune.backends()
    assert b["cuda"]["available"], b["cuda"]["why"]
    assert b["triton"]["available"], b["triton"]["why"]
