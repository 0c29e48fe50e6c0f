"""The lora benchmark family (python -m fusedtune bench lora) on the CPU: tiny shapes, so this tests the
framework (rows, baselines in the same run, ratios, flop counts), not performance."""
import csv
import math

import pytest
import torch

from fusedtune import bench
from fusedtune.bench import core
from fusedtune.bench import lora as lora_bench


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_lora")
    rc = bench.main(["lora", "--cpu", "--quick", "--out", str(out)])
    with open(out / "lora.csv", newline="") as f:
        r = csv.DictReader(f)
        return rc, r.fieldnames, list(r)


def test_family_is_discovered():
    assert "lora" in bench.families()


def test_cpu_run_rows(cpu_run):
    rc, header, rows = cpu_run
    assert rc == 0 and header[: len(core.COLUMNS)] == core.COLUMNS
    gemm = [r for r in rows if r["kernel"] in ("lora fwd", "lora fwd+bwd")]
    assert len(gemm) == len(lora_bench.TINY) * (2 * 3 + 1)      # fwd and fwd+bwd x 3 baselines, + determ.
    assert {r["baseline"] for r in gemm} >= {"base GEMM alone (frozen W)",
                                            "cuBLAS + addmm_ (unsloth's method, bf16 adapters)",
                                            "deterministic mode (dy read twice: u, then dB)"}
    assert any(r["baseline"].startswith("peft") for r in gemm)
    kinds = {r["kernel"] for r in rows}
    assert "lora fwd, 4 adapters in one batch" in kinds and "qlora fwd+bwd" in kinds
    qlora = [r for r in rows if r["kernel"] == "qlora fwd+bwd"]     # float32 tensors here: one adapter dtype
    assert {r["baseline"] for r in qlora} == {"bitsandbytes Linear4bit + peft LoRA (float32 adapters, peft's default)"}
    assert len(qlora) == 2 * 2                                      # 2 token counts x both NF4 schedules
    dora = [r for r in rows if r["kernel"].startswith("dora")]
    assert [(r["kernel"], r["baseline"]) for r in dora] == [
        ("dora fwd+bwd", "peft DoRA layer"), ("dora fwd+bwd", "fusedtune plain LoRA layer"),
        ("dora fwd (inference)", "peft DoRA layer")]
    assert all(float(r["time_ms"]) > 0 and float(r["baseline_ms"]) > 0 for r in dora)
    fused = [r for r in rows if "fuse" in r["kernel"]]
    assert [(r["kernel"], r["baseline"]) for r in fused] == [
        ("lora fwd+bwd, peft layer fused in place", "peft LoRA layer"),
        ("lora fwd+bwd, peft layer fused in place", "fusedtune LoRALinear over the same parameters"),
        ("fuse_peft per-call check (host)", "peft layer forward at 1 token (host)")]
    conv = [(r["kernel"], r["baseline"]) for r in rows if "Conv1D" in r["kernel"]]
    assert conv == [("lora fwd+bwd, Conv1D base (W stored transposed)", "LoRALinear over nn.Linear (W as [out, in])"),
                    ("lora fwd+bwd, Conv1D base (W stored transposed)", "peft LoRA layer (fan_in_fan_out)")]
    host = [(r["kernel"], r["baseline"]) for r in rows if r["kernel"].endswith("per call (host)")]
    assert host == [(f"LoRALinear {w} per call (host)", b) for w in ("fwd+bwd", "fwd")
                    for b in ("the same through the torch.library dispatcher", "peft LoRA layer")]
    bwd = [r for r in rows if r["kernel"] == "lora bwd"]
    step = [r for r in rows if r["kernel"] == "lora step"]
    assert len(bwd) == len(lora_bench.TINY) * 3                  # vs the dX GEMM, peft, unsloth's backward
    assert len(step) == len(lora_bench.TINY) * 2                 # vs the base GEMMs and peft's step
    assert any(r["baseline"].startswith("peft") for r in step)
    from fusedtune.bench.lora_kernels import KERNEL as PER_KERNEL
    assert any(r["kernel"] == PER_KERNEL for r in rows)     # no baseline: checked in test_per_kernel_rows_assemble
    for r in rows:
        if r["time_ms"] in ("nan", "") or r["kernel"] == PER_KERNEL:
            continue
        med, base = float(r["time_ms"]), float(r["baseline_ms"])
        assert med > 0 and math.isclose(float(r["ratio"]), base / med, rel_tol=1e-4)  # CSV keeps 6 digits
        assert "CPU framework check" in r["note"]


