"""transformers.Trainer checkpoints and resume_from_checkpoint with fusedtune: a run resumed from its step-3
checkpoint ends with the bits of the uninterrupted 6-step run. Patched models (lora, sparse_delta with its
SparseDeltaAdamW, with a Regrower too (its state travels in the optimizer's), fp8, roste; a peft model fused in place by fusedtune.lora.fuse_peft, with dropout) and
HFTCallback (matrix, and row with MaskedAdamW in bf16: the callback used to drop the loaded moments of the
row masters at train begin, and torch cast them to bf16; block, whose trained rows are views of the weights,
with the Trainer's own AdamW)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import fusedtune  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

DATA = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
CASES = [("lora", torch.float32), ("sparse_delta", torch.bfloat16), ("sparse_delta-regrow", torch.bfloat16), ("fp8", torch.float32),
         ("roste", torch.float32), ("hft-matrix", torch.bfloat16), ("hft-row", torch.bfloat16),
         ("hft-block", torch.bfloat16), ("hft-matrix-stages", torch.bfloat16), ("hft-row-stages", torch.bfloat16),
         ("lora-dora", torch.bfloat16), ("peft-fused", torch.bfloat16)]


def _run(case, dtype, out, resume=None, resume_in_args=True, save_steps=3):
    """hft-*-stages: a new stage every 2 steps, so the step-3 checkpoint is at stage 1 and the resumed run
    changes stage again at step 4; the checkpoint is named in TrainingArguments too, as the callback asks."""
    from fusedtune.hft import HFTCallback
    from fusedtune.optim import MaskedAdamW
    model = tiny_llama().to(dtype)
    kw, callbacks = {}, []
    if case.startswith("hft"):
        granularity = case.split("-")[1]
        callbacks = [HFTCallback(ratio=0.5, granularity=granularity, seed=0, merge_on_train_end=False,
                                 stage_every=2 if case.endswith("-stages") else None)]
        if granularity == "row":
            kw["optimizer_cls_and_kwargs"] = (MaskedAdamW, {})
    elif case == "peft-fused":      # a PeftModel whose LoRA layers fusedtune.lora.fuse_peft fused in place
        import peft
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
        fusedtune.lora.fuse_peft(model)
    else:
        name, _, variant = case.partition("-")
        opts = {"dora": {"use_dora": True, "dropout": 0.1},   # regrow: a selection at step 4, after the resume
                "regrow": {"density": 0.05, "regrow": {"every": 4, "rate": 0.3, "decay": "constant",
                                                       "accumulate_steps": 2}}}
        rep = fusedtune.patch(model, name, **opts.get(variant, {}))
        if name == "sparse_delta":
            kw["optimizers"] = (rep.optimizer, None)     # the fused optimizer, as a user passes it
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=save_steps, save_strategy="steps", per_device_train_batch_size=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, lr_scheduler_type="constant",
        resume_from_checkpoint=resume if resume_in_args else None)
    ds = [{"input_ids": x, "labels": x} for x in DATA]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks, **kw).train(
            resume_from_checkpoint=resume)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return after, any(not torch.equal(p, before[n]) for n, p in after.items() if n in before)


def _same(whole, resumed):
    assert sorted(whole) == sorted(resumed)
    diff = [n for n in whole if not torch.equal(whole[n], resumed[n])]
    assert not diff, diff[:4]


@pytest.mark.parametrize("case,dtype", CASES)
def test_resume_from_a_checkpoint_is_exact(tmp_path, case, dtype):
    whole, trained = _run(case, dtype, tmp_path / "a")
    resumed, _ = _run(case, dtype, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert trained
    _same(whole, resumed)


@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_resume_on_a_stage_boundary_is_exact(tmp_path, granularity):
    """Checkpoint-2 and checkpoint-4 are saved after the last step of stages 0 and 1, before the next step
    changes stage: their moments are those stages'. The resumed run changes stage where the whole run did
    (checkpoint-2 resumes even without the path in TrainingArguments: it is the first stage's)."""
    case = f"hft-{granularity}-stages"
    whole, _ = _run(case, torch.bfloat16, tmp_path / "a", save_steps=1)
    for step, in_args in ((2, True), (4, True), (2, False)):
        resumed, _ = _run(case, torch.bfloat16, tmp_path / f"b{step}{in_args}",
                          resume=str(tmp_path / "a" / f"checkpoint-{step}"), resume_in_args=in_args)
        _same(whole, resumed)


def test_a_checkpoint_without_the_stage_file_resumes_from_its_optimizers_stage(tmp_path):
    """A just-in-time checkpoint (enable_jit_checkpoint: Trainer saves it without on_save) has no
    fusedtune_hft.json; the stage key in its optimizer's param groups names the stage."""
    whole, _ = _run("hft-matrix-stages", torch.bfloat16, tmp_path / "a")
    (tmp_path / "a" / "checkpoint-3" / "fusedtune_hft.json").unlink()
    resumed, _ = _run("hft-matrix-stages", torch.bfloat16, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    _same(whole, resumed)


def test_a_resume_onto_another_stage_is_refused(tmp_path):
    """Without the checkpoint in TrainingArguments the optimizer is built over stage 0's parameters and
    the step-3 checkpoint's moments (stage 1) would land on them: refused, by name."""
    from fusedtune.hft import HFTError
    _run("hft-matrix-stages", torch.float32, tmp_path / "a")
    with pytest.raises(HFTError, match=r"stage 0's\s+parameters.*stage 1's.*TrainingArguments\(resume_from"):
        _run("hft-matrix-stages", torch.float32, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"),
             resume_in_args=False)


def test_sync_optimizer_places_new_parameters_by_kind_in_model_order():
    """Trainer's groups (matrices with decay, norms and biases without; both at weight decay 0 by default):
    a new 1-D parameter joins the norm group even when it is empty at the time, a new matrix the matrix
    group, and each group ends in model order (the layout Trainer.create_optimizer builds)."""
    from fusedtune.hft.callback import sync_optimizer
    w1, w2, w3 = (torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3))
    n1, n2 = (torch.nn.Parameter(torch.zeros(4)) for _ in range(2))
    opt = torch.optim.AdamW([{"params": [w2], "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}])
    sync_optimizer(opt, [w1, n1, w2, w3, n2])
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(w1), id(w2), id(w3)], [id(n1), id(n2)]]
    opt = torch.optim.AdamW([{"params": [w1], "weight_decay": 0.1}, {"params": [n1], "weight_decay": 0.0}])
    sync_optimizer(opt, [n2, w3])
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(w3)], [id(n2)]]
