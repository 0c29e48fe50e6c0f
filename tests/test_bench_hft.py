"""The hft benchmark family (python -m fusedtune bench hft) on the CPU: tiny shapes, so this tests the
framework and the accounting (optimizer state, trainable elements), not performance."""
from __future__ import annotations

import csv
import math

import pytest
import torch

pytest.importorskip("transformers")

from fusedtune import bench  # noqa: E402
from fusedtune.bench import core  # noqa: E402
from fusedtune.bench import hft as hft_bench  # noqa: E402

from fakes import CallOnceTimer  # noqa: E402

STEP_KERNELS = {"hft step (matrix)", "hft step (row)", "hft step (block)"}
ROW_GRAD = "hft row_grad (compact dW rows)"
ADAMW_KERNELS = {"MaskedAdamW step (fp32 params, fp32 moments)", "MaskedAdamW step (bf16 params, fp32 moments)",
                 "MaskedAdamW step (fp32 row masters -> bf16 weight)"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_hft")
    rc = bench.main(["hft", "--cpu", "--quick", "--out", str(out)])
    with open(out / "hft.csv", newline="") as f:
        r = csv.DictReader(f)
        header, rows = r.fieldnames, list(r)
    return rc, out, header, rows


def _tiny_counts():
    """Elements of the tiny Llama, and what row-level HFT at ratio 0.5 trains, from the shapes alone."""
    c = hft_bench.TINY
    h, f, L, V = c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    kv = c["kv_heads"] * (h // c["heads"])
    mats = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]          # (out, in): q k v o gate up down
    total = 2 * V * h + h + L * (sum(o * i for o, i in mats) + 2 * h)
    # half the output rows of every matrix, 1 of the 2 norms per layer, embeddings, lm_head, final norm
    row_level = 2 * V * h + h + L * (sum((o // 2) * i for o, i in mats) + h)
    n_tensors = 3 + L * 9
    return total, row_level, n_tensors


def test_family_is_discovered():
    assert "hft" in bench.families()


def test_cpu_run_writes_the_rows_and_columns(cpu_run):
    rc, out, header, rows = cpu_run
    assert rc == 0
    assert header[: len(core.COLUMNS)] == core.COLUMNS
    assert {"peak_mem_bytes", "opt_state_bytes", "baseline_opt_state_bytes", "trainable_elems"} <= set(header)
    host = [(r["kernel"], r["baseline"]) for r in rows if r["kernel"].endswith("per call (host)")]
    assert host == [(f"RowMaskedLinear (half the rows) {w} per call (host)", b) for w in ("fwd+bwd", "fwd")
                    for b in ("the same through the torch.library dispatcher", "nn.Linear")]
    kernels = [r["kernel"] for r in rows if not r["kernel"].endswith("per call (host)")]
    assert set(kernels) == STEP_KERNELS | {ROW_GRAD} | ADAMW_KERNELS
    assert kernels.count(ROW_GRAD) == 3 and all(kernels.count(k) == 1 for k in STEP_KERNELS | ADAMW_KERNELS)
    for r in rows:
        assert r["gpu_name"] == "cpu" and r["torch"] == torch.__version__ and r["date"].endswith("Z")
        med, p20, p80, base = (float(r[k]) for k in ("time_ms", "p20_ms", "p80_ms", "baseline_ms"))
        assert 0 < p20 <= med <= p80 < 60_000 and base > 0
        assert math.isclose(float(r["ratio"]), base / med, rel_tol=1e-3)
        assert hft_bench.CPU_NOTE in r["note"]
        assert r["baseline"] and r["baseline"] != "-"
    assert (out / "hft.png").stat().st_size > 1000


def test_step_rows_compare_against_full_fine_tuning(cpu_run):
    _, _, _, rows = cpu_run
    step = {r["kernel"]: r for r in rows if r["kernel"] in STEP_KERNELS}
    for r in step.values():
        assert r["baseline"].startswith(hft_bench.FULL_NAME)
        assert r["dtype"] == "fp32" and "tiny-llama" in r["shape"]
        assert "optimizer state" in r["note"] and "goal" not in r["note"]   # no verdicts on CPU
        assert math.isnan(float(r["peak_mem_bytes"]))                        # no CUDA peak on CPU
        assert float(r["roofline_pct"]) > 0
    assert step["hft step (row)"]["backend"] == "cpu+cpu"
    assert step["hft step (block)"]["backend"] == "cpu+torch"
    assert step["hft step (matrix)"]["backend"] == "torch"


def test_row_level_optimizer_state_is_about_half_of_full_adamw(cpu_run):
    _, _, _, rows = cpu_run
    total, row_level, n_tensors = _tiny_counts()
    r = next(r for r in rows if r["kernel"] == "hft step (row)")
    full_state, row_state = float(r["baseline_opt_state_bytes"]), float(r["opt_state_bytes"])
    assert int(float(r["baseline_trainable_elems"])) == total
    assert int(float(r["trainable_elems"])) == row_level
    # MaskedAdamW: two fp32 moments per trainable element and nothing else
    assert row_state == 8 * row_level
    # fused AdamW: two fp32 moments per element (+ at most a step counter per tensor)
    assert 8 * total <= full_state <= 8 * total + 8 * n_tensors
    assert 0.45 <= row_state / full_state <= 0.6
    assert float(r["master_bytes"]) == 4 * (row_level - (2 * hft_bench.TINY["vocab"] + 3) * hft_bench.TINY["hidden"])
    # matmul flops: forward + dX over every linear weight, dW over the trained rows (and lm_head)
    c = hft_bench.TINY
    T = c["batch"] * c["seq"]
    lin_total = total - c["vocab"] * c["hidden"] - (2 * c["layers"] + 1) * c["hidden"]   # no embeddings, norms
    lin_rows = row_level - c["vocab"] * c["hidden"] - (c["layers"] + 1) * c["hidden"]
    attn = 6 * c["batch"] * c["seq"] ** 2 * c["hidden"] * c["layers"]
    assert float(r["baseline_step_flops"]) == 6 * lin_total * T + attn
    assert float(r["step_flops"]) == 4 * lin_total * T + 2 * lin_rows * T + attn
    # block level: the same trained elements and flops, no masters, torch AdamW's moments (fp32 here) + step counters
    b = next(r for r in rows if r["kernel"] == "hft step (block)")
    assert int(float(b["trainable_elems"])) == row_level and float(b["master_bytes"]) == 0
    assert float(b["step_flops"]) == float(r["step_flops"])
    assert 8 * row_level <= float(b["opt_state_bytes"]) <= 8 * row_level + 8 * n_tensors
    m = next(r for r in rows if r["kernel"] == "hft step (matrix)")
    assert 0.45 <= float(m["opt_state_bytes"]) / float(m["baseline_opt_state_bytes"]) <= 0.6


def test_state_bytes_counts_every_state_tensor():
    p = torch.nn.Parameter(torch.zeros(3, 5))
    p.grad = torch.ones(3, 5)
    opt = torch.optim.AdamW([p], lr=1e-3, foreach=False)
    assert hft_bench.state_bytes(opt) == 0
    opt.step()
    assert hft_bench.state_bytes(opt) == 2 * 15 * 4 + opt.state[p]["step"].numel() * opt.state[p]["step"].element_size()
    assert hft_bench.moment_dtype(opt) == "fp32"


def test_state_memory_counts_each_method_untimed():
    """python -m fusedtune.bench.hft: the state of section 1's methods and of block granularity with
    embeddings and lm_head frozen, from one untimed step (here the tiny Llama in fp32: fp32 moments)."""
    total, row_level, n_tensors = _tiny_counts()
    emb = 2 * hft_bench.TINY["vocab"] * hft_bench.TINY["hidden"]
    rows = {r["method"]: r for r in hft_bench.state_memory(hft_bench.TINY, dtype=torch.float32)}
    assert list(rows) == list(hft_bench.STATE_METHODS)
    assert rows["full"]["trainable"] == total and rows["full"]["ratio"] == 1.0
    assert rows["row"]["state_bytes"] == 8 * row_level and rows["row"]["master_bytes"] > 0
    for m, trained in (("block", row_level), ("block, embeddings frozen", row_level - emb)):
        r = rows[m]
        assert r["trainable"] == trained and r["master_bytes"] == 0 and r["total"] == total
        assert 8 * trained <= r["state_bytes"] <= 8 * trained + 8 * n_tensors      # + step counters
        assert r["ratio"] == r["state_bytes"] / rows["full"]["state_bytes"]
    assert rows["block, embeddings frozen"]["ratio"] < 0.5 < rows["block"]["ratio"]


def test_the_row_master_baseline_writes_each_weight_once(monkeypatch):
    """As the sparse-delta baseline: the step hook rewrote the rows the baseline writes itself (found by review)."""
    from fusedtune.bench import core
    from fusedtune.bench import hft as hft_bench
    from fusedtune.nn import RowMaskedLinear
    calls = []
    monkeypatch.setattr(RowMaskedLinear, "masters_written_elsewhere", lambda self: calls.append(self))
    hft_bench.bench_adamw(core.CpuTimer(quick=True), quick=True)
    assert not calls


def test_rows_that_compute_the_same_result_are_checked(cpu_run):
    """The row gradients against the dense dW's rows, and MaskedAdamW against torch's AdamW (one step each from
    the same values), before timing; the training-step rows (other parameters by design) and host rows not."""
    _, _, _, rows = cpu_run
    for r in rows:
        checked = r["kernel"] == ROW_GRAD or r["kernel"] in ADAMW_KERNELS
        assert ("checked against it" in r["note"]) == checked, r["kernel"]
        assert ("one step at lr 0.01 from the same values" in r["note"]) == (r["kernel"] in ADAMW_KERNELS)
        assert "DIFFER" not in r["note"]


def test_a_wrong_result_is_flagged(monkeypatch):
    from fusedtune.ops import hft as ops
    from fusedtune.optim import MaskedAdamW
    real = ops.row_grad
    monkeypatch.setattr(ops, "row_grad", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    rows = hft_bench.bench_row_grad(CallOnceTimer(), quick=True)
    assert len(rows) == 3 and all(r["note"].endswith("-- RESULTS DIFFER") for r in rows)
    monkeypatch.setattr(MaskedAdamW, "step", lambda self, closure=None: None)     # a step that updates nothing
    rows = hft_bench.bench_adamw(CallOnceTimer(), quick=True)
    assert {r["kernel"] for r in rows} == ADAMW_KERNELS
    assert all(r["note"].endswith("-- RESULTS DIFFER") for r in rows)
