"""MeZOTrainer: MeZO steps inside transformers.Trainer equal a hand-written MeZO loop; evaluation and
checkpoints see settled weights under fold=True; a resumed run continues the uninterrupted one; refusals."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="MeZOTrainer is a transformers.Trainer")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from fusedtune.optim import MeZO  # noqa: E402
from tiny_models import one_thread, tiny_llama  # noqa: E402,F401

LR, EPS = 5e-3, 1e-2


def _ids():
    return torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1))


def _dataset(n=16):
    """n copies of one sequence: every batch is the same, whatever order the Trainer's sampler draws (16 at 4 a
    batch: the runs' 4 steps are one epoch, whose end settles a folded run)."""
    ids = _ids()
    return [{"input_ids": ids.clone(), "labels": ids.clone()} for _ in range(n)]


def _batch(rows=4):
    return _ids().expand(rows, -1).clone()


def _model():
    """A bf16 tiny Llama: where a folded run settles changes bf16 weights (a settle and the next +eps round
    twice), so the hand-written runs must settle where the trainer does; float32 weights hardly tell."""
    return tiny_llama(vocab=64).to(torch.bfloat16)


def _trainer(model, tmp_path, steps=4, mezo=None, **args_kw):
    from fusedtune.optim import MeZOTrainer
    kw = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=steps, per_device_train_batch_size=4,
              learning_rate=LR, weight_decay=0.1, save_strategy="no", logging_steps=1, disable_tqdm=True,
              lr_scheduler_type="constant", seed=3)
    kw.update(args_kw)
    ds = _dataset()
    trainer = MeZOTrainer(model=model, args=transformers.TrainingArguments(**kw), train_dataset=ds,
                          eval_dataset=ds, mezo={"eps": EPS, **(mezo or {})})
    # the model's own mean loss, as the hand-written loop's closure computes it (with num_items_in_batch a
    # causal LM sums and divides instead: the same value up to the last bits)
    trainer.model_accepts_loss_kwargs = False
    return trainer


def _manual(model, trainer_model, fold, steps, settle_after=(), settle_end=True):
    """A hand-written MeZO run over `model` (a copy of the trainer's model before training), with the groups,
    order, lr, weight decay and seed MeZOTrainer gives its optimizer. Returns (optimizer, losses)."""
    names = [n for n, _ in trainer_model.named_parameters()]
    decay = set(transformers.Trainer.get_decay_parameter_names(None, trainer_model))   # (self unused)
    mine = dict(model.named_parameters())
    groups = [{"params": [mine[n] for n in names if n in decay], "weight_decay": 0.1},
              {"params": [mine[n] for n in names if n not in decay], "weight_decay": 0.0}]
    opt = MeZO(groups, lr=LR, eps=EPS, seed=3, fold=fold)
    ids = _batch()
    model.train()
    losses = []
    for s in range(1, steps + 1):
        losses.append(float(opt.step(lambda: model(input_ids=ids, labels=ids).loss)))
        if s in settle_after:
            opt.settle()
    if settle_end:
        opt.settle()
    return opt, losses


def _same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n].detach(), pb[n].detach()), n


@pytest.mark.parametrize("fold", [False, True])
def test_trainer_steps_equal_a_hand_written_mezo_loop(tmp_path, fold):
    model = _model()
    copy_ = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_path, mezo={"fold": fold})
    trainer.train()
    opt, losses = _manual(copy_, model, fold, 4)
    _same_params(model, copy_)                                      # bit for bit, weight decay groups included
    assert trainer.mezo.pending_seed is None                        # fold: settled at the end of train()
    assert trainer.mezo.steps == 4 and trainer.mezo.seed_for(3) == opt.seed_for(3)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [round(x, 4) for x in losses] == pytest.approx([h["loss"] for h in logs], abs=1e-4)
    assert all("projected_grad" in h and "grad_norm" not in h for h in logs)
    assert logs[-1]["projected_grad"] == pytest.approx(float(opt.last["projected_grad"]), rel=1e-6)
    assert losses[-1] < losses[0]


def _loss(model):
    ids = _batch()
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _train_folded_settling_at_2(tmp_path, **args_kw):
    """A 4-step fold=True run in which step 2 settles the weights (an evaluation or a checkpoint there), checked
    against the hand-written run that settles after step 2; returns (trainer, model, its initial copy, the
    hand-written run's settled weights after step 2)."""
    model = _model()
    start = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, mezo={"fold": True}, **args_kw)
    trainer.train()
    copy_ = copy.deepcopy(start)
    _manual(copy_, model, True, 4, settle_after=(2,))
    _same_params(model, copy_)
    at2 = copy.deepcopy(start)
    _manual(at2, model, True, 2)
    return trainer, model, start, at2


