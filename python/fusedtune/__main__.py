"""python -m fusedtune {doctor,demo,bench,kernels} [options]  (also the `fusedtune` console script)."""
from __future__ import annotations

import importlib
import sys

USAGE = """usage: python -m fusedtune COMMAND [options]

commands:
  doctor    versions, the compiled extension, GPU, backends and why not   [--json]
  demo      pre-train a tiny Llama on task A, fine-tune on task B with every method, print a table
  bench     time kernels against their baselines (CSV + plots under bench/results/)
  kernels   compile every kernel for sm_80/sm_89/sm_90a: registers, spills, shared memory, tensor cores

`python -m fusedtune COMMAND --help` shows a command's options; `--version` the version."""

COMMANDS = {
    "doctor": "fusedtune.doctor",
    "demo": "fusedtune.demo",
    "bench": "fusedtune.bench",
    "kernels": "fusedtune.bench.kernels",
}


def _entry(command: str):
    """The main(argv) of a command's module, or None with a message when it is not there."""
    modname = COMMANDS[command]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            print(f"fusedtune {command}: {modname} is not part of this installation", file=sys.stderr)
            return None
        raise
    fn = getattr(mod, "main", None)
    if not callable(fn):
        print(f"fusedtune {command}: {modname} has no main(argv) in this installation", file=sys.stderr)
        return None
    return fn


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:                       # a usage error: the usage goes to stderr
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        if len(argv) > 1:
            print(f"fusedtune: {argv[0]} takes no arguments, got {' '.join(argv[1:])!r}\n", file=sys.stderr)
            print(USAGE, file=sys.stderr)
            return 2
        from . import __version__
        print(f"fusedtune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fusedtune: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    fn = _entry(command)
    if fn is None:
        return 2
    rc = fn(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
