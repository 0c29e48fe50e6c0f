"""python -m fusedtune demo: pre-train a tiny Llama on task A, fine-tune it on task B with every
registered fusedtune method (fusedtune.patch), and compare them in one table.

    python -m fusedtune demo [--method NAME ...] [--steps N] [--out DIR] [--device cpu|cuda]

Results: the table on stdout, OUT/results.md, OUT/results.csv, OUT/loss_curves.png.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import time

import torch

from .tasks import Tasks
from .train import DemoConfig, agreement, build_model, evaluate, finetune, pretrain, split_demo_options
from . import output


def _overrides(items: list[str]) -> dict:
    """['mezo.lr=1e-4', ...] -> {'mezo': {'lr': 1e-4}}"""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, opt = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected METHOD.OPTION=VALUE, e.g. mezo.lr=1e-4")
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            v = value
        out.setdefault(method, {})[opt] = v
    return out


def _check_overrides(overrides: dict, names: list[str], known: dict, cfg: DemoConfig) -> None:
    """--set METHOD.OPTION=VALUE: a method that exists and runs, an option it has (patch options, demo settings
    step_multiplier / target_modules), a number where the default is one, a positive whole step multiplier,
    and options the method's patch takes: each overridden method patches (and unpatches) a fresh demo model."""
    for method, opts in overrides.items():
        if method not in known:
            raise SystemExit(f"--set {method}.…: no method {method!r}; choose from {', '.join(sorted(known))}")
        if method not in names:
            raise SystemExit(f"--set {method}.…: method {method!r} is not among the methods run "
                             f"({', '.join(names)}); add --method {method}")
        cls = known[method]
        defaults = {**cls.options, **getattr(cls, "demo", {}), "step_multiplier": 1, "target_modules": None}
        for opt, value in opts.items():
            if opt not in defaults:
                raise SystemExit(f"--set {method}.{opt}: method {method!r} has no option {opt!r}; it takes "
                                 f"{', '.join(sorted(defaults))}")
            d = defaults[opt]
            number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
            if number(d) and not number(value):
                raise SystemExit(f"--set {method}.{opt}={value!r}: expected a number (default {d!r})")
            if opt == "step_multiplier" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SystemExit(f"--set {method}.step_multiplier={value!r}: expected a whole number >= 1")
        _dry_patch(method, cls, opts, cfg)


def _dry_patch(method: str, cls, opts: dict, cfg: DemoConfig) -> None:
    """patch + unpatch of a fresh (untrained) demo model with the method's options: a value the method refuses
    stops the demo now, not after the pre-training."""
    from ..patch import patch, unpatch
    _, targets, patch_opts = split_demo_options(cls, opts)
    rng = torch.random.get_rng_state()
    try:
        model = build_model(cfg)
        patch(model, method, target_modules=targets, **patch_opts)
        unpatch(model)
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:   # PatchError is a ValueError
        raise SystemExit(f"--set {method}.…: method {method!r} refuses these options: {e}") from None
    finally:
        torch.random.set_rng_state(rng)


def run(cfg: DemoConfig, methods: list[str] | None = None, out: str | None = "demo_out",
        overrides: dict | None = None) -> dict:
    """Run the demo; returns {'rows': [...], 'table': str, 'paths': {...}, 'seconds': float}."""
    from ..patch import methods as registry, missing_requirements
    t0 = time.perf_counter()
    known = registry()
    names = list(methods) if methods else sorted(known, key=lambda n: (n != "full", n))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--method {unknown[0]!r} is not registered; choose from {', '.join(sorted(known))}")
    for n in list(names):
        miss = missing_requirements(known[n])
        if miss and methods:
            raise SystemExit(f"--method {n!r} needs {', '.join(miss)} (pip install {' '.join(miss)})")
        if miss:
            print(f"demo: skipping method {n!r}: needs {', '.join(miss)} (pip install {' '.join(miss)})")
            names.remove(n)
    overrides = overrides or {}
    _check_overrides(overrides, names, known, cfg)    # before the pre-training, not after it
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, names, known, out, overrides, t0)
    finally:
        torch.set_num_threads(threads)