def test_fold_evaluation_sees_settled_weights(tmp_path):
    trainer, model, start, at2 = _train_folded_settling_at_2(tmp_path, eval_strategy="steps", eval_steps=2)
    settled = _loss(at2)
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert evals[2] == pytest.approx(settled, rel=1e-6, abs=0)
    carrying = copy.deepcopy(start)   # step 2's weights carrying step 3's +eps: the test can tell them apart
    _manual(carrying, model, True, 2, settle_end=False)
    assert abs(_loss(carrying) - settled) > 1e-4 * abs(settled)


def test_fold_checkpoints_hold_settled_weights_and_a_resume_continues_the_run(tmp_path):
    run = tmp_path / "run"
    _, model, _, at2 = _train_folded_settling_at_2(run, save_strategy="steps", save_steps=2)
    _same_params(transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoint-2"), at2)

    # a resume from checkpoint-2 (weights, MeZO's seed and step count) ends where the uninterrupted run ended
    resumed_model = tiny_llama(vocab=64, seed=5).to(torch.bfloat16)  # other weights: the checkpoint must replace them
    resumed = _trainer(resumed_model, tmp_path / "resumed", mezo={"fold": True})
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.mezo.steps == 4
    _same_params(resumed_model, model)


@pytest.mark.parametrize("args_kw, mezo, match", [
    (dict(gradient_accumulation_steps=2), None, "gradient_accumulation_steps=2"),
    (dict(fp16=True), None, "fp16=True"),
    ({}, {"lr": 1e-3}, "learning_rate and weight_decay"),
    ({}, {"eps": 0.0}, "eps must be > 0"),
    ({}, {"fold": True, "rounding": "stochastic"}, "fold=True needs rounding='nearest'"),
])
def test_refusals_when_the_trainer_is_made(tmp_path, args_kw, mezo, match):
    with pytest.raises(ValueError, match=match):
        _trainer(_model(), tmp_path, mezo=mezo, **args_kw)


def test_an_optimizer_of_ones_own_is_refused(tmp_path):
    from fusedtune.optim import MeZOTrainer
    model = _model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    for kw in (dict(optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)),
               dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))):
        with pytest.raises(ValueError, match="makes its own MeZO optimizer"):
            MeZOTrainer(model=model, args=args, train_dataset=_dataset(), **kw)
    # a scheduler made before the MeZO exists would drive another optimizer's learning rate
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda step: 0.0)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        MeZOTrainer(model=model, args=args, train_dataset=_dataset(), optimizers=(None, sched))


def test_a_hyperparameter_trials_arguments_are_checked_again(tmp_path):
    trainer = _trainer(_model(), tmp_path)
    trainer.args.gradient_accumulation_steps = 2       # what a trial's hyperparameters may set
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        trainer._hp_search_setup(None)


def test_a_model_without_trainable_parameters_is_refused_and_left_alone(tmp_path):
    model = _model().requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_path)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_frozen_parameters_stay_bit_identical(tmp_path):
    """MeZO perturbs only what trains: a model with a frozen base (here: everything but the norms)."""
    model = _model()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(model, tmp_path, steps=2, mezo={"fold": True}).train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) != ("norm" in n), n


@pytest.mark.parametrize("as_number", [False, True])
def test_a_non_differentiable_objective_through_compute_loss_func_sees_the_labels_in_both_passes(tmp_path, as_number):
    """compute_loss_func gets the labels on both forward passes of a step (Trainer's compute_loss pops them out
    of the dict it is given), and may return what has no gradient (a token error rate, as a tensor or as a
    Python number): no backward runs."""
    from fusedtune.optim import MeZOTrainer
    seen = []

    def error_rate(outputs, labels, num_items_in_batch=None):
        seen.append(labels is not None)
        pred = outputs.logits[:, :-1].argmax(-1)
        value = (pred != labels[:, 1:]).float().mean()
        seen_values.append(float(value))
        return float(value) if as_number else value

    seen_values = []
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3,
                                          per_device_train_batch_size=4, learning_rate=LR, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True, seed=0)
    trainer = MeZOTrainer(model=_model(), args=args, train_dataset=_dataset(),
                          compute_loss_func=error_rate, mezo={"eps": EPS})
    trainer.train()
    assert seen == [True] * 6
    last = trainer.mezo.last
    assert float(last["loss_plus"]) == seen_values[-2] and float(last["loss_minus"]) == seen_values[-1]
    assert float(last["projected_grad"]) == pytest.approx((seen_values[-2] - seen_values[-1]) / (2 * EPS))


def test_fold_callbacks_at_the_end_of_training_see_settled_weights(tmp_path):
    """Without an evaluation or a checkpoint at the last step, the epoch's end settles the weights, before
    Trainer's end of training (its best-model load, on_train_end callbacks, a final push) takes them."""
    seen = {}

    class Grab(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            seen.update({n: p.detach().clone() for n, p in model.named_parameters()})

    model = _model()
    start = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, steps=3, mezo={"fold": True})
    trainer.add_callback(Grab())
    trainer.train()
    _manual(start, model, True, 3)
    assert seen.keys() == dict(start.named_parameters()).keys()
    for n, p in start.named_parameters():
        assert torch.equal(seen[n], p.detach()), n


