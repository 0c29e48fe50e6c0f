"""fusedtune.doctor(): what is installed, what was built, which backends run here and why not.

Ops are found by convention: every public function `<op>_backend(device, backend=None) -> {'backend': ...,
'why_not': {...}}` (or {op: {'backend', 'why_not'}} for a family of ops) defined in a module fusedtune/ops/<family>.py
is asked which backend its op takes on cpu and on cuda (`<family>_backend` first, then the others: hadamard_backend
in ops/roste.py, fp8_quant_backend in ops/fp8.py, regrow_backend in ops/sparse_delta_select.py).

The environment section lists every FUSEDTUNE_* variable that is set, with whether its value is valid (checked as
the code that reads it checks it; names fusedtune does not read are flagged), and TRITON_INTERPRET. An invalid
value makes `python -m fusedtune doctor` exit 1 after the report.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import platform
import sys

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict:
    import fusedtune
    try:
        import triton
        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001 - reported, not raised
        triton_v = f"not importable ({type(e).__name__}: {e})"
    return {"fusedtune": fusedtune.__version__, "torch": torch.__version__, "triton": triton_v,
            "transformers": _version("transformers"), "python": platform.python_version(),
            "torch_cuda": torch.version.cuda}


def _extension() -> dict:
    from . import _ext
    info = _ext.info()
    built_for = info.get("torch")
    out = {"built": info.get("path") is not None, "loaded": info.get("loaded", False), "path": info.get("path"),
           "error": info.get("error"), "built_for_torch": built_for, "with_cuda": bool(info.get("with_cuda")),
           "cuda_archs": _ext.cuda_archs(), "cuda_version": _cuda_version(info.get("cuda_version"))}
    if built_for and built_for != torch.__version__:
        out["warning"] = f"built for torch {built_for}, running torch {torch.__version__}"
    return out


def _cuda_version(v) -> str | None:
    """13000 -> '13.0' (nvcc's version as the build recorded it)."""
    if not v:
        return None
    v = int(v)
    return f"{v // 1000}.{(v % 1000) // 10}"


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return {"present": False, "why": "torch.cuda.is_available() is False (no GPU or no driver)"}
    devs = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devs.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1)})
    return {"present": True, "count": len(devs), "devices": devs, "name": devs[0]["name"],
            "capability": devs[0]["capability"]}


# FUSEDTUNE_* variables the code reads: name -> (who reads it, check). check: ("flag", default) for the boolean
# switches (fusedtune._env.env_flag; setup.py keeps a copy of its rule), a callable raising on a bad value for the
# others that validate (the readers' own checks), None for free-form values and the ones read outside the package.
def _check_backend(name):
    from .backend import _check_name
    _check_name(os.environ[name], name)


def _check_fp8_gemm(name):
    from .ops import fp8_cublas
    fp8_cublas.engine()


def _check_autotune(name):
    from .triton_kernels import common     # (needs triton: without it the variable is not read at all)
    common.autotune_mode()


def _check_kernel_jobs(name):
    from .bench import kernels
    try:
        kernels.report_jobs()
    except SystemExit as e:   # its CLI's way of refusing
        raise ValueError(str(e)) from None


_ENV_VARS = {
    "FUSEDTUNE_BACKEND": ("fusedtune.backend: the backend of every op that has it", _check_backend),
    "FUSEDTUNE_DISABLE_EXTENSION": ("fusedtune._ext, at import", ("flag", False)),
    "FUSEDTUNE_EAGER_OPS": ("fusedtune.ops._eager, at import", ("flag", True)),
    "FUSEDTUNE_HADAMARD_MMA": ("fusedtune.ops.roste, at import", ("flag", False)),
    "FUSEDTUNE_LORA_TMA": ("fusedtune.triton_kernels.lora_tma, at import", ("flag", False)),
    "FUSEDTUNE_FP8_TMA": ("fusedtune.triton_kernels.fp8_tma, at import", ("flag", False)),
    "FUSEDTUNE_FAST_LAUNCH": ("fusedtune.triton_kernels.launch, at import", ("flag", True)),
    "FUSEDTUNE_FP8_GEMM": ("fusedtune.ops.fp8_cublas: FP8Linear's GEMM engine", _check_fp8_gemm),
    "FUSEDTUNE_AUTOTUNE": ("fusedtune.triton_kernels.common: the Triton GEMMs' autotuning", _check_autotune),
    "FUSEDTUNE_KERNEL_JOBS": ("python -m fusedtune kernels", _check_kernel_jobs),
    "FUSEDTUNE_KERNEL_CACHE": ("python -m fusedtune kernels (cache folder; empty: no cache)", None),
    "FUSEDTUNE_BENCH_SKIP": ("python -m fusedtune bench", None),
    "FUSEDTUNE_COMMIT": ("python -m fusedtune bench (the commit its rows name)", None),
    "FUSEDTUNE_SKIP_CUDA": ("setup.py, at build time", ("flag", False)),
    "FUSEDTUNE_NO_CUDA": ("setup.py, at build time", ("flag", False)),
    "FUSEDTUNE_CUDA_ARCHS": ("setup.py, at build time (not checked here)", None),
    "FUSEDTUNE_REINSTALL": ("tools/dev.sh (not checked here)", None),
    "FUSEDTUNE_TEST_WORKERS": ("tools/dev.sh (not checked here)", None),
}