def test_flop_count():
    T, N, K, r = 8, 5, 3, 2
    fwd = 2 * T * N * K + 2 * T * r * (K + N)
    assert lora_bench._flops(T, N, K, r, False) == fwd
    # backward: the dX GEMM (2TNK), u = dy.B and u.A (2Tr(N+K)), dA and dB (2Tr(K+N))
    # (the forward's LoRA FLOPs were counted twice: 2 * fwd)
    assert lora_bench._flops(T, N, K, r, True) == fwd + 2 * T * N * K + 4 * T * r * (K + N)


def test_timed_step_is_a_training_step():
    """The 'lora step' row times a real step: the gradients it leaves are the layer's own, and AdamW
    moved both adapters."""
    import torch
    from fusedtune.ops import lora_linear

    g = torch.Generator().manual_seed(0)
    T, N, K, r = 16, 12, 10, 4
    W = torch.randn(N, K, generator=g)
    A = torch.nn.Parameter(torch.randn(r, K, generator=g))
    B = torch.nn.Parameter(torch.randn(N, r, generator=g))
    xg = torch.randn(T, K, generator=g).requires_grad_()
    dy = torch.randn(T, N, generator=g)
    layer = lambda v: lora_linear(v, W, A, B, 2.0)  # noqa: E731
    gx, gA, gB = torch.autograd.grad(layer(xg), [xg, A, B], dy)
    A0, B0 = A.detach().clone(), B.detach().clone()
    lora_bench._train_step(layer, xg, A, B, dy, on_gpu=False)()
    assert torch.equal(xg.grad, gx) and torch.equal(A.grad, gA) and torch.equal(B.grad, gB)
    assert (A != A0).any() and (B != B0).any()


def test_graph_replay_rows_assemble(monkeypatch):
    """The CUDA-graph replay section's rows (tiny shapes on the CPU, the capture replaced by a plain call):
    ours against our eager call, peft's replay, unsloth's, the base GEMMs' and our other schedule's, with
    ratios taken from those timings."""
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora_tma
    calls, limits = [], []

    def timer(fn):
        fn()
        calls.append(fn)
        return (float(len(calls)),) * 3     # distinct times, so each ratio names its two timings
    monkeypatch.setattr(lora_bench, "QUICK", lora_bench.TINY)
    monkeypatch.setattr(lora_bench, "GRAPH_TOKENS", 8)
    monkeypatch.setattr(lora_bench, "_graph_timer", lambda t, fn: t(fn))
    import fusedtune.ops as ops
    real = ops.lora_linear

    def recorded(*a, **k):      # what the schedule scope set while our call ran
        limits.append((lora_triton.CUBLAS_MIN_WORK, lora_tma.ENABLED))
        return real(*a, **k)
    monkeypatch.setattr(ops, "lora_linear", recorded)
    rows = lora_bench.graph_rows(timer, True, "cpu", quick=True)
    assert [r["baseline"] for r in rows] == ["the same call in eager mode (kernels + host)",
                                             "peft LoRA Linear (CUDA graph replay; float32 adapters, no autocast)",
                                             "cuBLAS + addmm_ (unsloth's method, CUDA graph replay)",
                                             "base GEMMs alone (forward + dX, CUDA graph replay)",
                                             "cublas schedule (CUDA graph replay)"]
    # the order the section times them in: ours on each schedule (no GPU here: no fused-tma), the others, eager
    ours, cublas, peft, base, uns, eager = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
    assert [r["time_ms"] for r in rows] == [ours] * 5
    assert [r["ratio"] for r in rows] == [eager / ours, peft / ours, uns / ours, base / ours, cublas / ours]
    assert all(r["kernel"] == "lora fwd+bwd (CUDA graph replay)" for r in rows)
    assert "LoRA costs -75.0% over the base" in rows[3]["note"]     # ours 1.0 against the base GEMMs 4.0
    # the two schedules' timings ran forced (fused: no cuBLAS; cublas: always), the eager call as configured
    assert limits == [(2**62, False), (0, False), (lora_triton.CUBLAS_MIN_WORK, lora_tma.ENABLED)]


