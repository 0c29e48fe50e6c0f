"""Half fine-tuning (HFT) family benchmark (python -m fusedtune bench hft).

1. One training step (zero_grad, forward with labels, backward, optimizer step) of a ~1B Llama
   (TinyLlama-1.1B shapes: vocab 32000, hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
   heads; random init, bf16, sdpa attention; batch 4 x 1024 tokens; --quick: 4 layers, 2 x 1024),
   four ways in the same run, each on a freshly built model with the same init:
     full fine-tuning   every parameter trains, torch.optim.AdamW(fused=True) (bf16 moments)
     matrix-level HFT   fusedtune.hft.HalfFineTuner(granularity="matrix"): frozen matrices get
                        requires_grad=False; torch.optim.AdamW(fused=True) over the rest
     row-level HFT      HalfFineTuner(granularity="row"): every q/k/v/o/gate/up/down becomes a
                        fusedtune.nn.RowMaskedLinear training half its output rows (fp32 masters,
                        compact row gradients); fusedtune.optim.MaskedAdamW (fp32 moments)
     block-level HFT    HalfFineTuner(granularity="block"): the same layers train a contiguous block
                        of half their rows as views of the weight (no masters, compact row
                        gradients); torch.optim.AdamW(fused=True) (bf16 moments, as full FT's)
   Reported: step time (median/p20/p80), roofline_pct = the step's matmul flops (step_flops) at
   989 TFLOP/s over the time, peak GPU memory of a steady-state step
   (torch.cuda.max_memory_allocated after a reset), optimizer state bytes (row HFT: its fp32 row
   masters counted in, as they exist only to be updated) and trainable elements.
   Goals on an H100: HFT step <= 0.75x full fine-tuning's time, optimizer memory <= 0.5x.
2. The compact row-gradient GEMM (fusedtune.ops.hft.row_grad: cuda = gather + cuBLAS, and the Triton
   gathered-load kernel) against the dense dW GEMM
   (dy.t() @ x) followed by a gather of the selected half of the rows, on Llama-3-8B shapes at 8192
   tokens, bf16: TFLOP/s of the useful 2*T*R*in flops, % of 989 TFLOP/s (fp32 output; the note gives
   the time with bf16 output, as block granularity asks for).
3. MaskedAdamW (cuda backend) against torch.optim.AdamW(fused=True) on the same parameters (2 layers
   of Llama-3-8B; --quick 1): fp32 params, bf16 params, and fp32 row masters of half the rows that
   also write into their bf16 weight (baseline: AdamW on the masters + index_copy_ write-back);
   bandwidth = bytes touched / time, % of the HBM peak of the GPU that ran (core.hbm_peak).

Before timing, sections 2 and 3 run ours and the baseline once and the row's note says how far apart they are
(core.agreement; "RESULTS DIFFER" where they do): the compact row gradients against the dense dW's rows, and one
optimizer step each from the same values (at lr core.CHECK_LR, so that the update shows in bf16 weights: the
parameters, and with row masters the masters and the bf16 weights they write). Section 1's methods train
different parameters by design: not checked.

--cpu: a 2-layer hidden-64 Llama (fp32, so that both optimizers keep fp32 moments) and tiny GEMMs;
the rows check the framework, not performance.
"""
from __future__ import annotations


import torch

from .core import (H100_BF16_FLOPS, agreement, free_memory, hbm_share, linear_host_rows, roofline_pct, row,
                   step_agreement)

TINYLLAMA = {"name": "tinyllama-1.1b", "vocab": 32000, "hidden": 2048, "intermediate": 5632, "layers": 22,
             "heads": 32, "kv_heads": 4, "batch": 4, "seq": 1024}
TINY = {"name": "tiny-llama", "vocab": 32, "hidden": 64, "intermediate": 176, "layers": 2,
        "heads": 4, "kv_heads": 2, "batch": 2, "seq": 32}
# Llama-3-8B linear shapes (out_features, in_features)
LLAMA3_8B_GEMMS = [("q/o_proj", 4096, 4096), ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
TINY_GEMMS = [("q/o_proj", 64, 64), ("gate/up_proj", 176, 64), ("down_proj", 64, 176)]
LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                   (14336, 4096), (14336, 4096), (4096, 14336), (4096,), (4096,)]
TINY_LAYER = [(64, 64), (32, 64), (32, 64), (64, 64), (176, 64), (176, 64), (64, 176), (64,), (64,)]
GEMM_TOKENS, TINY_GEMM_TOKENS = 8192, 256

