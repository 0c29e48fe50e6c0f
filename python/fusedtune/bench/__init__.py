"""Benchmarks: python -m fusedtune bench [FAMILY|all] [--out DIR] [--quick] [--cpu] [--list]

Each family module fusedtune/bench/<family>.py has sections(timer, quick) -> [(name, fn), ...], each
fn() -> rows; every row times our kernel and its baseline in the same run (fusedtune.bench.core).
A section's rows are appended to <out>/<family>.csv (default out: bench/results) as soon as it ends,
so a run stopped at a time limit keeps what it measured, and a failing section is reported and does
not stop the others; the family's rows of this run are plotted to <out>/<family>.png at the end.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

import torch

NO_GPU = ("no GPU: torch.cuda.is_available() is False, so nothing was timed and nothing was written.\n"
          "The benchmarks time kernels on an NVIDIA GPU (bench/gpu_check.sh runs them all there);\n"
          "--cpu times tiny shapes on the CPU, which only tests the benchmark framework itself.")


def families() -> list[str]:
    """The modules here that define sections() (read, not imported; the others -- core, kernels, the
    no-GPU driver, a family's helper sections -- are not families)."""
    here = os.path.dirname(os.path.abspath(__file__))
    def is_family(name: str) -> bool:
        with open(os.path.join(here, f"{name}.py"), encoding="utf-8") as f:
            return "\ndef sections(" in f.read()
    return sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_") and is_family(m.name))


def run_family(fam: str, timer, env: dict, quick: bool, out: str) -> int:
    """Runs one family's sections; 0 when all of them ran, 1 when the family or a section failed."""
    from . import core
    print(f"\n== {fam} ==", flush=True)
    try:
        parts = importlib.import_module(f"fusedtune.bench.{fam}").sections(timer, quick)
    except Exception:  # noqa: BLE001 - one family's failure must not hide the others
        traceback.print_exc()
        print(f"fusedtune bench: family {fam} FAILED", file=sys.stderr)
        core.free_memory()
        return 1
    rc, done = 0, []
    csv_path = os.path.join(out, f"{fam}.csv")
    for name, fn in parts:
        print(f"-- {fam}: {name}", flush=True)
        try:
            rows = fn()
        except Exception:  # noqa: BLE001 - nor one section's the other sections
            traceback.print_exc()
            print(f"fusedtune bench: {fam} section {name!r} FAILED", file=sys.stderr)
            rc = 1
            continue
        finally:
            core.free_memory()            # each section's tensors die with its frame
        if not rows:
            print("(no rows)")
            continue
        rows = [dict(r, **env) for r in rows]
        print(core.format_rows(rows), flush=True)
        core.append_csv(rows, csv_path)
        print(f"appended {len(rows)} rows to {csv_path}", flush=True)
        done += rows
    if done:
        png = core.plot(done, os.path.join(out, f"{fam}.png"),
                        f"fusedtune bench {fam} on {env['gpu_name']} (torch {env['torch']}, triton {env['triton']}, "
                        f"{env['commit']})")
        print(f"plot {png}" if png else "no plot (matplotlib missing)")
    return rc


def main(argv=None) -> int:
    fams = families()
    ap = argparse.ArgumentParser(prog="python -m fusedtune bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("family", nargs="?", default="all", help=f"one of: all, {', '.join(fams)}")
    ap.add_argument("--out", default=os.path.join("bench", "results"),
                    help="directory for <family>.csv and <family>.png (default: bench/results)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    ap.add_argument("--cpu", action="store_true",
                    help="time on the CPU with tiny shapes (tests the framework; the numbers mean nothing)")
    ap.add_argument("--list", action="store_true", help="list the families and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(fams))
        return 0
    if args.family != "all" and args.family not in fams:
        print(f"fusedtune bench: unknown family {args.family!r}; choose all or one of: {', '.join(fams)}",
              file=sys.stderr)
        return 2

    from . import core
    if args.cpu:
        timer = core.CpuTimer(quick=args.quick)
    elif torch.cuda.is_available():
        timer = core.GpuTimer(quick=args.quick)
    else:
        print(NO_GPU, file=sys.stderr)   # a failure: a script must not record a run that measured nothing
        return 1

    env = core.environment(timer)
    print(f"fusedtune bench on {env['gpu_name']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}){' [quick]' if args.quick else ''}")
    if args.cpu:
        print("--cpu: CPU timing of tiny shapes; this checks the framework, not the kernels")
    rc = 0
    threads = torch.get_num_threads()
    if args.cpu:
        # tiny shapes gain nothing from more intra-op threads, and on a loaded machine OpenMP threads
        # waiting on each other turned a 5 ms tiny training step into ~1 s
        torch.set_num_threads(1)
    try:
        for fam in (fams if args.family == "all" else [args.family]):
            rc |= run_family(fam, timer, env, args.quick, args.out)
    finally:
        torch.set_num_threads(threads)
    return rc