def test_graph_replay_rows_skip_without_a_gpu():
    rows = lora_bench.graph_rows(lambda fn: (1.0,) * 3, False, "cpu", quick=True)
    assert len(rows) == 1 and rows[0]["note"].startswith("skipped")


def test_per_kernel_rows_assemble():
    """The per-kernel section on the CPU (torch's CPU ops stand in for kernels): each call's listed entries
    and an "all" row whose time is the sum over every entry, listed or not; shares that add up."""
    from fusedtune.bench import lora_kernels
    rows = lora_kernels.breakdown_rows(False, "cpu", quick=True)
    assert {r["kernel"] for r in rows} == {lora_kernels.KERNEL}
    whos = [r["baseline"] for r in rows if r["note"].startswith("all ")]
    assert whos == ["ours", "cuBLAS + addmm_ (unsloth's method)"]
    for who in whos:
        mine = [r for r in rows if r["baseline"] == who]
        listed, total = mine[:-1], mine[-1]["time_ms"]
        assert 0 < len(listed) <= lora_kernels.TOP and all(r["time_ms"] > 0 for r in listed)
        assert sum(r["time_ms"] for r in listed) <= total * (1 + 1e-9)
        assert [r["time_ms"] for r in listed] == sorted((r["time_ms"] for r in listed), reverse=True)
        assert any("aten::mm" in r["note"] or "aten::addmm" in r["note"] for r in listed)   # GEMMs were seen


def test_a_failing_or_untaken_schedule_is_a_skipped_row(monkeypatch):
    """On a GPU the LoRA GEMMs section times every schedule: one other than the default that raises, or a
    fused-tma timing in which the TMA kernel never ran, becomes a skipped row (the section keeps the others);
    the default schedule's failure is the section's."""
    from fusedtune.triton_kernels import lora_tma

    def timed(timer, sched, *args):
        if sched == "cublas":
            raise RuntimeError("cuBLAS refused")
        return (1.0,) * 4
    monkeypatch.setattr(lora_bench, "_time_ours", timed)
    ours, skipped = lora_bench._time_schedules(None, ["fused", "cublas", "fused-tma"], True, *([None] * 7))
    assert list(ours) == ["fused"]
    assert [r["kernel"] for r in skipped] == ["lora fwd+bwd (cublas schedule)", "lora fwd+bwd (fused-tma schedule)"]
    assert "cuBLAS refused" in skipped[0]["note"] and "not taken" in skipped[1]["note"]

    def taken(timer, sched, *args):        # a fused-tma timing that launched the kernel is kept
        lora_tma.launches += sched == "fused-tma"
        return (1.0,) * 4
    monkeypatch.setattr(lora_bench, "_time_ours", taken)
    ours, skipped = lora_bench._time_schedules(None, ["fused", "fused-tma"], True, *([None] * 7))
    assert list(ours) == ["fused", "fused-tma"] and skipped == []
    monkeypatch.setattr(lora_bench, "_time_ours", timed)
    with pytest.raises(RuntimeError, match="cuBLAS refused"):
        lora_bench._time_schedules(None, ["cublas", "fused"], True, *([None] * 7))


def test_a_skipped_opt_in_schedule_is_not_timed(monkeypatch):
    """FUSEDTUNE_BENCH_SKIP (bench/gpu_check.sh sets it when the kernel's GPU tests failed) leaves fused-tma out."""
    from fusedtune.ops import lora_triton
    from fusedtune.triton_kernels import lora_tma
    monkeypatch.setattr(lora_tma, "available", lambda device: True)
    monkeypatch.setattr(lora_triton, "schedule", lambda *a: "fused")
    monkeypatch.delenv("FUSEDTUNE_BENCH_SKIP", raising=False)
    assert lora_bench._schedules(64, 64, 64, "cpu") == ["fused", "cublas", "fused-tma"]
    monkeypatch.setenv("FUSEDTUNE_BENCH_SKIP", "cuda-mma, fused-tma")
    assert lora_bench._schedules(64, 64, 64, "cpu") == ["fused", "cublas"]
    monkeypatch.setattr(lora_tma, "ENABLED", True)     # not the default either
    assert lora_bench._schedules(64, 64, 64, "cpu") == ["fused", "cublas"]