def _environment() -> dict:
    """{name: {'value', 'valid' (True/False; None: not checked), 'note'}} for every FUSEDTUNE_* variable set
    and TRITON_INTERPRET."""
    from ._env import env_flag, interpreting
    out = {}
    for name in sorted(k for k in os.environ if k.startswith("FUSEDTUNE_")):
        value = os.environ[name]
        if name not in _ENV_VARS:
            out[name] = {"value": value, "valid": None, "note": "not read by fusedtune (a misspelt name?)"}
            continue
        reader, check = _ENV_VARS[name]
        valid, note = (None, f"read by {reader}") if check is None else (True, f"read by {reader}")
        try:
            if isinstance(check, tuple):
                on = env_flag(name, check[1])
                note = f"{'on' if on else 'off'}, read by {reader}"
            elif check is not None:
                check(name)
        except ImportError as e:
            valid, note = None, f"read by {reader}; not checked ({type(e).__name__}: {e})"
        except Exception as e:  # noqa: BLE001 - the reader's refusal is the report
            valid, note = False, str(e)
            for prefix in (f"{name}={value!r}: ", f"{name}: ", f"{name} "):   # (the line names them already)
                note = note.removeprefix(prefix)
        out[name] = {"value": value, "valid": valid, "note": note}
    if "TRITON_INTERPRET" in os.environ:
        on = interpreting()
        out["TRITON_INTERPRET"] = {
            "value": os.environ["TRITON_INTERPRET"], "valid": True,
            "note": "on: Triton kernels run in its interpreter (on CPU tensors too)" if on
            else "off (Triton's rule: 1/true/yes/on/y, any case, turn it on)"}
    return out


def invalid_settings(d: dict) -> list[str]:
    """'NAME=value: why' for each variable of collect()'s environment whose value its reader refuses."""
    return [f"{k}={v['value']!r}: {v['note']}" for k, v in d.get("environment", {}).items() if v["valid"] is False]


def _forced() -> tuple[str, str] | None:
    """(backend, what asks for it) where a use_backend() scope around the call or FUSEDTUNE_BACKEND forces one
    (None: neither, 'auto', or an invalid FUSEDTUNE_BACKEND, which the ops' lines show as an error)."""
    from .backend import CHOICES, _scope
    scoped = getattr(_scope, "name", None)
    if scoped is not None:
        return (scoped, f"use_backend({scoped!r})") if scoped != "auto" else None
    want = os.environ.get("FUSEDTUNE_BACKEND")
    return (want, f"FUSEDTUNE_BACKEND={want}") if want in CHOICES and want != "auto" else None


def _op_probes() -> dict:
    """{'zo': <zo_backend>, 'hadamard': <hadamard_backend>, ...}: every public `<op>_backend` function defined in
    a module fusedtune.ops.<family>, `<family>_backend` first."""
    from . import ops
    probes = {}
    for mod in pkgutil.iter_modules(ops.__path__):
        if mod.name.startswith("_"):
            continue
        try:
            m = importlib.import_module(f"{ops.__name__}.{mod.name}")
        except Exception as e:  # noqa: BLE001 - a broken family is reported, not fatal
            probes[mod.name] = e
            continue
        names = sorted((k for k, fn in vars(m).items() if k.endswith("_backend") and not k.startswith("_")
                        and callable(fn) and getattr(fn, "__module__", None) == m.__name__),
                       key=lambda k: (k != f"{mod.name}_backend", k))
        for k in names:
            probes[k[:-len("_backend")]] = getattr(m, k)
    return probes


