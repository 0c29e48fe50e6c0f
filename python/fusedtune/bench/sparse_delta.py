"""Sparse-delta family benchmark (python -m fusedtune bench sparse_delta).

1. The delta gradient: fusedtune.ops.sparse_delta.sddmm (the tiled CUDA kernel and the Triton kernel,
   one row each) against the dense weight-gradient
   GEMM (dy.t() @ x, bf16 out) followed by a gather at the k indices, on the Llama-3-8B linear shapes
   (4096x4096, 14336x4096, 4096x14336) at 8192 tokens (--quick: 4096), bf16, densities 0.3%, 1%
   and 2.4%. Reported: both times, ratio = dense / ours, the bandwidth of the gathered reads (every
   index reads a column of dy and one of x: gathered_bytes = 2 * T * k * 2 B; served largely from
   the caches, so its "% of HBM" may exceed 100), the TFLOP/s of the useful flops 2*T*k, and in
   roofline_pct the H100 roofline of the compulsory traffic (dy and x once, indices, fp32 output) and
   the useful flops. Goal on an H100: >= 5x faster than dense dW + gather at 1% density. A third row
   per shape and density ("dense schedule") times sddmm(schedule="dense"): dW formed by torch.mm with
   out_dtype=float32 (blocks of rows of at most DENSE_BLOCK_BYTES), then gathered -- what
   SparseDeltaLinear's delta_grad="auto" takes above a density (its note says which one auto takes).
2. SparseDeltaAdamW (cuda backend) on the deltas of 32 Llama-3-8B decoder layers (8 with --quick; q, k, v, o, gate,
   up, down; bf16 weights) at 1% density, against torch.optim.AdamW(fused=True) on the same float32
   deltas followed by index_copy_ of round(base + delta) into each weight. Bytes touched per delta
   (BYTES_PER_DELTA = 36): delta r/w 8, grad 4, two moments r/w 16, base read 2 (bf16), index read 4,
   merged-weight write 2. Bandwidth = bytes / time, % of the HBM peak of the GPU that ran; goal >= 80%. The baseline's
   bandwidth is over the same 36 B/delta (what it has to do), not over its temporaries. A second row
   times the op sparse_adamw_ on prebuilt lists, to separate the optimizer's host overhead. A third
   times the step as it runs after regrowth: per-element step counts (+8 B/delta, BYTES_PER_DELTA_COUNTED
   = 44), every 5th entry young (reseeded, so it computes its own bias corrections each step).
   The notes also give the bandwidth over what DRAM moves by our estimate: each scattered 2-byte weight
   write costs its 32-byte sector read and written back (SECTOR_BYTES_PER_DELTA = 98), so 80% of HBM
   over the 36 counted bytes would need ~220% over the moved ones -- out of reach if the estimate holds.
3. One training step (zero_grad, forward with labels, backward, optimizer step) of a Llama with
   Llama-3-8B's shapes and fewer layers (4 of its 32 layers: hidden 4096, intermediate 14336, 32/8
   heads, vocab 128256, untied lm_head; random init, bf16, sdpa; batch 4 x 1024; --quick: 2 layers,
   batch 2 x 1024): every q/k/v/o/
   gate/up/down becomes a SparseDeltaLinear at 1% density (embeddings, norms and lm_head frozen)
   with SparseDeltaAdamW, against full fine-tuning (every parameter, torch.optim.AdamW(fused=True)).
   Reported: step time, peak GPU memory of a steady-state step, optimizer state, trainable elements,
   the matmul flops of the step. A second row compares the same sparse step with LoRA at the same
   trainable-parameter budget (fusedtune.patch(model, "lora") on the same 7 linears, rank r =
   round(k / sum(in + out)), alpha 2r, fp32 adapters, torch.optim.AdamW(fused=True)), same run.

4. Regrowth's selection (fused Triton ops vs the torch.topk path): sparse_delta_regrow.py here.

Before timing, sections 1 and 2 run ours and the baseline once and the row's note says how far apart they are
(core.agreement; "RESULTS DIFFER" where they do): each SDDMM row's k values against the dense dW's gathered
ones; SparseDeltaAdamW's step and the sparse_adamw_ op against the torch AdamW baseline, one step each from the
same values (at lr core.CHECK_LR, so that the update shows in the bf16 weights): the deltas and the merged weights
at the indices. Not checked: the step after regrowth (its young entries' own bias corrections differ from the
baseline's by design) and section 3 (other methods train other parameters).

--cpu: tiny shapes (a 2-layer hidden-64 Llama in fp32, 64/176-wide GEMMs at 256 tokens, 2 tiny
layers of deltas); the rows check the framework, not performance, and carry no goal verdicts.
"""
from __future__ import annotations


