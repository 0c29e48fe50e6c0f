"""Kernel report: what each GPU kernel costs on every target, read from the machine code, no GPU needed.

    python -m fusedtune kernels [--json PATH] [--no-triton] [--no-cuda] [--family F]

Two sources:

* Triton: every kernel registered in fusedtune.triton_kernels.registry is compiled ahead of time,
  once per config it ships and per compute capability it claims (spec.targets), with
  triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)). Pointer arguments are compiled
  as 16-byte aligned (what a launch on fresh torch tensors specializes to); a config may list the
  arguments that get that hint under "aligned" to override it.
* CUDA: the cubins embedded in the built extension fusedtune._C.

For each kernel x target the report reads, with cuobjdump (the one in the Triton wheel, else the
CUDA toolkit's): registers, stack/local bytes (spills live there), shared memory (static from the
cubin, plus the dynamic amount Triton launches with), local-memory instructions (LDL/STL) and
tensor-core instructions in the SASS (HMMA, HGMMA, QGMMA, IMMA, IGMMA; QMMA: Ada's FP8 mma.sync).
A Triton cubin's SASS comes from the nvdisasm beside that cuobjdump (code sections only, no dataflow
analysis: 0.46 s a row against cuobjdump -sass's 0.60 on a 2-core machine, the same instructions). The
kernels compile as a launch compiles them, line info included: without it ptxas allocated differently
on sm_89 (sm3_update_kernel 107 registers instead of 105; two hadamard_kernel_fp32 configs 8 more
instructions), so the rows would no longer be the launched code.

Defects, which make main() return 1: a compile failure, any stack/local memory (spills), and a GEMM
kernel (spec.gemm) without tensor-core instructions on a target it claims; for the extension, a
target it was built for that has no cubin.

Cache: a Triton row that compiled is kept as JSON under $FUSEDTUNE_KERNEL_CACHE (default
~/.cache/fusedtune/kernel_report; an empty value turns it off; --no-cache), keyed by Triton's own
source key of the kernel (its source and that of every function it calls), the spec, the config,
the target, the Triton build (version, triton_key, cache-invalidating environment variables), the
cuobjdump and nvdisasm used and this file. The rows of the extension's cubins are kept there too, keyed by the
library's bytes, the cuobjdump and this file (a wheel's copy of the same link reads the same rows).
The CLI and the tests of the report and the wheel use it, so `tools/dev.sh test` compiles each kernel
and reads each library once, not two or three times.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

TC_OPS = ("HMMA", "HGMMA", "QGMMA", "IMMA", "IGMMA", "QMMA")   # IGMMA: Hopper's int8 wgmma
_INSN = re.compile(r"/\*[0-9a-fA-F]{4,}\*/\s+(.*?)\s*;")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# ----------------------------------------------------------------------------- tools

@functools.lru_cache(maxsize=None)
def find_cuobjdump() -> str | None:
    """cuobjdump from the Triton wheel (always matches its ptxas), else CUDA_HOME's, else PATH."""
    cands = []
    try:
        from triton import knobs
        cands.append(knobs.nvidia.cuobjdump.path)
    except Exception:  # noqa: BLE001 - older Triton has no knobs
        pass
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "cuobjdump"))
    cands.append(shutil.which("cuobjdump"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@functools.lru_cache(maxsize=None)
def find_nvdisasm() -> str | None:
    """The nvdisasm beside find_cuobjdump()'s cuobjdump (the same toolkit), or None."""
    tool = find_cuobjdump()
    cand = os.path.join(os.path.dirname(tool), "nvdisasm") if tool else None
    return cand if cand and os.path.isfile(cand) and os.access(cand, os.X_OK) else None


def _cubin_sass(path: str) -> str:
    """The SASS of one cubin: nvdisasm's code sections (no dataflow analysis), else cuobjdump -sass;
    parse_sass reads both."""
    tool = find_nvdisasm()
    if tool is None:
        return _cuobjdump("-sass", path)
    proc = subprocess.run([tool, "-c", "-ndf", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm -c -ndf failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc.stdout


def _cuobjdump(*args: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (looked in the Triton wheel, $CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc.stdout


def parse_res_usage(text: str) -> dict:
    """cuobjdump -res-usage output -> {(arch or None, mangled function): {regs, stack, smem_static, local}}."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            fn = m.group(1)
            continue
        m = _RES.search(line)
        if m and fn is not None:
            regs, stack, shared, local = (int(v) for v in m.groups())
            out[(arch, fn)] = {"regs": regs, "stack": stack, "smem_static": shared, "local": local}
            fn = None
    return out


def parse_sass(text: str) -> dict:
    """cuobjdump -sass or nvdisasm output -> {(arch or None, mangled function): {HMMA: n, ..., LDL: n, STL: n,
    insts: n}}. cuobjdump names the arch ("code for sm_90a") and each function ("Function : name"); nvdisasm
    gives the arch in the ELF header flags (EF_CUDA_SM90, EF_CUDA_ACCELERATORS for sm_90a) and a function as
    its section's label (".text.name:")."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        m = "code for" in line and re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = ".headerflags" in line and re.search(r"EF_CUDA_SM(\d+)", line)
        if m:
            arch = f"sm_{m.group(1)}" + ("a" if "EF_CUDA_ACCELERATORS" in line else "")
            continue
        m = ("Function :" in line and re.match(r"\s*Function : (\S+)", line)) or \
            (line.startswith(".text.") and re.match(r"\.text\.(\S+):\s*$", line))
        if m:
            fn = m.group(1)
            out[(arch, fn)] = dict.fromkeys(TC_OPS + ("LDL", "STL", "insts", "LDG128", "STG128"), 0)
            continue
        if fn is None:
            continue
        m = _INSN.search(line)
        if not m:
            continue
        toks = m.group(1).split()
        if toks and toks[0].startswith("@"):  # predicate
            toks = toks[1:]
        if not toks:
            continue
        op = toks[0].split(".")[0]
        c = out[(arch, fn)]
        c["insts"] += 1
        if op in c:
            c[op] += 1
        if ".128" in toks[0] and op in ("LDG", "LDGSTS", "STG"):   # 16-byte global accesses (cp.async included)
            c["STG128" if op == "STG" else "LDG128"] += 1
    return out


def _demangle_fallback(name: str) -> str:
    """Itanium nested/simple names only (_ZN3foo3barE..., _Z3foo...), arguments dropped."""
    m = re.match(r"_Z(N?)(.*)", name)
    if not m:
        return name
    s, parts = m.group(2), []
    while s and s[0].isdigit():
        n = re.match(r"\d+", s).group(0)
        parts.append(s[len(n):len(n) + int(n)])
        s = s[len(n) + int(n):]
        if not m.group(1):
            break
    return "::".join(parts) if parts else name


def _strip_signature(s: str) -> str:
    """'void ns::k<float, 4>(ns::Args, int)' -> 'ns::k<float, 4>'."""
    s = s.strip()
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    depth, cut = 0, 0
    for i, ch in enumerate(s):  # drop a return type: the last top-level space
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == " " and depth == 0:
            cut = i + 1
    return s[cut:]


def demangle(names) -> dict:
    """{mangled: short readable name} (c++filt when present, else a small fallback)."""
    names = list(dict.fromkeys(names))
    full = {}
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if tool and names:
        try:
            proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=30)
            lines = proc.stdout.splitlines()
            if proc.returncode == 0 and len(lines) == len(names):
                full = dict(zip(names, lines))
        except Exception:  # noqa: BLE001
            full = {}
    out = {}
    for n in names:
        d = full.get(n)
        out[n] = _strip_signature(d) if d and d != n else _demangle_fallback(n)
    return out


# ----------------------------------------------------------------------------- Triton

def _row(**kw) -> dict:
    row = {"source": None, "family": None, "kernel": None, "config": "", "target": None, "cc": None,
           "gemm": False, "regs": None, "spill_bytes": None, "stack_bytes": None, "local_bytes": None,
           "local_insts": None, "smem": None, "smem_static": None, "smem_dynamic": None,
           **dict.fromkeys(TC_OPS), "tc_insts": None, "insts": None, "ldg128": None, "stg128": None,
           "mangled": None, "error": None, "requires": None, "notes": []}
    row.update(kw)
    return row


def _fill_from_cubin_stats(row: dict, res: dict | None, sass: dict | None):
    if res is not None:
        row.update(regs=res["regs"], stack_bytes=res["stack"], local_bytes=res["local"],
                   spill_bytes=res["stack"] + res["local"], smem_static=res["smem_static"])
        row["smem"] = res["smem_static"] + (row["smem_dynamic"] or 0)
    if sass is not None:
        for op in TC_OPS:
            row[op] = sass[op]
        row["tc_insts"] = sum(sass[op] for op in TC_OPS)
        row["local_insts"] = sass["LDL"] + sass["STL"]
        row["insts"] = sass["insts"]
        row["ldg128"], row["stg128"] = sass["LDG128"], sass["STG128"]


# config keys that describe the launch rather than being triton.compile options
_NOT_OPTIONS = ("constexprs", "aligned", "signature", "gemm")


def config_label(config: dict, spec=None) -> str:
    parts = [f"{k}={v}" for k, v in (config.get("constexprs") or {}).items()]
    base = getattr(spec, "signature", {}) or {}
    parts += [f"{k}:{v}" for k, v in (config.get("signature") or {}).items() if base.get(k) != v]
    parts += [f"w{config['num_warps']}"] if "num_warps" in config else []
    parts += [f"s{config['num_stages']}"] if "num_stages" in config else []
    parts += [f"{k}={v}" for k, v in config.items() if k not in _NOT_OPTIONS + ("num_warps", "num_stages")]
    return " ".join(parts)


def _param_names(fn) -> list[str]:
    names = getattr(fn, "arg_names", None)
    if names is None:
        names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    return list(names)


def _ast_source(spec, config: dict, target):
    """The ASTSource for one config, for the installed Triton (constexprs listed in the signature)."""
    from triton.compiler import ASTSource

    fn = spec.fn
    names = _param_names(fn)
    types = dict(spec.signature, **(config.get("signature") or {}))
    consts = dict(config.get("constexprs") or {})
    for p in getattr(fn, "params", []):  # constexpr parameters with defaults that a config leaves out
        if getattr(p, "is_constexpr", False) and p.name not in consts and p.name not in types:
            default = getattr(p, "default", inspect.Parameter.empty)
            if default is not inspect.Parameter.empty:
                consts[p.name] = default
    unknown = [k for k in list(types) + list(consts) if k not in names]
    if unknown:
        raise ValueError(f"{spec.name}: {unknown} are not parameters of {getattr(fn, '__name__', fn)} ({names})")
    missing = [n for n in names if n not in types and n not in consts]
    if missing:
        raise ValueError(f"{spec.name}: parameters {missing} have neither a type in the spec's signature nor a "
                         "constexpr value in the config")
    signature = {n: (types[n] if n in types else "constexpr") for n in names}
    aligned = config.get("aligned")
    if aligned is None:
        aligned = [n for n, t in types.items() if str(t).startswith("*")]
    try:
        from triton.compiler.compiler import make_backend
        hint = make_backend(target).parse_attr("D")
    except Exception:  # noqa: BLE001
        hint = [["tt.divisibility", 16]]
    attrs = {(names.index(n),): hint for n in aligned}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs)
    # Triton < 3.3: constants by name, signature without the constexprs, no attrs dict
    sig = {n: t for n, t in signature.items() if t != "constexpr"}
    return ASTSource(fn, signature=sig, constants=consts)


def compile_triton(spec, config: dict, cc: int):
    """triton.compile one spec/config for compute capability cc; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", int(cc), 32)
    options = dict(spec.options or {})
    options.update({k: v for k, v in config.items() if k not in _NOT_OPTIONS})
    src = _ast_source(spec, config, target)
    return triton.compile(src, target=target, options=options)


def report_triton_kernel(spec, config: dict, cc: int) -> dict:
    row = _row(source="triton", family=spec.family, kernel=spec.name, config=config_label(config, spec),
               target=f"sm_{cc}", cc=int(cc), gemm=bool(config.get("gemm", spec.gemm)),
               requires=(getattr(spec, "requires", None) or {}).get(int(cc)))
    try:
        k = compile_triton(spec, config, cc)
    except Exception as e:  # noqa: BLE001 - a failed compile is a reported defect
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().strip("^~").strip()]
        row["error"] = f"compile failed: {type(e).__name__}: {lines[-1] if lines else ''}"[:400]
        row["error_detail"] = str(e)[-4000:]
        return row
    row["smem_dynamic"] = int(getattr(k.metadata, "shared", 0) or 0)
    row["mangled"] = k.metadata.name
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(k.asm["cubin"])
        res = parse_res_usage(_cuobjdump("-res-usage", path))
        sass = parse_sass(_cubin_sass(path))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"cannot read the cubin: {e}"
        return row
    finally:
        os.remove(path)
    r = next((v for (a, f), v in res.items() if f == k.metadata.name), None)
    s_key = next(((a, f) for (a, f) in sass if f == k.metadata.name), None)
    if s_key and s_key[0]:
        row["target"] = s_key[0]  # the real cubin arch, e.g. sm_90a
    _fill_from_cubin_stats(row, r, sass.get(s_key) if s_key else None)
    if r is None or s_key is None:
        row["error"] = f"function {k.metadata.name} not found in the cubin's res-usage/SASS"
    return row


def default_cache_dir() -> str | None:
    """Where report rows are cached: $FUSEDTUNE_KERNEL_CACHE ('' = off), else ~/.cache/fusedtune/kernel_report."""
    env = os.environ.get("FUSEDTUNE_KERNEL_CACHE")
    if env is not None:
        return env or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedtune", "kernel_report")


@functools.lru_cache(maxsize=None)
def _this_file_hash() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@functools.lru_cache(maxsize=None)
def _triton_build_key() -> str:
    """What Triton's own compile cache keys on besides the source: the installed build (triton_key)
    and the environment variables that change its output (e.g. TRITON_PTXAS_PATH)."""
    import triton
    parts = [triton.__version__]
    try:
        from triton.runtime.cache import triton_key
        parts.append(triton_key())
    except Exception:  # noqa: BLE001 - another Triton layout: the version alone
        pass
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        parts.append(json.dumps(get_cache_invalidating_env_vars(), sort_keys=True, default=str))
    except Exception:  # noqa: BLE001
        pass
    return "|".join(parts)


def row_cache_key(spec, config: dict, cc: int) -> str | None:
    """The cache key of one report row, or None when the kernel has no Triton source key."""
    try:
        src_key = spec.fn.cache_key      # Triton's hash of the kernel's source and its callees'
    except Exception:  # noqa: BLE001
        return None
    blob = json.dumps([src_key, spec.family, spec.name, spec.signature, config, int(cc), spec.options,
                       getattr(spec, "requires", None), config.get("gemm", spec.gemm), _triton_build_key(),
                       find_cuobjdump(), find_nvdisasm(), _this_file_hash()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached_report(spec, config: dict, cc: int, cache_dir: str | None) -> dict:
    row = _cached_row(spec, config, cc, cache_dir)   # (unreadable: compile again)
    if row is not None:
        return row
    key = row_cache_key(spec, config, cc) if cache_dir else None
    path = os.path.join(cache_dir, key + ".json") if key else None
    row = report_triton_kernel(spec, config, cc)
    if path and not row.get("error"):
        _write_json(path, row)
    return row


def _write_json(path: str, obj) -> None:
    """Write a cache entry atomically; a read-only cache only costs time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _cached_row(spec, config: dict, cc: int, cache_dir: str | None) -> dict | None:
    """The cached row of (spec, config, cc), or None."""
    key = row_cache_key(spec, config, cc) if cache_dir else None
    path = os.path.join(cache_dir, key + ".json") if key else None
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    return None


def _spec_keys(specs) -> dict:
    """id(spec) -> (module, name, k): the k-th spec of that name registered by that module. The registry's
    order across modules is the order the modules were first imported, which differs between a process that
    imported some before all_kernels() and a fresh worker; within a module it is the module's own."""
    seen, keys = {}, {}
    for spec in specs:
        mod = getattr(getattr(spec.fn, "fn", spec.fn), "__module__", "")
        k = seen.get((mod, spec.name), 0)
        seen[(mod, spec.name)] = k + 1
        keys[id(spec)] = (mod, spec.name, k)
    return keys


def _report_job(key: tuple, j: int, cc: int, cache_dir: str | None) -> dict:
    """A worker's row: the registry's spec `key` (_spec_keys), its config j, on cc."""
    from fusedtune.triton_kernels.registry import all_kernels
    specs = all_kernels()
    by_key = {v: i for i, v in _spec_keys(specs).items()}
    spec = next(s for s in specs if id(s) == by_key[key])
    return _cached_report(spec, spec.configs[j], cc, cache_dir)


def report_jobs() -> int:
    """Processes that compile the report's uncached Triton rows: $FUSEDTUNE_KERNEL_JOBS, else the CPU count
    (at most 8)."""
    env = os.environ.get("FUSEDTUNE_KERNEL_JOBS")
    if env:
        if not env.strip().isdigit():
            raise SystemExit(f"FUSEDTUNE_KERNEL_JOBS must be a number of processes, got {env!r}")
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def _spawn_works() -> bool:
    """Whether a spawned worker can start: it re-runs the main script, which must then be a file (not stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path)


# Fewer uncached rows than this compile in this process (a worker's start, an import of torch and Triton,
# costs a few seconds).
_POOL_MIN_ROWS = 16


def collect_triton(specs=None, cache_dir: str | None = None, jobs: int | None = None) -> list[dict]:
    """Rows of every spec x config x target; cache_dir: reuse and keep compiled rows there. Uncached rows of
    the registry's kernels compile in `jobs` processes (report_jobs()) when there are enough of them: on a
    fresh 2-core machine the 485 rows took ~9 minutes in one (~1.1 s a row), the longest step of CI."""
    from fusedtune.triton_kernels.registry import all_kernels
    registry = all_kernels()
    specs = registry if specs is None else specs
    work = [(spec, j, cc) for spec in specs for j in range(len(spec.configs)) for cc in spec.targets]
    rows = [_cached_row(spec, spec.configs[j], cc, cache_dir) for spec, j, cc in work]
    keys = _spec_keys(registry)
    todo = [k for k, r in enumerate(rows) if r is None]
    pooled = [k for k in todo if id(work[k][0]) in keys]
    jobs = report_jobs() if jobs is None else jobs
    if jobs > 1 and len(pooled) >= _POOL_MIN_ROWS and _spawn_works():
        import multiprocessing
        try:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futs = {k: pool.submit(_report_job, keys[id(work[k][0])], work[k][1], work[k][2], cache_dir)
                        for k in pooled}
                for k, fut in futs.items():
                    rows[k] = fut.result()
        except Exception as e:  # noqa: BLE001 - a worker's failure is the pool's (a compile error is a row):
            print(f"fusedtune kernels: worker processes failed ({type(e).__name__}: {e}); compiling here",
                  file=sys.stderr)   # the rows left compile in this process
    for k in todo:
        if rows[k] is None:
            spec, j, cc = work[k]
            rows[k] = _cached_report(spec, spec.configs[j], cc, cache_dir)
    return rows


# ----------------------------------------------------------------------------- CUDA extension

def extension_path() -> str | None:
    try:
        from fusedtune import _ext
        p = _ext.info().get("path")
    except Exception:  # noqa: BLE001
        p = None
    return p if p and os.path.exists(p) else None


def list_elfs(path: str) -> list[str]:
    """Names of the cubins embedded in a binary (cuobjdump -lelf), e.g. ['zo.sm_80.cubin', ...]; none for a
    library without device code (cuobjdump fails on it: an extension built without CUDA kernels)."""
    try:
        text = _cuobjdump("-lelf", path)
    except RuntimeError as e:
        if "does not contain device code" in str(e):
            return []
        raise
    return re.findall(r"ELF file\s+\d+:\s*(\S+)", text)


def cubin_archs(path: str) -> list[str]:
    """Distinct SASS targets embedded in a binary, e.g. ['sm_80', 'sm_89', 'sm_90a']."""
    archs = []
    for name in list_elfs(path):
        m = re.search(r"\.(sm_\w+?)\.cubin$", name) or re.search(r"(sm_\d+[af]?)", name)
        if m and m.group(1) not in archs:
            archs.append(m.group(1))
    return archs


def _claimed_archs() -> list[str]:
    try:
        from fusedtune import _ext
        return ["sm_" + a.replace("+PTX", "").replace(".", "") for a in _ext.cuda_archs()]
    except Exception:  # noqa: BLE001
        return []


def collect_cuda(path: str | None = None, notes: list | None = None, cache_dir: str | None = None) -> list[dict]:
    """One row per kernel x embedded cubin arch of the extension (default: the built fusedtune._C).
    cache_dir: keep (and reuse) the rows of a library by its bytes (with the cuobjdump and this file)."""
    notes = notes if notes is not None else []
    path = path or extension_path()
    if path is None:
        notes.append("fusedtune._C is not built: the report covers the Triton kernels only")
        return []
    try:
        rows = _cubin_rows(path, cache_dir)
    except Exception as e:  # noqa: BLE001
        notes.append(f"cannot read the cubins of {path}: {e}")
        return [_row(source="cuda", kernel="(extension)", error=str(e))]
    if not rows:
        notes.append(f"{path} holds no cubins (built without CUDA kernels)")
        return []
    archs = list(dict.fromkeys(r["target"] for r in rows))
    have = {re.sub(r"[af]$", "", a) for a in archs}  # an older cuobjdump names sm_90a cubins "sm_90"
    for want in _claimed_archs():
        if want not in archs and re.sub(r"[af]$", "", want) not in have:
            rows.append(_row(source="cuda", kernel="(extension)", target=want,
                             error=f"built for {want} but {os.path.basename(path)} has no cubin for it"))
    return rows


def _cubin_rows(path: str, cache_dir: str | None) -> list[dict]:
    """The kernel rows of every cubin in the library at path, from the cache when its bytes were read before.
    The cuobjdump runs of the targets go in parallel (threads: each is its own process)."""
    key = None
    if cache_dir:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        blob = json.dumps([h.hexdigest(), find_cuobjdump(), _this_file_hash()])
        key = os.path.join(cache_dir, "cuda-" + hashlib.sha256(blob.encode()).hexdigest() + ".json")
        try:
            with open(key) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    archs = cubin_archs(path)

    def dump(arch_what):
        return _cuobjdump("-arch", arch_what[0], arch_what[1], path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        texts = list(pool.map(dump, [(a, w) for a in archs for w in ("-res-usage", "-sass")]))
    rows = []
    for i, arch in enumerate(archs):
        res, sass = parse_res_usage(texts[2 * i]), parse_sass(texts[2 * i + 1])
        names = demangle([f for (_, f) in res])
        for (a, fn), r in sorted(res.items(), key=lambda kv: names[kv[0][1]]):
            row = _row(source="cuda", family=_family_of(names[fn]), kernel=names[fn], config="-", target=arch,
                       cc=int(re.sub(r"\D", "", arch)), mangled=fn, gemm=names[fn].startswith(CUDA_GEMMS))
            s = sass.get((a, fn)) or next((v for (sa, sf), v in sass.items() if sf == fn), None)
            _fill_from_cubin_stats(row, r, s)
            rows.append(row)
    if key and rows and not any(r.get("error") for r in rows):
        _write_json(key, rows)
    return rows


def _family_of(name: str) -> str | None:
    parts = name.split("<")[0].split("::")
    return parts[1] if len(parts) > 2 and parts[0] == "fusedtune" else None


# ----------------------------------------------------------------------------- checks and output

# CUDA kernels built to move 16 bytes per global access (their sources say so), by name prefix: which
# accesses the SASS must show as 128-bit (LDG / cp.async LDGSTS, STG). A uint4 assignment can compile to
# four 32-bit stores: zo_apply_kernel's did, unseen until its PTX was read. (hadamard_kernel's factor stage
# stores 16-bit outputs one by one: loads only.)
VECTOR_IO = {"fusedtune::zo::zo_apply_kernel": ("ldg128", "stg128"),
             "fusedtune::roste::hadamard_warp_kernel": ("ldg128", "stg128"),
             "fusedtune::roste::hadamard_kernel": ("ldg128",),
             "fusedtune::roste::(anonymous namespace)::hadamard_mma_kernel": ("ldg128", "stg128")}

# CUDA kernels built on tensor cores (mma.sync): the SASS must show HMMA, as a Triton GEMM's must.
CUDA_GEMMS = ("fusedtune::roste::(anonymous namespace)::hadamard_mma_kernel",)

# The most shared memory one block may use (static + dynamic), per target (CUDA programming guide).
SMEM_MAX = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
            "sm_90a": 227 * 1024}


def defects(row: dict) -> list[str]:
    """What is wrong with one row (empty when nothing)."""
    out = []
    where = f"{row['source']} {row['kernel']} [{row['config']}] on {row['target']}"
    if row.get("error"):
        return [f"{where}: {row['error']}"]
    if (row.get("spill_bytes") or 0) > 0 or (row.get("local_insts") or 0) > 0:
        out.append(f"{where}: spills / local memory: {row['stack_bytes']} B stack, {row['local_bytes']} B local, "
                   f"{row['local_insts']} LDL/STL instructions")
    wants = next((v for k, v in VECTOR_IO.items() if str(row.get("kernel")).startswith(k)), ())
    short = [w for w in wants if row.get(w) == 0]
    if row.get("source") == "cuda" and short:
        out.append(f"{where}: built for 16-byte global accesses, but the SASS has no 128-bit "
                   f"{' or '.join('loads' if w == 'ldg128' else 'stores' for w in short)}")
    cap = SMEM_MAX.get(str(row.get("target")))
    if cap is not None and (row.get("smem") or 0) > cap:
        out.append(f"{where}: needs {row['smem']} B of shared memory, the target allows {cap} B per block "
                   "(the launch fails)")
    if row.get("gemm") and not row.get("tc_insts"):
        out.append(f"{where}: GEMM kernel without tensor-core instructions (no {'/'.join(TC_OPS)} in SASS)")
    elif row.get("requires") and not row.get(row["requires"]) and not row.get("error"):
        shown = "/".join(op for op in TC_OPS if row.get(op)) or "none"
        out.append(f"{where}: needs {row['requires']} on this target, SASS shows {shown}")
    return out


def check(rows) -> list[str]:
    return [d for r in rows for d in defects(r)]


def collect(include_triton: bool = True, include_cuda: bool = True, specs=None, ext_path: str | None = None,
            notes: list | None = None, cache_dir: str | None = None) -> list[dict]:
    """Rows for every Triton kernel config x target (specs default to the registry) and every cubin kernel
    of the extension. Each row's "defects" lists what check() would flag. cache_dir: see the module doc."""
    notes = notes if notes is not None else []
    rows = []
    if include_triton:
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001
            notes.append(f"triton is not importable ({e}): no Triton kernels reported")
        else:
            rows += collect_triton(specs, cache_dir)
    if include_cuda:
        rows += collect_cuda(ext_path, notes, cache_dir)
    for r in rows:
        r["defects"] = defects(r)
        if (r.get("gemm") and (r.get("cc") or 0) >= 90 and not r.get("HGMMA") and not r.get("QGMMA")
                and not r.get("IGMMA") and r.get("tc_insts")):
            r["notes"].append("mma.sync on sm_90 (no wgmma)")
    return rows


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def format_table(rows) -> str:
    cols = [("source", "source"), ("family", "family"), ("kernel", "kernel"), ("config", "config"),
            ("target", "target"), ("regs", "regs"), ("spill_bytes", "spill B"), ("smem", "smem B"),
            ("HMMA", "HMMA"), ("HGMMA", "HGMMA"), ("QGMMA", "QGMMA"), ("QMMA", "QMMA"), ("IMMA", "IMMA"),
            ("IGMMA", "IGMMA"), ("status", "status")]
    body = []
    for r in rows:
        status = "DEFECT" if r.get("defects") else ("GEMM ok" if r.get("gemm") else "ok")
        if r.get("error"):
            status = "ERROR"
        if r.get("notes"):
            status += " (" + "; ".join(r["notes"]) + ")"
        body.append([status if k == "status" else _fmt(r.get(k)) for k, _ in cols])
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (_, h) in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line([h for _, h in cols]), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedtune kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--no-cuda", action="store_true", help="skip the extension's cubins")
    ap.add_argument("--family", help="only kernels of this family")
    ap.add_argument("--no-cache", action="store_true", help="compile every Triton kernel again (no row cache)")
    args = ap.parse_args(argv)

    notes: list[str] = []
    specs, known = None, set()
    if not args.no_triton and args.family:
        try:
            from fusedtune.triton_kernels.registry import all_kernels
            registered = all_kernels()
            known = {s.family for s in registered}
            specs = [s for s in registered if s.family == args.family]
        except Exception as e:  # noqa: BLE001
            notes.append(f"cannot load the Triton kernel registry: {e}")
            specs = []
    cache = None if args.no_cache else default_cache_dir()
    rows = collect(include_triton=not args.no_triton, include_cuda=not args.no_cuda, specs=specs, notes=notes,
                   cache_dir=cache)
    known |= {r["family"] for r in rows}
    if args.family:
        rows = [r for r in rows if r["family"] == args.family or r["source"] == "triton"]
    tool = find_cuobjdump()
    print(f"fusedtune kernel report (cuobjdump: {tool or 'not found'}; row cache: {cache or 'off'})")
    for n in notes:
        print(f"note: {n}")
    if rows:
        print(format_table(rows))
    else:
        print("no kernels to report")
    bad = check(rows)
    n_triton = sum(r["source"] == "triton" for r in rows)
    print(f"\n{len(rows)} kernel x target rows ({n_triton} Triton, {len(rows) - n_triton} CUDA); "
          f"{len(bad)} defect(s)")
    for d in bad:
        print(f"DEFECT: {d}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "notes": notes, "defects": bad, "cuobjdump": tool}, f, indent=1)
        print(f"wrote {args.json}")
    if not rows and not (args.no_triton and args.no_cuda):
        # nothing compiled although something was asked for: a wrong --family, or no Triton and no extension
        if args.family:
            fams = ", ".join(sorted(f for f in known if f)) or "none found"
            print(f"error: no kernel of family {args.family!r} was compiled (families: {fams})")
        else:
            print("error: no kernel was compiled (see the notes above)")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
