"""HFTCallback: half fine-tuning for transformers.Trainer in one line.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HFTCallback(ratio=0.5, granularity="matrix", seed=0, stage_every=None)])

When things happen (transformers 5.x: Trainer.train() creates its optimizer in _prepare_for_training,
*before* on_train_begin):

- on_init_end (the callback was given to Trainer(callbacks=[...])): the selection is applied to the
  model, so Trainer.create_optimizer (which keeps only requires_grad parameters) builds its optimizer
  over the selected parameters only, and any DDP wrapper sees the final requires_grad flags. In row
  granularity the RowMaskedLinear layers are swapped in here, before the optimizer exists.
- on_train_begin: if the callback was added later (trainer.add_callback), the selection is applied
  now. Either way the optimizer's param groups are then made to hold exactly the trainable parameters:
  frozen ones are removed (their optimizer state, if any, is dropped), newly trainable ones are
  appended to an existing group (1-D parameters to a group without weight decay, others to the group
  with the largest weight decay), so the learning-rate scheduler keeps working.
- stage changes: stage_every=N switches to stage global_step // N at on_step_begin (so a resumed run
  lands on the right stage); stage_every="epoch" switches at every epoch (stage = epoch index).
  The param groups are synced again; moments of parameters that became frozen are dropped and the
  moments of row masters are reset (their rows changed).
- row granularity: with fusedtune.optim.MaskedAdamW as the Trainer's optimizer
  (Trainer(..., optimizer_cls_and_kwargs=(MaskedAdamW, {"lr": args.learning_rate}))) the rows are written
  into the full weights inside its fused step. With any other optimizer the callback copies the
  updated rows into the full weights at on_optimizer_step (an extra unfused pass; it warns once).
- block granularity: the trained rows are views of the weights, so the Trainer's own optimizer
  (torch AdamW, moments in the model's dtype) updates them in place; nothing is written back.
- on_train_end: row layers become nn.Linear again with the trained weights (merge_on_train_end=True),
  so trainer.save_model() writes the model's usual state_dict keys.

Limits: stage changes under DDP/FSDP/DeepSpeed are not supported (they fix the trainable set when they
wrap the model): use one Trainer per stage there, with HFTCallback(seed=..., stage=k).
"""
from __future__ import annotations

import math
import warnings

import torch
from transformers import TrainerCallback

from .selection import HFTError
from .tuner import HalfFineTuner, _masked_adamw_class


