"""The sparse_delta benchmark family (python -m fusedtune bench sparse_delta) on the CPU: tiny shapes,
so this tests the framework and the accounting (deltas, bytes touched, trainable elements), not
performance."""
from __future__ import annotations

import csv
import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from fusedtune import bench  # noqa: E402
from fusedtune.bench import core  # noqa: E402
from fusedtune.bench import sparse_delta as sd_bench  # noqa: E402
from fusedtune.nn import SparseDeltaLinear  # noqa: E402

from fakes import CallOnceTimer  # noqa: E402

SDDMM = "sddmm delta gradient"
DENSE = "delta gradient (dense schedule: float32 dW blocks + gather)"
OPT = "SparseDeltaAdamW step"
OP = "sparse_adamw_ op (prebuilt lists)"
COUNTED = "SparseDeltaAdamW step after regrowth (counts, 1 in 5 young)"
STEP = "sparse_delta training step (1% deltas)"

# the tiny shapes, written out here rather than read from the module
TINY_GEMMS = [(64, 64), (176, 64), (64, 176)]            # (out, in), 256 tokens
TINY_LAYER = [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176)]  # q k v o gate up down


def _k(out_f, in_f, density):
    return max(1, round(density * out_f * in_f))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sparse_delta")
    rc = bench.main(["sparse_delta", "--cpu", "--quick", "--out", str(out)])
    with open(out / "sparse_delta.csv", newline="") as f:
        r = csv.DictReader(f)
        header, rows = r.fieldnames, list(r)
    return rc, out, header, rows


def test_family_is_discovered():
    assert "sparse_delta" in bench.families()


def test_cpu_run_writes_the_rows_and_columns(cpu_run):
    rc, out, header, rows = cpu_run
    assert rc == 0
    assert header[: len(core.COLUMNS)] == core.COLUMNS
    assert {"k", "gathered_bytes", "useful_flops", "bytes_per_delta", "bytes_touched", "achieved_gbps",
            "peak_mem_bytes", "opt_state_bytes", "trainable_elems", "lora_same_budget_rank"} <= set(header)
    host = [r for r in rows if r["kernel"].endswith("per call (host)")]
    assert [(r["kernel"], r["baseline"]) for r in host] == [
        (f"SparseDeltaLinear (1%) {w} per call (host)", b) for w in ("fwd+bwd", "fwd")
        for b in ("the same through the torch.library dispatcher", "nn.Linear")]
    assert all(r["note"].startswith(sd_bench.CPU_NOTE) and float(r["time_ms"]) > 0 for r in host)
    rows = [r for r in rows if r not in host]
    kernels = [r["kernel"] for r in rows]
    assert kernels.count(SDDMM) == kernels.count(DENSE) == 9            # 3 shapes x 3 densities
    assert kernels.count(OPT) == kernels.count(OP) == kernels.count(COUNTED) == 1
    assert kernels.count(STEP) == 2                                      # vs full FT, vs LoRA
    assert len(rows) == 23
    for r in rows:
        assert r["gpu_name"] == "cpu" and r["torch"] == torch.__version__ and r["date"].endswith("Z")
        med, p20, p80, base = (float(r[k]) for k in ("time_ms", "p20_ms", "p80_ms", "baseline_ms"))
        assert 0 < p20 <= med <= p80 < 60_000 and base > 0
        assert math.isclose(float(r["ratio"]), base / med, rel_tol=1e-3)
        assert float(r["roofline_pct"]) > 0
        assert r["note"].startswith(sd_bench.CPU_NOTE)
        assert "goal" not in r["note"] and not re.search(r"\bmet\b", r["note"])   # no verdicts on the CPU
        assert r["baseline"] and r["baseline"] != "-"
    assert (out / "sparse_delta.png").stat().st_size > 1000