def _say_forced(r: dict, forced: tuple[str, str]) -> dict:
    """r ({'backend', 'why_not'} or {op: that}) with 'forced': what the forced backend (_forced()) did to the op:
    taken (or refused: backend None, why_not naming it alone), or not applied where the op has no such backend
    (backend.explain then chooses automatically)."""
    if "backend" not in r:
        return {op: _say_forced(rr, forced) for op, rr in r.items()}
    name, by = forced
    if r.get("backend") == name or (r.get("backend") is None and list(r.get("why_not") or {}) == [name]):
        why = f"{by} forces it"
    else:
        why = f"{by} does not apply: the op has no {name} backend, chosen automatically"
    return {**r, "forced": why}


def _ops() -> dict:
    out = {}
    gpu = torch.cuda.is_available()
    forced = _forced()
    for family, fn in _op_probes().items():
        if isinstance(fn, Exception):
            out[family] = {"error": f"fusedtune.ops.{family} did not import: {type(fn).__name__}: {fn}"}
            continue
        row = {}
        for dev in ("cpu", "cuda"):
            if dev == "cuda" and not gpu:
                row[dev] = {"backend": None, "why_not": {"cuda": "no CUDA GPU", "triton": "no CUDA GPU"}}
                continue
            try:
                row[dev] = fn(dev)
                if forced:
                    row[dev] = _say_forced(row[dev], forced)
            except Exception as e:  # noqa: BLE001
                row[dev] = {"backend": None, "why_not": {"error": f"{type(e).__name__}: {e}"}}
        out[family] = row
    return out


def _schedules(gpu: dict) -> dict:
    """The shape- and device-dependent choices inside the GPU paths: LoRA's base-GEMM schedule, FP8Linear's
    GEMM engine (on a GPU: whether cuBLAS's block-scaled FP8 GEMM passed its one-time check there), the
    sparse-delta gradient's schedule and the Hadamard kernel of factored rows."""
    out = {}
    try:
        from .ops import lora_triton
        from .triton_kernels import lora_tma
        out["lora"] = (f"base GEMM through cuBLAS + one expand pass for M*N*K >= {lora_triton.CUBLAS_MIN_WORK}, "
                       "the fused Triton GEMM below; on sm_90 that GEMM with TMA loads (lora_gemm_tma_kernel) "
                       f"{'on' if lora_tma.ENABLED else 'off'} ({lora_tma.ENV}=1 turns it on)")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        out["lora"] = f"unknown ({type(e).__name__}: {e})"
    try:
        from .ops import fp8_cublas
        eng = fp8_cublas.engine()
        if eng == "triton" or not gpu["present"]:
            why = f"{fp8_cublas.ENGINE_ENV}=triton" if eng == "triton" else "no GPU"
        else:
            why = fp8_cublas.status(torch.device("cuda", 0))
        out["fp8"] = (f"engine {eng}: FP8Linear's GEMMs through cuBLAS's block-scaled FP8 GEMM where the shape "
                      "allows" if why is None else f"engine {eng}: the Triton FP8 GEMM ({why})")
        try:
            from .triton_kernels import fp8_tma
            out["fp8"] += (f"; on sm_90 the Triton GEMM with TMA loads (fp8_gemm_tma_kernel) "
                           f"{'on' if fp8_tma.ENABLED else 'off'} ({fp8_tma.ENV}=1 turns it on)")
        except Exception as e:  # noqa: BLE001 - (no Triton: the engine line stands)
            out["fp8"] += f"; the TMA GEMM unknown ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001
        out["fp8"] = f"unknown ({type(e).__name__}: {e})"
    try:
        from .ops import sparse_delta as sd
        out["sparse_delta"] = (
            f"delta gradient (delta_grad='auto', 16-bit, >= {sd.DENSE_MIN_TOKENS} tokens): dW in float32 blocks + "
            f"gather from density {sd.dense_min_density((9, 0), 'cuda'):.2%} (over the CUDA SDDMM) / "
            f"{sd.dense_min_density((9, 0), 'triton'):.2%} (over Triton's) on sm_90 (measured), "
            f"{sd.dense_min_density((8, 0), 'cuda'):.2%} / {sd.dense_min_density((8, 0), 'triton'):.2%} on sm_80, "
            f"{sd.dense_min_density((8, 9), 'cuda'):.2%} / {sd.dense_min_density((8, 9), 'triton'):.2%} on other "
            "sm_8x (estimated); the SDDMM below")
    except Exception as e:  # noqa: BLE001
        out["sparse_delta"] = f"unknown ({type(e).__name__}: {e})"
    try:
        from .ops import roste
        out["hadamard"] = ("16-bit factored rows (m > 1) on CUDA: the tensor-core factor kernel (hadamard_mma_kernel) "
                           f"{'on' if roste.MMA else 'off'} ({roste.MMA_ENV}=1 turns it on); off, the butterfly "
                           "kernel up to 8192 and Triton above")
    except Exception as e:  # noqa: BLE001
        out["hadamard"] = f"unknown ({type(e).__name__}: {e})"
    return out


