"""MeZOTrainer: MeZO (fusedtune.optim.MeZO) inside transformers.Trainer, as MeZO's own code runs it.

    trainer = MeZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6, weight_decay=0.0),
                          train_dataset=ds, mezo={"eps": 1e-3, "fold": True})
    trainer.train()

What it changes in Trainer:
- the optimizer is a MeZO over the trainable parameters (requires_grad), in Trainer's two groups (weight decay
  on the parameters Trainer decays, none on biases and norms), lr and weight decay from the arguments, so the
  learning-rate scheduler drives it; its seed is args.seed unless mezo={"seed": ...} says otherwise. Other MeZO
  settings (eps, noise, rounding, fold, same_rng, backend, process_group) come in `mezo`.
- training_step runs the whole MeZO step on the batch: two forward passes (Trainer's compute_loss under its
  autocast context, no backward) and the fused perturbation passes; it returns the loss at +eps (what MeZO's
  trainer reports). Trainer's later optimizer.step() call then does nothing. The model stays in train mode, as
  Trainer puts it: both passes of a step see the same dropout masks (same_rng, the default).
- compute_loss (Trainer's, a subclass's, or compute_loss_func) may return a non-differentiable objective, e.g.
  a negated accuracy: no backward runs.
- the logs gain `projected_grad` (the last step's) and lose `grad_norm` (there are no gradients to clip).
- fold=True: between steps the weights carry the next step's +eps; evaluate(), predict(), save_model() (every
  checkpoint), each epoch's end (the last step's too, before Trainer loads a best model or calls on_train_end)
  and the end of train() settle them first, so none of these sees or saves perturbed weights, and a
  checkpoint's optimizer state has nothing pending. Callbacks of every step (on_step_end, on_log,
  on_pre_optimizer_step, on_optimizer_step) run between steps and see the perturbed weights; one that reads the
  weights calls trainer.settle() first (a pass over them; the next step re-applies its +eps).
- a resumed run continues the uninterrupted one exactly: the seeds follow MeZO's step count, which the
  checkpoint's optimizer state holds; a checkpoint without it (save_only_model=True) resumes from the step
  count in its trainer_state.json, which is the same number (its weights were saved settled). A just-in-time
  checkpoint (enable_jit_checkpoint) is taken at the end of the step, not before the optimizer step as Trainer
  takes it: a MeZO step has already moved the weights by then, and a checkpoint taken there would make the
  resumed run take that step twice.
- DataParallel (several GPUs in one process): both passes of a step restore every GPU's random state, so the
  replicas draw the same dropout masks in both. Under DDP (torchrun, accelerate launch) Trainer scales each rank's
  loss by the world size, expecting it to be a sum over the global item count (num_items_in_batch), and MeZO
  averages the ranks' losses: a compute_loss_func that returns a per-batch mean (an accuracy) must divide by
  the world size itself, or set average_tokens_across_devices=False.

Refused when the trainer is made (ValueError, nothing trained): gradient_accumulation_steps > 1 (a MeZO step
measures one batch's loss difference along one direction; raise the batch size instead: the passes keep no
activations), fp16=True (the GradScaler steps only from gradients; use bf16=True, or load the model in float16),
DeepSpeed, an optimizer or a scheduler of one's own (`optimizers=(opt, sched)`, `optimizer_cls_and_kwargs`: a
scheduler made before the MeZO exists drives another optimizer's lr; use lr_scheduler_type and
lr_scheduler_kwargs), and lr / weight_decay in `mezo` (they come from the arguments); the same argument checks
again for each hyperparameter-search trial. MeZO itself refuses sharded (FSDP) parameters.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from transformers import Trainer, TrainerCallback

from .mezo import MeZO

_MEZO_KEYS = ("eps", "noise", "rounding", "seed", "fold", "same_rng", "backend", "process_group")


class _TrainerMeZO(MeZO):
    """MeZO whose step() without a closure does nothing: MeZOTrainer takes the step in training_step, and
    Trainer calls optimizer.step() afterwards as it would after a backward."""

    def step(self, closure=None):
        if closure is None:
            return None
        return super().step(closure)


def _unwrap(optimizer):
    """The MeZO inside accelerate's AcceleratedOptimizer (or the optimizer itself), or None."""
    for _ in range(4):
        if isinstance(optimizer, MeZO) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _settle(optimizer) -> None:
    """fold=True: take the next step's +eps off the weights of the MeZO inside `optimizer` (nothing otherwise,
    or without one)."""
    opt = _unwrap(optimizer)
    if opt is not None:
        opt.settle()


class _SettleAtEpochEnd(TrainerCallback):
    """fold=True: settles the weights at each epoch's end, the last step's included (Trainer ends its loop
    through an epoch end), so that what Trainer does after the loop (the best-model load, on_train_end
    callbacks) takes settled weights. First among the callbacks."""

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        _settle(optimizer)


def _skip_event(*args, **kwargs):
    return None