def _run(cfg, names, known, out, overrides, t0) -> dict:
    tasks = Tasks(vocab_size=cfg.vocab, seq_len=cfg.seq_len)
    g = torch.Generator().manual_seed(cfg.seed + 100)   # held-out evaluation sets
    evals = {"A": tasks.retention_batch(cfg.eval_size, g, cfg.device),     # task A on the tokens B never uses
             "B": tasks.batch("B", cfg.eval_size, g, cfg.device)}
    model, pre_curve = pretrain(cfg, tasks)
    evals["a_acc_before"] = evaluate(model, tasks, evals["A"])[1]
    ckpt = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # the pretrained model's
    del model
    rows = []
    for name in names:
        r = finetune(name, known[name], ckpt, cfg, tasks, evals, overrides.get(name, {}))
        r["agreement"] = agreement(name, known[name], ckpt, cfg, tasks, overrides.get(name, {}))
        rows.append(r)
    header = {"model": f"Llama, hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}, "
                       f"seq {cfg.seq_len}, {n_params:,} parameters" if rows else "",
              "device": cfg.device, "dtype": cfg.dtype, "pretrain_steps": cfg.pretrain_steps,
              "a_acc_before": evals["a_acc_before"],
              "task_a": f"x[t] = x[t-{tasks.period}] over all {tasks.n_content} content tokens",
              "task_b": f"x[t] = sigma(x[t-{tasks.period}]) over the first {tasks.remapped} content tokens only, "
                        f"sigma(x) = (x + 1) mod {tasks.remapped}",
              "retention": f"task-A accuracy on sequences of the {tasks.n_content - tasks.remapped} tokens "
                           "that task B never uses"}
    paths = output.write(out, rows, header, pre_curve) if out else {}
    return {"rows": rows, "table": output.table(rows), "notes": output.notes(rows, header), "paths": paths,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    d = DemoConfig()
    ap = argparse.ArgumentParser(prog="python -m fusedtune demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", help="a registered method (repeatable; default: all)")
    ap.add_argument("--steps", type=int, default=d.steps,
                    help=f"fine-tuning steps of a gradient method (zeroth-order methods take a multiple, "
                         f"see the steps column); default {d.steps}")
    ap.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    ap.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help=f"CPU threads (default {d.threads})")
    ap.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                    help="override a method's demo option, e.g. --set mezo.lr=2e-4")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    missing = [m for m in ("transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:   # checked before the run (matplotlib is needed at its end, for the plot)
        print(f"fusedtune demo: needs {', '.join(missing)} (it builds a tiny Llama from a transformers config and "
              "plots the loss curves): pip install 'fusedtune[demo]'", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
    for k in ("steps", "pretrain_steps", "hidden", "layers", "batch", "threads"):
        if getattr(a, k) < (0 if k == "pretrain_steps" else 1):
            ap.error(f"--{k.replace('_', '-')} must be positive, got {getattr(a, k)}")
    if a.hidden % (2 * DemoConfig.heads):   # (head_dim even: RoPE rotates pairs)
        ap.error(f"--hidden must be a multiple of {2 * DemoConfig.heads} (the demo model has {DemoConfig.heads} "
                 f"attention heads of an even size), got {a.hidden}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        ap.error(f"--out {a.out}: exists and is not a folder")
    cfg = DemoConfig(hidden=a.hidden, layers=a.layers, batch=a.batch, pretrain_steps=a.pretrain_steps,
                     steps=a.steps, seed=a.seed, device=a.device, dtype=a.dtype, progress=not a.no_progress,
                     threads=a.threads)
    res = run(cfg, a.method, a.out, _overrides(a.set))
    print(res["table"])
    print("\n".join(f"  {n}" for n in res["notes"]))
    print(f"wrote {', '.join(res['paths'].values())} in {res['seconds']:.0f} s")
    return 0