def test_fold_a_run_that_stops_on_an_error_leaves_settled_weights(tmp_path):
    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    model = _model()
    start = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, mezo={"fold": True})
    trainer.add_callback(Stop())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.mezo.pending_seed is None
    _manual(start, model, True, 2)
    _same_params(model, start)


def _uninterrupted(steps=4, fold=False):
    """The hand-written run's weights after `steps` (a model as _model() makes it)."""
    model = _model()
    _manual(model, _model(), fold, steps)
    return model


def test_a_checkpoint_without_optimizer_state_resumes_from_the_step_count(tmp_path):
    """save_only_model=True: no optimizer.pt; MeZO's seeds follow Trainer's step count, so the resumed run still
    continues the uninterrupted one."""
    run = tmp_path / "run"
    _trainer(_model(), run, save_strategy="steps", save_steps=2, save_only_model=True).train()
    ckpt = run / "checkpoint-2"
    assert not any(f.name.startswith("optimizer") for f in ckpt.iterdir())
    resumed_model = tiny_llama(vocab=64, seed=5).to(torch.bfloat16)
    resumed = _trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.mezo.steps == 4
    _same_params(resumed_model, _uninterrupted())


def test_a_just_in_time_checkpoint_is_taken_after_the_step(tmp_path):
    """enable_jit_checkpoint: a SIGTERM during a step's forward passes checkpoints at the step's end (Trainer's
    own hook before the optimizer step would save this step's update under the previous step count, and the
    resumed run would take the step twice)."""
    import signal
    from fusedtune.optim import MeZOTrainer

    class Terminated(MeZOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.state.global_step == 1:     # the second step: as if SIGTERM came during its passes
                jit = next(cb for cb in self.callback_handler.callbacks if type(cb).__name__ == "JITCheckpointCallback")
                jit.jit_manager.is_checkpoint_requested = True
            return loss

    handler = signal.getsignal(signal.SIGTERM)
    try:
        run = tmp_path / "run"
        args = dict(output_dir=str(run), report_to=[], use_cpu=True, max_steps=4, per_device_train_batch_size=4,
                    learning_rate=LR, weight_decay=0.1, save_strategy="no", disable_tqdm=True,
                    lr_scheduler_type="constant", seed=3, enable_jit_checkpoint=True)
        trainer = Terminated(model=_model(), args=transformers.TrainingArguments(**args), train_dataset=_dataset(),
                             mezo={"eps": EPS})
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert trainer.state.global_step == 2 and trainer.mezo.steps == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    resumed_model = tiny_llama(vocab=64, seed=5).to(torch.bfloat16)
    _trainer(resumed_model, tmp_path / "resumed").train(resume_from_checkpoint=str(run / "checkpoint-2"))
    _same_params(resumed_model, _uninterrupted())


def test_the_batch_keeps_its_type_in_both_passes(tmp_path):
    """A collator's BatchEncoding reaches compute_loss as a BatchEncoding in both passes (attribute access works
    as under Trainer), each pass with its own copy."""
    from transformers import BatchEncoding

    from fusedtune.optim import MeZOTrainer
    seen = []

    class Reading(MeZOTrainer):
        def compute_loss(self, model, inputs, **kw):
            seen.append(type(inputs))
            return model(input_ids=inputs.input_ids, labels=inputs.labels).loss

    def collate(items):
        return BatchEncoding({k: torch.stack([it[k] for it in items]) for k in items[0]})

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=4, learning_rate=LR, save_strategy="no",
                                          disable_tqdm=True)
    Reading(model=_model(), args=args, train_dataset=_dataset(), data_collator=collate, mezo={"eps": EPS}).train()
    assert seen == [BatchEncoding] * 4


def test_data_parallel_passes_restore_every_gpus_random_state(tmp_path, monkeypatch):
    """Under DataParallel (n_gpu > 1) the replicas draw dropout masks from every GPU's generator: the step takes
    all their states before the first pass and restores them before the second (same_rng), not only the
    parameters' device's. Checked on the CPU with the CUDA state calls recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("get") or ["states"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda st: calls.append(("set", st)))
    trainer = _trainer(_model(), tmp_path)
    trainer.create_optimizer()
    batch = {"input_ids": _batch(), "labels": _batch()}
    trainer.args._n_gpu = 2
    trainer.training_step(trainer.model, batch)
    assert calls == ["get", ("set", ["states"])]
    trainer.training_step(trainer.model, batch)          # a new step takes the states again
    assert calls[2:] == ["get", ("set", ["states"])]
    calls.clear()
    trainer.args._n_gpu = 1
    trainer.training_step(trainer.model, batch)
    assert calls == []