import torch

from .core import (CHECK_LR, H100_BF16_FLOPS, agreement, free_memory, from_same_start, hbm_goal, hbm_share,
                   linear_host_rows, lr_scope, roofline_pct, row)

# Llama-3-8B linear shapes (out_features, in_features)
LLAMA3_8B_GEMMS = [("q/o_proj", 4096, 4096), ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
TINY_GEMMS = [("q/o_proj", 64, 64), ("gate/up_proj", 176, 64), ("down_proj", 64, 176)]
GEMM_TOKENS, QUICK_GEMM_TOKENS, TINY_GEMM_TOKENS = 8192, 4096, 256
DENSITIES = (0.003, 0.01, 0.024)
GOAL_DENSITY = 0.01
GOAL_SPEEDUP = 5.0

# the 7 linears of one decoder layer, (out, in): q, k, v, o, gate, up, down
LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                   (14336, 4096), (14336, 4096), (4096, 14336)]
TINY_LAYER = [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176)]
OPT_LAYERS = 2            # CPU; on a GPU 8 (--quick) or all 32 of Llama-3-8B's layers: the H200 run timed 2
OPT_LAYERS_GPU = (8, 32)  # layers (0.16 GB of traffic, 0.35 ms), where per-launch overhead is most of the time
OPT_DENSITY = 0.01
# bytes an AdamW step on one delta touches: delta r/w, grad, 2 moments r/w, base (bf16), index (int32),
# merged-weight write (bf16)
BYTES_PER_DELTA = 4 + 4 + 4 + 16 + 2 + 4 + 2
BYTES_PER_DELTA_COUNTED = BYTES_PER_DELTA + 8      # + the int32 step count r/w (after regrowth)
# what DRAM moves per delta (an estimate): at 1% density the merged-weight writes land ~100 elements apart,
# so each 2-byte write costs its 32-byte sector read and written back (DRAM moves whole sectors)
SECTOR_BYTES_PER_DELTA = BYTES_PER_DELTA - 2 + 2 * 32
YOUNG_EVERY = 5                                    # every 5th entry reseeded: 20% young, as at rate 0.2
GOAL_HBM_PCT = 80.0

LLAMA3_8B = {"name": "llama3-8b", "vocab": 128256, "hidden": 4096, "intermediate": 14336, "layers": 32,
             "heads": 32, "kv_heads": 8, "batch": 4, "seq": 1024}
STEP_LAYERS = 4
TINY = {"name": "tiny-llama", "vocab": 32, "hidden": 64, "intermediate": 176, "layers": 2,
        "heads": 4, "kv_heads": 2, "batch": 2, "seq": 32}
STEP_DENSITY = 0.01
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LR = 1e-5
CPU_NOTE = "CPU framework check, not performance"
FULL_NAME = "full fine-tuning"


# ----------------------------------------------------------------------------- helpers

def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def n_deltas(numel: int, density: float) -> int:
    """k for a weight of `numel` elements, as SparseDeltaLinear.from_linear counts it."""
    return max(1, round(density * numel))


def make_indices(numel: int, density: float, device, seed: int = 0) -> torch.Tensor:
    """k = n_deltas(numel, density) sorted unique int32 flat indices, drawn on `device` (a CPU
    randperm of a 58.7M-element weight would cost about a second per matrix)."""
    g = torch.Generator(device=device).manual_seed(seed)
    perm = torch.randperm(numel, generator=g, device=device)
    return perm[: n_deltas(numel, density)].sort().values.to(torch.int32)


def _usable(op_has, name: str, device) -> bool:
    from .. import backend as B
    ok, why = B.can_serve(name, device, frozenset(op_has))
    if not ok:
        print(f"sparse_delta bench: backend {name} skipped: {why}")
    return ok


