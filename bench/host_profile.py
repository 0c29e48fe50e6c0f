"""Where a layer's host time per call goes, on a GPU (a diagnostic, not a benchmark):

    python bench/host_profile.py [OUT.txt] [--layers lora,fp8,roste,hft,sparse_delta] [--tokens 1]

At one token a layer's kernels are launched and not waited for, so its forward+backward costs what the
host spends issuing it (bench rows "... per call (host)"). For each layer (over a bf16 nn.Linear 4096x4096):
the host time per call of forward+backward and of the forward (median of 200 calls after a warm-up), then
cProfile's top functions by own time and by cumulative time over 200 forward+backward calls, then
those in fusedtune's and Triton's files by own time. Also the
floor: a trivial Triton kernel's launch and an empty autograd.Function's forward+backward.
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


def layers(names, n=4096):
    from fusedtune.nn import FP8Linear, LoRALinear, RoSTELinear, RowMaskedLinear, SparseDeltaLinear
    make = {"lora": lambda lin: LoRALinear.from_linear(lin, r=16, alpha=32),
            "fp8": FP8Linear.from_linear,
            "roste": RoSTELinear.from_linear,
            "hft": lambda lin: RowMaskedLinear.from_linear(lin, torch.arange(0, n, 2, device=lin.weight.device)),
            "sparse_delta": lambda lin: SparseDeltaLinear.from_linear(lin, density=0.01)}
    for name in names:
        torch.manual_seed(0)
        lin = torch.nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16)
        yield name, make[name](lin)


def fwd_bwd(m, x):
    leaves = [x] + [p for p in m.parameters() if p.requires_grad]
    y = m(x)
    return torch.autograd.grad(y, leaves, torch.ones_like(y))


def per_call_ms(fn, reps=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile(fn, reps=200, top=25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
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

    p = torch.zeros(1024, device="cuda")
    a = torch.zeros(1, 4096, device="cuda", requires_grad=True)
    launch = per_call_ms(lambda: _noop[(1,)](p, 1024, BLOCK=1024))
    empty = per_call_ms(lambda: torch.autograd.grad(_Id.apply(a), [a], torch.ones_like(a)))
    return f"floor: one trivial Triton launch {launch * 1e3:.1f} us; an empty autograd.Function fwd+bwd {empty * 1e3:.1f} us"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--layers", default="lora,fp8,roste,hft,sparse_delta")
    ap.add_argument("--tokens", type=int, default=1)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_profile: needs a CUDA GPU")
    report, summary = [], [floors()]
    for name, m in layers(args.layers.split(",")):
        x = torch.randn(args.tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
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
