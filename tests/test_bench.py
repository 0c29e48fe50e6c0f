"""The benchmark framework (python -m fusedtune bench): CPU timing of tiny shapes, the CSV it
appends, the plain no-GPU message; the GPU run itself is marked gpu."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from fusedtune import bench
from fusedtune.bench import core
from fusedtune.bench import zo as zo_bench

no_gpu = not torch.cuda.is_available()


def _read(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["zo", "--cpu", "--quick", "--out", str(out)])
    return rc, out


def test_cpu_run_writes_csv_with_the_columns_and_sane_rows(cpu_run):
    rc, out = cpu_run
    assert rc == 0
    header, rows = _read(out / "zo.csv")
    assert header == core.COLUMNS
    kernels = {r["kernel"] for r in rows}
    assert {"zo_apply_ pass", "zo_apply_ undo+update pass", "mezo step perturbation (3 passes)",
            "mezo step perturbation (fold=True, 2 passes)"} <= kernels
    for r in rows:
        assert r["gpu_name"] == "cpu" and r["dtype"] == "bf16"
        assert r["torch"] == torch.__version__ and r["commit"] and r["date"].endswith("Z")
        med, p20, p80 = float(r["time_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80 < 60_000
        if r["baseline"] != "-":
            base = float(r["baseline_ms"])
            assert base > 0 and math.isclose(float(r["ratio"]), base / med, rel_tol=1e-3)
        assert float(r["roofline_pct"]) > 0
    step = [r for r in rows if r["kernel"].startswith("mezo step")]
    assert step and all(r["baseline"].startswith("MeZO per-parameter loop") for r in step)
    assert (out / "zo.png").stat().st_size > 1000


def test_a_failing_section_keeps_the_rows_before_it_and_the_sections_after_it(tmp_path, monkeypatch, capsys):
    import sys
    import types

    written = []

    def first():
        return [core.row("k1", "s", "bf16", "cpu", "-", (1.0, 1.0, 1.0), None)]

    def broken():
        written.append(sorted(p.name for p in tmp_path.iterdir()))   # first's rows are on disk already
        raise RuntimeError("section blew up")

    def last():
        return [core.row("k3", "s", "bf16", "cpu", "-", (2.0, 2.0, 2.0), None)]

    fake = types.ModuleType("fusedtune.bench.fakefam")
    fake.sections = lambda timer, quick: [("first", first), ("broken", broken), ("last", last)]
    monkeypatch.setitem(sys.modules, "fusedtune.bench.fakefam", fake)
    env = {"gpu_name": "cpu", "torch": "t", "triton": "tr", "commit": "c", "date": "d"}
    rc = bench.run_family("fakefam", core.CpuTimer(quick=True), env, True, str(tmp_path))
    assert rc == 1
    assert written == [["fakefam.csv"]]
    assert [r["kernel"] for r in _read(tmp_path / "fakefam.csv")[1]] == ["k1", "k3"]
    assert "fakefam section 'broken' FAILED" in capsys.readouterr().err


def test_csv_is_appended_not_overwritten(tmp_path):
    r = core.row("k", "s", "bf16", "cuda", "torch", (1.0, 0.9, 1.2), 2.0, 50.0)
    env = {"gpu_name": "x", "torch": "t", "triton": "tr", "commit": "c", "date": "d"}
    path = tmp_path / "f.csv"
    core.append_csv([dict(r, **env)], str(path))
    core.append_csv([dict(r, **env, kernel="k2")], str(path))
    header, rows = _read(path)
    assert header == core.COLUMNS and [x["kernel"] for x in rows] == ["k", "k2"]
    assert float(rows[0]["ratio"]) == 2.0
    core.append_csv([dict(r, **env, kernel="k3", extra_col=1)], str(path))  # a new column keeps old rows
    header, rows = _read(path)
    assert header[-1] == "extra_col" and [x["kernel"] for x in rows] == ["k", "k2", "k3"]


def test_roofline_and_quantiles():
    assert math.isclose(core.roofline_pct(1.0, bytes_moved=3.35e9), 100.0)
    assert math.isclose(core.roofline_pct(2.0, flops=989e9), 50.0)
    assert math.isclose(core.roofline_pct(1.0, flops=1979e9, precision="fp8"), 100.0)
    assert core._quantiles([5, 1, 3, 2, 4]) == pytest.approx((3, 1.8, 4.2))
    med, p20, p80 = core.CpuTimer(quick=True)(lambda: sum(range(1000)))
    assert 0 < p20 <= med <= p80


def test_llama2_7b_parameter_list():
    shapes = zo_bench.llama_shapes(**{k: v for k, v in zo_bench.LLAMA2_7B.items() if k != "name"})
    assert len(shapes) == 1 + 32 * 9 + 2
    assert sum(math.prod(s) for s in shapes) == 6_738_415_616  # Llama-2-7B's parameter count


def test_mezo_loop_is_faithful():
    """+eps, -2eps, +eps with regenerated noise restores fp32 weights up to rounding; the update is -lr*g*z."""
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    before = [p.detach().clone() for p in ps]
    zo_bench.mezo_perturb(ps, 1)
    torch.manual_seed(zo_bench.SEED)
    z = [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for p in ps]
    for p, b, zz in zip(ps, before, z):
        torch.testing.assert_close(p.detach(), b + zo_bench.EPS * zz)
    zo_bench.mezo_perturb(ps, -2)
    zo_bench.mezo_perturb(ps, 1)
    zo_bench.mezo_update(ps, 2.0, lr=0.1)
    for p, b, zz in zip(ps, before, z):
        torch.testing.assert_close(p.detach(), b - 0.2 * zz, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not no_gpu, reason="checks the message on a machine without a GPU")
def test_no_gpu_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench.main(["zo", "--out", str(out)]) == 1     # nothing measured: a failure for a script
    text = capsys.readouterr().err
    assert text.startswith("no GPU:") and "nothing was timed and nothing was written" in text
    assert not out.exists()


def test_unknown_family_and_list(capsys):
    assert bench.main(["nope", "--cpu"]) == 2
    assert bench.main(["--list"]) == 0
    assert "zo" in capsys.readouterr().out.split()


def test_every_listed_family_is_a_benchmark():
    """`bench all` runs each listed family's sections(); a helper module listed as a family (the no-GPU
    driver was) fails there on a GPU."""
    import importlib
    for fam in bench.families():
        assert callable(getattr(importlib.import_module(f"fusedtune.bench.{fam}"), "sections", None)), fam


@pytest.mark.gpu
@pytest.mark.skipif(no_gpu, reason="needs a CUDA GPU")
def test_gpu_quick_run(tmp_path):
    assert bench.main(["zo", "--quick", "--out", str(tmp_path)]) == 0
    header, rows = _read(tmp_path / "zo.csv")
    assert header == core.COLUMNS
    assert rows and all(r["gpu_name"] == torch.cuda.get_device_name() for r in rows)
    assert any(r["backend"] in ("cuda", "triton") for r in rows)
    for r in rows:
        assert 0 < float(r["p20_ms"]) <= float(r["time_ms"]) <= float(r["p80_ms"])


def test_bandwidth_goals_are_judged_against_the_gpu_that_ran():
    # 4 GB in 1 ms: 119% of an H100's 3.35 TB/s, but 83% of an H200's 4.8 TB/s
    assert core.hbm_goal(1.0, 4.0e9, 85, "NVIDIA H200").endswith("NOT met")
    assert core.hbm_goal(1.0, 3.0e9, 85, "NVIDIA H100 80GB HBM3").endswith(": met")
    assert core.hbm_peak("NVIDIA H100 PCIe")[0] == 2.0e12
    assert "not known for NVIDIA L40S" in core.hbm_peak("NVIDIA L40S")[1]


def test_bandwidth_notes_name_the_gpu_that_ran(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert core.hbm_share(1.0, 4.8e9) == "4800 GB/s = 100.0% of H200 HBM 4.80 TB/s"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert core.hbm_share(2.0, 3.35e9) == "1675 GB/s = 50.0% of H100 HBM 3.35 TB/s"


def test_step_agreement_compares_the_updates():
    """An optimizer step whose update is 20% off is flagged (found by review: the values after the step were compared
    against the weights' magnitude, so only errors of 50% or more were)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64) * 0.02)
    p.grad = torch.randn_like(p) * 1e-3
    ours, theirs = torch.optim.AdamW([p], lr=1e-3), torch.optim.AdamW([p], lr=1e-3)

    def ours_step(scale):
        before = p.detach().clone()
        ours.step()
        with torch.no_grad():
            p.copy_(before + scale * (p - before))
    assert "DIFFER" in core.step_agreement((ours, theirs), (lambda: ours_step(0.8), theirs.step), [p])
    assert "DIFFER" not in core.step_agreement((ours, theirs), (lambda: ours_step(1.0), theirs.step), [p])
