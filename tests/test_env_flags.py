"""Boolean environment switches (fusedtune._env): every FUSEDTUNE_* on/off switch takes 1/true/yes/on and
0/false/no/off in any case and refuses anything else, naming it; TRITON_INTERPRET is read by Triton's own
rule, so fusedtune interprets exactly when Triton does. The import-time switches are checked in two
subprocesses (each one a fresh import of torch and fusedtune)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fusedtune._env import env_flag, interpreting

SWITCHES = ("FUSEDTUNE_DISABLE_EXTENSION", "FUSEDTUNE_EAGER_OPS", "FUSEDTUNE_HADAMARD_MMA", "FUSEDTUNE_LORA_TMA",
            "FUSEDTUNE_FP8_TMA", "FUSEDTUNE_FAST_LAUNCH", "FUSEDTUNE_SKIP_CUDA", "FUSEDTUNE_NO_CUDA", "TRITON_INTERPRET")
ON = ("1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 ", "\ttrue\n")
OFF = ("0", "false", "FALSE", "no", "No", "off", "OFF", " 0 ", " off")
REFUSED = ("2", "y", "n", "t", "f", "enable", "disabled", "1.0", "+1", "-1", "tru", "o n", "none")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize("default", [False, True])
def test_the_spellings(monkeypatch, default):
    for v in ON:
        monkeypatch.setenv("FT_TEST_FLAG", v)
        assert env_flag("FT_TEST_FLAG", default) is True, v
    for v in OFF:
        monkeypatch.setenv("FT_TEST_FLAG", v)
        assert env_flag("FT_TEST_FLAG", default) is False, v
    for v in ("", "  "):
        monkeypatch.setenv("FT_TEST_FLAG", v)
        assert env_flag("FT_TEST_FLAG", default) is default, repr(v)
    monkeypatch.delenv("FT_TEST_FLAG", raising=False)
    assert env_flag("FT_TEST_FLAG", default) is default
    for v in REFUSED:
        monkeypatch.setenv("FT_TEST_FLAG", v)
        with pytest.raises(ValueError) as e:
            env_flag("FT_TEST_FLAG", default)
        msg = str(e.value)
        assert f"FT_TEST_FLAG={v!r}" in msg and "1/true/yes/on" in msg and "0/false/no/off" in msg, msg


def test_setup_py_reads_switches_the_same_way(monkeypatch):
    """setup.py runs before the package is installed and carries its own copy of the rule."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from setup_py import function
    finally:
        sys.path.pop(0)
    setup_flag = function("_env_flag")
    for v in ON + OFF + ("", "  "):
        monkeypatch.setenv("FT_TEST_FLAG", v)
        for default in (False, True):
            assert setup_flag("FT_TEST_FLAG", default) is env_flag("FT_TEST_FLAG", default), (v, default)
    monkeypatch.delenv("FT_TEST_FLAG")
    assert setup_flag("FT_TEST_FLAG", True) is True and setup_flag("FT_TEST_FLAG", False) is False
    for v in REFUSED:
        monkeypatch.setenv("FT_TEST_FLAG", v)
        with pytest.raises(SystemExit, match="FT_TEST_FLAG"):
            setup_flag("FT_TEST_FLAG", False)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreting_follows_tritons_own_rule(monkeypatch):
    from triton import knobs
    for v in ON + OFF + REFUSED + ("", "Y", "yEs"):
        monkeypatch.setenv("TRITON_INTERPRET", v)
        assert interpreting() is bool(knobs.runtime.interpret), repr(v)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert interpreting() is False and not knobs.runtime.interpret


def _probe(code: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**e, **env})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_PROBE_A = r"""
import json, torch
from fusedtune import _ext, backend
from fusedtune.ops import _eager, roste
out = dict(ext_error=_ext.error(), eager=_eager._ON, mma=roste.MMA, interpreting=backend.interpreting())
if __import__("importlib").util.find_spec("triton") is not None:
    from triton import knobs
    from fusedtune import triton_kernels as tk
    from fusedtune.triton_kernels import (fp8, fp8_tma, hft, launch, lora, lora_tma, roste as troste, roste_int,
                                          sparse_delta, sparse_delta_select)
    mods = (fp8, fp8_tma, hft, lora, lora_tma, troste, roste_int, sparse_delta, sparse_delta_select)
    out.update(triton_interprets=bool(knobs.runtime.interpret), interp_flags=[m._INTERP for m in mods],
               lora_tma=lora_tma.ENABLED, fp8_tma=fp8_tma.ENABLED, fast_launch=launch.ENABLED)
    x = torch.randn(4, 64)      # a CPU tensor: served by Triton only in the interpreter
    try:
        out["hadamard_ok"] = torch.allclose(roste.hadamard(x, backend="triton"),
                                            roste.hadamard(x, backend="reference"), atol=1e-5)
    except Exception as e:
        out["hadamard_ok"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_switches_take_effect_with_words_and_triton_interpret_true():
    out = _probe(_PROBE_A, FUSEDTUNE_DISABLE_EXTENSION="true", FUSEDTUNE_EAGER_OPS="false",
                 FUSEDTUNE_HADAMARD_MMA="On", FUSEDTUNE_LORA_TMA="yes", FUSEDTUNE_FP8_TMA=" TRUE ",
                 TRITON_INTERPRET="true")
    assert "disabled by FUSEDTUNE_DISABLE_EXTENSION" in (out["ext_error"] or ""), out
    assert out["eager"] is False and out["mma"] is True, out
    if not HAS_TRITON:
        return
    assert out["triton_interprets"] is True and out["interpreting"] is True, out
    assert all(out["interp_flags"]), out
    assert out["lora_tma"] is True and out["fp8_tma"] is True, out
    assert out["fast_launch"] is False, out       # never under the interpreter
    assert out["hadamard_ok"] is True, out


_PROBE_B = r"""
import importlib, json, os
from fusedtune import _ext
from fusedtune.ops import _eager
out = dict(ext_error=_ext.error(), eager=_eager._ON)
try:
    from fusedtune.triton_kernels import launch
    out["fast_launch"] = launch.ENABLED
except ImportError:
    pass
os.environ["FUSEDTUNE_EAGER_OPS"] = "maybe"
try:
    importlib.reload(_eager)
except ValueError as e:
    out["refused"] = str(e)
print(json.dumps(out))
"""


def test_switches_left_on_and_fast_launch_off_and_a_misspelling_refused():
    out = _probe(_PROBE_B, FUSEDTUNE_DISABLE_EXTENSION="off", FUSEDTUNE_EAGER_OPS="YES", FUSEDTUNE_FAST_LAUNCH="false",
                 TRITON_INTERPRET="0")
    assert "FUSEDTUNE_DISABLE_EXTENSION" not in (out["ext_error"] or ""), out
    assert out["eager"] is True, out
    if "fast_launch" in out:
        assert out["fast_launch"] is False, out
    assert "FUSEDTUNE_EAGER_OPS='maybe'" in out.get("refused", ""), out
