"""Benchmarks: python -m fusedtune bench [FAMILY|all] [--out DIR] [--quick] [--cpu] [--list]

Each family module fusedtune/bench/<family>.py has run(timer, quick) -> rows; every row times our
kernel and its baseline in the same run (fusedtune.bench.core). Results are appended to
<out>/<family>.csv (default out: bench/results) and plotted to <out>/<family>.png.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

NOT_FAMILIES = {"core", "kernels"}
NO_GPU = ("no GPU: torch.cuda.is_available() is False, so nothing was timed and nothing was written.\n"
          "The benchmarks time kernels on an NVIDIA GPU (bench/gpu_check.sh runs them all there);\n"
          "--cpu times tiny shapes on the CPU, which only tests the benchmark framework itself.")


def families() -> list[str]:
    here = [os.path.dirname(os.path.abspath(__file__))]
    return sorted(m.name for m in pkgutil.iter_modules(here)
                  if m.name not in NOT_FAMILIES and not m.name.startswith("_"))


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

    import torch

    from . import core
    if args.cpu:
        timer = core.CpuTimer(quick=args.quick)
    elif torch.cuda.is_available():
        timer = core.GpuTimer(quick=args.quick)
    else:
        print(NO_GPU)
        return 0

    env = core.environment(timer)
    print(f"fusedtune bench on {env['gpu_name']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}){' [quick]' if args.quick else ''}")
    if args.cpu:
        print("--cpu: CPU timing of tiny shapes; this checks the framework, not the kernels")
    rc = 0
    for fam in (fams if args.family == "all" else [args.family]):
        print(f"\n== {fam} ==", flush=True)
        try:
            mod = importlib.import_module(f"fusedtune.bench.{fam}")
            rows = mod.run(timer, args.quick)
        except Exception:  # noqa: BLE001 - one family's failure must not hide the others
            traceback.print_exc()
            print(f"fusedtune bench: family {fam} FAILED", file=sys.stderr)
            rc = 1
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not rows:
            print("(no rows)")
            continue
        rows = [dict(r, **env) for r in rows]
        print(core.format_rows(rows))
        csv_path = os.path.join(args.out, f"{fam}.csv")
        core.append_csv(rows, csv_path)
        png = core.plot(rows, os.path.join(args.out, f"{fam}.png"),
                        f"fusedtune bench {fam} on {env['gpu_name']} (torch {env['torch']}, triton {env['triton']}, "
                        f"{env['commit']})")
        print(f"appended {len(rows)} rows to {csv_path}" + (f"; plot {png}" if png else "; no plot (matplotlib missing)"))
    return rc


if __name__ == "__main__":  # python -m fusedtune.bench
    from fusedtune.bench import main as _main
    sys.exit(_main())
