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
- stage changes: stage_every=N switches to stage global_step // N at on_step_begin; stage_every="epoch"
  switches at every epoch (stage = epoch index, counted by the callback: state.epoch is a fraction of
  max_steps on an IterableDataset, not the epoch index). The param groups are synced again (each in the model's
  parameter order, the layout Trainer.create_optimizer builds); moments of parameters that became
  frozen are dropped and the moments of row masters are reset (their rows changed).
- resuming a run with stage changes: each checkpoint records the stage it trained (fusedtune_hft.json,
  and a key in the optimizer's param groups, which a just-in-time checkpoint (enable_jit_checkpoint,
  saved without on_save) holds alone). The Trainer builds its optimizer and loads the checkpoint's
  moments before any callback event of train(), so name the checkpoint in
  TrainingArguments(resume_from_checkpoint=path) when making the Trainer and pass it to train() too:
  on_init_end then selects that stage first, and the resumed run changes stage where the uninterrupted
  one did. (The transformers example scripts pass the last checkpoint they find to train() alone: past
  the first stage, that resume is refused.) A resume whose optimizer was built over another stage than
  the checkpoint's is refused at on_train_begin (torch may refuse it first, when the parameter counts
  differ); a checkpoint saved on the first stage resumes without it.
- resuming with other settings: fusedtune_hft.json (and a key in the optimizer's param groups) records
  ratio, granularity, seed, train_final_norm and train_embeddings; a resume whose callback differs in any
  of them is refused by name (its selection is other matrices, and torch would load the checkpoint's
  moments onto them position by position: onto parameters of other shapes, a heap corruption at the first
  AdamW step). At on_train_begin every loaded moment must also have its parameter's shape.
- row granularity: with fusedtune.optim.MaskedAdamW as the Trainer's optimizer
  (Trainer(..., optimizer_cls_and_kwargs=(MaskedAdamW, {"lr": args.learning_rate}))) the rows are written
  into the full weights inside its fused step. With any other optimizer the callback copies the
  updated rows into the full weights at on_optimizer_step (an extra unfused pass; it warns once).
- block granularity: the trained rows are views of the weights, so the Trainer's own optimizer
  (torch AdamW, moments in the model's dtype) updates them in place; nothing is written back.
- on_train_end: row layers become nn.Linear again with the trained weights (merge_on_train_end=True),
  so trainer.save_model() writes the model's usual state_dict keys.

Limits: stage changes under DDP/FSDP/DeepSpeed are not supported (they fix the trainable set when they
wrap the model): use one Trainer per stage there, with HFTCallback(seed=..., stage=k). Under DeepSpeed
(whose ZeRO optimizer holds flattened copies the callback cannot adjust) only matrix granularity, with the
callback given to Trainer(callbacks=[...]) and no stage_every: the selection is then made before the engine
is built, and the callback leaves the optimizer alone; anything else is refused at on_train_begin, before
the first step.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
from transformers import TrainerCallback

from .selection import HFTError
from .tuner import HalfFineTuner, _masked_adamw_class

STAGE_KEY = "fusedtune_hft_stage"   # in each param group of the Trainer's optimizer (saved with its state)
STAGE_FILE = "fusedtune_hft.json"   # in each checkpoint folder: the stage it trained, read before a resume
SETTINGS_KEY = "fusedtune_hft_settings"   # in each param group: the selection's settings (JSON), saved with it
SETTINGS = ("ratio", "granularity", "seed", "train_final_norm", "train_embeddings")   # what picks the matrices
# state entries of torch's optimizers that hold one value per element of their parameter (its shape)
ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                     "acc_delta", "sum", "exp_inf", "prev", "ax")


def _unwrap(optimizer):
    """The torch.optim.Optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself); None when
    the innermost optimizer is not one (DeepSpeed's ZeRO optimizer inside accelerate's wrapper, itself a
    torch.optim.Optimizer subclass whose param groups are ZeRO's flattened copies)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        if not isinstance(inner, torch.optim.Optimizer):
            return None
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _group_for(groups, pure, one: bool) -> dict:
    """The group a new parameter joins: the group holding only its kind (one: 1-D); without one, among the
    groups not holding only the other kind, 1-D ones go to the least decayed (the last of equals: Trainer's
    no-decay group), others to the most decayed (the first of equals)."""
    if one in pure:
        return groups[pure[one]]
    cand = [g for j, g in enumerate(groups) if j != pure.get(not one)] or groups
    order = range(len(cand))
    wd = [g.get("weight_decay", 0.0) for g in cand]
    pick = max(order, key=lambda j: (-wd[j], j)) if one else max(order, key=lambda j: (wd[j], -j))
    return cand[pick]


def sync_optimizer(optimizer, params, reset=()) -> dict:
    """Make `optimizer`'s param groups hold exactly `params`, each group in the order of `params`: drop the
    others and their state, add the missing ones to a group of their kind (1-D parameters to the group that
    holds only 1-D ones, others to the one that holds none; without one, among the groups not holding only
    the other kind, 1-D ones to the least decayed (the last of equals) and others to the most decayed).
    reset: parameters whose state is dropped (fresh moments). Returns {'removed': n, 'added': n}."""
    opt = _unwrap(optimizer)
    if opt is None:
        raise HFTError(f"HFTCallback: cannot adjust the Trainer's optimizer {type(optimizer).__name__}: it is not "
                       "a torch.optim.Optimizer (DeepSpeed?); pass the callback to Trainer(callbacks=[...]) so the "
                       "selection is applied before the optimizer is built, and use no stage changes")
    want = {id(p): p for p in params}
    # each group's kind from what it holds now: Trainer's groups are the decayed matrices and the norms and
    # biases (weight decay 0); a new parameter joins the group of its kind (1-D or not), whatever the decay
    pure = {}
    for i, g in enumerate(opt.param_groups):
        flat = {p.ndim <= 1 for p in g["params"]}
        if len(flat) == 1:
            pure.setdefault(flat.pop(), i)
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
    else:
        for p in missing:
            _group_for(opt.param_groups, pure, p.ndim <= 1)["params"].append(p)
    # each group in the order of `params` (the model's): the layout Trainer.create_optimizer builds for the
    # same trainable set, so a checkpoint saved after a stage change loads into a resumed run's optimizer
    # position for position
    order = {id(p): i for i, p in enumerate(params)}
    for g in opt.param_groups:
        g["params"].sort(key=lambda p: order[id(p)])
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
        self._selected_at_init = False
        self._resume_epochs = None   # stage_every="epoch": the count a checkpoint named at on_init_end recorded
        self._epochs = None          # stage_every="epoch": epochs completed (set at on_train_begin)
        self._epoch_start = None     # global_step at the last on_epoch_begin

    def _settings(self) -> dict:
        return {k: self.kwargs[k] for k in SETTINGS}

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
            return self.first_stage + (self._epochs or 0)
        return self.first_stage + state.global_step // self.stage_every

    def _start_epochs(self, state, train_dataloader) -> int:
        """stage_every="epoch": the epochs completed when train() begins. 0 on a fresh run. On a resume, with
        a sized dataloader, the index the Trainer's epoch loop starts at (global_step // steps per epoch, which
        floor(state.epoch) is there), also where the checkpoint was saved after an epoch's last step but
        before its on_epoch_end. On an IterableDataset with max_steps the Trainer's state.epoch is
        epoch + steps / max_steps, not the epoch index: the count the checkpoint recorded is used (without
        one, floor(state.epoch), the best there is)."""
        if not state.global_step:
            return 0
        try:
            sized = train_dataloader is not None and len(train_dataloader) >= 0
        except (TypeError, NotImplementedError):      # a DataLoader over an IterableDataset has no length
            sized = False
        if not sized and self._resume_epochs is not None:
            return self._resume_epochs
        return int(math.floor((state.epoch or 0.0) + 1e-9))

    def _sync(self, optimizer, stage_changed: bool):
        t = self.tuner
        rows = [p for m in t.row_layers().values() for p in m.master_parameters()]
        sync_optimizer(optimizer, t.trainable_parameters(), reset=rows if stage_changed else ())
        settings = json.dumps(self._settings(), sort_keys=True)
        for g in _unwrap(optimizer).param_groups:   # saved with the optimizer: a resume knows whose moments
            g[STAGE_KEY] = t.stage
            g[SETTINGS_KEY] = settings
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
        """A stage change, whole or not at all: an optimizer the callback cannot sync (DeepSpeed's ZeRO) is
        refused before set_stage flips any requires_grad flag, and a failing sync puts the old stage back
        (on_train_begin refuses stage_every with such an optimizer already; this is the second guard)."""
        want = self._stage_for(state)
        if want is None or self.tuner is None or want == self.tuner.stage:
            return
        if optimizer is not None and _unwrap(optimizer) is None:
            raise HFTError(self._unsyncable(optimizer, f"a stage change (stage_every={self.stage_every!r})"))
        old = self.tuner.stage
        self.tuner.set_stage(want)
        if optimizer is not None:
            try:
                self._sync(optimizer, stage_changed=True)
            except BaseException:
                self.tuner.set_stage(old)
                raise

    @staticmethod
    def _unsyncable(optimizer, why: str) -> str:
        return (f"HFTCallback: the Trainer's optimizer {type(optimizer).__name__} holds parameters the callback "
                f"cannot adjust (DeepSpeed?), and this run needs {why}. There, use matrix granularity with "
                "HFTCallback(seed=..., stage=k) in Trainer(callbacks=[...]), one Trainer per stage")

    @staticmethod
    def _checkpoint_record(args) -> dict | None:
        """What the checkpoint named by args.resume_from_checkpoint records of the callback that trained it:
        the file on_save wrote into it (stage, settings, epochs); without one, the stage and settings its
        optimizer's param groups hold. None when there is no such checkpoint or nothing recorded."""
        path = getattr(args, "resume_from_checkpoint", None)
        if not isinstance(path, str):
            return None
        if os.path.isfile(os.path.join(path, STAGE_FILE)):
            with open(os.path.join(path, STAGE_FILE)) as f:
                return json.load(f)
        opt = os.path.join(path, "optimizer.pt")     # a just-in-time checkpoint: Trainer saved it, no on_save
        if not os.path.isfile(opt):
            return None
        try:
            groups = torch.load(opt, map_location="cpu", mmap=True, weights_only=True).get("param_groups", [])
        except Exception:  # noqa: BLE001 - not a state torch can map: the Trainer's own load will say why
            return None
        groups = [g for g in groups if isinstance(g, dict)]
        out = {}
        stages = {g.get(STAGE_KEY) for g in groups} - {None}
        if len(stages) == 1:
            out["stage"] = int(stages.pop())
        settings = {g.get(SETTINGS_KEY) for g in groups} - {None}
        if len(settings) == 1:
            out.update(json.loads(settings.pop()))
        return out or None

    def _check_settings(self, recorded: dict, where: str) -> None:
        """Refuse a resume from a run whose callback selected with other settings: its selection is other
        matrices, and torch loads the checkpoint's moments onto this run's trainable parameters position by
        position (the group lengths often match): onto parameters of other shapes (the first AdamW step then
        writes out of bounds) or silently onto the wrong matrices. Every difference is named."""
        mine = self._settings()
        diff = [k for k in SETTINGS if k in recorded and recorded[k] != mine[k]]
        if not diff:
            return
        theirs = ", ".join(f"{k}={recorded[k]!r}" for k in diff)
        ours = ", ".join(f"{k}={mine[k]!r}" for k in diff)
        raise HFTError(
            f"HFTCallback: {where} was trained by HFTCallback({theirs}), and this callback has {ours}: its "
            "selection is other parameters, and the checkpoint's optimizer moments would be loaded onto them. "
            f"Resume with HFTCallback({theirs}, ...), the checkpoint's settings, or start a new run (no "
            "resume_from_checkpoint) from its weights")

    def _check_loaded_state(self, model, inner) -> None:
        """Every moment the optimizer holds must have its parameter's shape: a moment loaded onto another
        parameter (a checkpoint of another selection that the settings check could not see, e.g. one
        without a record) makes torch's AdamW step write out of bounds. Checked before any step."""
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        bad = []
        for g in inner.param_groups:
            for p in g["params"]:
                for key, val in inner.state.get(p, {}).items():
                    if key in ELEMENTWISE_STATE and torch.is_tensor(val) and tuple(val.shape) != tuple(p.shape):
                        bad.append(f"{names.get(id(p), 'a parameter')} {tuple(p.shape)} holds {key} "
                                   f"{tuple(val.shape)}")
                        break
        if bad:
            raise HFTError(
                f"HFTCallback: the Trainer's optimizer holds moments of other shapes than their parameters "
                f"({'; '.join(bad[:3])}{f'; {len(bad) - 3} more' if len(bad) > 3 else ''}): the checkpoint "
                "resumed from was trained with another selection (seed, ratio, granularity or stage), and a "
                "step would corrupt memory. Resume with the HFTCallback settings and stage of the run that "
                "saved it, naming it in TrainingArguments(resume_from_checkpoint=...) too")

    # -- events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        world = int(getattr(args, "world_size", 1) or 1)
        if self.stage_every is not None and world > 1:
            raise HFTError(f"HFTCallback(stage_every={self.stage_every!r}) with {world} processes: DDP / FSDP / "
                           "DeepSpeed fix the trainable set when they wrap the model, so a stage change mid-training "
                           "would let the ranks train apart. Use one Trainer per stage, with "
                           "HFTCallback(seed=..., stage=k)")
        # before the Trainer builds (and loads) its optimizer, and before anything changes
        record = self._checkpoint_record(args) or {}
        self._check_settings(record, f"the checkpoint {args.resume_from_checkpoint}" if record else "")
        self._attach(model)
        self._selected_at_init = True            # before the Trainer (or DeepSpeed's engine) builds its optimizer
        resume = record.get("stage")
        if resume is not None and int(resume) != self.tuner.stage:
            self.tuner.set_stage(int(resume))
        self._resume_epochs = record.get("epochs")

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.tuner is not None and os.path.isdir(path):
            with open(os.path.join(path, STAGE_FILE), "w") as f:
                json.dump({"stage": self.tuner.stage, **self._settings(), "epochs": self._epochs}, f)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self._selected_at_init:           # added with trainer.add_callback: on_init_end never ran
            record = self._checkpoint_record(args) or {}
            self._check_settings(record, f"the checkpoint {args.resume_from_checkpoint}" if record else "")
            self._resume_epochs = record.get("epochs")
        self._attach(model)
        if self.stage_every == "epoch":
            self._epochs = self._start_epochs(state, train_dataloader)
        built = self.tuner.stage                 # the trainable set the Trainer's optimizer was made over
        want = self._stage_for(state)
        changed = want is not None and want != built
        inner = _unwrap(optimizer) if optimizer is not None else None
        if inner is not None:                    # a resume (train(resume_from_checkpoint=...) alone, too)
            saved = {g.get(SETTINGS_KEY) for g in inner.param_groups} - {None}
            if len(saved) == 1:
                self._check_settings(json.loads(saved.pop()), "the checkpoint whose optimizer state was loaded")
        loaded = {g.get(STAGE_KEY) for g in inner.param_groups} - {None} if inner is not None else set()
        if loaded and loaded != {built}:         # a resume: the checkpoint's moments belong to another stage
            raise HFTError(
                f"HFTCallback: resuming at step {state.global_step} with an optimizer built over stage {built}'s "
                f"parameters, and the checkpoint's moments are stage {sorted(loaded)[0]}'s: they were loaded onto "
                "the wrong parameters. Name the checkpoint in TrainingArguments(resume_from_checkpoint=...) when "
                "making the Trainer, so the callback selects its stage before the optimizer is built")
        if inner is not None:
            self._check_loaded_state(model, inner)
        if optimizer is not None and inner is None:   # DeepSpeed's ZeRO optimizer: its groups cannot be adjusted
            why = None
            if self.stage_every is not None:     # refused now, not at the first change (the model half switched)
                why = f"stage changes (stage_every={self.stage_every!r})"
            elif self.tuner.row_layers():
                why = f"{self.kwargs['granularity']} granularity (its trained rows are not the tensors ZeRO steps)"
            elif not self._selected_at_init:
                why = "a callback added after the Trainer was made (its optimizer covers the whole model)"
            if why is not None:
                raise HFTError(self._unsyncable(optimizer, why))
            return
        if changed:
            self.tuner.set_stage(want)
        if optimizer is not None:   # a resume's loaded moments belong to the same rows: kept unless the stage moved
            self._sync(optimizer, stage_changed=changed)

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.stage_every == "epoch":
            self._epoch_start = state.global_step
            self._maybe_change(state, optimizer)

    def on_epoch_end(self, args, state, control, **kwargs):
        """Counts the epochs (stage_every="epoch"): one in which no optimizer step ran is not counted (the
        Trainer resuming on an IterableDataset skips the steps trained as batches of one pass of the stream,
        which can leave that pass empty), so the resumed run changes stage where the whole run did."""
        if self.stage_every == "epoch" and self._epochs is not None:
            if self._epoch_start is None or state.global_step > self._epoch_start:
                self._epochs += 1

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
