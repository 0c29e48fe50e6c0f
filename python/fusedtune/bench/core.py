"""Benchmark framework: timers, the H100 roofline, CSV rows and plots.

A family module fusedtune/bench/<family>.py exposes `run(timer, quick) -> list[dict]`; each dict is
one measurement made with `timer` (a GpuTimer or a CpuTimer), built with `row(...)`: our kernel's
time and the baseline's, timed in the same run. main() adds the environment columns, appends to
<out>/<family>.csv and plots the ratios to <out>/<family>.png.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import math
import os
import subprocess
import time
from typing import Callable, Sequence

import torch

# H100 SXM dense peaks (DESIGN.md, Conventions/Benchmarks)
H100_BF16_FLOPS = 989e12
H100_FP8_FLOPS = 1979e12
H100_HBM_BYTES_PER_S = 3.35e12

COLUMNS = ["kernel", "shape", "dtype", "backend", "baseline", "time_ms", "p20_ms", "p80_ms", "baseline_ms",
           "ratio", "roofline_pct", "gpu_name", "torch", "triton", "commit", "date", "note"]
QUANTILES = [0.5, 0.2, 0.8]


# ----------------------------------------------------------------------------- roofline

def roofline_ms(bytes_moved: float = 0.0, flops: float = 0.0, precision: str = "bf16") -> float:
    """The H100 lower bound on the time of a kernel that moves `bytes_moved` through HBM and does
    `flops` dense tensor-core flops of `precision` ("bf16"/"fp16" or "fp8")."""
    peak = H100_FP8_FLOPS if precision.startswith("fp8") else H100_BF16_FLOPS
    return max(bytes_moved / H100_HBM_BYTES_PER_S, flops / peak) * 1e3


def roofline_pct(time_ms: float, bytes_moved: float = 0.0, flops: float = 0.0, precision: str = "bf16") -> float:
    """Percent of the H100 roofline reached: 100 * roofline time / measured time."""
    if not time_ms or time_ms <= 0:
        return float("nan")
    return 100.0 * roofline_ms(bytes_moved, flops, precision) / time_ms


# datasheet HBM bandwidth by GPU name (first match wins): bandwidth goals ("85% of HBM") are judged
# against the GPU that ran; the roofline_pct column stays on the H100 figures (bench/README.md)
HBM_PEAKS = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", H100_HBM_BYTES_PER_S),
             ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12))


def hbm_peak(gpu_name: str) -> tuple[float, str]:
    """(bytes/s, label) of the GPU named gpu_name; the H100's, labelled so, for a GPU not in HBM_PEAKS."""
    for key, bw in HBM_PEAKS:
        if key in gpu_name:
            return bw, f"{key} HBM {bw / 1e12:.2f} TB/s"
    return H100_HBM_BYTES_PER_S, f"H100 HBM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s (not known for {gpu_name})"


def _hbm_pct(time_ms: float, bytes_moved: float, gpu_name: str) -> tuple[float, float, str]:
    """(bytes/s, % of the HBM peak of gpu_name, that peak's label)."""
    bw, label = hbm_peak(gpu_name)
    per_s = bytes_moved / (time_ms * 1e-3)
    return per_s, 100.0 * per_s / bw, label


def hbm_share(time_ms: float, bytes_moved: float) -> str:
    """'X GB/s = P% of <this GPU's HBM>' (the GPU torch runs on; the roofline_pct column stays on the H100's)."""
    per_s, pct, label = _hbm_pct(time_ms, bytes_moved,
                                 torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return f"{per_s / 1e9:.0f} GB/s = {pct:.1f}% of {label}"


def hbm_goal(time_ms: float, bytes_moved: float, goal_pct: float, gpu_name: str) -> str:
    """'P% of <this GPU's HBM>; goal >= G%: met / NOT met' for a kernel that moved bytes_moved in time_ms."""
    _, pct, label = _hbm_pct(time_ms, bytes_moved, gpu_name)
    return f"{pct:.1f}% of {label}; goal >= {goal_pct:.0f}%: {'met' if pct >= goal_pct else 'NOT met'}"


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]

    def q(p):  # linear interpolation, as numpy's default and torch.quantile
        x = p * (len(s) - 1)
        lo = int(x)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)
    return q(0.5), q(0.2), q(0.8)


