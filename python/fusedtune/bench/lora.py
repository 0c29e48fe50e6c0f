"""LoRA family benchmark (python -m fusedtune bench lora).

On Llama-3-8B layer shapes (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336),
bf16 base and input, fp32 adapters (peft's default), at 4096 and 16384 tokens and r in {8, 16, 64}
(--quick: 4096 tokens, r=16, q/gate/down), each in the same run:

  lora fwd        fusedtune.ops.lora_linear on its default schedule at the shape (ops/lora_triton.py,
                  CUBLAS_MIN_WORK): "fused" (Triton shrink + one GEMM with the LoRA inner loop) or "cublas"
                  (Triton shrink, the base GEMM through cuBLAS, lora_expand_kernel adding the LoRA term);
                  the other schedules' rows follow as "lora <kind> (<schedule> schedule)", on an sm_90 GPU
                  also "fused-tma" (the fused GEMM with TMA loads on a persistent grid, triton_kernels/
                  lora_tma.py; off by default until measured: FUSEDTUNE_LORA_TMA=1)
  lora fwd+bwd    the same, forward then backward for dX, dA, dB (W frozen); backward reads dy for u
                  and dB once (lora_dy_kernel, r <= 64), also timed against torch's deterministic mode,
                  where u and dB take one read of dy each
  lora bwd        the backward alone (autograd.grad over a retained graph), against the dX GEMM alone
  lora step       a full training step of the layer: zero_grad, forward, backward (dX, dA, dB), and
                  torch.optim.AdamW(fused=True) over A and B, against the base GEMMs (forward + dX)
against
  base GEMM       the frozen base alone (F.linear; + the dX GEMM for fwd+bwd): the goal is LoRA
                  costing <= 10% over it (ratio >= 0.909)
  peft            peft's LoRA Linear layer (its own forward and autograd), when peft is installed,
                  else a line-for-line re-implementation of its forward (noted in the row)
  cuBLAS+addmm_   unsloth's method: y = x W^T, then y.addmm_(x A^T, B^T, alpha=s) with adapters cast
                  to bf16, and its hand-derived backward (dX = dy W + s (dy B) A, dA, dB, no dW)
Goal on an H100: ratio vs peft >= 1.25 for fwd+bwd.

NF4 (bitsandbytes installed with CUDA): forward+backward of a QLoRA layer, ours (both NF4 schedules) vs
peft's bnb Linear4bit LoRA layer, at 16, 256, 4096 tokens (--quick: 16, 4096), with float32 adapters
(peft's default through get_peft_model) and with bf16 adapters (what the layer made directly holds).
Goal: >= 1.3x.
Several adapters: a mixed batch of 4 adapters (ranks 8, 16, 32, 64) in one call vs peft's mixed-batch
forward (a loop over adapters with index masks).

DoRA (use_dora): forward+backward of a DoRA layer (r=16), ours (fused op, float32 chunked weight norm,
column scale) vs peft's DoRA layer, and vs our plain LoRA layer (DoRA's extra cost); inference forward
(the norm cached) vs peft's, at q_proj and gate/up (--quick: q_proj) with 4096 tokens.

Per kernel (bench/lora_kernels.py, last): each kernel's device time in a forward+backward of ours (every
schedule) and of unsloth's composition at q_proj and gate/up, 4096 tokens, r 16 (torch.profiler).

A peft model fused in place (fusedtune.lora.fuse_peft): forward+backward of a fused peft LoRA layer vs
peft's own layer and vs LoRALinear over the same parameters (ratio ~1: what the wrapper costs), at
q_proj with 4096 tokens; and the host time of the per-call check that the layer's adapters are unchanged,
against the host time of peft's own forward at one token (CPU timer on both: kernels are launched, not
waited for, at one token).

GPT-2's Conv1D base (weight stored (in, out); peft's fan_in_fan_out): forward+backward of LoRALinear over
a Conv1D, whose weight the kernels read transposed in place, vs LoRALinear over an nn.Linear holding the
same weight as [out, in] (ratio: what reading W^T costs the GEMMs), and vs peft's fan_in_fan_out layer,
at q_proj with 4096 tokens.

Host time per call (CPU timer, one token, where kernels are launched and not waited for: what bounds a
layer at small batches, in decoding and in any step whose kernels are shorter than their launch code):
a LoRALinear forward+backward and forward, on the ops' direct eager route (fusedtune/ops/_eager.py)
against the same call through the torch.library dispatcher (dispatcher_only()), and against peft's layer.

Kernels only (CUDA graph replay): forward+backward of lora_linear, peft's layer and unsloth's composition at
q_proj (and gate/up without --quick), 4096 tokens, r 16, each captured in one CUDA graph and replayed: the
GPU's share alone, against the eager call of ours (the ratio says how long the eager call waits on its host
code) and against the others' replays (kernels vs kernels). Skipped on the CPU.

--cpu: tiny shapes on the CPU backend (the reference math); the rows check the framework only.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .core import agreement, opt_in_skipped, roofline_pct, row

LLAMA3_8B = [("q_proj", 4096, 4096), ("k/v_proj", 1024, 4096), ("o_proj", 4096, 4096),
             ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
QUICK = [("q_proj", 4096, 4096), ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
TINY = [("q_proj", 64, 64), ("down_proj", 64, 176)]
GOAL_OVER_BASE = 1.10     # LoRA time / base GEMM time
GOAL_VS_PEFT = 1.25
GOAL_NF4 = 1.3
GRAPH_TOKENS = 4096       # tokens of the CUDA-graph replay rows
CPU_NOTE = "CPU framework check, not performance"


def _peft_layer(W, bias, A, B, r, alpha):
    """peft's LoRA Linear around W (sharing A and B), or None when peft is not installed."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import layer as pl
    except Exception:  # noqa: BLE001
        return None
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    lin.weight = torch.nn.Parameter(W, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias, requires_grad=False)
    pe = pl.Linear(lin, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    pe.lora_A["default"].weight = A
    pe.lora_B["default"].weight = B
    return pe


def _peft_like(x, W, A, B, s):
    """peft's forward, line for line: base layer, x cast to the adapter dtype, lora_B(lora_A(x)) * s."""
    result = F.linear(x, W)
    xa = x.to(A.dtype)
    return (result + F.linear(F.linear(xa, A), B) * s).to(result.dtype)


def _unsloth_fwd(x, W, A16, B16, s):
    y = F.linear(x, W)
    return y.addmm_(x @ A16.t(), B16.t(), alpha=s)


def _unsloth_bwd(dy, x, W, A16, B16, s):
    dyB = dy @ B16
    dx = (dy @ W).addmm_(dyB, A16, alpha=s)
    dA = s * (dyB.t() @ x)
    dB = s * (dy.t() @ (x @ A16.t()))
    return dx, dA, dB


def _time_backward(timer, layer, xg, A, B, dy):
    """The backward alone: one forward whose graph is kept, then autograd.grad for dX, dA, dB."""
    y = layer(xg)
    return timer(lambda: torch.autograd.grad(y, [xg, A, B], dy, retain_graph=True))


def _train_step(layer, xg, A, B, dy, on_gpu):
    """A full step of the layer: zero_grad, forward, backward, AdamW (fused on a GPU) over A and B.
    The learning rate is tiny: the shared adapters barely move while the candidates are timed."""
    opt = torch.optim.AdamW([A, B], lr=1e-8, fused=True if on_gpu else None)

    def step():
        opt.zero_grad(set_to_none=True)
        xg.grad = None
        layer(xg).backward(dy)
        opt.step()
    return step


def _flops(T, N, K, r, backward):
    """Forward: x W^T (2TNK), the shrink x A^T (2TrK) and the expand (2TrN). Backward (W frozen): dX = dy W (2TNK)
    plus (dy B) A (2TrN + 2TrK), dA = (dy B)^T x (2TrK), dB = dy^T (x A^T) (2TrN; x A^T kept or recomputed as
    ours does: not counted)."""
    fwd = 2 * T * N * K + 2 * T * r * (K + N)
    return fwd + (2 * T * N * K + 4 * T * r * (K + N) if backward else 0)


def _note(ratio, goal, what, on_gpu):
    if not on_gpu:
        return CPU_NOTE
    return f"{what}: goal {goal:g}x, {'met' if ratio >= goal else 'NOT met'}"


def _schedules(T, N, K, device) -> list:
    """The schedules to time at this shape, the default first: "fused", "cublas" (ops/lora_triton.py,
    CUBLAS_MIN_WORK) and, on sm_90, "fused-tma" (the fused schedule through lora_gemm_tma_kernel)."""
    from ..ops import lora_triton
    from ..triton_kernels import lora_tma
    default = lora_triton.schedule(T, N, K, None, "")
    if default == "fused" and lora_tma.ENABLED and lora_tma.available(device) and not opt_in_skipped("fused-tma"):
        default = "fused-tma"
    rest = [s for s in ("fused", "cublas", "fused-tma") if s != default]
    return [default] + [s for s in rest if s != "fused-tma" or (lora_tma.available(device)
                                                                 and not opt_in_skipped("fused-tma"))]


@contextlib.contextmanager
def _schedule_scope(sched: str | None):
    """lora_linear on schedule `sched` in the scope ("fused", "fused-tma", "cublas"; None: as configured)."""
    from ..ops import lora_triton
    from ..triton_kernels import lora_tma
    keep = lora_triton.CUBLAS_MIN_WORK, lora_tma.ENABLED
    if sched is not None:
        lora_triton.CUBLAS_MIN_WORK = 0 if sched == "cublas" else 2**62
        lora_tma.ENABLED = sched == "fused-tma"
    try:
        yield
    finally:
        lora_triton.CUBLAS_MIN_WORK, lora_tma.ENABLED = keep


def _time_ours(timer, sched, x, xg, W, A, B, s, dy, on_gpu):
    """(fwd, fwd+bwd, bwd, step) timings of lora_linear on schedule `sched` (None: as configured)."""
    from ..ops import lora_linear
    with _schedule_scope(sched):
        def fb():
            y = lora_linear(xg, W, A, B, s)
            return torch.autograd.grad(y, [xg, A, B], dy)
        return (timer(lambda: lora_linear(x, W, A, B, s)), timer(fb),
                _time_backward(timer, lambda v: lora_linear(v, W, A, B, s), xg, A, B, dy),
                timer(_train_step(lambda v: lora_linear(v, W, A, B, s), xg, A, B, dy, on_gpu)))


def _time_schedules(timer, scheds, on_gpu, x, xg, W, A, B, s, dy) -> tuple[dict, list]:
    """({schedule: _time_ours(...)}, skipped rows): a schedule other than the default that fails (fused-tma on
    a stack it does not run on) is a row saying so, not the loss of the section. A fused-tma timing in which
    the TMA kernel never ran (operands it cannot load) is dropped the same way: it would be the classic
    kernel's time under the wrong name."""
    from ..triton_kernels import lora_tma
    ours, skipped = {}, []
    for sn in scheds:
        before = lora_tma.launches
        try:
            ours[sn] = _time_ours(timer, sn if on_gpu else None, x, xg, W, A, B, s, dy, on_gpu)
            if sn == "fused-tma" and lora_tma.launches == before:
                raise RuntimeError("lora_gemm_tma_kernel was not taken (operands TMA cannot load)")
        except Exception as e:  # noqa: BLE001
            if sn == scheds[0]:
                raise
            ours.pop(sn, None)
            skipped.append(_skipped(f"lora fwd+bwd ({sn} schedule)", "-", f"the {sn} schedule", e))
    return ours, skipped


def _gemm_kind_rows(sched, default, shape, dt, ours_f, ours_t, ours_b, ours_s, base3, peft4, uns3, peft_name,
                    T, N, K, r, on_gpu, agree: str = "") -> list:
    """The fwd / fwd+bwd / bwd / step rows of one schedule against the base GEMM, peft and unsloth's method.
    The default schedule's rows are named "lora <kind>"; the other's "lora <kind> (<schedule> schedule)"."""
    rows = []
    (base_f, base_fb, base_b), (pf, pfb, peft_b, peft_s), (uf, ufb, ub) = base3, peft4, uns3
    dts, be = str(dt).replace("torch.", ""), "triton" if on_gpu else "cpu"
    tag = "" if sched == default else f" ({sched} schedule)"
    how = "" if not on_gpu else (f"{sched} schedule" + (" (the default here); " if sched == default else "; "))
    for kind, ours, base, peft_t, uns in (("fwd", ours_f, base_f, pf, uf), ("fwd+bwd", ours_t, base_fb, pfb, ufb),
                                           ("bwd", ours_b, base_b, peft_b, ub), ("step", ours_s, base_fb, peft_s, None)):
        fl = _flops(T, N, K, r, kind != "fwd") - (_flops(T, N, K, r, False) if kind == "bwd" else 0)
        rl = roofline_pct(ours[0], flops=fl)
        over = ours[0] / base[0]
        k = f"lora {kind}{tag}"
        rows.append(row(k, shape, dts, be, "base GEMM alone (frozen W)", ours, base[0], rl,
                        note=(how + f"LoRA costs {100 * (over - 1):+.1f}% over the base; "
                              + _note(1 / over, 1 / GOAL_OVER_BASE, "<= +10%", on_gpu))))
        rows.append(row(k, shape, dts, be, peft_name, ours, peft_t[0], rl,
                        note=how + (_note(peft_t[0] / ours[0], GOAL_VS_PEFT, "vs peft", on_gpu)
                                    if kind != "fwd" else (CPU_NOTE if not on_gpu else ""))
                        + (f"; {agree}" if agree and sched == default else "")))
        if uns is not None:
            rows.append(row(k, shape, dts, be, "cuBLAS + addmm_ (unsloth's method, bf16 adapters)", ours, uns[0], rl,
                            note=how + (CPU_NOTE if not on_gpu else "")))
    return rows


def gemm_rows(timer, shapes, tokens, ranks, on_gpu, device):
    rows = []
    from ..ops import lora_linear
    from ..triton_kernels import lora_tma
    if on_gpu and lora_tma.available(device) and opt_in_skipped("fused-tma"):
        rows.append(row("lora fwd+bwd (fused-tma schedule)", "-", "bf16", "-", "-", (float("nan"),) * 3, None,
                        note="skipped: " + opt_in_skipped("fused-tma")))
    dt = torch.bfloat16 if on_gpu else torch.float32
    backend = None
    for T in tokens:
        for name, N, K in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(T, K, device=device, generator=g).to(dt)
            W = (torch.randn(N, K, device=device, generator=g) / math.sqrt(K)).to(dt)
            dy = torch.randn(T, N, device=device, generator=g).to(dt)
            base_f = timer(lambda: F.linear(x, W))
            base_fb = timer(lambda: (F.linear(x, W), dy @ W))
            base_b = timer(lambda: dy @ W)
            for r in ranks:
                s = 2.0
                A = torch.nn.Parameter(torch.randn(r, K, device=device, generator=g) / math.sqrt(K))
                B = torch.nn.Parameter(torch.randn(N, r, device=device, generator=g) * 0.01)
                A16, B16 = A.detach().to(dt), B.detach().to(dt)
                xg = x.detach().requires_grad_()
                shape = f"{name} T={T} N={N} K={K} r={r}"
                scheds = _schedules(T, N, K, device) if on_gpu else ["cpu"]
                ours, failed = _time_schedules(timer, scheds, on_gpu, x, xg, W, A, B, s, dy)
                rows += failed

                def ours_fb():
                    y = lora_linear(xg, W, A, B, s, backend=backend)
                    return torch.autograd.grad(y, [xg, A, B], dy)
                det = torch.are_deterministic_algorithms_enabled()
                fill = torch.utils.deterministic.fill_uninitialized_memory
                torch.use_deterministic_algorithms(True)    # the two-kernel backward: dy read for u, then dB
                torch.utils.deterministic.fill_uninitialized_memory = False   # time the kernels, not NaN fills
                try:
                    two_reads = timer(ours_fb)
                finally:
                    torch.use_deterministic_algorithms(det)
                    torch.utils.deterministic.fill_uninitialized_memory = fill
                pe = _peft_layer(W, None, A, B, r, int(s * r))
                # peft as a bf16 model without autocast runs it: float32 adapters (get_peft_model's default), so
                # its LoRA branch computes in float32; under autocast (Trainer(bf16=True)) see the rows below
                peft_name = "peft LoRA Linear (float32 adapters, no autocast)" if pe is not None \
                    else "peft forward (re-implemented; peft missing)"

                def peft_f():
                    return pe(x) if pe is not None else _peft_like(x, W, A, B, s)

                def peft_fb():
                    y = pe(xg) if pe is not None else _peft_like(xg, W, A, B, s)
                    return torch.autograd.grad(y, [xg, A, B], dy)
                agree = agreement(ours_fb(), peft_fb())     # dX, dA, dB (the default schedule), before timing
                pf, pfb = timer(peft_f), timer(peft_fb)
                uf = timer(lambda: _unsloth_fwd(x, W, A16, B16, s))
                ufb = timer(lambda: (_unsloth_fwd(x, W, A16, B16, s), _unsloth_bwd(dy, x, W, A16, B16, s)))
                ub = timer(lambda: _unsloth_bwd(dy, x, W, A16, B16, s))
                peft_b = _time_backward(timer, lambda v: pe(v) if pe is not None else _peft_like(v, W, A, B, s),
                                        xg, A, B, dy)
                peft_s = timer(_train_step(lambda v: pe(v) if pe is not None else _peft_like(v, W, A, B, s),
                                           xg, A, B, dy, on_gpu))
                rows += _autocast_rows(timer, shape, xg, W, A, B, s, dy, pe, on_gpu, backend, T, N, K, r)
                for sched, (ours_f, ours_t, ours_b, ours_s) in ours.items():
                    rows += _gemm_kind_rows(sched, scheds[0], shape, dt, ours_f, ours_t, ours_b, ours_s,
                                            (base_f, base_fb, base_b), (pf, pfb, peft_b, peft_s), (uf, ufb, ub),
                                            peft_name, T, N, K, r, on_gpu, agree)
                ours_t = ours[scheds[0]][1]
                rows.append(row("lora fwd+bwd", shape, str(dt).replace("torch.", ""), "triton" if on_gpu else "cpu",
                                "deterministic mode (dy read twice: u, then dB)", ours_t, two_reads[0],
                                roofline_pct(ours_t[0], flops=_flops(T, N, K, r, True)),
                                note=CPU_NOTE if not on_gpu else "one-read lora_dy_kernel (dB by atomics) "
                                "vs the shrink + wgrad kernels; ratio < 1 means the atomics cost more than a read"))
    return rows


def _autocast_rows(timer, shape, xg, W, A, B, s, dy, pe, on_gpu, backend, T, N, K, r) -> list[dict]:
    """forward+backward of ours and peft's layer, both under bf16 autocast (transformers.Trainer(bf16=True)):
    peft's LoRA branch then runs in bf16 (its float32 adapters cast per call), ours as without autocast."""
    if pe is None:
        return []
    from ..ops import lora_linear
    dev = xg.device.type

    def fb(fn):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16):
                y = fn(xg)
            return torch.autograd.grad(y, [xg, A, B], dy.to(y.dtype))
        return run
    ours_fn, peft_fn = fb(lambda v: lora_linear(v, W, A, B, s, backend=backend)), fb(pe)
    agree = agreement(ours_fn(), peft_fn())
    ours, theirs = timer(ours_fn), timer(peft_fn)
    return [row("lora fwd+bwd (bf16 autocast)", shape, "bf16", "triton" if on_gpu else "cpu",
                "peft LoRA Linear under bf16 autocast", ours, theirs[0],
                roofline_pct(ours[0], flops=_flops(T, N, K, r, True)),
                note=(CPU_NOTE if not on_gpu else _note(theirs[0] / ours[0], GOAL_VS_PEFT,
                                                        "fwd+bwd vs peft under autocast", on_gpu)) + f"; {agree}")]


