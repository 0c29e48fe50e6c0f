"""The demo's model, pre-training on task A, and fine-tuning on task B with one fusedtune method."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .tasks import Tasks


@dataclass
class DemoConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 64
    seq_len: int = 24
    batch: int = 32
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    steps: int = 150          # fine-tuning steps of a gradient method; a method's demo step_multiplier scales it
    eval_size: int = 256
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    threads: int = 1          # CPU threads: the model is tiny, and more threads only contend

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def build_model(cfg: DemoConfig):
    """A small Llama-architecture causal LM, built from a config (nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, max_position_embeddings=max(64, cfg.seq_len),
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(conf).to(device=cfg.device, dtype=cfg.torch_dtype)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(model, tasks: Tasks, ids: torch.Tensor) -> tuple[float, float]:
    loss, acc = tasks.loss_acc(model, ids)
    return loss.item(), acc.item()


def _bar(cfg: DemoConfig, steps: int, desc: str):
    return tqdm(range(steps), desc=desc, disable=not cfg.progress, leave=False, mininterval=0.5)


def pretrain(cfg: DemoConfig, tasks: Tasks):
    """Train a fresh model on task A with AdamW; returns (model, loss curve)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    curve = []
    bar = _bar(cfg, cfg.pretrain_steps, "pre-train on task A")
    for _ in bar:
        ids = tasks.batch("A", cfg.batch, gen, cfg.device)
        loss, _ = tasks.loss_acc(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.3f}", refresh=False)
    return model, curve


def state_bytes(model, optimizer) -> int:
    """Bytes of parameters + gradients + optimizer state (what training keeps besides activations)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total


def split_demo_options(cls, overrides: dict) -> tuple[int, object, dict]:
    """A method's demo settings: (step multiplier, target_modules, patch options)."""
    opts = {**getattr(cls, "demo", {}), **overrides}
    mult = int(opts.pop("step_multiplier", 1))
    targets = opts.pop("target_modules", None)
    return mult, targets, opts


def finetune(name: str, cls, ckpt: dict, cfg: DemoConfig, tasks: Tasks, evals: dict, overrides: dict) -> dict:
    """Fine-tune a copy of the pre-trained model on task B with method `name` via fusedtune.patch."""
    from ..patch import patch, unpatch
    mult, targets, opts = split_demo_options(cls, overrides)
    model = build_model(cfg)
    model.load_state_dict(ckpt)
    b_loss0, b_acc0 = evaluate(model, tasks, evals["B"])
    rep = patch(model, name, target_modules=targets, **opts)
    backends = sorted({r.backend for r in rep.rows})
    gen = torch.Generator().manual_seed(cfg.seed + 2)   # every method sees the same batches
    steps = cfg.steps * mult
    gpu = torch.device(cfg.device).type == "cuda"
    if gpu:
        sync(cfg.device)
        torch.cuda.reset_peak_memory_stats()
    curve, times = [], []
    bar = _bar(cfg, steps, f"fine-tune on task B: {name}")
    for _ in bar:
        ids = tasks.batch("B", cfg.batch, gen, cfg.device)
        t0 = time.perf_counter()
        loss = rep.step(lambda: tasks.loss_acc(model, ids)[0])
        sync(cfg.device)
        times.append(time.perf_counter() - t0)
        last = getattr(rep.optimizer, "last", None)
        if isinstance(last, dict) and "loss_plus" in last and "loss_minus" in last:
            loss = (last["loss_plus"].float() + last["loss_minus"].float()) / 2
        curve.append(float(loss))
        bar.set_postfix(loss=f"{curve[-1]:.3f}", refresh=False)
    if gpu:
        memory, memory_kind = torch.cuda.max_memory_allocated(), "peak allocated (CUDA)"
    else:
        memory, memory_kind = state_bytes(model, rep.optimizer), "params+grads+optimizer state (CPU)"
    if hasattr(rep.optimizer, "settle"):      # MeZO(fold=True): the weights carry the next step's +eps
        rep.optimizer.settle()
    b_loss, b_acc = evaluate(model, tasks, evals["B"])
    a_loss, a_acc = evaluate(model, tasks, evals["A"])
    unpatch(model)
    times = sorted(times[min(5, len(times) // 10):]) or [0.0]   # skip warm-up steps
    return {"method": name, "backend": ",".join(backends), "lr": opts.get("lr"), "trainable": rep.trainable_params,
            "total": rep.total_params, "steps": steps, "memory": memory, "memory_kind": memory_kind,
            "step_ms": 1000 * times[len(times) // 2], "b_loss_before": b_loss0, "b_loss": b_loss,
            "b_acc_before": b_acc0, "b_acc": b_acc, "a_acc_before": evals["a_acc_before"], "a_acc": a_acc,
            "a_loss": a_loss, "curve": curve}


def agreement(name: str, cls, ckpt: dict, cfg: DemoConfig, tasks: Tasks, overrides: dict) -> str:
    """One step with the default backend and one with backend='reference', from identical weights
    and on the same batch: are the resulting weights bit-identical?"""
    from ..patch import patch, unpatch
    if "backend" not in getattr(cls, "options", {}):
        return "n/a (no fused path)"
    _, targets, opts = split_demo_options(cls, overrides)
    opts.pop("backend", None)
    ids = tasks.batch("B", cfg.batch, torch.Generator().manual_seed(cfg.seed + 3), cfg.device)
    states, taken = [], None
    for backend in (None, "reference"):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        model.load_state_dict(ckpt)
        rep = patch(model, name, target_modules=targets, backend=backend, **opts)
        if backend is None:
            taken = ",".join(sorted({r.backend for r in rep.rows}))
        rep.step(lambda: tasks.loss_acc(model, ids)[0])
        sync(cfg.device)
        unpatch(model)
        states.append({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    if taken == "reference":
        return "reference only (no fused path here)"
    diff = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0])
    same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    return f"{taken} vs reference: " + ("bit-identical" if same else f"max |diff| {diff:.2e}")
