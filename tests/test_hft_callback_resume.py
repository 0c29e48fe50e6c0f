"""HFTCallback and resuming, found by review: a resume with other selection settings (the checkpoint's moments
would land on other matrices, of other shapes: a heap corruption at the first AdamW step) is refused before
any step; stage_every="epoch" counts epochs itself (an IterableDataset's state.epoch is a fraction of
max_steps) and carries the count across a resume; a stage change the optimizer cannot take (DeepSpeed's ZeRO)
is refused at train begin, and never leaves the model half switched."""
import json
import os
import re
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the callback drives a transformers.Trainer")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from fusedtune.hft import HFTCallback, HFTError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from fakes import DeepSpeedWrapped, ZeroLike  # noqa: E402
from tiny_models import one_thread, tiny_llama  # noqa: E402,F401

DATA = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))


class _Stream(torch.utils.data.IterableDataset):
    """8 samples a pass: 4 optimizer steps an epoch at batch size 2."""

    def __iter__(self):
        for x in DATA[:8]:
            yield {"input_ids": x, "labels": x}


class _NoStep(Exception):
    pass


class _StopBeforeTheFirstStep(transformers.TrainerCallback):
    """Ends train() at on_train_begin (after the HFT callback's): no optimizer step can run on moments that
    landed on the wrong parameters."""

    def on_train_begin(self, args, state, control, **kwargs):
        raise _NoStep


class _StagePerStep(transformers.TrainerCallback):
    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append(self.cb.tuner.stage)


def _trainer(out, cb, ds=None, resume=None, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                seed=0, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                lr_scheduler_type="constant", save_strategy="no", resume_from_checkpoint=resume)
    base.update(kw)
    ds = [{"input_ids": x, "labels": x} for x in DATA] if ds is None else ds
    return transformers.Trainer(model=tiny_llama(), args=transformers.TrainingArguments(**base), train_dataset=ds,
                                callbacks=[cb])


def _train(trainer, resume=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)


@pytest.fixture(scope="module")
def seed0_checkpoint(tmp_path_factory):
    """checkpoint-2 of a 2-step run of HFTCallback(seed=0)."""
    out = tmp_path_factory.mktemp("seed0")
    _train(_trainer(out, HFTCallback(seed=0), max_steps=2, save_strategy="steps", save_steps=2))
    return str(out / "checkpoint-2")


# ------------------------------------------------------------------------------------------ other settings

def test_a_resume_with_other_settings_is_refused_by_name_before_anything_changes(tmp_path, seed0_checkpoint):
    """fusedtune_hft.json records the settings; a resume with seed=1 built its optimizer over other matrices
    (same group lengths), and torch loaded the checkpoint's moments onto them: heap corruption at the first
    AdamW step. Refused at on_init_end, naming each difference, before the selection is applied."""
    assert json.load(open(os.path.join(seed0_checkpoint, "fusedtune_hft.json")))["seed"] == 0
    model = tiny_llama()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=4,
                                          resume_from_checkpoint=seed0_checkpoint)
    cb = HFTCallback(seed=1, train_final_norm=False)
    with pytest.raises(HFTError, match=r"HFTCallback\(seed=0, train_final_norm=True\), and this callback has "
                                       r"seed=1, train_final_norm=False.*Resume with HFTCallback\(seed=0"):
        transformers.Trainer(model=model, args=args, train_dataset=[], callbacks=[cb])
    assert all(p.requires_grad for p in model.parameters())          # nothing applied
    ok = HFTCallback(seed=0)                                          # the checkpoint's settings: fine
    transformers.Trainer(model=tiny_llama(), args=args, train_dataset=[], callbacks=[ok])
    assert ok.tuner.stage == 0


def test_a_resume_named_only_in_train_with_another_seed_is_refused_before_a_step(tmp_path, seed0_checkpoint):
    """train(resume_from_checkpoint=...) alone: the callback never sees the path, but the loaded param groups
    carry the settings of the run that saved them; refused at on_train_begin, before any optimizer step."""
    trainer = _trainer(tmp_path, HFTCallback(seed=1), max_steps=4)
    trainer.add_callback(_StopBeforeTheFirstStep())
    with pytest.raises(HFTError, match=r"loaded was trained by HFTCallback\(seed=0\), and this callback has seed=1"):
        _train(trainer, resume=seed0_checkpoint)


def test_loaded_moments_of_other_shapes_are_refused():
    """A checkpoint without a record (saved before the settings were recorded): its moments are checked
    against their parameters' shapes at on_train_begin, before any step can write out of bounds."""
    cb = HFTCallback(seed=0)
    model = tiny_llama()
    args = SimpleNamespace(world_size=1, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=2, epoch=0.5)
    cb.on_init_end(args, state, None, model=model)
    trainable = cb.tuner.trainable_parameters()
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    p = next(p for p in trainable if p.ndim == 2 and p.shape[0] != p.shape[1])
    opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(p.shape[::-1]),
                    "exp_avg_sq": torch.zeros(p.shape[::-1])}
    name = next(n for n, q in model.named_parameters() if q is p)
    with pytest.raises(HFTError, match=re.escape(f"{name} {tuple(p.shape)} holds exp_avg {tuple(p.shape[::-1])}")):
        cb.on_train_begin(args, state, None, model=model, optimizer=opt)