def _skipped(kernel: str, baseline: str, what: str, e: Exception) -> dict:
    return row(kernel, "-", "bf16", "-", baseline, (float("nan"),) * 3, None,
               note=f"skipped: {what} not usable here ({type(e).__name__}: {e})")


def nf4_rows(timer, on_gpu, device, quick):
    """QLoRA forward+backward, ours against peft's bitsandbytes Linear4bit LoRA layer over the same weights.
    Adapters in float32, peft's default (get_peft_model's autocast_adapter_dtype casts 16-bit adapters to
    float32; peft's layer then computes the LoRA branch in float32), and in bf16 (what peft's layer made
    directly over a bf16 Linear4bit holds: its compute dtype); ours over the same adapters each time. Both
    of our NF4 schedules with float32 adapters (and, on sm_90 from MIN_ROWS rows, the dequant buffer on the
    fused-tma schedule), the default one with bf16."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except Exception as e:  # noqa: BLE001
        return [_skipped("qlora fwd+bwd", "bitsandbytes + peft", "bitsandbytes/peft", e)]
    from ..nn import LoRALinear
    from ..ops import lora as lora_ops
    from ..triton_kernels import lora_tma
    dt = torch.bfloat16 if on_gpu else torch.float32
    N, K = (14336, 4096) if on_gpu else (64, 128)
    r = 16
    lin = torch.nn.Linear(K, N, bias=False, dtype=dt)
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    q = q.to(device)
    def peft_layer():
        return PeftLinear4bit(q, "default", config=LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False), r=r,
                              lora_alpha=2 * r)
    pe16, pe32 = peft_layer(), peft_layer()      # (two layers over the one quantized base)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            dst = getattr(pe32, name)["default"]
            dst.float()
            dst.weight.copy_(getattr(pe16, name)["default"].weight)
    adapters = [("float32 adapters, peft's default", pe32, LoRALinear.from_peft(pe32), True)]
    if dt != torch.float32:
        adapters.append((f"{str(dt)[6:]} adapters", pe16, LoRALinear.from_peft(pe16), False))
    rows = []
    for T in ((16, 4096) if quick else (16, 256, 4096)) if on_gpu else (4, 64):
        x = torch.randn(T, K, device=device, dtype=dt, requires_grad=True)
        dy = torch.randn(T, N, device=device, dtype=dt)
        for label, pe, ours, both in adapters:
            params = [x, ours.lora_A["default"].weight, ours.lora_B["default"].weight]
            peft_params = [x, pe.lora_A["default"].weight, pe.lora_B["default"].weight]
            base = timer(lambda: torch.autograd.grad(pe(x), peft_params, dy))
            default = lora_ops.NF4_FUSED_MAX_ROWS
            # the in-GEMM dequant (fused), then the buffer; on sm_90 also the buffer with the fused-tma schedule
            tma = both and lora_tma.available(device) and T >= lora_tma.MIN_ROWS and not opt_in_skipped("fused-tma")
            for limit, sched in [(T, None), (T - 1, None)] + [(T - 1, "fused-tma")] * tma if both else [(default, None)]:
                lora_ops.NF4_FUSED_MAX_ROWS = limit
                before = lora_tma.launches
                try:
                    with _schedule_scope(sched):
                        t = timer(lambda: torch.autograd.grad(ours(x), params, dy))
                        path = lora_ops.nf4_path(T, True)
                except Exception as e:  # noqa: BLE001 -- fused-tma on a stack it does not run on: a row saying so
                    if sched is None:
                        raise
                    rows.append(_skipped("qlora fwd+bwd", f"path buffer, {sched} schedule", sched, e))
                    continue
                finally:
                    lora_ops.NF4_FUSED_MAX_ROWS = default
                if sched is not None and lora_tma.launches == before:
                    rows.append(_skipped("qlora fwd+bwd", f"path buffer, {sched} schedule", sched,
                                         RuntimeError("lora_gemm_tma_kernel was not taken")))
                    continue
                chosen = "the default" if path == lora_ops.nf4_path(T, True) and sched is None else "not the default"
                rows.append(row("qlora fwd+bwd", f"gate/up T={T} N={N} K={K} r={r}", "nf4/" + str(dt)[6:],
                                "triton" if on_gpu else "cpu", f"bitsandbytes Linear4bit + peft LoRA ({label})", t,
                                base[0], roofline_pct(t[0], flops=_flops(T, N, K, r, True)),
                                note=f"path {path}" + (f", {sched} schedule" if sched else "") + f" ({chosen}); "
                                + _note(base[0] / t[0], GOAL_NF4, "vs bnb+peft", on_gpu)))
    return rows


def multi_rows(timer, on_gpu, device):
    from ..ops import lora_linear_multi
    dt = torch.bfloat16 if on_gpu else torch.float32
    N, K, T = (4096, 4096, 8192) if on_gpu else (64, 64, 64)
    ranks = (8, 16, 32, 64)
    x = torch.randn(T, K, device=device, dtype=dt)
    W = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dt)
    ads = [(torch.randn(r, K, device=device) / math.sqrt(K), torch.randn(N, r, device=device) * 0.01, 2.0)
           for r in ranks]
    idx = torch.arange(T, device=device) * len(ranks) // T        # 4 equal segments
    ours = timer(lambda: lora_linear_multi(x, W, ads, idx))

    def loop():      # peft's _mixed_batch_forward: the base, then each adapter on its rows
        y = F.linear(x, W)
        for a, (A, B, s) in enumerate(ads):
            rows_a = (idx == a).nonzero().squeeze(1)
            xa = x[rows_a].to(A.dtype)
            y[rows_a] += (F.linear(F.linear(xa, A), B) * s).to(y.dtype)
        return y
    base = timer(loop)
    return [row("lora fwd, 4 adapters in one batch", f"T={T} N={N} K={K} r={ranks}", str(dt)[6:],
                "triton" if on_gpu else "cpu", "peft mixed-batch loop", ours, base[0],
                roofline_pct(ours[0], flops=2 * T * N * K + 2 * T * sum(ranks) * (N + K) // len(ranks)),   # a token: 1
                note=CPU_NOTE if not on_gpu else "")]


def dora_rows(timer, on_gpu, device, quick):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import layer as pl
    except Exception as e:  # noqa: BLE001
        return [_skipped("dora fwd+bwd", "peft DoRA layer", "peft", e)]
    from ..nn import LoRALinear
    dt = torch.bfloat16 if on_gpu else torch.float32
    shapes = ([QUICK[0]] if quick else [QUICK[0], QUICK[1]]) if on_gpu else TINY[:1]
    T, r = (4096, 16) if on_gpu else (32, 8)
    rows = []
    for name, N, K in shapes:
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dt)
        pe = pl.Linear(lin, "default", config=LoraConfig(r=r, lora_alpha=2 * r, use_dora=True,
                                                         init_lora_weights=False), r=r, lora_alpha=2 * r)
        for mod in (pe.lora_A["default"], pe.lora_B["default"], pe.lora_magnitude_vector["default"]):
            mod.float()                     # peft's autocast_adapter_dtype: float32 adapters
        ours = LoRALinear.from_peft(pe)
        plain = LoRALinear.from_linear(lin, r=r, alpha=2 * r, init_lora_weights=False)
        x = torch.randn(T, K, device=device, dtype=dt, requires_grad=True)
        dy = torch.randn(T, N, device=device, dtype=dt)

        def fb(layer):
            ps = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            ps += [layer.lora_magnitude_vector["default"].weight] if layer.use_dora["default"] else []
            return torch.autograd.grad(layer(x), ps, dy)
        shape = f"{name} T={T} N={N} K={K} r={r}"
        t = timer(lambda: fb(ours))
        flops = _flops(T, N, K, r, True)
        rows.append(row("dora fwd+bwd", shape, str(dt)[6:], "triton" if on_gpu else "cpu", "peft DoRA layer", t,
                        timer(lambda: fb(pe))[0], roofline_pct(t[0], flops=flops),
                        note=CPU_NOTE if not on_gpu else ""))
        rows.append(row("dora fwd+bwd", shape, str(dt)[6:], "triton" if on_gpu else "cpu",
                        "fusedtune plain LoRA layer", t, timer(lambda: fb(plain))[0], roofline_pct(t[0], flops=flops),
                        note=CPU_NOTE if not on_gpu else "ratio = plain / DoRA: DoRA's extra cost"))
        for m in (ours, pe):
            m.eval()
        with torch.no_grad():
            ti = timer(lambda: ours(x))
            rows.append(row("dora fwd (inference)", shape, str(dt)[6:], "triton" if on_gpu else "cpu",
                            "peft DoRA layer", ti, timer(lambda: pe(x))[0],
                            roofline_pct(ti[0], flops=_flops(T, N, K, r, False)),
                            note=CPU_NOTE if not on_gpu else "weight norm cached (peft recomputes it)"))
    return rows


def _layer_fwd_bwd(T, N, K, device, dt):
    """fb(layer): forward and backward of a one-adapter LoRA layer on a fixed [T, K] input: dX, dA, dB."""
    x = torch.randn(T, K, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(T, N, device=device, dtype=dt)

    def fb(layer):
        return torch.autograd.grad(layer(x), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight], dy)
    return fb


def peft_model_rows(timer, on_gpu, device, quick):
    from .core import CpuTimer  # noqa: PLC0415
    dt = torch.bfloat16 if on_gpu else torch.float32
    name, N, K = QUICK[0] if on_gpu else TINY[0]
    T, r = (4096, 16) if on_gpu else (32, 8)
    W = torch.randn(N, K, device=device).div_(math.sqrt(K)).to(dt)
    A = torch.nn.Parameter(torch.randn(r, K, device=device) / math.sqrt(K))
    B = torch.nn.Parameter(torch.randn(N, r, device=device) * 0.01)
    pe = _peft_layer(W, None, A, B, r, 2 * r)
    if pe is None:
        return [_skipped("lora fwd+bwd, peft layer fused in place", "peft LoRA layer", "peft",
                         ImportError("peft is not installed"))]
    import copy  # noqa: PLC0415
    from ..lora import fuse_peft  # noqa: PLC0415
    from ..lora.peft_model import _signature  # noqa: PLC0415
    from ..nn import LoRALinear  # noqa: PLC0415
    model = torch.nn.Sequential(copy.deepcopy(pe))
    fuse_peft(model)
    fused = model[0]
    plain = LoRALinear.from_peft(fused)
    fb = _layer_fwd_bwd(T, N, K, device, dt)
    shape, backend = f"{name} T={T} N={N} K={K} r={r}", "triton" if on_gpu else "cpu"
    t = timer(lambda: fb(fused))
    flops = roofline_pct(t[0], flops=_flops(T, N, K, r, True))
    note = CPU_NOTE if not on_gpu else ""
    rows = [row("lora fwd+bwd, peft layer fused in place", shape, str(dt)[6:], backend, "peft LoRA layer", t,
                timer(lambda: fb(pe))[0], flops, note=note),
            row("lora fwd+bwd, peft layer fused in place", shape, str(dt)[6:], backend,
                "fusedtune LoRALinear over the same parameters", t, timer(lambda: fb(plain))[0], flops,
                note=note or "ratio ~1: the wrapper's cost")]
    host = CpuTimer(quick)
    one = torch.randn(1, K, device=device, dtype=dt)
    with torch.no_grad():
        peft_host = host(lambda: pe(one))[0]
    rows.append(row("fuse_peft per-call check (host)", "one layer", "-", "python",
                    "peft layer forward at 1 token (host)", host(lambda: _signature(fused)), peft_host,
                    note=CPU_NOTE if not on_gpu else "host time, CPU timer; ratio = how many checks fit in "
                    "peft's own per-call host time"))
    return rows


def conv1d_rows(timer, on_gpu, device):
    what = "lora fwd+bwd, Conv1D base (W stored transposed)"
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - transformers missing
        return [_skipped(what, "LoRALinear over nn.Linear", "transformers", e)]
    from ..nn import LoRALinear  # noqa: PLC0415
    dt = torch.bfloat16 if on_gpu else torch.float32
    name, N, K = QUICK[0] if on_gpu else TINY[0]
    T, r = (4096, 16) if on_gpu else (32, 8)
    conv = Conv1D(N, K).to(device=device, dtype=dt)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / math.sqrt(K))
    lin = torch.nn.Linear(K, N, device=device, dtype=dt)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    ours, flat = LoRALinear.from_linear(conv, r=r, alpha=2 * r), LoRALinear.from_linear(lin, r=r, alpha=2 * r)
    for m in (ours, flat):
        m.lora_A["default"] = ours.lora_A["default"]
        m.lora_B["default"] = ours.lora_B["default"]
    fb = _layer_fwd_bwd(T, N, K, device, dt)
    shape, backend = f"{name} T={T} N={N} K={K} r={r}", "triton" if on_gpu else "cpu"
    t = timer(lambda: fb(ours))
    flops = roofline_pct(t[0], flops=_flops(T, N, K, r, True))
    note = CPU_NOTE if not on_gpu else ""
    rows = [row(what, shape, str(dt)[6:], backend, "LoRALinear over nn.Linear (W as [out, in])", t,
                timer(lambda: fb(flat))[0], flops, note=note or "ratio ~1: reading W^T costs nothing")]
    try:
        pe = ours.to_peft()
    except ImportError as e:
        return rows + [_skipped(what, "peft LoRA layer (fan_in_fan_out)", "peft", e)]
    rows.append(row(what, shape, str(dt)[6:], backend, "peft LoRA layer (fan_in_fan_out)", t,
                    timer(lambda: fb(pe))[0], flops, note=note))
    return rows


def capture(fn) -> tuple:
    """(graph, fn's outputs): fn warmed up twice on a side stream (autotuning, workspaces), then captured in one
    CUDA graph. Shared by the graph-replay rows and the GPU tests that replay a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _graph_timer(timer, fn):
    """The time of fn's kernels alone: the replay of its capture timed (no Python, no launch code: the GPU's
    share of an eager call)."""
    return timer(capture(fn)[0].replay)


def graph_rows(timer, on_gpu, device, quick):
    """forward+backward (dX, dA, dB) of lora_linear, peft's layer and unsloth's composition, each captured in a
    CUDA graph and replayed: the kernels' time without the host's, against the eager call of ours. Where an
    eager row is host-bound (q_proj at 4096 tokens on the H200's host), this is what the kernels give. Also the
    base GEMMs alone (the goal: LoRA <= +10% over them, kernels against kernels) and ours on every other
    schedule (_schedules) against the default one."""
    kernel, base = "lora fwd+bwd (CUDA graph replay)", "peft LoRA Linear (CUDA graph replay; float32 adapters, no autocast)"
    if not on_gpu:
        return [row(kernel, "-", "-", "cpu", base, (float("nan"),) * 3, None, note="skipped: needs a CUDA GPU")]
    from ..ops import lora_linear
    rows, dt, T, r, s = [], torch.bfloat16, GRAPH_TOKENS, 16, 2.0
    for name, N, K in QUICK[:1] if quick else QUICK[:2]:
        x, W, dy, A, B, A16, B16 = layer_case(T, N, K, r, dt, device)
        pe = _peft_layer(W, None, A, B, r, int(s * r))
        shape = f"{name} T={T} N={N} K={K} r={r}"

        def ours():
            return torch.autograd.grad(lora_linear(x, W, A, B, s), [x, A, B], dy)

        def peft():
            y = pe(x) if pe is not None else _peft_like(x, W, A, B, s)
            return torch.autograd.grad(y, [x, A, B], dy)
        xd = x.detach()
        scheds = _schedules(T, N, K, device)
        timed = {}
        for what, fn in ([(f"ours {sn}", _in_schedule(sn, ours)) for sn in scheds]
                         + [("peft", peft), ("base", lambda: (F.linear(xd, W), dy @ W)),
                            ("unsloth", lambda: (_unsloth_fwd(xd, W, A16, B16, s), _unsloth_bwd(dy, xd, W, A16, B16, s)))]):
            try:
                timed[what] = _graph_timer(timer, fn)
            except Exception as e:  # noqa: BLE001 -- a capture that fails is a row saying so, not a crash
                timed[what] = e
        default = f"ours {scheds[0]}"
        if isinstance(timed[default], Exception):
            rows.append(_skipped(kernel, base, "CUDA graph capture of lora_linear", timed[default]))
            continue
        ours_t = timed[default]
        rl = roofline_pct(ours_t[0], flops=_flops(T, N, K, r, True))
        eager = timer(ours)
        rows.append(row(kernel, shape, "bfloat16", "triton", "the same call in eager mode (kernels + host)", ours_t,
                        eager[0], rl, note=f"{scheds[0]} schedule (the default here); ratio > 1: the eager call "
                        "waits on its host code by that factor"))
        for what, label in (("peft", base), ("unsloth", "cuBLAS + addmm_ (unsloth's method, CUDA graph replay)"),
                            ("base", "base GEMMs alone (forward + dX, CUDA graph replay)")):
            t = timed[what]
            if isinstance(t, Exception):
                rows.append(_skipped(kernel, label, f"CUDA graph capture of {what}", t))
                continue
            if what == "peft":
                note = _note(t[0] / ours_t[0], GOAL_VS_PEFT, "kernels vs peft's kernels", True)
            elif what == "base":
                note = _over_base(ours_t[0], t[0])
            else:
                note = "kernels only on both sides"
            rows.append(row(kernel, shape, "bfloat16", "triton", label, ours_t, t[0], rl,
                            note=f"{scheds[0]} schedule; " + note))
        for sn in scheds[1:]:     # the other schedules' kernels against the default's
            t = timed[f"ours {sn}"]
            if isinstance(t, Exception):
                rows.append(_skipped(kernel, f"{sn} schedule (CUDA graph replay)", f"CUDA graph capture of {sn}", t))
                continue
            over = "" if isinstance(timed["base"], Exception) else f"; {sn}: " + _over_base(t[0], timed["base"][0])
            rows.append(row(kernel, shape, "bfloat16", "triton", f"{sn} schedule (CUDA graph replay)", ours_t, t[0], rl,
                            note=f"{scheds[0]} schedule (the default) vs {sn}: ratio > 1, the default is faster"
                            + over))
    return rows


def layer_case(T, N, K, r, dt, device):
    """(x [T, K] needing a gradient, W [N, K], dy [T, N], A, B float32 Parameters, A and B in dt): one seeded
    LoRA layer case of the graph-replay and per-kernel sections."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, K, device=device, generator=g).to(dt).requires_grad_()
    W = (torch.randn(N, K, device=device, generator=g) / math.sqrt(K)).to(dt)
    dy = torch.randn(T, N, device=device, generator=g).to(dt)
    A = torch.nn.Parameter(torch.randn(r, K, device=device, generator=g) / math.sqrt(K))
    B = torch.nn.Parameter(torch.randn(N, r, device=device, generator=g) * 0.01)
    return x, W, dy, A, B, A.detach().to(dt), B.detach().to(dt)


def _over_base(ours: float, base: float) -> str:
    return f"LoRA costs {100 * (ours / base - 1):+.1f}% over the base; " + _note(base / ours, 1 / GOAL_OVER_BASE,
                                                                               "<= +10%", True)


def _in_schedule(sched, fn):
    def call():
        with _schedule_scope(sched):
            return fn()
    return call


def host_rows(on_gpu, device, quick):
    from ..nn import LoRALinear  # noqa: PLC0415
    from .core import host_rows as host  # noqa: PLC0415
    dt = torch.bfloat16 if on_gpu else torch.float32
    name, N, K = QUICK[0] if on_gpu else TINY[0]
    r = 16 if on_gpu else 8
    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dt)
    ours = LoRALinear.from_linear(lin, r=r, alpha=2 * r)
    pe = _peft_layer(lin.weight.detach(), None, ours.lora_A["default"].weight, ours.lora_B["default"].weight, r,
                     2 * r)
    x = torch.randn(1, K, device=device, dtype=dt, requires_grad=True)
    return host("LoRALinear", f"{name} T=1 N={N} K={K} r={r}", str(dt)[6:], "triton" if on_gpu else "cpu", ours, x,
                quick, "" if on_gpu else CPU_NOTE, [("peft LoRA layer", pe)] if pe is not None else [])


def sections(timer, quick: bool) -> list:
    from .lora_kernels import breakdown_rows
    on_gpu = timer.name != "cpu"
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        shapes, tokens, ranks = (QUICK, (4096,), (16,)) if quick else (LLAMA3_8B, (4096, 16384), (8, 16, 64))
    else:
        shapes, tokens, ranks = TINY, (32,), (8,)
    return [("LoRA GEMMs", lambda: gemm_rows(timer, shapes, tokens, ranks, on_gpu, device)),
            ("QLoRA (NF4 base)", lambda: nf4_rows(timer, on_gpu, device, quick)),
            ("several adapters", lambda: multi_rows(timer, on_gpu, device)),
            ("DoRA", lambda: dora_rows(timer, on_gpu, device, quick)),
            ("peft model fused in place", lambda: peft_model_rows(timer, on_gpu, device, quick)),
            ("GPT-2 Conv1D base", lambda: conv1d_rows(timer, on_gpu, device)),
            ("host time per call", lambda: host_rows(on_gpu, device, quick)),
            ("kernels only (CUDA graph replay)", lambda: graph_rows(timer, on_gpu, device, quick)),
            ("per-kernel device time (torch.profiler)", lambda: breakdown_rows(on_gpu, device, quick))]