def test_sddmm_rows_count_the_gathered_bytes_and_useful_flops(cpu_run):
    _, _, _, rows = cpu_run
    got = {(r["shape"].split(":")[1].split(",")[0].strip(), float(r["density"]), r["kernel"]): r for r in rows
           if r["kernel"] in (SDDMM, DENSE)}
    want = {(f"W {o}x{i}", d, kern) for o, i in TINY_GEMMS for d in (0.003, 0.01, 0.024) for kern in (SDDMM, DENSE)}
    assert set(got) == want
    for (w, d, kern), r in got.items():
        o, i = (int(s) for s in w[2:].split("x"))
        k, T = _k(o, i, d), 256
        assert int(r["k"]) == k and int(r["tokens"]) == T and f"(k={k})" in r["shape"]
        assert int(r["gathered_bytes"]) == 2 * T * k * 2                # a dy and an x column per index, bf16
        assert int(r["useful_flops"]) == 2 * T * k
        s = float(r["time_ms"]) * 1e-3
        assert math.isclose(float(r["gathered_gbps"]), 4 * T * k / s / 1e9, rel_tol=1e-3)
        assert r["backend"] == ("cpu" if kern == SDDMM else "dense") and r["baseline"].startswith("dense dW GEMM")


def _independent_bytes():
    """36 B per delta: delta r/w, grad, two fp32 moments r/w, bf16 base, int32 index, bf16 weight write;
    k counted by building the layers with SparseDeltaLinear.from_linear itself."""
    k = 0
    for o, i in TINY_LAYER * 2:
        lin = torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
        k += SparseDeltaLinear.from_linear(lin, density=0.01, seed=0).indices.numel()
    per = (4 + 4) + 4 + 2 * (4 + 4) + 2 + 4 + 2
    return k, per


def test_bytes_per_delta_is_36():
    assert _independent_bytes()[1] == 36 == sd_bench.BYTES_PER_DELTA


def test_optimizer_rows_match_the_independent_byte_count(cpu_run):
    _, _, _, rows = cpu_run
    k, per = _independent_bytes()
    assert k == sum(_k(o, i, 0.01) for o, i in TINY_LAYER * 2)
    for name, per in ((OPT, per), (OP, per), (COUNTED, per + 8)):    # counts: + int32 read and write
        r = next(r for r in rows if r["kernel"] == name)
        assert int(r["k"]) == k and f"{k} deltas" in r["shape"] and "14 tensors" in r["shape"]
        assert int(r["bytes_per_delta"]) == per
        assert int(r["bytes_touched"]) == per * k
        med, base = float(r["time_ms"]), float(r["baseline_ms"])
        assert math.isclose(float(r["achieved_gbps"]), per * k / (med * 1e-3) / 1e9, rel_tol=1e-4)
        assert math.isclose(float(r["baseline_gbps"]), per * k / (base * 1e-3) / 1e9, rel_tol=1e-4)
        # roofline_pct: the H100 HBM time of those bytes over the measured time
        assert math.isclose(float(r["roofline_pct"]), 100 * per * k / core.H100_HBM_BYTES_PER_S / (med * 1e-3),
                            rel_tol=1e-4)
        assert r["backend"] == "cpu"
        assert r["baseline"].startswith("torch.optim.AdamW") and "index_copy_" in r["baseline"]