LR = 1e-5
GOAL_TIME = 0.75      # HFT step time / full fine-tuning step time
GOAL_OPT_MEM = 0.5    # HFT optimizer state bytes / full fine-tuning's
METHODS = ("full", "matrix", "row", "block")      # timed (section 1)
STATE_METHODS = METHODS + ("block, embeddings frozen",)   # untimed state accounting (state_memory)
FULL_NAME = "full fine-tuning"
CPU_NOTE = "CPU framework check, not performance"


# ----------------------------------------------------------------------------- helpers

def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (moments; fused AdamW's per-parameter step counters)."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def moment_dtype(opt: torch.optim.Optimizer) -> str:
    """The dtype of the first exp_avg in an optimizer's state ("?" when it has none yet)."""
    for st in opt.state.values():
        m = st.get("exp_avg")
        if torch.is_tensor(m):
            return str(m.dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")
    return "?"


def torch_adamw(params, lr: float = LR):
    """torch.optim.AdamW(fused=True), or foreach where this torch has no fused kernel for the device."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, TypeError, ValueError) as e:
        print(f"hft bench: torch.optim.AdamW(fused=True) refused ({e}); using foreach=True")
        return torch.optim.AdamW(params, lr=lr, foreach=True), "torch.optim.AdamW(foreach=True)"


def build_llama(cfg: dict, device, dtype):
    """A randomly initialized LlamaForCausalLM of cfg's shapes (seeded: the same weights every call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(2048, cfg["seq"]),
                       tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(conf)
    model.to(dtype)
    model.train()
    return model


def setup_method(model, method: str):
    """Apply `method` to the model in place; returns (optimizer, optimizer name, extra info dict)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        opt, name = torch_adamw(model.parameters())
        return opt, name, {}
    from ..hft import HalfFineTuner

    granularity, _, frozen = method.partition(", ")
    hft = HalfFineTuner(model, ratio=0.5, granularity=granularity, seed=0, snapshot=False,
                        train_embeddings=frozen != "embeddings frozen")
    if method == "matrix":
        opt, name = torch_adamw(hft.trainable_parameters())
        return opt, name, {"hft": hft}
    opt = hft.make_optimizer(lr=LR)               # MaskedAdamW (row); torch AdamW, fused on CUDA (block)
    if granularity == "block":
        return opt, "torch.optim.AdamW" + ("(fused=True)" if opt.defaults.get("fused") else ""), {"hft": hft}
    masters = sum(p.numel() * p.element_size() for m in hft.row_layers().values() for p in m.master_parameters())
    return opt, type(opt).__name__, {"hft": hft, "master_bytes": masters}


def step_flops(model, cfg: dict) -> int:
    """Matmul flops of one training step: forward 2*W*T and dX 2*W*T over every linear weight W (lm_head
    included), dW 2*W_trained*T over the weight elements that get a gradient (a RowMaskedLinear: its
    selected rows), causal attention 2*B*S^2*hidden per layer forward and twice that backward."""
    from ..nn import RowMaskedLinear

    return linear_step_flops(model, cfg, RowMaskedLinear, "weight_rows")


def linear_step_flops(model, cfg: dict, layer_cls, trained_attr: str) -> int:
    """Matmul FLOPs of one training step: forward 2*W*T and dX 2*W*T over every linear weight,
    dW 2*T per trained element (layers of `layer_cls` train their `trained_attr` tensor, plain
    nn.Linear their weight when it requires grad), causal attention 3 * 2*B*S^2*hidden per layer."""
    T = cfg["batch"] * cfg["seq"]
    w = trained = 0
    for mod in model.modules():
        if isinstance(mod, layer_cls):
            w += mod.weight.numel()
            t = getattr(mod, trained_attr)
            trained += t.numel() if t.requires_grad else 0
        elif isinstance(mod, torch.nn.Linear):
            w += mod.weight.numel()
            trained += mod.weight.numel() if mod.weight.requires_grad else 0
    attn = 3 * 2 * cfg["batch"] * cfg["seq"] ** 2 * cfg["hidden"] * cfg["layers"]
    return 4 * w * T + 2 * trained * T + attn


def make_step(model, opt, ids):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
    return step


def time_step(timer, step):
    """Warm a training step up (optimizer state, autotuning, allocator), read the peak memory of a
    steady-state step on a GPU (nan on CPU), then time it: (times, peak_bytes)."""
    dev = timer.device
    step()
    peak = float("nan")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = float(torch.cuda.max_memory_allocated(dev))
    return timer(step), peak


def state_accounting(model, opt, info: dict) -> dict:
    """The optimizer's state bytes and moments dtype, the row masters' bytes, and the model's trainable and
    total elements (row masters are not counted in the total: they copy rows of the weights)."""
    return {"state_bytes": state_bytes(opt), "moments": moment_dtype(opt), "master_bytes": info.get("master_bytes", 0),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for n, p in model.named_parameters()
                         if not n.endswith(("weight_rows", "bias_rows")))}


def measure_method(timer, cfg: dict, method: str, dtype) -> dict:
    """Build the model, apply the method, time steps; peak memory of a steady-state step."""
    dev = timer.device
    model = build_llama(cfg, dev, dtype)
    opt, opt_name, info = setup_method(model, method)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(dev)
    flops = step_flops(model, cfg)
    step = make_step(model, opt, ids)
    times, peak = time_step(timer, step)
    out = {"times": times, "opt_name": opt_name, "peak": peak, "flops": flops, **state_accounting(model, opt, info)}
    if method not in ("full", "matrix"):
        from ..ops.hft import hft_backend
        b = hft_backend(dev)
        opt_b = b["masked_adamw_"]["backend"] if method == "row" else "torch"
        out["backend"] = f"{b['row_grad']['backend']}+{opt_b}"
    del step, opt, model, info
    free_memory()
    return out


# ----------------------------------------------------------------------------- 1. training step

def bench_step(timer, quick: bool) -> list[dict]:
    dev = timer.device
    on_gpu = dev.type == "cuda"
    try:
        import transformers  # noqa: F401, PLC0415 - only to say plainly that it is missing
    except Exception as e:  # noqa: BLE001
        print(f"hft bench: transformers is not importable ({e}); the training-step rows are SKIPPED")
        return []
    cfg = dict(TINYLLAMA if on_gpu else TINY)
    if quick and on_gpu:
        cfg.update(layers=4, batch=2)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dname = "bf16" if on_gpu else "fp32"
    full_layers = (TINYLLAMA if on_gpu else TINY)["layers"]
    layers = f"{cfg['layers']} layers" if cfg["layers"] == full_layers else f"{cfg['layers']} of {full_layers} layers"
    shape = (f"{cfg['name']} ({layers}, h{cfg['hidden']}, ffn{cfg['intermediate']}, {cfg['heads']}/{cfg['kv_heads']} "
             f"heads, vocab {cfg['vocab']}); batch {cfg['batch']}x{cfg['seq']}")
    print(f"hft bench: training step of {shape}, {dname}, on {timer.name}")
    res = {}
    for m in METHODS:
        res[m] = measure_method(timer, cfg, m, dtype)
        r = res[m]
        print(f"  {m:6s}: {r['times'][0]:.4g} ms, trainable {r['trainable']:,}/{r['total']:,}, optimizer state "
              f"{_gb(r['state_bytes'])}" + (f", peak {_gb(r['peak'])}" if on_gpu else ""))
    full = res["full"]
    base_name = f"{FULL_NAME} ({full['opt_name']})"
    rows = []
    for m in METHODS[1:]:
        r = res[m]
        t_ratio = r["times"][0] / full["times"][0]
        # the row masters are optimizer state in all but name (fp32 copies that exist only to be updated)
        s_ratio = (r["state_bytes"] + r["master_bytes"]) / full["state_bytes"] if full["state_bytes"] else float("nan")
        e_ratio = r["trainable"] / full["trainable"]
        tf = lambda x: x["flops"] / (x["times"][0] * 1e-3) / 1e12  # noqa: E731
        parts = [f"time {t_ratio:.3g}x full FT; {tf(r):.3g} vs {tf(full):.3g} TFLOP/s of step matmul flops "
                 f"({r['flops'] / full['flops']:.3g}x full FT's)"]
        if on_gpu:
            parts.append(f"peak mem {_gb(r['peak'])} vs {_gb(full['peak'])} = {r['peak'] / full['peak']:.3g}x")
        masters = f" + fp32 row masters {_gb(r['master_bytes'])}" if r["master_bytes"] else ""
        parts.append(f"optimizer state ({r['opt_name']}, {r['moments']} moments) {_gb(r['state_bytes'])}{masters} vs "
                     f"{_gb(full['state_bytes'])} ({full['moments']} moments) = {s_ratio:.3g}x")
        parts.append(f"trainable elems {e_ratio:.3g}x")
        if on_gpu:
            parts.append(f"goal time <= {GOAL_TIME}x: {'met' if t_ratio <= GOAL_TIME else 'NOT met'}")
            parts.append(f"goal optimizer memory <= {GOAL_OPT_MEM}x: {'met' if s_ratio <= GOAL_OPT_MEM else 'NOT met'}")
        else:
            parts.insert(0, CPU_NOTE)
        backend = r.get("backend", "torch")
        rw = row(f"hft step ({m})", shape, dname, backend, base_name, r["times"], full["times"][0],
                 roofline_pct(r["times"][0], flops=r["flops"]), note="; ".join(parts))
        rw.update(peak_mem_bytes=r["peak"], baseline_peak_mem_bytes=full["peak"],
                  opt_state_bytes=r["state_bytes"], baseline_opt_state_bytes=full["state_bytes"],
                  trainable_elems=r["trainable"], baseline_trainable_elems=full["trainable"],
                  master_bytes=r["master_bytes"], step_flops=r["flops"], baseline_step_flops=full["flops"])
        rows.append(rw)
    return rows


# ----------------------------------------------------------------------------- 2. row-gradient GEMM

def _half_rows(n: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=g)[: n // 2].sort().values.to(device)


def _usable(op_has, name: str, device) -> bool:
    from .. import backend as B
    ok, why = B.can_serve(name, device, frozenset(op_has))
    if not ok:
        print(f"hft bench: backend {name} skipped: {why}")
    return ok


def bench_row_grad(timer, quick: bool) -> list[dict]:
    from ..ops import hft as ops

    dev = timer.device
    on_gpu = dev.type == "cuda"
    gemms = LLAMA3_8B_GEMMS if on_gpu else TINY_GEMMS
    T = GEMM_TOKENS if on_gpu else TINY_GEMM_TOKENS
    backends = [b for b in (("cuda", "triton") if on_gpu else ("cpu",)) if _usable(ops._ROW_GRAD_HAS, b, dev)]
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, out_f, in_f in gemms:     # inputs and the torch baselines once a shape, then each backend
        dy = torch.randn(T, out_f, device=dev, dtype=torch.bfloat16, generator=g)
        x = torch.randn(T, in_f, device=dev, dtype=torch.bfloat16, generator=g)
        sel = _half_rows(out_f, dev)
        R = sel.numel()
        dense = timer(lambda: (dy.t() @ x).index_select(0, sel))
        gather = timer(lambda: dy.index_select(1, sel).t() @ x)
        flops = 2.0 * T * R * in_f
        nbytes = 2.0 * T * (out_f + in_f) + 4.0 * R * in_f
        dense_tflops = 2.0 * T * out_f * in_f / (dense[0] * 1e-3) / 1e12
        shape = f"llama3-8b {label}: W {out_f}x{in_f}, {T} tokens, {R} of {out_f} rows"
        for b in backends:
            check = agreement(ops.row_grad(dy, x, sel, backend=b, check_rows=False),   # once each, before timing
                              (dy.t() @ x).index_select(0, sel))
            ours = timer(lambda: ops.row_grad(dy, x, sel, backend=b, check_rows=False))
            ours_bf16 = timer(lambda: ops.row_grad(dy, x, sel, backend=b, check_rows=False, out_dtype=torch.bfloat16))
            tflops = flops / (ours[0] * 1e-3) / 1e12
            if on_gpu:
                note = (f"{tflops:.0f} TFLOP/s useful (2*T*R*in) = "
                        f"{100 * flops / (ours[0] * 1e-3) / H100_BF16_FLOPS:.1f}% of {H100_BF16_FLOPS / 1e12:.0f}; "
                        f"dense dW {dense_tflops:.0f} TFLOP/s over all rows; torch gather+GEMM (bf16 out) "
                        f"{gather[0]:.3g} ms = {gather[0] / ours[0]:.3g}x ours; ours writes fp32; with bf16 out "
                        f"(block granularity) {ours_bf16[0]:.3g} ms")
            else:
                note = (f"{CPU_NOTE}; {tflops * 1e3:.3g} GFLOP/s; torch gather+GEMM {gather[0]:.3g} ms; "
                        f"bf16 out {ours_bf16[0]:.3g} ms")
            rows.append(row("hft row_grad (compact dW rows)", shape if on_gpu else shape.replace("llama3-8b", "tiny"),
                            "bf16", b, "dense dW GEMM (dy.t() @ x) + gather of the rows", ours, dense[0],
                            roofline_pct(ours[0], nbytes, flops), note=f"{note}; {check}"))
    free_memory()
    return rows


# ----------------------------------------------------------------------------- 3. MaskedAdamW

def _params(shapes, dtype, device, grad_dtype=None):
    g = torch.Generator(device=device).manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02, generator=g))
        p.grad = torch.empty(s, dtype=grad_dtype or dtype, device=device).normal_(0, 1e-3, generator=g)
        ps.append(p)
    return ps


def bench_adamw(timer, quick: bool) -> list[dict]:
    from ..ops import hft as ops
    from ..optim import MaskedAdamW

    dev = timer.device
    on_gpu = dev.type == "cuda"
    b = "cuda" if on_gpu else "cpu"
    if not _usable(ops._ADAMW_HAS, b, dev):
        return []
    n_layers = (1 if quick else 2) if on_gpu else 2
    shapes = (LLAMA3_8B_LAYER if on_gpu else TINY_LAYER) * n_layers
    where = f"llama3-8b {n_layers} layer{'s' if n_layers > 1 else ''}" if on_gpu else f"tiny {n_layers} layers"
    rows = []

    def bw_note(ours_ms, ours_bytes, base_ms, base_bytes, base_name, numel):
        if not on_gpu:
            return f"{CPU_NOTE}; {ours_bytes / (ours_ms * 1e-3) / 1e9:.3g} GB/s"
        return (f"{hbm_share(ours_ms, ours_bytes)} ({ours_bytes / numel:.0f} B/elem); {base_name}: "
                f"{hbm_share(base_ms, base_bytes)} ({base_bytes / numel:.0f} B/elem)")

    # (a) fp32 and (b) bf16 parameters: read p, g, m, v and write p, m, v; moments fp32 (ours) and the
    # parameter dtype (torch)
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ps = _params(shapes, dtype, dev)
        numel = sum(p.numel() for p in ps)
        es = ps[0].element_size()
        ours_opt = MaskedAdamW(ps, lr=LR, backend=b)
        base_opt, base_name = torch_adamw(ps)
        check = step_agreement((ours_opt, base_opt), (ours_opt.step, base_opt.step), ps)   # before timing
        ours = timer(ours_opt.step)
        base = timer(base_opt.step)
        ours_bytes = numel * (3 * es + 4 * 4)
        base_bytes = numel * 7 * es
        rows.append(row(f"MaskedAdamW step ({dname} params, fp32 moments)",
                        f"{where}: {len(ps)} tensors, {numel / 1e6:.4g}M elems", dname, b,
                        base_name + f" ({dname} moments)", ours, base[0], roofline_pct(ours[0], ours_bytes),
                        note=bw_note(ours[0], ours_bytes, base[0], base_bytes, base_name, numel) + f"; {check}"))
        del ps, ours_opt, base_opt
        free_memory()

    # (c) fp32 row masters of half of each matrix's rows, written into the bf16 weight in the same pass
    rows.append(_adamw_row_masters(timer, b, shapes, where, bw_note))
    free_memory()
    return rows


def _adamw_row_masters(timer, b: str, shapes, where: str, bw_note) -> dict:
    from ..nn import RowMaskedLinear
    from ..optim import MaskedAdamW

    dev = timer.device
    layers = []
    for s in shapes:
        if len(s) == 2:
            lin = torch.nn.Linear(s[1], s[0], bias=False, device=dev, dtype=torch.bfloat16)
            m = RowMaskedLinear.from_linear(lin, _half_rows(s[0], dev))  # only its optimizer runs here
            m.weight_rows.grad = torch.randn_like(m.weight_rows) * 1e-3
            layers.append(m)
    masters = [m.weight_rows for m in layers]
    numel = sum(p.numel() for p in masters)
    ours_opt = MaskedAdamW(masters, lr=LR, backend=b)
    base_opt, base_name = torch_adamw(masters)
    base_opt.writes_master_layers = True   # base_step writes the rows itself (the step hook's refresh: twice)

    def base_step():
        base_opt.step()
        with torch.no_grad():                   # HalfFineTuner.write_back_rows
            for m in layers:
                m.weight.index_copy_(0, m.rows, m.weight_rows.to(m.weight.dtype))
    check = step_agreement((ours_opt, base_opt), (ours_opt.step, base_step),     # before timing
                           masters + [m.weight for m in layers])
    ours = timer(ours_opt.step)
    base = timer(base_step)
    ours_bytes = numel * (7 * 4 + 2)            # AdamW on fp32 + the bf16 rows written into the weight
    base_bytes = numel * (7 * 4 + 4 + 2 + 2 + 2)  # + read the master, bf16 temporary written and read, rows written
    return row("MaskedAdamW step (fp32 row masters -> bf16 weight)",
               f"{where}: {len(masters)} matrices, half the rows, {numel / 1e6:.4g}M master elems",
               "fp32", b, base_name + " + index_copy_ write-back", ours, base[0], roofline_pct(ours[0], ours_bytes),
               note=f"{bw_note(ours[0], ours_bytes, base[0], base_bytes, base_name + ' + write-back', numel)}; {check}")


def sections(timer, quick: bool) -> list:
    return [("training step", lambda: bench_step(timer, quick)),
            ("row gradient", lambda: bench_row_grad(timer, quick)),
            ("MaskedAdamW", lambda: bench_adamw(timer, quick)),
            ("host time per call", lambda: _host(timer.name != "cpu", quick))]


def _host(on_gpu, quick):
    from ..nn.hft import RowMaskedLinear  # noqa: PLC0415
    return linear_host_rows("RowMaskedLinear (half the rows)", lambda lin: RowMaskedLinear.from_linear(
        lin, torch.arange(0, lin.out_features, 2, device=lin.weight.device)), on_gpu, quick)


# ----------------------------------------------------------------------------- optimizer state, untimed

def state_memory(cfg: dict = TINYLLAMA, device="cpu", dtype=torch.bfloat16, tokens: int = 16) -> list[dict]:
    """The memory accounting of section 1 without timing, so that it runs on a CPU at real shapes:
    per method (section 1's, and block granularity with HalfFineTuner(train_embeddings=False):
    embeddings and lm_head frozen), one training step on a batch of 1 x `tokens` (the state does not
    depend on the batch), then the optimizer state bytes (every state tensor), the row masters' bytes and the trainable
    elements. Rows: method, optimizer, moments dtype, state_bytes, master_bytes, trainable, total,
    ratio (state + masters over full fine-tuning's state)."""
    cfg = dict(cfg, batch=1, seq=tokens)
    out = []
    for method in STATE_METHODS:
        model = build_llama(cfg, device, dtype)
        opt, name, info = setup_method(model, method)
        ids = torch.randint(0, cfg["vocab"], (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
        make_step(model, opt, ids)()
        acc = state_accounting(model, opt, info)
        out.append({"method": method, "optimizer": name, "moments": acc["moments"], "state_bytes": acc["state_bytes"],
                    "master_bytes": acc["master_bytes"], "trainable": acc["trainable"], "total": acc["total"]})
        del opt, model, info
        free_memory()
    for r in out:
        r["ratio"] = (r["state_bytes"] + r["master_bytes"]) / out[0]["state_bytes"]
    return out


def _state_main(argv=None) -> int:
    import argparse
    import csv
    import sys

    ap = argparse.ArgumentParser(prog="python -m fusedtune.bench.hft",
                                 description="optimizer state of full FT and matrix/row/block HFT at "
                                             "TinyLlama-1.1B shapes, bf16, one untimed step (any device)")
    ap.add_argument("--layers", type=int, default=TINYLLAMA["layers"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    a = ap.parse_args(argv)
    rows = state_memory(dict(TINYLLAMA, layers=a.layers), device=a.device)
    print(f"{TINYLLAMA['name']} shapes, {a.layers} layers, bf16, on {a.device}:")
    for r in rows:
        print(f"  {r['method']:25s} {r['optimizer']:30s} {r['moments']} moments: state {_gb(r['state_bytes'])}"
              f" + masters {_gb(r['master_bytes'])} = {r['ratio']:.3f}x full FT's; trainable "
              f"{r['trainable']:,} of {r['total']:,} ({r['trainable'] / r['total']:.3f})")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["shape", "device", "torch"])
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, shape=f"{TINYLLAMA['name']} {a.layers} layers", device=a.device,
                                torch=torch.__version__))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_state_main())