def _on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def _backends(on_gpu: bool) -> tuple[tuple[str, ...], str]:
    """(sddmm backends, optimizer backend) timed: the tiled CUDA and the Triton SDDMM and the CUDA
    optimizer kernel on a GPU; the C++ kernels on the CPU."""
    return (("cuda", "triton"), "cuda") if on_gpu else (("cpu",), "cpu")


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


# ----------------------------------------------------------------------------- 1. SDDMM

def sddmm_bytes(T: int, out_f: int, in_f: int, k: int, elem: int = 2) -> dict:
    """gathered: every index reads T elements of dy and T of x; compulsory: dy and x once, the int32
    indices, the fp32 output; useful flops 2*T*k."""
    return {"gathered": 2 * T * k * elem, "compulsory": T * (out_f + in_f) * elem + 4 * k + 4 * k,
            "flops": 2 * T * k}


def bench_sddmm(timer, quick: bool) -> list[dict]:
    from ..ops import sparse_delta as ops

    dev = timer.device
    on_gpu = _on_gpu(dev)
    gemms = LLAMA3_8B_GEMMS if on_gpu else TINY_GEMMS
    T = (QUICK_GEMM_TOKENS if quick else GEMM_TOKENS) if on_gpu else TINY_GEMM_TOKENS
    usable = [b for b in _backends(on_gpu)[0] if _usable(ops._SDDMM_HAS, b, dev)]
    if not usable:
        return []
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, out_f, in_f in gemms:
        dy = torch.randn(T, out_f, device=dev, dtype=torch.bfloat16, generator=g)
        x = torch.randn(T, in_f, device=dev, dtype=torch.bfloat16, generator=g)
        for j, dens in enumerate(DENSITIES):
            idx = make_indices(out_f * in_f, dens, dev, seed=j)
            idx64 = idx.long()  # the baseline's gather index, made once (not timed)
            k = idx.numel()
            want = (dy.t() @ x).view(-1).index_select(0, idx64)     # the baseline's result, for the checks
            checks = {b: agreement(ops.sddmm(dy, x, idx, backend=b, check=False), want) for b in usable}
            checks["dense"] = agreement(ops.sddmm(dy, x, idx, check=False, schedule="dense"), want)
            del want
            dense = timer(lambda: (dy.t() @ x).view(-1).index_select(0, idx64))
            for b in usable:
                rows.append(_sddmm_row(timer(lambda: ops.sddmm(dy, x, idx, backend=b, check=False)), dense, b,
                                       label, out_f, in_f, T, dens, k, on_gpu, checks[b]))
            r = _sddmm_row(timer(lambda: ops.sddmm(dy, x, idx, check=False, schedule="dense")), dense, "dense",
                           label, out_f, in_f, T, dens, k, on_gpu, checks["dense"])
            r["kernel"] = DENSE_KERNEL
            if on_gpu:
                name = ops.sparse_delta_backend(dev)["sddmm"]["backend"]
                run, why = ops.choose_delta_grad("auto", name, None, out_f, in_f, T, k, dy.dtype, dev)
                r["note"] += (f"; delta_grad='auto' takes {'this schedule' if run == ops.DENSE else 'the SDDMM'} "
                              f"here ({why})")
            rows.append(r)
    return rows


DENSE_KERNEL = "delta gradient (dense schedule: float32 dW blocks + gather)"


def _sddmm_row(ours, dense, b, label, out_f, in_f, T, dens, k, on_gpu, check: str = "") -> dict:
    """One SDDMM row: backend b's time `ours` against the dense baseline's, same run; check: agreement()'s note."""
    nb = sddmm_bytes(T, out_f, in_f, k)
    s = ours[0] * 1e-3
    gbps = nb["gathered"] / s / 1e9
    tflops = nb["flops"] / s / 1e12
    ratio = dense[0] / ours[0]
    shape = f"llama3-8b {label}: W {out_f}x{in_f}, {T} tokens, density {_pct(dens)} (k={k})"
    if on_gpu:
        note = (f"gathered reads {hbm_share(ours[0], nb['gathered'])}; useful 2*T*k flops {tflops:.3g} TFLOP/s = "
                f"{100 * nb['flops'] / s / H100_BF16_FLOPS:.2f}% of {H100_BF16_FLOPS / 1e12:.0f}; dense dW "
                f"{2.0 * T * out_f * in_f / (dense[0] * 1e-3) / 1e12:.0f} TFLOP/s; ours writes fp32")
        if dens == GOAL_DENSITY:
            note += (f"; goal >= {GOAL_SPEEDUP:.0f}x faster than dense dW + gather at {_pct(GOAL_DENSITY)}: "
                     f"{ratio:.3g}x, {'met' if ratio >= GOAL_SPEEDUP else 'NOT met'}")
    else:
        shape = shape.replace("llama3-8b", "tiny")
        note = f"{CPU_NOTE}; gathered reads {gbps:.3g} GB/s; useful {tflops * 1e3:.3g} GFLOP/s"
    note += f"; {check}" if check else ""
    r = row("sddmm delta gradient", shape, "bf16", b, "dense dW GEMM (dy.t() @ x) + gather at the indices",
            ours, dense[0], roofline_pct(ours[0], nb["compulsory"], nb["flops"]), note=note)
    r.update(density=dens, k=k, tokens=T, gathered_bytes=nb["gathered"], gathered_gbps=gbps,
             useful_flops=nb["flops"], useful_tflops=tflops)
    return r