def test_step_row_against_full_fine_tuning(cpu_run):
    _, _, _, rows = cpu_run
    r = next(r for r in rows if r["kernel"] == STEP and r["baseline"].startswith(sd_bench.FULL_NAME))
    c = sd_bench.TINY
    h, f, L, V = c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    kv = c["kv_heads"] * (h // c["heads"])
    mats = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    assert mats == TINY_LAYER
    k = L * sum(_k(o, i, 0.01) for o, i in mats)
    total = 2 * V * h + h + L * (sum(o * i for o, i in mats) + 2 * h)
    assert int(float(r["trainable_elems"])) == k
    assert int(float(r["baseline_trainable_elems"])) == total
    assert float(r["opt_state_bytes"]) == 8 * k                          # two fp32 moments per delta
    assert 8 * total <= float(r["baseline_opt_state_bytes"]) <= 8 * total + 8 * (3 + 9 * L)
    assert math.isnan(float(r["peak_mem_bytes"]))                        # no CUDA peak on the CPU
    assert r["baseline"].startswith(sd_bench.FULL_NAME) and r["dtype"] == "fp32" and r["backend"] == "cpu+cpu"
    assert math.isclose(float(r["lora_same_budget_rank"]), (k / L) / sum(o + i for o, i in mats), rel_tol=1e-4)
    # matmul flops: forward + dX over every linear (lm_head included), dW = the SDDMM's 2*k*T
    T = c["batch"] * c["seq"]
    lin = L * sum(o * i for o, i in mats) + V * h
    attn = 6 * c["batch"] * c["seq"] ** 2 * h * L
    assert float(r["step_flops"]) == 4 * lin * T + 2 * k * T + attn
    assert float(r["baseline_step_flops"]) == 6 * lin * T + attn


def test_step_row_against_lora_at_the_same_budget(cpu_run):
    _, _, _, rows = cpu_run
    r = next(r for r in rows if r["kernel"] == STEP and r["baseline"].startswith("LoRA, same budget"))
    c = sd_bench.TINY
    L = c["layers"]
    rank = max(1, round(float(r["lora_same_budget_rank"])))
    assert f"r={rank}" in r["baseline"]
    # LoRA trains r * (in + out) per linear: the equal budget within the rounding of the rank
    lora = L * rank * sum(o + i for o, i in TINY_LAYER)
    assert int(float(r["baseline_trainable_elems"])) == lora
    exact = float(r["lora_same_budget_rank"])
    assert abs(lora - int(float(r["trainable_elems"]))) <= L * abs(rank - exact) * sum(o + i for o, i in TINY_LAYER) + 1
    assert float(r["baseline_opt_state_bytes"]) >= 8 * lora
    med, base = float(r["time_ms"]), float(r["baseline_ms"])
    assert math.isclose(float(r["ratio"]), base / med, rel_tol=1e-4)


def test_the_optimizer_baseline_writes_each_weight_once(monkeypatch):
    """The torch AdamW baseline writes the merged weights itself; the global step hook (nn/masters.py) also
    compared and rewrote every layer after its step (a host sync a layer, twice the writes): the baseline's
    time was inflated (found by review)."""
    calls = []
    monkeypatch.setattr(SparseDeltaLinear, "masters_written_elsewhere", lambda self: calls.append(self))
    sd_bench.bench_adamw(core.CpuTimer(quick=True), quick=True)
    assert not calls


def test_rows_that_compute_the_same_result_are_checked(cpu_run):
    """Before timing: each SDDMM row (and the dense schedule's) against the dense dW's gathered values, the
    optimizer and the op against torch's AdamW (one step each from the same values); not the step after
    regrowth (its young entries' own bias corrections), the training steps (other parameters) or host rows."""
    _, _, _, rows = cpu_run
    for r in rows:
        assert ("checked against it" in r["note"]) == (r["kernel"] in (SDDMM, DENSE, OPT, OP)), r["kernel"]
        assert ("one step at lr 0.01 from the same values" in r["note"]) == (r["kernel"] in (OPT, OP))
        assert "DIFFER" not in r["note"]


def test_a_wrong_result_is_flagged(monkeypatch):
    """The SDDMM giving zeros; the optimizer stepping the deltas but leaving the bf16 weights unwritten (the
    check's step runs at a learning rate that shows in them)."""
    from fusedtune.ops import sparse_delta as ops
    from fusedtune.optim import SparseDeltaAdamW
    real = ops.sddmm
    monkeypatch.setattr(ops, "sddmm", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    rows = sd_bench.bench_sddmm(CallOnceTimer(), quick=True)
    assert len(rows) == 18 and all(r["note"].endswith("-- RESULTS DIFFER") for r in rows)
    step, real_layers, layers = SparseDeltaAdamW.step, sd_bench.opt_layers, {}

    def opt_layers(*a, **k):
        out = real_layers(*a, **k)
        layers.update({id(m.values): m for m in out})
        return out
    monkeypatch.setattr(sd_bench, "opt_layers", opt_layers)

    def step_without_weights(self, closure=None):
        ws = [(m.weight, m.weight.detach().clone()) for g in self.param_groups for p in g["params"]
              for m in [layers[id(p)]]]
        step(self, closure)
        with torch.no_grad():
            for w, before in ws:
                w.copy_(before)
    monkeypatch.setattr(SparseDeltaAdamW, "step", step_without_weights)
    rows = {r["kernel"]: r for r in sd_bench.bench_adamw(CallOnceTimer(), quick=True)}
    assert rows[OPT]["note"].endswith("-- RESULTS DIFFER") and "DIFFER" not in rows[OP]["note"]
