"""The roste benchmark family on the CPU (tiny shapes: the framework, not performance)."""
import csv
import math

import pytest
import torch

from fusedtune import _ext, bench
from fusedtune.bench import roste as br


def test_cpu_run_rows(tmp_path):
    assert "roste" in bench.families()
    assert bench.main(["roste", "--cpu", "--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "roste.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    host, rows = rows[4:], rows[:4]
    assert [(r["kernel"], r["baseline"]) for r in host] == [
        (f"RoSTELinear {w} per call (host)", b) for w in ("fwd+bwd", "fwd")
        for b in ("the same through the torch.library dispatcher", "nn.Linear")]
    assert all("CPU framework check" in r["note"] and float(r["time_ms"]) > 0 for r in host)
    assert [r["kernel"] for r in rows] == ["hadamard (orthonormal)", "rotate_fake_quant (token, W4 asym, fused)"] \
        + ["exported layer (W4A8, rotated), integer GEMM"] * 2
    assert [r["baseline"] for r in rows] == ["memcpy (copy_ of the same bytes)",
                                             "hadamard (%s) + torch fake quant (unfused)"   # auto's choice
                                             % ("cpu" if _ext.loaded() else "reference"),
                                             "the same layer, fake quant (dequantized weight, bf16 GEMM)",
                                             "bf16 nn.Linear (unquantized)"]
    for r in rows:
        med, base = float(r["time_ms"]), float(r["baseline_ms"])
        assert med > 0 and math.isclose(float(r["ratio"]), base / med, rel_tol=1e-4)
        assert "CPU framework check" in r["note"]
        assert r["shape"] == ("64x768" if r["kernel"].startswith(("hadamard", "rotate")) else "M=64 K=N=256")
    assert rows[0]["backend"] == ("cpu" if _ext.loaded() else "reference")      # 768 = 12 x 64: the C++ kernel
    # checked before timing: the fused op against the unfused sequence (to within a quantization level) and the
    # integer GEMM against the fake-quant layer; not the Hadamard vs memcpy, the layer vs nn.Linear, the host rows
    assert [("checked against it: max rel error" in r["note"]) for r in rows] == [False, True, True, False]
    assert "(tolerance 2.0e-01: 1.5 levels of 4-bit" in rows[1]["note"]
    assert not any("DIFFER" in r["note"] or "checked" in r["note"] for r in [rows[0], rows[3]] + host)
    assert not any("DIFFER" in r["note"] for r in rows)


def test_flops_count_the_padded_gemms():
    from fusedtune.bench.roste import _flops
    # 11008 = 172 x 64: A = 172 padded to 256, P = 64 -> 2*256*256*64 + 4*256*64*64 per row
    assert _flops(1, 11008) == 2 * 256 * 256 * 64 + 4 * 256 * 64 * 64
    assert _flops(2, 4096) == 2 * (2 * 32 * 32 * 128 + 4 * 32 * 128 * 128)


def _timer(fn):
    fn()
    return (1.0, 0.9, 1.1)


def test_a_failing_tensor_core_kernel_is_a_skipped_row(monkeypatch):
    """The opt-in tensor-core kernel ("cuda-mma") failing is a row saying so, the other backends' rows stay;
    any other backend failing still fails the section."""
    def timed(timer, x, hb):
        if hb == "cuda-mma":
            raise RuntimeError("boom")
        return timer(lambda: None)
    monkeypatch.setattr(br, "_hadamard_backends", lambda x, on_gpu, mma_only=False: ["reference", "cuda-mma"])
    monkeypatch.setattr(br, "_timed_hadamard", timed)
    rows = br.size_rows(_timer, 4, 768, False, fused=False)
    assert [r["backend"] for r in rows] == ["reference", "cuda-mma"]
    assert rows[0]["time_ms"] == 1.0 and math.isnan(rows[1]["time_ms"])
    assert rows[1]["note"] == "skipped: the tensor-core kernel failed (RuntimeError: boom)"
    monkeypatch.setattr(br, "_hadamard_backends", lambda x, on_gpu, mma_only=False: ["cuda", "cuda-mma"])
    monkeypatch.setattr(br, "_timed_hadamard", lambda timer, x, hb: (_ for _ in ()).throw(RuntimeError("cuda")))
    with pytest.raises(RuntimeError, match="cuda"):
        br.size_rows(_timer, 4, 768, False, fused=False)


def test_the_opt_in_tensor_core_kernel_is_timed_after_every_other_section(monkeypatch):
    """A fault of a kernel new to a GPU leaves the CUDA context unusable for the rest of the process: the
    default schedule's rows come first, the cuda-mma rows in sections of their own at the end."""
    from fusedtune import backend as B
    from fusedtune.ops import roste as ops_roste
    monkeypatch.setattr(B, "can_serve", lambda *a, **k: (True, ""))
    monkeypatch.setattr(ops_roste, "_ext_refuses", lambda x: "")
    monkeypatch.setattr(ops_roste, "mma_refuses", lambda x: "")
    x = torch.zeros(4, 4096, dtype=torch.bfloat16)
    assert br._hadamard_backends(x, True) == ["cuda", "triton"]
    assert br._hadamard_backends(x, True, mma_only=True) == ["cuda-mma"]

    class GpuTimer:
        name = "cuda"
    names = [n for n, _ in br.sections(GpuTimer(), quick=True)]
    mma = [i for i, n in enumerate(names) if "cuda-mma" in n]
    assert mma and mma == list(range(len(names) - len(mma), len(names))), names
    assert len(mma) == len(br.SIZES) + len(br.FACTORED)


def test_a_skipped_opt_in_kernel_is_a_row_saying_so(monkeypatch):
    monkeypatch.setenv("FUSEDTUNE_BENCH_SKIP", "cuda-mma")
    monkeypatch.setattr(br, "_timed_hadamard", lambda *a: pytest.fail("timed a skipped kernel"))
    rows = br.size_rows(_timer, 4, 768, False, fused=False, mma_only=True)
    assert len(rows) == 1 and rows[0]["backend"] == "cuda-mma" and math.isnan(rows[0]["time_ms"])
    assert "FUSEDTUNE_BENCH_SKIP" in rows[0]["note"]


def test_the_unfused_baseline_makes_no_clip_mask(monkeypatch):
    """Ours is timed with the identity STE (no clip mask); the baseline computed the mask too (two compares and an
    AND an element: work the fused op skips; found by review). Same output."""
    import torch

    from fusedtune.bench import roste as roste_bench
    from fusedtune.ops.roste import rotate_fake_quant
    from fusedtune.reference import roste as ref
    masks, real = [], ref._quantize

    def spy(*a, **k):
        out = real(*a, **k)
        masks.append(out[3])
        return out
    monkeypatch.setattr(ref, "_quantize", spy)
    x = torch.randn(8, 64)
    got = roste_bench._unfused(x, 4, 0.95)()
    assert masks == [None]
    torch.testing.assert_close(got, rotate_fake_quant(x, 4, "token", False, 0.95, rotate=True), rtol=1e-6, atol=1e-6)


def test_a_wrong_fused_result_is_flagged(monkeypatch):
    """The fused rotate + fake quant giving zeros, or skipping the rotation, is said so in its row (the ratio
    would compare ours with a sequence that computes something else)."""
    from fusedtune.ops import roste as ops_roste
    real = ops_roste.rotate_fake_quant
    for broken in (lambda x, *a, **k: torch.zeros_like(real(x, *a, **k)),
                   lambda x, *a, **k: real(x, *a, **dict(k, rotate=False))):
        monkeypatch.setattr(ops_roste, "rotate_fake_quant", broken)
        rows = br.size_rows(_timer, 64, 768, False)
        assert [r["kernel"] for r in rows] == ["hadamard (orthonormal)", "rotate_fake_quant (token, W4 asym, fused)"]
        assert rows[1]["note"].endswith("-- RESULTS DIFFER") and "checked" not in rows[0]["note"]