def collect() -> dict:
    from .backend import backends
    gpu = _gpu()
    return {"versions": _versions(), "environment": _environment(), "extension": _extension(), "gpu": gpu,
            "backends": backends(), "ops": _ops(), "schedules": _schedules(gpu),
            "platform": {"system": platform.platform(), "executable": sys.executable}}


def _why(d) -> str:
    return "; ".join(f"{k}: {v}" for k, v in d.items()) if isinstance(d, dict) else str(d or "")


def format_report(d: dict) -> str:
    v, e, g = d["versions"], d["extension"], d["gpu"]
    lines = ["fusedtune doctor", ""]
    lines += [f"  {k:<13}{val}" for k, val in v.items()]
    lines += ["", "environment (FUSEDTUNE_* and TRITON_INTERPRET set here)"]
    env = d.get("environment", {})
    for name, x in env.items():
        known = name in _ENV_VARS or not name.startswith("FUSEDTUNE_")
        mark = {True: "ok", False: "INVALID", None: "-" if known else "?"}[x["valid"]]
        lines.append(f"  {name:<27} {x['value']!r:<12} {mark:<7} {x['note']}".rstrip())
    if not env:
        lines.append("  none set")
    lines += ["", "extension fusedtune._C"]
    if e["loaded"]:
        cuda = (f"yes, archs {';'.join(e['cuda_archs'])}, nvcc {e['cuda_version']}" if e["with_cuda"]
                else "no (C++ CPU kernels only)")
        lines += [f"  loaded       {e['path']}", f"  built for    torch {e['built_for_torch']}",
                  f"  CUDA kernels {cuda}"]
        if e.get("warning"):
            lines.append(f"  WARNING      {e['warning']}")
    else:
        lines.append(f"  not loaded   {e['error']}")
    lines += ["", "GPU"]
    if g["present"]:
        lines += [f"  {x['index']}: {x['name']} (sm {x['capability']}, {x['memory_gib']} GiB)" for x in g["devices"]]
    else:
        lines.append(f"  none: {g['why']}")
    lines += ["", "backends"]
    for name, b in d["backends"].items():
        lines.append(f"  {name:<10} {'yes' if b['available'] else 'no ':<4} {b['why']}")
    lines += ["", "ops (backend taken by default, and why faster ones are not)"]
    for family, row in d["ops"].items():
        if "error" in row:
            lines.append(f"  {family:<6} {row['error']}")
            continue
        for dev, r in row.items():
            # a family of several ops (hft, sparse_delta) answers {op: {'backend', 'why_not'}}: a line an op
            for name, rr in ([(family, r)] if "backend" in r else [(f"{family}.{k}", v) for k, v in r.items()]):
                why = "; ".join(w for w in (rr.get("forced"), _why(rr.get("why_not"))) if w)
                line = f"  {name:<26} {dev:<5} -> {str(rr.get('backend')):<10}" + (f" ({why})" if why else "")
                lines.append(line.rstrip())
    lines += ["", "schedules (GPU paths)"]
    lines += [f"  {k:<12} {v}" for k, v in d.get("schedules", {}).items()]
    return "\n".join(lines)


def doctor(print_report: bool = True) -> dict:
    """Print (unless print_report=False) and return what fusedtune finds in this environment:
    versions, the compiled extension, GPU, available backends and the backend each op takes."""
    d = collect()
    if print_report:
        print(format_report(d))
    return d


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m fusedtune doctor", description=doctor.__doc__)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.json:
        d = doctor(print_report=False)
        print(json.dumps(d, indent=2, default=str))
    else:
        d = doctor()
    bad = invalid_settings(d)
    for b in bad:
        print(f"fusedtune doctor: invalid setting {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":   # python -m fusedtune.doctor (also python -m fusedtune doctor)
    sys.exit(main())
