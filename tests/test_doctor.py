"""fusedtune.doctor() and the CLI entry point."""
import json
import subprocess
import sys

import torch

import fusedtune
from fusedtune import _ext
from fusedtune.__main__ import main
from fusedtune.doctor import doctor


def test_doctor_reports_every_key(capsys):
    d = doctor()
    assert set(d) >= {"versions", "extension", "gpu", "backends", "ops"}
    assert d["versions"]["torch"] == torch.__version__ and d["versions"]["fusedtune"] == fusedtune.__version__
    assert {"triton", "python"} <= set(d["versions"])
    ext = d["extension"]
    assert ext["loaded"] == _ext.loaded()
    if ext["loaded"]:
        assert ext["path"] and ext["built_for_torch"] and ext["error"] is None
        assert ext["cuda_archs"] == _ext.cuda_archs()
    else:
        assert ext["error"]
    assert d["gpu"]["present"] == torch.cuda.is_available()
    assert set(d["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert all(set(b) == {"available", "why"} for b in d["backends"].values())
    assert all(b["why"] for b in d["backends"].values() if not b["available"])
    zo = d["ops"]["zo"]
    assert zo["cpu"]["backend"] == ("cpu" if _ext.loaded() else "reference")
    if not torch.cuda.is_available():
        assert zo["cuda"]["backend"] is None and zo["cuda"]["why_not"]
    assert set(d["schedules"]) == {"lora", "fp8", "sparse_delta", "hadamard"}
    assert "cuBLAS" in d["schedules"]["lora"]
    from fusedtune.ops import roste
    assert f"hadamard_mma_kernel) {'on' if roste.MMA else 'off'}" in d["schedules"]["hadamard"]
    if not torch.cuda.is_available():
        assert "the Triton FP8 GEMM (" in d["schedules"]["fp8"]
    from fusedtune.triton_kernels import fp8_tma
    assert f"fp8_gemm_tma_kernel) {'on' if fp8_tma.ENABLED else 'off'}" in d["schedules"]["fp8"]
    out = capsys.readouterr().out
    for section in ("fusedtune doctor", "extension fusedtune._C", "GPU", "backends", "ops", "schedules (GPU paths)"):
        assert section in out


def test_doctor_text_names_each_ops_backend_as_the_json_does():
    """hft and sparse_delta answer per op ({op: {'backend', 'why_not'}}): the text report has a line an op with
    that op's backend (it printed None for the family where the C++ CPU kernels serve both ops)."""
    from fusedtune.doctor import collect, format_report
    d = collect()
    text = format_report(d)
    for family in ("hft", "sparse_delta"):
        row = d["ops"][family]["cpu"]
        assert "backend" not in row and len(row) >= 2
        for op, r in row.items():
            line = next(ln for ln in text.splitlines() if ln.split()[:2] == [f"{family}.{op}", "cpu"])
            assert line.split()[3] == str(r["backend"])
        if _ext.loaded():
            assert all(r["backend"] == "cpu" for r in row.values())
    zo = next(ln for ln in text.splitlines() if ln.split()[:2] == ["zo", "cpu"])
    assert zo.split()[3] == str(d["ops"]["zo"]["cpu"]["backend"])


def test_doctor_quiet(capsys):
    doctor(print_report=False)
    assert capsys.readouterr().out == ""


def test_cli_doctor_subprocess():
    r = subprocess.run([sys.executable, "-m", "fusedtune", "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fusedtune doctor" in r.stdout and "backends" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fusedtune", "doctor", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["versions"]["torch"] == torch.__version__


def test_cli_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "doctor" in capsys.readouterr().out
    assert main([]) == 2            # no command: a usage error, its usage on stderr
    out = capsys.readouterr()
    assert out.out == "" and "usage: python -m fusedtune COMMAND" in out.err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["-V", "extra"]) == 2 and main(["--version", "x"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "takes no arguments" in out.err and "usage:" in out.err


def test_cli_version_is_the_package_metadata_version(capsys):
    import os
    import re
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    declared = re.search(r'^version = "([^"]+)"', open(os.path.join(root, "pyproject.toml")).read(), re.M).group(1)
    assert out == f"fusedtune {declared}" == f"fusedtune {fusedtune.__version__}"


def test_demo_without_transformers_says_what_to_install(monkeypatch, capsys):
    import importlib.util
    from fusedtune import demo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert demo.main(["--steps", "1"]) == 2
    assert "pip install 'fusedtune[demo]'" in capsys.readouterr().err


def test_an_extension_that_does_not_load_names_the_cause_and_the_fix(monkeypatch, tmp_path):
    import glob as glob_mod
    keep = dict(_ext._state)

    def refuse(path):
        try:
            raise OSError(f"{path}: undefined symbol: _ZN3c10fooEv")
        except OSError as e:
            raise OSError(f"Could not load this library: {path}") from e
    monkeypatch.setattr(glob_mod, "glob", lambda pat: [str(tmp_path / "_C.so")] if pat.endswith("_C*.so") else [])
    monkeypatch.setattr(torch.ops, "load_library", refuse)
    try:
        _ext._load()
        err = _ext.error()
    finally:
        _ext._state.clear()
        _ext._state.update(keep)
    assert "undefined symbol: _ZN3c10fooEv" in err and f"torch {torch.__version__}" in err, err
    assert "pip install --no-build-isolation" in err, err


def _clean_env(monkeypatch):
    import os
    for k in list(os.environ):
        if k.startswith("FUSEDTUNE_") or k == "TRITON_INTERPRET":
            monkeypatch.delenv(k)


def _line(text, name, dev="cpu"):
    return next(ln for ln in text.splitlines() if ln.split()[:2] == [name, dev])


def test_doctor_environment_section_lists_fusedtune_variables_and_whether_valid(monkeypatch):
    """Every FUSEDTUNE_* variable set, checked as its reader checks it; unknown names flagged; TRITON_INTERPRET."""
    from fusedtune.doctor import collect, format_report, invalid_settings
    _clean_env(monkeypatch)
    assert collect()["environment"] == {} and "  none set" in format_report(collect())
    for k, v in {"FUSEDTUNE_BACKEND": "reference", "FUSEDTUNE_BAKEND": "cuda", "FUSEDTUNE_FP8_GEMM": "cuBLAS",
                 "FUSEDTUNE_EAGER_OPS": "0", "FUSEDTUNE_LORA_TMA": "maybe", "FUSEDTUNE_COMMIT": "abc",
                 "TRITON_INTERPRET": "true"}.items():
        monkeypatch.setenv(k, v)
    d = collect()
    env = d["environment"]
    assert set(env) == {"FUSEDTUNE_BACKEND", "FUSEDTUNE_BAKEND", "FUSEDTUNE_FP8_GEMM", "FUSEDTUNE_EAGER_OPS",
                        "FUSEDTUNE_LORA_TMA", "FUSEDTUNE_COMMIT", "TRITON_INTERPRET"}
    assert env["FUSEDTUNE_BACKEND"]["valid"] is True and env["FUSEDTUNE_EAGER_OPS"]["valid"] is True
    assert env["FUSEDTUNE_FP8_GEMM"]["valid"] is False and "auto, triton, cublas" in env["FUSEDTUNE_FP8_GEMM"]["note"]
    assert env["FUSEDTUNE_LORA_TMA"]["valid"] is False      # (read at import: this process read it before)
    assert env["FUSEDTUNE_BAKEND"]["valid"] is None and "not read by fusedtune" in env["FUSEDTUNE_BAKEND"]["note"]
    assert env["TRITON_INTERPRET"]["note"].startswith("on")
    assert sorted(b.split("=")[0] for b in invalid_settings(d)) == ["FUSEDTUNE_FP8_GEMM", "FUSEDTUNE_LORA_TMA"]
    text = format_report(d)
    assert _line(text, "FUSEDTUNE_BAKEND", "'cuda'") and "INVALID" in _line(text, "FUSEDTUNE_FP8_GEMM", "'cuBLAS'")
    # the forced backend is the reason on the ops' lines
    for name in ("zo", "lora", "hft.row_grad", "sparse_delta.sddmm"):
        assert _line(text, name).endswith("-> reference  (FUSEDTUNE_BACKEND=reference forces it)"), _line(text, name)
    monkeypatch.setenv("FUSEDTUNE_BACKEND", "cuda")   # hadamard has a cuda backend (refused on CPU); lora has none
    d = collect()
    assert "FUSEDTUNE_BACKEND=cuda forces it" in d["ops"]["hadamard"]["cpu"]["forced"]
    assert d["ops"]["hadamard"]["cpu"]["backend"] is None
    assert "FUSEDTUNE_BACKEND=cuda does not apply" in _line(format_report(d), "lora")


def test_doctor_lists_every_backend_probe_of_the_ops_modules(monkeypatch):
    """hadamard_backend, fp8_quant_backend and regrow_backend are not named <module>_backend: listed too."""
    from fusedtune.doctor import collect, format_report
    from fusedtune.ops import fp8, roste, sparse_delta_select
    _clean_env(monkeypatch)
    d = collect()
    assert {"zo", "lora", "hft", "fp8", "roste", "sparse_delta", "hadamard", "fp8_quant", "regrow"} <= set(d["ops"])
    text = format_report(d)
    for name, probe in (("hadamard", roste.hadamard_backend), ("fp8_quant", fp8.fp8_quant_backend)):
        assert d["ops"][name]["cpu"] == probe("cpu")
        assert _line(text, name).split()[3] == str(probe("cpu")["backend"])
    for op, r in sparse_delta_select.regrow_backend("cpu").items():
        assert _line(text, f"regrow.{op}").split()[3] == str(r["backend"])


def test_doctor_cli_exits_1_on_an_invalid_setting_and_still_prints_the_report(monkeypatch, capsys):
    from fusedtune.doctor import main as doctor_main
    _clean_env(monkeypatch)
    assert doctor_main([]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FUSEDTUNE_BACKEND", "trition")
    assert doctor_main([]) == 1
    out = capsys.readouterr()
    assert "schedules (GPU paths)" in out.out and "FUSEDTUNE_BACKEND" in out.out
    assert "invalid setting FUSEDTUNE_BACKEND='trition': unknown backend 'trition'" in out.err
    assert doctor_main(["--json"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["environment"]["FUSEDTUNE_BACKEND"]["valid"] is False and "trition" in out.err
