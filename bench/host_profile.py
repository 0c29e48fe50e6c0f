"""Where a layer's host time per call goes, on a GPU (a diagnostic, not a benchmark):

    python bench/host_profile.py [OUT.txt] [--layers lora,fp8,roste,hft,sparse_delta] [--tokens 1] [--no-gpu]

At one token a layer's kernels are launched and not waited for, so its forward+backward costs what the
host spends issuing it (bench rows "... per call (host)"). For each layer (over a bf16 nn.Linear 4096x4096):
the host time per call of forward+backward and of the forward (median of 200 calls after a warm-up), then
cProfile's top functions by own time and by cumulative time over 200 forward+backward calls, then
those in fusedtune's and Triton's files by own time. Also the
floor: a trivial Triton kernel's launch and an empty autograd.Function's forward+backward.

--no-gpu (a machine without one): fusedtune/bench/nogpu_driver.py compiles the Triton kernels for sm_90
and "launches" them without running them, on CPU tensors, so the numbers are the host's cost of a call
less the driver's launch and CUDA's allocator (its docstring). They compare versions of the glue on one
machine; a GPU machine's host is another CPU. Only the layers whose every kernel is Triton mean anything
there (lora, fp8: the default with --no-gpu); the others compute with CPU kernels or the reference.
--compare-launch ROUNDS times each layer through Triton's launch path and through fusedtune's fast launch
(triton_kernels/launch.py), alternating in one process, instead of profiling.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def layers(names, n=4096):
    from fusedtune.nn import FP8Linear, LoRALinear, RoSTELinear, RowMaskedLinear, SparseDeltaLinear
    make = {"lora": lambda lin: LoRALinear.from_linear(lin, r=16, alpha=32),
            "fp8": FP8Linear.from_linear,
            "roste": RoSTELinear.from_linear,
            "hft": lambda lin: RowMaskedLinear.from_linear(lin, torch.arange(0, n, 2, device=lin.weight.device)),
            "sparse_delta": lambda lin: SparseDeltaLinear.from_linear(lin, density=0.01)}
    for name in names:
        torch.manual_seed(0)
        lin = torch.nn.Linear(n, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
        yield name, make[name](lin)


def fwd_bwd(m, x):
    leaves = [x] + [p for p in m.parameters() if p.requires_grad]
    y = m(x)
    return torch.autograd.grad(y, leaves, torch.ones_like(y))


def per_call_ms(fn, reps=200):
    for _ in range(20):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync()
    return statistics.median(times)


def profile(fn, reps=200, top=25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    sync()
    prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats("fusedtune|triton", 2 * top)   # our glue and Triton's launch path
    return out.getvalue()


def floors() -> str:
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(p, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(p + i, tl.load(p + i, mask=i < n), mask=i < n)

    class _Id(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    p = torch.zeros(1024, device=DEVICE)
    a = torch.zeros(1, 4096, device=DEVICE, requires_grad=True)
    from fusedtune.triton_kernels.launch import fast
    launch = per_call_ms(lambda: _noop[(1,)](p, 1024, BLOCK=1024))
    quick = per_call_ms(lambda: fast(_noop)[(1,)](p, 1024, BLOCK=1024))
    empty = per_call_ms(lambda: torch.autograd.grad(_Id.apply(a), [a], torch.ones_like(a)))
    return (f"floor: one trivial Triton launch {launch * 1e3:.1f} us (through fusedtune's fast launch {quick * 1e3:.1f} "
            f"us); an empty autograd.Function fwd+bwd {empty * 1e3:.1f} us")


def compare_launch(names, tokens: int, rounds: int) -> list[str]:
    """Host time per call through Triton's launch path and through triton_kernels/launch.py, alternating
    within one process (a noisy machine drifts between processes)."""
    from fusedtune.triton_kernels import launch
    lines = []
    for name, m in layers(names):
        x = torch.randn(tokens, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        times = {(mode, what): [] for mode in ("triton", "fast") for what in ("fwd+bwd", "fwd")}
        for _ in range(rounds):
            for mode in ("triton", "fast"):
                launch.ENABLED = mode == "fast"
                times[mode, "fwd+bwd"].append(per_call_ms(lambda: fwd_bwd(m, x)) * 1e3)
                with torch.no_grad():
                    times[mode, "fwd"].append(per_call_ms(lambda: m(x)) * 1e3)
        launch.ENABLED = True
        for what in ("fwd+bwd", "fwd"):
            t, f = times["triton", what], times["fast", what]
            lines.append(f"{name} {what} (T={tokens}, {rounds} rounds): Triton's launch path median "
                         f"{statistics.median(t):.0f} us (min {min(t):.0f}), fast launch median "
                         f"{statistics.median(f):.0f} us (min {min(f):.0f})")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--layers", default=None, help="default: lora,fp8,roste,hft,sparse_delta (--no-gpu: lora,fp8)")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--no-gpu", action="store_true", help="no GPU here: compile, skip the launches (docstring)")
    ap.add_argument("--compare-launch", type=int, default=0, metavar="ROUNDS",
                    help="time each layer with Triton's launch path and with fusedtune's fast launch, alternating, "
                         "ROUNDS times (median and min over the rounds), instead of profiling")
    args = ap.parse_args(argv)
    global DEVICE
    if args.no_gpu:
        from fusedtune.bench import nogpu_driver
        nogpu_driver.install()
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("host_profile: needs a CUDA GPU (or --no-gpu)")
    names = args.layers or ("lora,fp8" if args.no_gpu else "lora,fp8,roste,hft,sparse_delta")
    if args.compare_launch:
        print("\n".join(compare_launch(names.split(","), args.tokens, args.compare_launch)))
        return
    report, summary = [], [floors()]
    for name, m in layers(names.split(",")):
        x = torch.randn(args.tokens, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        fb = per_call_ms(lambda: fwd_bwd(m, x))
        with torch.no_grad():
            fw = per_call_ms(lambda: m(x))
        summary.append(f"{name}: fwd+bwd {fb * 1e3:.0f} us, fwd {fw * 1e3:.0f} us per call (host, T={args.tokens})")
        report.append(f"===== {name}: fwd+bwd x 200\n" + profile(lambda: fwd_bwd(m, x)))
    text = "\n".join(summary) + "\n\n" + "\n".join(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