def _unwrap(optimizer):
    """The torch.optim.Optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def sync_optimizer(optimizer, params, reset=()) -> dict:
    """Make `optimizer`'s param groups hold exactly `params` (order within a group kept): drop the others
    and their state, append the missing ones to a fitting group. reset: parameters whose state is
    dropped (fresh moments). Returns {'removed': n, 'added': n}."""
    opt = _unwrap(optimizer)
    if opt is None:
        raise HFTError(f"HFTCallback: cannot adjust the Trainer's optimizer {type(optimizer).__name__}: it is not "
                       "a torch.optim.Optimizer (DeepSpeed?); pass the callback to Trainer(callbacks=[...]) so the "
                       "selection is applied before the optimizer is built, and use no stage changes")
    want = {id(p): p for p in params}
    present, removed = set(), 0
    for g in opt.param_groups:
        kept = []
        for p in g["params"]:
            if id(p) in want and id(p) not in present:
                kept.append(p)
                present.add(id(p))
            else:
                opt.state.pop(p, None)
                removed += 1
        g["params"] = kept
    missing = [p for i, p in want.items() if i not in present]
    if missing and not opt.param_groups:
        opt.add_param_group({"params": missing})
    elif missing:
        no_decay = [g for g in opt.param_groups if not g.get("weight_decay", 0.0)]
        decay = max(opt.param_groups, key=lambda g: g.get("weight_decay", 0.0))
        for p in missing:
            (no_decay[0] if p.ndim <= 1 and no_decay else decay)["params"].append(p)
    for p in reset:
        opt.state.pop(p, None)
    return {"removed": removed, "added": len(missing)}


class HFTCallback(TrainerCallback):
    """Half fine-tuning for transformers.Trainer (see the module docstring for when what happens).

    ratio, granularity, seed, train_final_norm, train_embeddings, snapshot: as fusedtune.hft.HalfFineTuner.
    stage: the first stage (e.g. the DPO run after an SFT run with the same seed uses stage=1).
    stage_every: None (one stage), an int N (next stage every N optimizer steps) or "epoch".
    After training, .tuner is the HalfFineTuner (selection(), summary(), reset()).
    """

    def __init__(self, ratio: float = 0.5, granularity: str = "matrix", seed: int = 0, stage_every=None, *,
                 stage: int = 0, train_final_norm: bool = True, train_embeddings: bool = True,
                 snapshot: bool | str = True,
                 merge_on_train_end: bool = True):
        if stage_every is not None and stage_every != "epoch" and (
                isinstance(stage_every, bool) or not isinstance(stage_every, int) or stage_every < 1):
            raise HFTError(f"HFTCallback: stage_every must be None, a positive int (optimizer steps) or 'epoch', "
                           f"got {stage_every!r}")
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
            raise HFTError(f"HFTCallback: stage must be an int >= 0, got {stage!r}")
        self.kwargs = dict(ratio=ratio, granularity=granularity, seed=seed, train_final_norm=train_final_norm,
                           train_embeddings=train_embeddings, snapshot=snapshot)
        self.first_stage = stage
        self.stage_every = stage_every
        self.merge_on_train_end = merge_on_train_end
        self.tuner: HalfFineTuner | None = None
        self._write_back = False
        self._warned = False

    # -- helpers
    def _attach(self, model):
        if model is None:
            raise HFTError("HFTCallback: the Trainer passed no model to the callback")
        stage = self.first_stage
        if self.tuner is not None and self.tuner.model is model and model.__dict__.get("_fusedtune_hft") is self.tuner:
            if not self.tuner._restored:
                return
            stage = self.tuner.stage               # trained again after on_train_end merged the row layers
            self.tuner.remove()
        self.tuner = HalfFineTuner(model, **self.kwargs)
        if stage:
            self.tuner.set_stage(stage)

    def _stage_for(self, state) -> int | None:
        if self.stage_every is None:
            return None
        if self.stage_every == "epoch":
            return self.first_stage + int(math.floor((state.epoch or 0.0) + 1e-9))
        return self.first_stage + state.global_step // self.stage_every

    def _sync(self, optimizer, stage_changed: bool):
        t = self.tuner
        rows = [p for m in t.row_layers().values() for p in m.master_parameters()]
        sync_optimizer(optimizer, t.trainable_parameters(), reset=rows if stage_changed else ())
        self._write_back = False
        if any(m.masters for m in t.row_layers().values()):   # not block granularity (views, any optimizer)
            cls, why = _masked_adamw_class()
            inner = _unwrap(optimizer)
            self._write_back = cls is None or not isinstance(inner, cls)
            if self._write_back and not self._warned:
                self._warned = True
                warnings.warn(
                    f"HFTCallback: row granularity with {type(inner).__name__}: the callback copies the trained rows "
                    "into the full weights after every optimizer step (an extra unfused pass). For the fused path "
                    "pass Trainer(..., optimizer_cls_and_kwargs=(fusedtune.optim.MaskedAdamW, {'lr': ...}))"
                    + (f" (MaskedAdamW is not available here: {why})" if cls is None else ""), stacklevel=2)

    def _maybe_change(self, state, optimizer):
        want = self._stage_for(state)
        if want is None or self.tuner is None or want == self.tuner.stage:
            return
        self.tuner.set_stage(want)
        if optimizer is not None:
            self._sync(optimizer, stage_changed=True)

    # -- events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._attach(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._attach(model)
        want = self._stage_for(state)
        changed = want is not None and want != self.tuner.stage
        if changed:
            self.tuner.set_stage(want)
        if optimizer is not None:   # a resume's loaded moments belong to the same rows: kept unless the stage moved
            self._sync(optimizer, stage_changed=changed)

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.stage_every == "epoch":
            self._maybe_change(state, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if isinstance(self.stage_every, int):
            self._maybe_change(state, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._write_back and self.tuner is not None:
            self.tuner.write_back_rows()

    def on_train_end(self, args, state, control, **kwargs):
        if self.merge_on_train_end and self.tuner is not None and self.tuner.row_layers():
            self.tuner.restore_modules()
            self._write_back = False