# ----------------------------------------------------------------------------- 2. SparseDeltaAdamW

def opt_layers(shapes, density: float, device, dtype=torch.bfloat16) -> list:
    """SparseDeltaLinear layers of `shapes` (random weights) with random deltas and gradients."""
    from ..nn import SparseDeltaLinear

    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for i, (out_f, in_f) in enumerate(shapes):
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02, generator=g)
        m = SparseDeltaLinear.from_linear(lin, indices=make_indices(out_f * in_f, density, device, seed=100 + i))
        with torch.no_grad():
            m.values.normal_(0, 1e-3, generator=g)
        m.values.grad = torch.empty_like(m.values).normal_(0, 1e-3, generator=g)
        layers.append(m)
    return layers


def bench_adamw(timer, quick: bool) -> list[dict]:
    from ..ops import sparse_delta as ops
    from ..optim import SparseDeltaAdamW
    from .hft import torch_adamw

    dev = timer.device
    on_gpu = _on_gpu(dev)
    b = _backends(on_gpu)[1]
    if not _usable(ops._ADAMW_HAS, b, dev):
        return []
    n_layers = OPT_LAYERS_GPU[0 if quick else 1] if on_gpu else OPT_LAYERS
    shapes = (LLAMA3_8B_LAYER if on_gpu else TINY_LAYER) * n_layers
    layers = opt_layers(shapes, OPT_DENSITY, dev)
    vals = [m.values for m in layers]
    k = sum(v.numel() for v in vals)
    nbytes = BYTES_PER_DELTA * k
    where = (f"{'llama3-8b' if on_gpu else 'tiny'} {n_layers} layers x 7 linears, bf16 weights, "
             f"density {_pct(OPT_DENSITY)}: {len(vals)} tensors, {k} deltas")

    ours_opt = SparseDeltaAdamW(vals, lr=LR, backend=b)
    base_opt, base_name = torch_adamw(vals, lr=LR)
    base_opt.writes_master_layers = True   # base_step writes the weights itself (the step hook's refresh: twice)
    idx64 = [m.indices.long() for m in layers]  # the baseline's scatter index, made once (not timed)

    def base_step():
        base_opt.step()
        with torch.no_grad():                   # SparseDeltaLinear.merge_ with a prebuilt long index
            for m, i in zip(layers, idx64):
                m.weight.view(-1).index_copy_(0, i, (m.base_values.float() + m.values).to(m.weight.dtype))

    # the op alone on prebuilt lists: the same kernel without the optimizer's per-step Python work
    ms = [torch.zeros_like(v) for v in vals]
    vs = [torch.zeros_like(v) for v in vals]
    lists = (vals, [v.grad for v in vals], ms, vs, [m.weight for m in layers], [m.base_values for m in layers],
             [m.indices for m in layers])

    def op_step(lr=LR):
        ops.sparse_adamw_(*lists, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, backend=b,
                          check=False)

    # once each before timing, from the same values: the deltas and the merged weights at the indices
    state = vals + [(lambda w=m.weight.view(-1), i=i: w.index_select(0, i),
                     lambda v, w=m.weight.view(-1), i=i: w.index_copy_(0, i, v)) for m, i in zip(layers, idx64)]
    with lr_scope((ours_opt, base_opt), CHECK_LR):     # so that the update shows in the bf16 weights
        mine, theirs, mine_op = from_same_start(state, ours_opt.step, base_step, lambda: op_step(CHECK_LR))
    how = f"one step at lr {CHECK_LR:g} from the same values: the updates"
    check, check_op = agreement(mine, theirs, how=how), agreement(mine_op, theirs, how=how)
    for t in ms + vs:
        t.zero_()
    del mine, theirs, mine_op, state

    ours = timer(ours_opt.step)
    base = timer(base_step)
    op = timer(op_step)

    # after regrowth: per-element counts, every YOUNG_EVERY-th entry reseeded (its own bias corrections)
    counted = SparseDeltaAdamW(vals, lr=LR, backend=b)
    counted.step()
    for v in vals:
        counted.reset_state(v, torch.arange(0, v.numel(), YOUNG_EVERY, device=v.device))
    after = timer(counted.step)

    def note(ms_, goal: bool, per: int) -> str:
        nb = per * k
        gbps = nb / (ms_ * 1e-3) / 1e9
        if not on_gpu:
            return f"{CPU_NOTE}; {gbps:.3g} GB/s over {per} B/delta"
        txt = (f"{hbm_share(ms_, nb)} over {per} B/delta ({_gb(nb)}); baseline {hbm_share(base[0], nb)} over the "
               f"same bytes")
        if goal:
            txt += "; " + hbm_goal(ms_, nb, GOAL_HBM_PCT, timer.name)
        moved = per - BYTES_PER_DELTA + SECTOR_BYTES_PER_DELTA
        return txt + (f"; counting the 32-byte sector each scattered weight write costs ({moved} B/delta): "
                      f"{moved * k / (ms_ * 1e-3) / 1e9:.0f} GB/s")

    baseline = f"{base_name} on the fp32 deltas + index_copy_ of round(base + delta)"
    rows = []
    for kernel, t, goal, per, agree in (("SparseDeltaAdamW step", ours, True, BYTES_PER_DELTA, check),
                                        ("sparse_adamw_ op (prebuilt lists)", op, False, BYTES_PER_DELTA, check_op),
                                        (f"SparseDeltaAdamW step after regrowth (counts, 1 in {YOUNG_EVERY} young)",
                                         after, True, BYTES_PER_DELTA_COUNTED, "")):
        nb = per * k
        r = row(kernel, where, "fp32 deltas, bf16 weights", b, baseline, t, base[0], roofline_pct(t[0], nb),
                note=note(t[0], goal, per) + (f"; {agree}" if agree else ""))
        r.update(k=k, bytes_per_delta=per, bytes_touched=nb,
                 achieved_gbps=nb / (t[0] * 1e-3) / 1e9, baseline_gbps=nb / (base[0] * 1e-3) / 1e9)
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------- 3. training step