def test_autocast_rows_time_both_sides_under_autocast_and_agree():
    """peft was timed only with float32 adapters and no autocast (its LoRA branch in float32); under autocast
    (Trainer(bf16=True)) it runs in bf16: a row times both sides there (found by review)."""
    torch.manual_seed(0)
    T, N, K, r, s = 8, 16, 12, 4, 2.0
    x, W, dy = torch.randn(T, K), torch.randn(N, K) / 4, torch.randn(T, N)
    A, B = torch.nn.Parameter(torch.randn(r, K) / 4), torch.nn.Parameter(torch.randn(N, r) / 4)
    xg = x.requires_grad_()
    pe = lora_bench._peft_layer(W, None, A, B, r, int(s * r))
    seen = []

    def timer(fn):
        seen.append(fn())
        return (1.0, 1.0, 1.0)
    rows = lora_bench._autocast_rows(timer, "tiny", xg, W, A, B, s, dy, pe, False, None, T, N, K, r)
    assert [r_["baseline"] for r_ in rows] == ["peft LoRA Linear under bf16 autocast"]
    assert "checked against it: max rel error" in rows[0]["note"] and "DIFFER" not in rows[0]["note"]
    ours, theirs = seen[-2:]
    for a, b in zip(ours, theirs):      # dX, dA, dB of both under bf16 autocast: bf16 rounding apart
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_agreement_is_cores_and_keeps_its_note():
    """bench/core.agreement (moved from lora.py, where the LoRA rows use it): the same note at the default
    tolerance; a NaN, another shape or another count of results is flagged too; another tolerance is said."""
    assert lora_bench.agreement is core.agreement
    a = torch.tensor([1.0, -2.0, 4.0])
    assert core.agreement((a, 2 * a), (a * 1.001, 2 * a)) == "checked against it: max rel error 1.0e-03"
    assert core.agreement(a * 1.05, a) == "checked against it: max rel error 5.0e-02 -- RESULTS DIFFER"
    assert core.agreement(torch.zeros(3), a).endswith("max rel error 1.0e+00 -- RESULTS DIFFER")
    assert core.agreement((a, a.clone().fill_(float("nan"))), (a, a)).endswith("nan -- RESULTS DIFFER")
    assert core.agreement(a[:2], a).endswith("shape (2,) against (3,) -- RESULTS DIFFER")
    assert core.agreement((a,), (a, a)).endswith("1 results against 2 -- RESULTS DIFFER")
    assert core.agreement(a * 1.05, a, tol=0.1, why="x") == \
        "checked against it: max rel error 5.0e-02 (tolerance 1.0e-01: x)"
    assert core.sqnr_agreement(a, a) == "checked against it: SQNR inf dB (FP8 rounding; flagged below 20 dB)"
    assert core.sqnr_agreement(a * 1.01, a).startswith("checked against it: SQNR 40.0 dB")
    assert core.sqnr_agreement(torch.zeros(3), a).endswith("SQNR 0.0 dB (FP8 rounding; flagged below 20 dB)"
                                                           " -- RESULTS DIFFER")


def test_from_same_start_restores_between_runs():
    t, w = torch.zeros(4), torch.zeros(6)
    idx = torch.tensor([1, 3])
    state = [t, (lambda: w.index_select(0, idx), lambda v: w.index_copy_(0, idx, v))]
    got = core.from_same_start(state, lambda: (t.add_(1), w.add_(2)), lambda: t.add_(3))
    assert [g.tolist() for g in got[0]] == [[1.0] * 4, [2.0, 2.0]]
    assert [g.tolist() for g in got[1]] == [[3.0] * 4, [0.0, 0.0]]
    assert t.tolist() == [0.0] * 4 and w.index_select(0, idx).tolist() == [0.0, 0.0]