class Timer:
    """timer(fn) -> (median_ms, p20_ms, p80_ms). `device` is where the family allocates its tensors."""

    device: torch.device
    name: str

    def __init__(self, quick: bool = False):
        self.quick = quick

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        raise NotImplementedError

    def sync(self):
        pass


class CpuTimer(Timer):
    """time.perf_counter over repeats: a warm-up call, then at least `min_reps` calls and about
    `budget_s` seconds. For testing the framework on machines without a GPU (tiny shapes)."""

    def __init__(self, quick: bool = False, min_reps: int | None = None, budget_s: float | None = None):
        super().__init__(quick)
        self.device = torch.device("cpu")
        self.name = "cpu"
        self.min_reps = min_reps or (5 if quick else 10)
        self.budget_s = budget_s if budget_s is not None else (0.05 if quick else 0.5)

    def __call__(self, fn):
        fn()  # warm-up
        samples, start = [], time.perf_counter()
        while len(samples) < self.min_reps or (time.perf_counter() - start < self.budget_s and len(samples) < 1000):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return _quantiles(samples)


class GpuTimer(Timer):
    """triton.testing.do_bench (L2 flushed between calls) with quantiles [0.5, 0.2, 0.8]; the
    repetition time grows with the kernel so that slow baselines are still timed several times.
    Falls back to CUDA events when Triton is not importable."""

    def __init__(self, quick: bool = False, device=None):
        super().__init__(quick)
        self.device = torch.device(device or "cuda")
        self.name = torch.cuda.get_device_name(self.device)
        self.min_reps = 3 if quick else 8

    def sync(self):
        torch.cuda.synchronize(self.device)

    def _estimate_ms(self, fn) -> float:
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn):
        est = self._estimate_ms(fn)
        rep = min(max(50.0 if self.quick else 100.0, self.min_reps * est), 20000.0)
        warmup = min(max(10.0, est), 1000.0)
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - no Triton: time with CUDA events
            return self._events(fn, max(self.min_reps, int(rep / max(est, 1e-3))))
        try:
            r = do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
        except TypeError:  # an older/newer signature: keep to the arguments every version has
            r = do_bench(fn, quantiles=QUANTILES)
        if isinstance(r, (list, tuple)) and len(r) == 3:
            return float(r[0]), float(r[1]), float(r[2])
        r = float(r[0] if isinstance(r, (list, tuple)) else r)
        return r, r, r

    def _events(self, fn, reps):
        samples = []
        for _ in range(max(1, min(reps, 1000))):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        return _quantiles(samples)


def opt_in_skipped(kernel: str) -> str:
    """Why an opt-in kernel ("fused-tma", "cuda-mma") is not timed in this run, or "": FUSEDTUNE_BENCH_SKIP
    (comma-separated) names the ones to leave out. bench/gpu_check.sh sets it for a kernel whose GPU tests
    failed in the same call: a kernel that faults leaves the process's CUDA context unusable, and the
    family's later sections would be lost with it."""
    skip = {k.strip() for k in os.environ.get("FUSEDTUNE_BENCH_SKIP", "").split(",") if k.strip()}
    return f"{kernel} left out (FUSEDTUNE_BENCH_SKIP: its GPU tests failed in this run)" if kernel in skip else ""