def sparsify(model, density: float, seed: int = 0) -> list:
    """Freeze the model; every q/k/v/o/gate/up/down Linear of the decoder layers becomes a
    SparseDeltaLinear at `density` (indices drawn on the weight's device). Returns the new layers."""
    from ..nn import SparseDeltaLinear

    model.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ]
    new = []
    for i, (name, lin) in enumerate(targets):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        idx = make_indices(lin.weight.numel(), density, lin.weight.device, seed=seed + i)
        m = SparseDeltaLinear.from_linear(lin, indices=idx)
        setattr(parent, name.rsplit(".", 1)[-1], m)
        new.append(m)
    return new


def step_flops(model, cfg: dict) -> int:
    """Matmul flops of one training step: forward 2*W*T and dX 2*W*T over every linear weight W
    (lm_head included), dW 2*W*T over the dense weights that train and 2*k*T (the SDDMM's useful
    flops) over the deltas, causal attention 2*B*S^2*hidden per layer forward and twice that backward."""
    from ..nn import SparseDeltaLinear
    from .hft import linear_step_flops

    return linear_step_flops(model, cfg, SparseDeltaLinear, "values")


def lora_rank_same_budget(cfg: dict, density: float) -> float:
    """The LoRA rank r with r * (in + out) summed over the 7 linears of every layer equal to the
    sparse deltas' count (density * out * in summed)."""
    h, f = cfg["hidden"], cfg["intermediate"]
    kv = cfg["kv_heads"] * (h // cfg["heads"])
    mats = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    k = sum(n_deltas(o * i, density) for o, i in mats)
    return k / sum(o + i for o, i in mats)


def _delta_grad_label(dev, model, cfg: dict) -> str:
    """The delta gradients' schedules in the training step, as the layers' forward picks them: "dense", the
    SDDMM's backend, or both joined by "/" where layers differ."""
    from ..nn import SparseDeltaLinear
    from ..ops import sparse_delta as ops
    name = ops.sparse_delta_backend(dev)["sddmm"]["backend"]
    T = cfg["batch"] * cfg["seq"]
    runs = {ops.choose_delta_grad(m.delta_grad, name, m.backend, m.out_features, m.in_features, T,
                                  m.indices.numel(), m.weight.dtype, dev)[0]
            for m in model.modules() if isinstance(m, SparseDeltaLinear)}
    return "/".join(sorted(runs)) or name


def measure(timer, cfg: dict, method: str, dtype) -> dict:
    from ..optim import SparseDeltaAdamW
    from .hft import build_llama, make_step, moment_dtype, state_bytes, time_step, torch_adamw

    dev = timer.device
    on_gpu = _on_gpu(dev)
    model = build_llama(cfg, dev, dtype)
    backend = "torch"
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt, opt_name = torch_adamw(model.parameters(), lr=LR)
    elif method == "lora":
        from ..patch import patch
        r = max(1, round(lora_rank_same_budget(cfg, STEP_DENSITY)))
        rep = patch(model, "lora", target_modules=list(PROJ), r=r, alpha=2 * r)
        opt, opt_name = torch_adamw([p for p in model.parameters() if p.requires_grad], lr=LR)
        opt_name = f"LoRA r={r} ({opt_name})"
        backend = ",".join(sorted({row.backend for row in rep.rows}))
    else:
        sparsify(model, STEP_DENSITY)
        ob = _backends(on_gpu)[1]
        opt = SparseDeltaAdamW([p for p in model.parameters() if p.requires_grad], lr=LR, backend=ob)
        opt_name = "SparseDeltaAdamW"
        backend = f"{_delta_grad_label(dev, model, cfg)}+{ob}"
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(dev)
    flops = step_flops(model, cfg)
    step = make_step(model, opt, ids)
    times, peak = time_step(timer, step)
    out = {"times": times, "opt_name": opt_name, "state_bytes": state_bytes(opt), "moments": moment_dtype(opt),
           "peak": peak, "flops": flops, "backend": backend,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del step, opt, model
    free_memory()
    return out


def bench_step(timer, quick: bool) -> list[dict]:
    dev = timer.device
    on_gpu = _on_gpu(dev)
    try:
        import transformers  # noqa: F401, PLC0415 - only to say plainly that it is missing
    except Exception as e:  # noqa: BLE001
        print(f"sparse_delta bench: transformers is not importable ({e}); the training-step row is SKIPPED")
        return []
    cfg = dict(LLAMA3_8B, layers=STEP_LAYERS) if on_gpu else dict(TINY)
    if quick and on_gpu:
        cfg.update(layers=2, batch=2)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dname = "bf16" if on_gpu else "fp32"
    full_layers = (LLAMA3_8B if on_gpu else TINY)["layers"]
    layers = f"{cfg['layers']} layers" if cfg["layers"] == full_layers else f"{cfg['layers']} of {full_layers} layers"
    shape = (f"{cfg['name']} ({layers}, h{cfg['hidden']}, ffn{cfg['intermediate']}, {cfg['heads']}/{cfg['kv_heads']} "
             f"heads, vocab {cfg['vocab']}); batch {cfg['batch']}x{cfg['seq']}; density {_pct(STEP_DENSITY)}")
    print(f"sparse_delta bench: training step of {shape}, {dname}, on {timer.name}")
    res = {m: measure(timer, cfg, m, dtype) for m in ("full", "sparse", "lora")}
    for m, r in res.items():
        print(f"  {m:6s}: {r['times'][0]:.4g} ms, trainable {r['trainable']:,}, optimizer state {_gb(r['state_bytes'])}"
              + (f", peak {_gb(r['peak'])}" if on_gpu else ""))
    full, sp, lo = res["full"], res["sparse"], res["lora"]
    rank = lora_rank_same_budget(cfg, STEP_DENSITY)
    tf = lambda x: x["flops"] / (x["times"][0] * 1e-3) / 1e12  # noqa: E731
    parts = [f"time {sp['times'][0] / full['times'][0]:.3g}x full FT; {tf(sp):.3g} vs {tf(full):.3g} TFLOP/s of "
             f"step matmul flops ({sp['flops'] / full['flops']:.3g}x full FT's)"]
    if on_gpu:
        parts.append(f"peak mem {_gb(sp['peak'])} vs {_gb(full['peak'])} = {sp['peak'] / full['peak']:.3g}x")
    else:
        parts.insert(0, CPU_NOTE)
    vocab_share = min(1.0, 2 * cfg["vocab"] * cfg["hidden"] / max(1, full["trainable"]))
    parts.append(f"full FT trains every parameter: {vocab_share:.0%} of them are the embedding and lm_head with "
                 f"{cfg['layers']} decoder layers (sparse and LoRA freeze those), so this ratio is not a whole "
                 "model's")
    parts.append(f"optimizer state (SparseDeltaAdamW, {sp['moments']} moments) {_gb(sp['state_bytes'])} vs "
                 f"{_gb(full['state_bytes'])} ({full['opt_name']}, {full['moments']} moments)")
    parts.append(f"trainable elems {sp['trainable']:,} vs {full['trainable']:,} = "
                 f"{sp['trainable'] / full['trainable']:.3g}x")
    parts.append(f"equal-budget LoRA rank on the same 7 linears ~ {rank:.3g} (second row)")
    r = row(f"sparse_delta training step ({_pct(STEP_DENSITY)} deltas)", shape, dname, sp["backend"],
            f"{FULL_NAME} ({full['opt_name']})", sp["times"], full["times"][0],
            roofline_pct(sp["times"][0], flops=sp["flops"]), note="; ".join(parts))
    r.update(peak_mem_bytes=sp["peak"], baseline_peak_mem_bytes=full["peak"], opt_state_bytes=sp["state_bytes"],
             baseline_opt_state_bytes=full["state_bytes"], trainable_elems=sp["trainable"],
             baseline_trainable_elems=full["trainable"], step_flops=sp["flops"], baseline_step_flops=full["flops"],
             lora_same_budget_rank=rank)
    vs = [CPU_NOTE] if not on_gpu else [f"peak mem {_gb(sp['peak'])} vs {_gb(lo['peak'])} = "
                                        f"{sp['peak'] / lo['peak']:.3g}x"]
    vs.append(f"trainable elems {sp['trainable']:,} vs {lo['trainable']:,} (LoRA, rank rounded from {rank:.3g})")
    vs.append(f"optimizer state {_gb(sp['state_bytes'])} vs {_gb(lo['state_bytes'])}")
    r2 = row(f"sparse_delta training step ({_pct(STEP_DENSITY)} deltas)", shape, dname, sp["backend"],
             f"LoRA, same budget: {lo['opt_name']}, layers on {lo['backend']}", sp["times"], lo["times"][0],
             roofline_pct(sp["times"][0], flops=sp["flops"]), note="; ".join(vs))
    r2.update(peak_mem_bytes=sp["peak"], baseline_peak_mem_bytes=lo["peak"], opt_state_bytes=sp["state_bytes"],
              baseline_opt_state_bytes=lo["state_bytes"], trainable_elems=sp["trainable"],
              baseline_trainable_elems=lo["trainable"], step_flops=sp["flops"], baseline_step_flops=float("nan"),
              lora_same_budget_rank=rank)
    return [r, r2]


def sections(timer, quick: bool) -> list:
    return [("SDDMM delta gradient", lambda: bench_sddmm(timer, quick)),
            ("SparseDeltaAdamW", lambda: bench_adamw(timer, quick)),
            ("training step vs LoRA", lambda: bench_step(timer, quick)),
            ("regrowth selection", lambda: bench_regrow(timer, quick)),
            ("host time per call", lambda: _host(timer.name != "cpu", quick))]


def bench_regrow(timer, quick: bool) -> list[dict]:
    from .sparse_delta_regrow import bench_regrow as run
    return run(timer, quick)


def _host(on_gpu, quick):
    from ..nn import SparseDeltaLinear  # noqa: PLC0415
    return linear_host_rows("SparseDeltaLinear (1%)", lambda lin: SparseDeltaLinear.from_linear(lin, density=0.01),
                            on_gpu, quick)
