"""MeZOTrainer under data parallelism, as `accelerate launch` / torchrun run it: two CPU processes (gloo), the
Trainer wraps the model in DDP and gives each rank its own batches, counts the loss's tokens over both ranks
(num_items_in_batch) and scales each rank's loss by the world size; MeZO averages both losses over the ranks.
The ranks end bit for bit equal, and equal to a one-process MeZO loop whose closure is that average over the
batches the ranks saw."""
from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="MeZOTrainer is a transformers.Trainer")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from fusedtune.optim import MeZO  # noqa: E402
from ranks import gloo_worker, run_ranks  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

LR, EPS, WD, SEED, STEPS, WORLD = 5e-3, 1e-2, 0.1, 3, 3, 2


def _model():
    return tiny_llama(vocab=64).to(torch.bfloat16)


def _dataset():
    """16 different sequences, so the ranks' batches differ; -100 in some labels, so the token count
    (num_items_in_batch) is not just rows x length."""
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[::3, :4] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(16)]


def _train_rank(rank, res, fold, out):
    """One rank of a `torchrun --nproc-per-node 2` run (the process group is already up: accelerate joins it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from fusedtune.optim import MeZOTrainer

    class Recording(MeZOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({"input_ids": inputs["input_ids"].clone(), "labels": inputs["labels"].clone(),
                              "num_items": num_items_in_batch})
            return super().training_step(model, inputs, num_items_in_batch)

    model = _model()
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"rank{rank}"), report_to=[],
        use_cpu=True, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=LR, weight_decay=WD,
        save_strategy="no", logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant", seed=SEED)
    trainer = Recording(model=model, args=args, train_dataset=_dataset(), mezo={"eps": EPS, "fold": fold})
    trainer.seen = []
    trainer.train()
    res["ddp"] = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    res["world"] = trainer.args.world_size
    res["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    res["seen"] = trainer.seen
    res["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["pending"] = trainer.mezo.pending_seed


def _rank_loss(model, batch):
    """A rank's loss as the Trainer computes it: the tokens' summed loss over both ranks' token count, times the
    world size (average_tokens_across_devices)."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=batch["num_items"])
    return out.loss * WORLD


def test_ranks_take_the_one_process_step_on_the_average_of_their_losses(tmp_path):
    fold = True    # the weights settled at the end of train() on both ranks
    r0, r1 = run_ranks(gloo_worker, tmp_path, functools.partial(_train_rank, fold=fold, out=str(tmp_path)), world=WORLD)
    for r in (r0, r1):
        assert r["ddp"] and r["world"] == WORLD and len(r["seen"]) == STEPS and r["pending"] is None
    # the ranks drew different batches at every step, and counted the tokens of both
    for s0, s1 in zip(r0["seen"], r1["seen"]):
        assert not torch.equal(s0["input_ids"], s1["input_ids"])
        n = int((s0["labels"][:, 1:] != -100).sum() + (s1["labels"][:, 1:] != -100).sum())
        assert int(s0["num_items"]) == int(s1["num_items"]) == n
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name

    # one process: MeZO with the Trainer's groups, lr, weight decay and seed, on the mean of the ranks' losses
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    mine = dict(model.named_parameters())
    groups = [{"params": [mine[n] for n in names if n in decay], "weight_decay": WD},
              {"params": [mine[n] for n in names if n not in decay], "weight_decay": 0.0}]
    opt = MeZO(groups, lr=LR, eps=EPS, seed=SEED, fold=fold)
    model.train()
    losses = []
    for s0, s1 in zip(r0["seen"], r1["seen"]):
        losses.append(float(opt.step(lambda: (_rank_loss(model, s0) + _rank_loss(model, s1)) / WORLD)))
    opt.settle()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), r0["params"][name]), name
    assert r0["losses"] == r1["losses"] == pytest.approx([round(x, 4) for x in losses], abs=1e-4)

    # without the average, rank 0's batches alone lead elsewhere
    other = _model()
    mine = dict(other.named_parameters())
    opt = MeZO([{"params": [mine[n] for n in names if n in decay], "weight_decay": WD},
                {"params": [mine[n] for n in names if n not in decay], "weight_decay": 0.0}],
               lr=LR, eps=EPS, seed=SEED, fold=fold)
    other.train()
    for s0 in r0["seen"]:
        opt.step(lambda: _rank_loss(other, s0))
    opt.settle()
    assert not all(torch.equal(p.detach(), r0["params"][n]) for n, p in other.named_parameters())
