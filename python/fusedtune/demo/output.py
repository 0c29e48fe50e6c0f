"""The demo's results: a printed table, OUT/results.md, OUT/results.csv and OUT/loss_curves.png."""
from __future__ import annotations

import csv
import os

from ..patch import format_table

COLUMNS = ["method", "backend", "trainable params", "steps", "memory (MiB)", "step (ms)", "task-B loss",
           "task-B acc", "task-A acc (retention)", "fused vs reference"]


def _cells(r: dict) -> list[str]:
    return [r["method"], r["backend"], f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.0f}%)",
            str(r["steps"]), f"{r['memory'] / 2**20:.2f}", f"{r['step_ms']:.1f}",
            f"{r['b_loss_before']:.3f} -> {r['b_loss']:.3f}", f"{r['b_acc_before']:.3f} -> {r['b_acc']:.3f}",
            f"{r['a_acc_before']:.3f} -> {r['a_acc']:.3f}", r["agreement"]]


def notes(rows: list[dict], header: dict) -> list[str]:
    kinds = sorted({r["memory_kind"] for r in rows})
    return [f"model: {header['model']}; device {header['device']}, {header['dtype']}",
            f"task A: {header['task_a']}; task B: {header['task_b']}",
            f"pre-training: {header['pretrain_steps']} AdamW steps, task-A accuracy {header['a_acc_before']:.3f}",
            f"memory: {', '.join(kinds)}; step: median wall time of one training step",
            "loss/acc columns: before fine-tuning -> after; retention: " + header["retention"]
            + " (what fine-tuning on B's narrow domain kept of the general skill)",
            "learning rates (each method's demo setting): "
            + ", ".join(f"{r['method']} {r['lr']:g}" for r in rows if r.get("lr") is not None),
            "fused vs reference: one step with the default backend and one with backend='reference' "
            "from the same weights and batch"]


def table(rows: list[dict]) -> str:
    return format_table(COLUMNS, [_cells(r) for r in rows])


def write(out: str, rows: list[dict], header: dict, pretrain_curve: list[float]) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {"md": os.path.join(out, "results.md"), "csv": os.path.join(out, "results.csv"),
             "png": os.path.join(out, "loss_curves.png")}
    with open(paths["md"], "w") as f:
        f.write("# fusedtune demo\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(c.replace("->", "→") for c in _cells(r)) + " |\n")
        f.write("\n" + "\n".join(f"- {n}" for n in notes(rows, header)) + "\n")
    keys = ["method", "backend", "lr", "trainable", "total", "steps", "memory", "memory_kind", "step_ms",
            "b_loss_before", "b_loss", "b_acc_before", "b_acc", "a_acc_before", "a_acc", "agreement"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])
    plot(paths["png"], rows, pretrain_curve)
    return paths


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(path: str, rows: list[dict], pretrain_curve: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(pretrain_curve, color="gray")
    a.set(title="pre-training on task A (AdamW)", xlabel="step", ylabel="loss", yscale="log")
    for r in rows:
        c = r["curve"]
        b.plot(range(1, len(c) + 1), _smooth(c, max(1, len(c) // 50)), label=f"{r['method']} ({r['backend']})")
    b.set(title="fine-tuning on task B", xlabel="step", ylabel="training loss (smoothed)", xscale="log",
          yscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
