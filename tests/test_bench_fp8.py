"""The fp8 benchmark family on the CPU (tiny shapes: the framework, not performance)."""
import csv
import math

import torch

from fusedtune import bench
from fusedtune.bench import fp8 as fp8_bench


def test_cpu_run_rows(tmp_path):
    assert "fp8" in bench.families()
    assert bench.main(["fp8", "--cpu", "--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "fp8.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    host = [(r["kernel"], r["baseline"]) for r in rows[4:]]
    assert host == [(f"FP8Linear {w} per call (host)", b) for w in ("fwd+bwd", "fwd")
                    for b in ("the same through the torch.library dispatcher", "nn.Linear")]
    assert [r["kernel"] for r in rows[:4]] == ["fp8_gemm (1x128 x 128x128, promoted)",
                                          "fp8_quantize_1x128 (+ transposed copy)",
                                          "fp8_quantize_128x128 (+ transposed copy)", "FP8Linear fwd+bwd"]
    assert [r["baseline"] for r in rows[:4]] == ["torch bf16 matmul", "bf16 clone (same tensor)",
                                                 "bf16 clone (same tensor)", "bf16 nn.Linear"]
    assert [r["backend"] for r in rows[1:3]] == ["cpu", "cpu"]     # the extension's C++ quantizers here
    for r in rows:
        med, base = float(r["time_ms"]), float(r["baseline_ms"])
        assert med > 0 and math.isclose(float(r["ratio"]), base / med, rel_tol=1e-4)
        assert "CPU framework check" in r["note"]
    # the GEMM and FP8Linear (y, dX, dW) checked against bf16 math by SQNR; the quantizers (vs a clone) and the
    # host rows not
    for r in rows[:4]:
        assert ("checked against it: SQNR" in r["note"]) == (r["kernel"] in ("fp8_gemm (1x128 x 128x128, promoted)",
                                                                            "FP8Linear fwd+bwd"))
        assert "DIFFER" not in r["note"]
    assert not any("checked" in r["note"] for r in rows[4:])


def _timer(fn):
    fn()
    return (1.0, 1.0, 1.0)


def test_a_wrong_result_is_flagged(monkeypatch):
    """A kernel that computes something else is said so in its row, not timed as if it were the baseline's
    work: fp8_gemm giving zeros, FP8Linear's GEMMs with their scales off by 2x (0 dB)."""
    from fusedtune.ops import fp8 as ops_fp8
    real = ops_fp8.fp8_gemm
    monkeypatch.setattr(ops_fp8, "fp8_gemm", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    rows = fp8_bench.gemm_rows(_timer, [256], False, "cpu")
    assert rows[0]["baseline"] == "torch bf16 matmul" and rows[0]["note"].endswith("-- RESULTS DIFFER")
    monkeypatch.setattr(ops_fp8, "fp8_gemm", real)
    gemm = ops_fp8._linear_gemm
    monkeypatch.setattr(ops_fp8, "_linear_gemm", lambda *a, **k: 2 * gemm(*a, **k))
    rows = fp8_bench.linear_rows(_timer, 256, False, "cpu")
    assert rows[0]["baseline"] == "bf16 nn.Linear" and rows[0]["note"].endswith("-- RESULTS DIFFER")