def free_memory() -> None:
    """Collect garbage and hand cached GPU blocks back, so the next measurement starts from what it allocates."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- rows

def row(kernel: str, shape: str, dtype: str, backend: str, baseline: str, times: Sequence[float],
        baseline_ms: float | None, roofline: float | None = None, note: str = "") -> dict:
    """One CSV row: `times` = (median, p20, p80) of ours; ratio = baseline_ms / median (> 1: faster
    than the baseline)."""
    med, p20, p80 = (float(t) for t in times)
    ratio = (baseline_ms / med) if baseline_ms and med > 0 else float("nan")
    return {"kernel": kernel, "shape": shape, "dtype": dtype, "backend": backend, "baseline": baseline,
            "time_ms": med, "p20_ms": p20, "p80_ms": p80,
            "baseline_ms": float("nan") if baseline_ms is None else float(baseline_ms),
            "ratio": ratio, "roofline_pct": float("nan") if roofline is None else float(roofline), "note": note}


# ----------------------------------------------------------------------------- agreement checks
# A row's ratio is only a claim where ours and the baseline compute the same result: each family runs the pair
# once before timing, outside the timed region, and appends one of these notes to the row.

AGREE_TOL = 3e-2          # max error / the baseline's max magnitude: bf16's rounding, with margin
FP8_MIN_SQNR_DB = 20.0    # E4M3 with block scales gives ~28.7 dB against exact math (3 mantissa bits)
CHECK_LR = 1e-2           # the learning rate of an optimizer check step: large enough to show in bf16 weights
DIFFER = " -- RESULTS DIFFER"


def _pairs(ours, theirs) -> tuple[list, list, str]:
    """(ours' tensors, theirs', why they cannot be compared or ""): a tensor or a sequence of tensors each."""
    ours = [ours] if torch.is_tensor(ours) else list(ours)
    theirs = [theirs] if torch.is_tensor(theirs) else list(theirs)
    if len(ours) != len(theirs):
        return ours, theirs, f"{len(ours)} results against {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if tuple(a.shape) != tuple(b.shape):
            return ours, theirs, f"result {i} has shape {tuple(a.shape)} against {tuple(b.shape)}"
    return ours, theirs, ""


def _worst(errs, key=max) -> float:
    """key (max or min) of errs; nan where any is nan (max() would drop a nan that is not first)."""
    return float("nan") if any(e != e for e in errs) else key(errs)


def agreement(ours, theirs, tol: float = AGREE_TOL, why: str = "", how: str = "") -> str:
    """How far ours' results (a tensor or a tuple of them: y or dX, dA, dB) are from the baseline's, as a note
    for the row: the largest error relative to the baseline's largest magnitude (per result; the worst), and
    "RESULTS DIFFER" above tol (default: bf16's rounding, with margin), where it is not finite (a NaN), or where
    the results' count or shapes differ. why: what sets another tolerance, said in the note with it; how: what
    was compared, when not the row's call itself."""
    head = "checked against it" + (f" ({how})" if how else "")
    ours, theirs, bad = _pairs(ours, theirs)
    if bad:
        return f"{head}: {bad}{DIFFER}"
    worst = _worst([float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                    if b.numel() else 0.0 for a, b in zip(ours, theirs)] or [0.0])
    tol_txt = f" (tolerance {tol:.1e}" + (f": {why}" if why else "") + ")" if why or tol != AGREE_TOL else ""
    return f"{head}: max rel error {worst:.1e}{tol_txt}" + ("" if worst <= tol else DIFFER)


def sqnr_agreement(ours, theirs, min_db: float = FP8_MIN_SQNR_DB, why: str = "FP8 rounding", how: str = "") -> str:
    """agreement() for results that differ by design by a quantization (FP8 against bf16 math): the
    signal-to-quantization-noise ratio 10 log10(sum theirs^2 / sum (ours - theirs)^2), the worst over the
    results, flagged "RESULTS DIFFER" below min_db (default 20 dB: E4M3 with block scales gives ~28.7 dB
    against exact math, ~26 dB against another FP8 recipe; ours all zeros gives 0 dB)."""
    head = "checked against it" + (f" ({how})" if how else "")
    ours, theirs, bad = _pairs(ours, theirs)
    if bad:
        return f"{head}: {bad}{DIFFER}"

    def db(a, b):
        b = b.float()
        noise, signal = float((a.float() - b).pow_(2).sum()), float(b.pow(2).sum())
        if noise != noise or signal != signal:
            return float("nan")
        return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    worst = _worst([db(a, b) for a, b in zip(ours, theirs) if b.numel()] or [float("inf")], key=min)
    return (f"{head}: SQNR {worst:.1f} dB ({why}; flagged below {min_db:g} dB)"
            + ("" if worst >= min_db else DIFFER))


def from_same_start(state, *runs) -> list[list[torch.Tensor]]:
    """Each of runs (one optimizer step of ours, one of the baseline) called once from the same values, for
    agreement(): state lists what the runs write, each a tensor (copied and restored whole) or a (read, write)
    pair (read() -> a tensor, write(t) puts it back: a gather of the positions a step writes). Returns each
    run's change of every entry (what it left minus the start, in float32: the update itself, so that an update
    20% off is 20% off, not 20% of a step against the weights' magnitude); every entry is restored to its start
    after each run."""
    state = [(lambda t=s: t, lambda v, t=s: t.copy_(v)) if torch.is_tensor(s) else s for s in state]
    with torch.no_grad():
        start = [read().detach().clone() for read, _ in state]
    out = []
    for fn in runs:
        fn()
        with torch.no_grad():
            out.append([read().detach().float() - v.float() for (read, _), v in zip(state, start)])
            for (_, write), v in zip(state, start):
                write(v)
    return out


@contextlib.contextmanager
def lr_scope(opts, lr: float):
    """Every param group of the optimizers in opts at learning rate lr in the scope (put back after)."""
    keep = [[g["lr"] for g in o.param_groups] for o in opts]
    for o in opts:
        for g in o.param_groups:
            g["lr"] = lr
    try:
        yield
    finally:
        for o, lrs in zip(opts, keep):
            for g, v in zip(o.param_groups, lrs):
                g["lr"] = v


def step_agreement(opts, runs, state, lr: float = CHECK_LR, tol: float = AGREE_TOL) -> str:
    """agreement() of the values one step of ours and one of the baseline leave (runs: (ours, baseline), each
    from the same values of state: from_same_start), at learning rate lr on every optimizer in opts (lr_scope),
    so that the update shows in bf16 weights; the optimizers keep the state of that first step."""
    with lr_scope(opts, lr):
        ours, theirs = from_same_start(state, *runs)
    return agreement(ours, theirs, tol, how=f"one step at lr {lr:g} from the same values: the updates")


def git_commit() -> str:
    """FUSEDTUNE_COMMIT when set (a staged copy of the package), else git rev-parse --short HEAD of
    fusedtune's source tree (the repository whose python/fusedtune this file is in), else the package version
    ("v0.1.0": an installed package, perhaps inside the user's own repository, whose HEAD is not ours)."""
    if os.environ.get("FUSEDTUNE_COMMIT"):
        return os.environ["FUSEDTUNE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = os.path.dirname(here)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if top and os.path.realpath(os.path.join(top, "python", "fusedtune")) == os.path.realpath(pkg):
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    try:
        from fusedtune import __version__  # noqa: PLC0415
        return f"v{__version__}"
    except Exception:  # noqa: BLE001
        return "unknown"


def environment(timer: Timer) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "none"
    return {"gpu_name": timer.name, "torch": torch.__version__, "triton": tv, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _cell(v):
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return v


def append_csv(rows: list[dict], path: str) -> None:
    """Append rows to a CSV (header written once). An existing file with other columns is rewritten
    with the union of columns, so older results are kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    cols = list(COLUMNS) + [k for r in rows for k in r if k not in COLUMNS]
    cols = list(dict.fromkeys(cols))
    old = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header == cols:
                with open(path, "a", newline="") as fa:
                    w = csv.DictWriter(fa, fieldnames=cols, extrasaction="ignore")
                    for r in rows:
                        w.writerow({k: _cell(r.get(k, "")) for k in cols})
                return
            old = list(reader)
            cols = list(dict.fromkeys(cols + header))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in old:
            w.writerow({k: r.get(k, "") for k in cols})
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in cols})


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Horizontal bars of ratio (baseline / ours) per kernel row; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    rows = [r for r in rows if r["ratio"] == r["ratio"]]
    if not rows:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    one_shape = len(shapes) == 1
    labels = [f"{r['kernel']} [{r['backend']}]" + ("" if one_shape else f" {r['shape']}") + f"\nvs {r['baseline']}"
              for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, ratios, color=["tab:green" if v >= 1 else "tab:red" for v in ratios])
    ax.axvline(1.0, color="black", lw=1)
    if max(ratios) / max(min(ratios), 1e-12) > 50:
        ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed-up over the baseline (baseline time / our time)")
    for yi, v in zip(y, ratios):
        ax.text(v, yi, f" {v:.3g}x", va="center", fontsize=7)
    if one_shape:
        title += "\n" + shapes[0]
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_rows(rows: list[dict]) -> str:
    cols = ["kernel", "shape", "dtype", "backend", "baseline", "time_ms", "p20_ms", "p80_ms", "baseline_ms", "ratio",
            "roofline_pct", "note"]
    body = [[str(_cell(r.get(c, ""))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])


def host_rows(kernel: str, shape: str, dtype: str, backend: str, layer, x: torch.Tensor, quick: bool,
              note: str = "", baselines: Sequence[tuple[str, object]] = ()) -> list[dict]:
    """Host time per call of `layer` at a tiny batch x (CPU timer: at a few tokens kernels are launched and
    not waited for, so this is what bounds decoding and small steps): forward+backward (gradients of x and
    every trainable parameter) and forward under no_grad, on the ops' direct eager route against the same
    calls through the torch.library dispatcher (fusedtune.ops._eager.dispatcher_only), on a GPU through
    Triton's own launch path (triton_kernels/launch.py's triton_path), and against each (name, other
    layer) in baselines."""
    from ..ops._eager import dispatcher_only  # noqa: PLC0415
    from ..triton_kernels import launch  # noqa: PLC0415
    host = CpuTimer(quick, min_reps=20 if quick else 50, budget_s=0.05 if quick else 0.2)   # <= ~2 s a family

    def fb(m):
        def run():
            leaves = [x] + [p for p in m.parameters() if p.requires_grad]
            y = m(x)
            return torch.autograd.grad(y, leaves, torch.ones_like(y))
        return run

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(x)
        return run

    def scoped(fn, scope):
        def run():
            with scope():
                return fn()
        return run
    routes = [("the same through the torch.library dispatcher", dispatcher_only)]
    if x.is_cuda and launch.ENABLED:
        routes.append(("the same through Triton's own launch path", launch.triton_path))
    note = f"{note}; host time, CPU timer" if note else "host time, CPU timer"
    rows = []
    for what, make in (("fwd+bwd", fb), ("fwd", fwd)):
        t = host(make(layer))
        name = f"{kernel} {what} per call (host)"
        rows += [row(name, shape, dtype, backend, route, t, host(scoped(make(layer), scope))[0], note=note)
                 for route, scope in routes]
        rows += [row(name, shape, dtype, backend, other, t, host(make(m))[0], note=note) for other, m in baselines]
    return rows


def linear_host_rows(kernel: str, make: Callable, on_gpu: bool, quick: bool, n: int | None = None) -> list[dict]:
    """host_rows of make(nn.Linear(n, n)) (a family's layer over a copy of it; n: 4096 on a GPU, 256 on
    the CPU) at one token, with that nn.Linear as a baseline."""
    import copy  # noqa: PLC0415
    device, dt = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    n = n or (4096 if on_gpu else 256)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(n, n, device=device, dtype=dt)
    layer = make(copy.deepcopy(lin))
    x = torch.randn(1, n, generator=gen).to(device=device, dtype=dt).requires_grad_()
    return host_rows(kernel, f"T=1 N={n} K={n}", str(dt)[6:], "auto", layer, x, quick,
                     "" if on_gpu else "CPU framework check, not performance", [("nn.Linear", lin)])
