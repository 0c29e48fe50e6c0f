"""bench lora's per-kernel section: where a LoRA forward+backward's device time goes, kernel by kernel
(torch.profiler), for ours on each schedule and for unsloth's composition, at q_proj and gate/up with 4096
tokens, r 16. The other sections time whole calls; this one says which kernel to work on (the shrink, the
GEMMs, the expand pass, the dy products, the weight gradients, the sums of split partials).

Rows: kernel "lora fwd+bwd per kernel (torch.profiler)", baseline = whose call, time = that kernel's device
time per forward+backward (all its launches), note = its launches per call and share of the call's kernel
time; then one "all kernels" row per call. Without a GPU the same rows list torch's CPU ops (a check that
the section assembles, not a measurement).
"""
from __future__ import annotations

import torch

from .core import row

KERNEL = "lora fwd+bwd per kernel (torch.profiler)"
TOP = 12          # kernels listed per call (the rest are summed in the "all kernels" row)
ITERS = 10


def _sync(on_gpu: bool):
    if on_gpu:
        torch.cuda.synchronize()


def profile_kernels(fn, on_gpu: bool, iters: int = ITERS) -> dict:
    """{name: (milliseconds per call, launches per call)} of fn's GPU kernels (CPU ops without a GPU), from
    torch.profiler over `iters` calls after 3 warm-up calls."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    _sync(on_gpu)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        _sync(on_gpu)
    kernels, ops = {}, {}
    for e in prof.key_averages():
        if not on_gpu:
            us, into = e.self_cpu_time_total, kernels
        else:
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
            into = kernels if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA else ops
        if us > 0:
            into[e.key] = (us / 1e3 / iters, e.count / iters)
    return kernels or ops   # (a profiler that books device time on the launching ops only: those)


def breakdown_rows(on_gpu: bool, device: str, quick: bool) -> list:
    from ..ops import lora_linear
    from ..triton_kernels import lora_tma
    from .lora import QUICK, TINY, _schedule_scope, _schedules, _unsloth_bwd, _unsloth_fwd, layer_case
    dt = torch.bfloat16 if on_gpu else torch.float32
    T, r, s = (4096, 16, 2.0) if on_gpu else (32, 8, 2.0)
    rows = []
    for name, N, K in (QUICK[:2] if on_gpu else TINY[:1]):
        x, W, dy, A, B, A16, B16 = layer_case(T, N, K, r, dt, device)
        xd = x.detach()
        shape = f"{name} T={T} N={N} K={K} r={r}"

        def ours(sched):
            def call():
                with _schedule_scope(sched):
                    return torch.autograd.grad(lora_linear(x, W, A, B, s), [x, A, B], dy)
            return call
        scheds = _schedules(T, N, K, device) if on_gpu else [None]
        calls = [(f"ours ({sn} schedule)" if sn else "ours", ours(sn)) for sn in scheds]
        calls.append(("cuBLAS + addmm_ (unsloth's method)",
                      lambda: (_unsloth_fwd(xd, W, A16, B16, s), _unsloth_bwd(dy, xd, W, A16, B16, s))))
        for who, fn in calls:
            before = lora_tma.launches
            try:
                kernels = profile_kernels(fn, on_gpu)
                if not kernels:
                    raise RuntimeError("the profiler recorded no kernel")
                if "fused-tma" in who and lora_tma.launches == before:
                    raise RuntimeError("lora_gemm_tma_kernel was not taken (operands TMA cannot load)")
            except Exception as e:  # noqa: BLE001 -- a profile that fails is a row saying so
                rows.append(row(KERNEL, shape, str(dt)[6:], "triton" if on_gpu else "cpu", who, (float("nan"),) * 3,
                                None, note=f"skipped: {type(e).__name__}: {e}"))
                continue
            rows += _rows(kernels, shape, str(dt)[6:], "triton" if on_gpu else "cpu", who, on_gpu)
    return rows


def _rows(kernels: dict, shape: str, dtype: str, backend: str, who: str, on_gpu: bool) -> list:
    from .lora import CPU_NOTE
    total = sum(ms for ms, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    what = "kernel" if on_gpu else "CPU op"
    out = [row(KERNEL, shape, dtype, backend, who, (ms,) * 3, None,
               note=f"{what} {name}: {n:g} launch(es) a call, {100 * ms / total:.1f}% of the call's {total:.3f} ms"
               + ("" if on_gpu else f"; {CPU_NOTE}"))
           for name, (ms, n) in ranked[:TOP]]
    rest = len(ranked) - TOP
    out.append(row(KERNEL, shape, dtype, backend, who, (total,) * 3, None,
                   note=f"all {len(ranked)} {what}s" + (f" ({rest} not listed above)" if rest > 0 else "")
                   + ("" if on_gpu else f"; {CPU_NOTE}")))
    return out