def test_a_checkpoint_without_a_record_resumed_with_another_seed_is_refused_before_a_step(tmp_path, seed0_checkpoint):
    """The seed-1 resume of a seed-0 checkpoint that records nothing (no fusedtune_hft.json, no settings in
    its param groups): the shape check at on_train_begin names the moments that landed on other shapes."""
    import shutil
    ck = str(tmp_path / "checkpoint-2")
    shutil.copytree(seed0_checkpoint, ck)
    os.remove(os.path.join(ck, "fusedtune_hft.json"))
    sd = torch.load(os.path.join(ck, "optimizer.pt"), weights_only=True)
    for g in sd["param_groups"]:
        g.pop("fusedtune_hft_settings", None)    # (absent before the settings were recorded)
    torch.save(sd, os.path.join(ck, "optimizer.pt"))
    trainer = _trainer(tmp_path / "b", HFTCallback(seed=1), resume=ck, max_steps=4)
    trainer.add_callback(_StopBeforeTheFirstStep())
    with pytest.raises(HFTError, match=r"self_attn\.v_proj\.weight \(16, 32\) holds exp_avg \(32, 32\).*another "
                                       r"selection \(seed"):
        _train(trainer, resume=ck)


# ------------------------------------------------------------------------------------------ epochs

def test_stage_per_epoch_on_an_iterable_dataset(tmp_path):
    """state.epoch there is epoch index + steps / max_steps (0.33 at the second epoch's begin): the stage
    lagged a whole epoch. The callback counts the epochs."""
    cb = HFTCallback(seed=0, stage_every="epoch")
    trainer = _trainer(tmp_path, cb, ds=_Stream(), max_steps=12)
    spy = _StagePerStep(cb)
    trainer.add_callback(spy)
    _train(trainer)
    assert spy.seen == [0] * 4 + [1] * 4 + [2] * 4


def test_stage_per_epoch_on_an_iterable_dataset_resumes_where_the_whole_run_changed_stage(tmp_path):
    """checkpoint-4 is saved at the first epoch's end; fusedtune_hft.json records 1 epoch. The resumed
    Trainer skips the 4 trained batches as one (empty) pass of the stream, which the callback does not
    count: the steps after it train stage 1, then stage 2, as in the whole run, bit for bit."""
    cb = HFTCallback(seed=0, stage_every="epoch")
    whole = _trainer(tmp_path / "a", cb, ds=_Stream(), max_steps=12, save_strategy="epoch")
    _train(whole)
    ck = str(tmp_path / "a" / "checkpoint-4")
    assert json.load(open(os.path.join(ck, "fusedtune_hft.json")))["epochs"] == 1
    cb = HFTCallback(seed=0, stage_every="epoch")
    resumed = _trainer(tmp_path / "b", cb, ds=_Stream(), resume=ck, max_steps=12)
    spy = _StagePerStep(cb)
    resumed.add_callback(spy)
    _train(resumed, resume=ck)
    assert spy.seen == [1] * 4 + [2] * 4
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert [n for n in a if not torch.equal(a[n], b[n])] == []


def test_stage_per_epoch_map_style_resume_at_an_epochs_last_step(tmp_path):
    """A map-style dataset, saved at step 4 (the first epoch's last step, before its on_epoch_end: the
    recorded count is 0): the Trainer resumes at epoch 1, and so does the stage (as before the count)."""
    cb = HFTCallback(seed=0, stage_every="epoch")
    ds = [{"input_ids": x, "labels": x} for x in DATA[:8]]
    _train(_trainer(tmp_path / "a", cb, ds=ds, num_train_epochs=2, save_strategy="steps", save_steps=4))
    ck = str(tmp_path / "a" / "checkpoint-4")
    cb = HFTCallback(seed=0, stage_every="epoch")
    resumed = _trainer(tmp_path / "b", cb, ds=ds, resume=ck, num_train_epochs=2)
    spy = _StagePerStep(cb)
    resumed.add_callback(spy)
    _train(resumed, resume=ck)
    assert spy.seen == [1] * 4


# ------------------------------------------------------------------------------------------ DeepSpeed

def _zero():
    return DeepSpeedWrapped(ZeroLike(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(32))], lr=1e-3)))


@pytest.mark.parametrize("every", [2, "epoch"])
def test_deepspeed_with_stage_every_is_refused_at_train_begin(every):
    """Single-process DeepSpeed: on_train_begin accepted stage_every, and the refusal came at the first change,
    mid-training. Now refused before the first step."""
    args = SimpleNamespace(world_size=1, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, epoch=0.0)
    cb = HFTCallback(seed=0, stage_every=every)
    model = tiny_llama()
    cb.on_init_end(args, state, None, model=model)
    with pytest.raises(HFTError, match=rf"needs stage changes \(stage_every={every!r}\).*one Trainer per stage"):
        cb.on_train_begin(args, state, None, model=model, optimizer=_zero())


def test_a_stage_change_the_optimizer_cannot_take_leaves_the_model_as_it_was():
    """The change is whole or not at all: set_stage used to run first (requires_grad flags flipped, tuner at
    stage 1) and only then the sync refused the ZeRO optimizer."""
    args = SimpleNamespace(world_size=1, resume_from_checkpoint=None)
    cb = HFTCallback(seed=0, stage_every=2)
    model = tiny_llama()
    cb.on_init_end(args, SimpleNamespace(global_step=0, epoch=0.0), None, model=model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(HFTError, match=r"cannot adjust.*stage"):
        cb.on_step_begin(args, SimpleNamespace(global_step=2, epoch=0.0), None, optimizer=_zero())
    assert cb.tuner.stage == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