class MeZOTrainer(Trainer):
    """transformers.Trainer with MeZO steps (the module docstring)."""

    def __init__(self, *args, mezo: dict | None = None, **kwargs):
        mezo = dict(mezo or {})
        unknown = sorted(set(mezo) - set(_MEZO_KEYS))
        if unknown:
            hint = " (lr and weight_decay come from TrainingArguments' learning_rate and weight_decay)" \
                if {"lr", "weight_decay"} & set(unknown) else ""
            raise ValueError(f"MeZOTrainer: unknown mezo settings {unknown}{hint}; the settings are "
                             f"{list(_MEZO_KEYS)}")
        opts = kwargs.get("optimizers") or (None, None)
        if opts[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("MeZOTrainer: it makes its own MeZO optimizer from the arguments' learning_rate and "
                             "weight_decay; pass MeZO's other settings as mezo={...}, not an optimizer")
        if len(opts) > 1 and opts[1] is not None:
            raise ValueError("MeZOTrainer: a scheduler passed in optimizers=(None, scheduler) was made for another "
                             "optimizer (the MeZO does not exist yet) and would not drive its learning rate; choose "
                             "one with TrainingArguments' lr_scheduler_type and lr_scheduler_kwargs")
        super().__init__(*args, **kwargs)
        self._check_arguments()
        self.mezo_settings = mezo
        self.callback_handler.callbacks.insert(0, _SettleAtEpochEnd())
        for cb in self.callback_handler.callbacks:
            if type(cb).__name__ == "JITCheckpointCallback" and hasattr(cb, "on_pre_optimizer_step"):
                # its checkpoint before the optimizer step would hold this step's update already (the MeZO step
                # ran in training_step) with the step count before it; its on_step_end takes the checkpoint
                cb.on_pre_optimizer_step = _skip_event
        # MeZO's own checks of the settings (eps, noise, rounding with fold, lr > 0) now, not at train()
        MeZO([torch.zeros(1, requires_grad=True)], lr=self.args.learning_rate, **self._mezo_kwargs())

    def _check_arguments(self) -> None:
        why = self._refusal()
        if why is not None:
            raise ValueError(f"MeZOTrainer: {why}")

    def _hp_search_setup(self, trial):
        super()._hp_search_setup(trial)      # a trial's arguments replace the checked ones
        self._check_arguments()

    def _refusal(self) -> str | None:
        a = self.args
        if a.gradient_accumulation_steps != 1:
            return (f"gradient_accumulation_steps={a.gradient_accumulation_steps}: a MeZO step measures one batch's "
                    "loss difference along one direction, so accumulation would step once per micro-batch; raise "
                    "per_device_train_batch_size instead (MeZO's forward passes keep no activations)")
        if a.fp16:
            return ("fp16=True: the GradScaler steps an optimizer only from gradients, and MeZO has none; use "
                    "bf16=True, or load the model in float16")
        if a.deepspeed or getattr(self, "is_deepspeed_enabled", False):
            return "DeepSpeed: its engine owns the optimizer step"
        return None

    # ------------------------------------------------------------------------------ the optimizer

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            m = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(m))
            named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            if not groups:
                raise ValueError("MeZOTrainer: the model has no trainable parameters (requires_grad) to perturb")
            self.optimizer = _TrainerMeZO(groups, lr=self.args.learning_rate, **self._mezo_kwargs())
        return self.optimizer

    def _mezo_kwargs(self) -> dict:
        return {"seed": self.args.seed, **self.mezo_settings}

    @property
    def mezo(self) -> MeZO | None:
        """The MeZO optimizer (None before training made it): `.last`, `.seed_for(step)`, `.settle()`."""
        return _unwrap(self.optimizer)

    def settle(self) -> None:
        """fold=True: take the next step's +eps off the weights (nothing otherwise, or before training)."""
        _settle(self.optimizer)

    # ------------------------------------------------------------------------------ the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.mezo
        if opt is None:
            raise RuntimeError("MeZOTrainer: training_step before the optimizer was made (call train())")
        model.train()
        inputs = self._prepare_inputs(inputs)

        rng = []      # DataParallel: every GPU's random state, taken before the first pass, restored for the second

        def closure():
            if self.args.n_gpu > 1 and opt.same_rng:
                if rng:
                    torch.cuda.set_rng_state_all(rng[0])
                else:
                    rng.append(torch.cuda.get_rng_state_all())
            # a copy per pass (of its own type: a BatchEncoding stays one): compute_loss pops "labels" out of the
            # dict it is given (label smoothing, compute_loss_func), which would leave the second pass without them
            batch = copy.copy(inputs) if isinstance(inputs, Mapping) else inputs
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
            if torch.is_tensor(loss) and loss.dim():
                loss = loss.mean()                          # DataParallel: a loss per device
            return loss                                     # (or a number from a compute_loss_func)

        return opt.step(closure).detach()     # (MeZO returns the loss as a tensor, a number's too)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:        # a training log
            logs.pop("grad_norm", None)
            opt = self.mezo
            if opt is not None and "projected_grad" in opt.last:
                logs["projected_grad"] = float(opt.last["projected_grad"])
        super().log(logs, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        opt = self.mezo
        if checkpoint is not None and opt is not None and opt.steps == 0 and self.state.global_step > 0:
            # no optimizer state in the checkpoint (save_only_model=True): the seeds follow the step count, which
            # is Trainer's; the weights were saved settled, so nothing is pending
            opt.steps = self.state.global_step

    # ------------------------------------------------------------------------------ settled weights

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.settle()

    def evaluate(self, *args, **kwargs):
        self.settle()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self.settle()
        return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        self.settle()
        return super().save_model(*args, **kwargs)
