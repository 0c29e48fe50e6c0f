"""The fp8 benchmark family on the CPU (tiny shapes: the framework, not performance)."""
import csv
import math

from fusedtune import bench


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
