"""HFT block granularity (HalfFineTuner(granularity="block"), RowMaskedLinear(masters=False)): each
q/k/v/o/gate/up/down trains one seeded contiguous block of output rows as views of its weight, so any
optimizer updates them in place, with moments for those rows only and no master copy. Checked here:
the block rule, training equal to a dense reference whose gradient is masked to the blocks, frozen rows
bit-identical, optimizer state bytes, the views surviving copies / saves / loads / dtype and device
conversions, a broken view refused, stages and reset, the Trainer callback and the patch method."""
import copy
import io
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HFT tests build tiny transformers models")
try:
    from fusedtune.nn import RowMaskedLinear
except Exception:  # noqa: BLE001
    RowMaskedLinear = None
pytestmark = pytest.mark.skipif(RowMaskedLinear is None, reason="fusedtune.nn.RowMaskedLinear is not importable")

from fusedtune.hft import HalfFineTuner, HFTError, row_count  # noqa: E402
from fusedtune.hft.selection import choose_block  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import moment_bytes, one_thread, tiny_llama, train_steps  # noqa: E402,F401


def tiny_qwen2(layers=2):
    """q/k/v with biases: the bias trains at the block too."""
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def ids_batch(seed=1):
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))


def train(model, opt, steps=3, seed=1):
    train_steps(model, opt, ids_batch(seed), steps)


def is_view_of_block(mod) -> bool:
    """weight_rows (bias_rows) share memory with the weight's (bias's) rows mod.rows."""
    a = int(mod.rows[0])
    ok = mod.weight_rows.data_ptr() == mod.weight[a].data_ptr() and mod.weight_rows.shape[0] == mod.rows.numel()
    if mod.bias is not None:
        ok = ok and mod.bias_rows.data_ptr() == mod.bias[a:].data_ptr()
    return ok


# ------------------------------------------------------------------------------------------ the rule

def test_choose_block_is_a_seeded_contiguous_block_of_the_row_count():
    for out in (1, 2, 7, 96, 11008):
        for ratio in (0.25, 0.5, 1.0):
            k = row_count(out, ratio)
            rows = choose_block("model.layers.0.mlp.up_proj", out, ratio, seed=3, stage=1)
            assert rows.dtype == torch.int64 and rows.numel() == k
            assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + k))
            assert 0 <= int(rows[0]) and int(rows[-1]) < out
            assert torch.equal(rows, choose_block("model.layers.0.mlp.up_proj", out, ratio, seed=3, stage=1))
    # every start in [0, out - k] occurs (the edges included), and stages / names / seeds move the block
    starts = {int(choose_block(f"m{i}", 5, 0.5, 0, 0)[0]) for i in range(200)}
    assert starts == {0, 1, 2, 3}
    assert len({int(choose_block("q", 4096, 0.5, 0, s)[0]) for s in range(8)}) > 4
    assert len({int(choose_block("q", 4096, 0.5, s, 0)[0]) for s in range(8)}) > 4


def test_masters_false_refuses_rows_that_are_not_one_block():
    lin = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match="one contiguous block"):
        RowMaskedLinear.from_linear(lin, torch.tensor([0, 1, 3]), masters=False)
    m = RowMaskedLinear.from_linear(lin, torch.tensor([2, 3, 4]), masters=False)
    w = m.weight_rows
    with pytest.raises(ValueError, match="one contiguous block"):
        m.set_rows(torch.tensor([0, 5]))
    assert m.weight_rows is w and torch.equal(m.rows, torch.tensor([2, 3, 4]))   # left as it was
    assert m.weight.data_ptr() == lin.weight.data_ptr()                          # no copy of the weight


# ------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_block_training_equals_a_dense_reference_masked_to_the_blocks(make):
    """fp32 models, plain AdamW without weight decay: the block model and a plain model whose weight
    gradients are zeroed outside the blocks (AdamW moves nothing with zero gradient and zero moments)
    must agree; frozen rows stay bit-identical; trained rows move."""
    model, ref = make(), make()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    hft = HalfFineTuner(model, granularity="block", seed=2)
    layers = hft.row_layers()
    assert len(layers) == 2 * 7
    for name, mod in layers.items():
        assert isinstance(mod, RowMaskedLinear) and not mod.masters and is_view_of_block(mod)
        assert mod.weight_rows.dtype == mod.weight.dtype and mod.weight_rows.requires_grad
        assert not mod.weight.requires_grad
    sel = hft.selection()
    for n, p in ref.named_parameters():
        v = sel[n]
        p.requires_grad_(bool(v) if not torch.is_tensor(v) else True)
    masks = {n: v for n, v in sel.items() if torch.is_tensor(v)}
    # eps 1e-3: a bias gradient here is a cancelling sum (~1e-5) whose fourth digit follows the CPU's
    # summation order (it moved with the machine, 2026-11-30); at eps 1e-8 AdamW's m / sqrt(v) turns that
    # 1e-4 relative difference into 1e-6 of a parameter, beyond the fp32 tolerance below
    opt = hft.make_optimizer(lr=1e-2, weight_decay=0.0, eps=1e-3)
    assert type(opt) is torch.optim.AdamW
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0, eps=1e-3)
    ref_named = dict(ref.named_parameters())
    ids = ids_batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        ref(input_ids=ids, labels=ids).loss.backward()
        for name, mod in layers.items():      # the compact gradient is the dense one's block
            dense = ref_named[name + ".weight"].grad
            torch.testing.assert_close(mod.weight_rows.grad, dense[mod.rows], rtol=1e-5, atol=1e-7)
        for n, mask in masks.items():
            ref_named[n].grad[~mask] = 0
        opt.step()
        ref_opt.step()
    for n, p in model.named_parameters():
        if n.endswith(("weight_rows", "bias_rows")):
            continue
        torch.testing.assert_close(p.detach(), ref_named[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
    for name, mod in layers.items():
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[mod.rows] = False
        for leaf in ("weight", "bias"):
            t = getattr(mod, leaf)
            if t is None:
                continue
            assert torch.equal(t.detach()[keep], pre[f"{name}.{leaf}"][keep]), name
            assert not torch.equal(t.detach()[~keep], pre[f"{name}.{leaf}"][~keep]), name
        assert is_view_of_block(mod)


def test_bf16_optimizer_state_is_that_of_the_blocks_only():
    """bf16 model, make_optimizer's torch AdamW: bf16 moments for the trained elements only: 4 bytes per
    trained element, against 12 for row granularity (float32 masters + float32 moments), and the same
    fraction of full fine-tuning's state as the fraction of elements that train."""
    base = tiny_llama(layers=4).to(torch.bfloat16)
    full = copy.deepcopy(base)
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-3)
    train(full, opt_full, steps=1)
    n_all = sum(p.numel() for p in base.parameters())
    assert moment_bytes(opt_full) == 4 * n_all

    block = copy.deepcopy(base)
    hft = HalfFineTuner(block, granularity="block", seed=0)
    opt = hft.make_optimizer(lr=1e-3)
    train(block, opt, steps=1)
    trained = sum(p.numel() for p in hft.trainable_parameters())
    assert moment_bytes(opt) == 4 * trained
    # no extra tensors: the model's parameter storage is the base's (the views add none)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in block.parameters()}
    assert sum(storages.values()) == 2 * n_all
    lin = [m for m in hft.row_layers().values()]
    assert sum(m.weight_rows.numel() for m in lin) == sum(row_count(m.out_features, 0.5) * m.in_features for m in lin)

    row = copy.deepcopy(base)
    hft_r = HalfFineTuner(row, granularity="row", seed=0)
    opt_r = hft_r.make_optimizer(lr=1e-3)
    train(row, opt_r, steps=1)
    masters = sum(p.numel() * p.element_size() for m in hft_r.row_layers().values() for p in m.master_parameters())
    lin_elems = sum(m.weight_rows.numel() for m in lin)
    rest = trained - lin_elems                     # embeddings, lm_head, norms: moments in both
    assert masters + moment_bytes(opt_r) == 12 * lin_elems + 8 * rest
    assert moment_bytes(opt) / moment_bytes(opt_full) == pytest.approx(trained / n_all, abs=1e-12)


@pytest.mark.parametrize("granularity", ["matrix", "block"])
def test_train_embeddings_false_freezes_embeddings_and_head(granularity):
    """The paper's rule trains embeddings and lm_head; train_embeddings=False freezes both (they keep
    their values bit for bit and get no state), so the state falls to what the layers train: at ratio
    0.5, under half of full fine-tuning's."""
    base = tiny_llama(layers=4).to(torch.bfloat16)
    n_all = sum(p.numel() for p in base.parameters())
    model = copy.deepcopy(base)
    hft = HalfFineTuner(model, granularity=granularity, seed=0, train_embeddings=False)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not emb.requires_grad and not head.requires_grad
    sel = hft.selection()
    assert sel["model.embed_tokens.weight"] is False and sel["lm_head.weight"] is False
    opt = hft.make_optimizer(lr=1e-2)
    train(model, opt, steps=2)
    assert torch.equal(emb, base.get_input_embeddings().weight) and emb.grad is None
    assert torch.equal(head, base.get_output_embeddings().weight)
    trained = sum(p.numel() for p in hft.trainable_parameters())
    assert trained == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    if granularity == "block":   # half of every matrix's rows, half the norms, the final norm
        lin = sum(m.weight_rows.numel() for m in hft.row_layers().values())
        assert lin == sum(m.weight.numel() for m in hft.row_layers().values()) // 2
        assert trained == lin + 4 * 32 + 32
        assert moment_bytes(opt) == 4 * trained and moment_bytes(opt) / (4 * n_all) < 0.5
    # the default keeps the paper's rule
    other = HalfFineTuner(copy.deepcopy(base), granularity=granularity, seed=0)
    assert other.selection()["model.embed_tokens.weight"] is True


# ------------------------------------------------------------------------------------------ the views survive

def test_views_survive_copies_saves_loads_and_conversions():
    model = tiny_qwen2()
    hft = HalfFineTuner(model, granularity="block", seed=1)
    train(model, hft.make_optimizer(lr=1e-2), steps=1)
    q = "model.layers.0.self_attn.q_proj"
    sd = model.state_dict()
    assert not any(k.endswith(("weight_rows", "bias_rows")) for k in sd)    # derived from the weight
    assert q + ".rows" in sd

    twin = copy.deepcopy(model)
    layer = twin.get_submodule(q)
    assert is_view_of_block(layer) and layer.weight.data_ptr() != model.get_submodule(q).weight.data_ptr()
    # a copy trains on its own: its optimizer moves its weights, not the original's
    before = model.get_submodule(q).weight.detach().clone()
    train(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2), steps=1)
    assert torch.equal(model.get_submodule(q).weight, before)
    assert not torch.equal(layer.weight, before)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_view_of_block(loaded.get_submodule(q))

    # strict loads into a model at another stage (other blocks): the saved blocks and weights take over
    other = tiny_qwen2()
    hft2 = HalfFineTuner(other, granularity="block", seed=1)
    hft2.set_stage(3)
    assert not torch.equal(other.get_submodule(q).rows, model.get_submodule(q).rows)
    for assign in (False, True):
        other.load_state_dict(sd, strict=True, assign=assign)
        for name, mod in hft2.row_layers().items():
            assert torch.equal(mod.rows, model.get_submodule(name).rows) and is_view_of_block(mod), (assign, name)
            assert torch.equal(mod.weight, model.get_submodule(name).weight)
    # a state dict with masters (row granularity) writes them into the block, after the weight
    row = tiny_qwen2()
    HalfFineTuner(row, granularity="row", seed=5)
    mod = row.get_submodule(q)
    mod.set_rows(model.get_submodule(q).rows)
    with torch.no_grad():
        mod.weight_rows.add_(1.0)
        mod.write_rows_()
    tgt = other.get_submodule(q)
    rsd = {k[len(q) + 1:]: v for k, v in row.state_dict().items() if k.startswith(q + ".")}
    for assign in (False, True):
        tgt.load_state_dict(rsd, assign=assign)
        assert torch.equal(tgt.weight, mod.weight) and is_view_of_block(tgt), assign
    with torch.no_grad():      # the masters are the truth: they reach the block even where the weight lags
        rsd["weight"] = rsd["weight"].clone()
        rsd["weight"][mod.rows] = 0
    tgt.load_state_dict(rsd, assign=True)
    assert torch.equal(tgt.weight, mod.weight) and is_view_of_block(tgt)

    for conv in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.to("cpu")):
        conv(other)
        for mod in hft2.row_layers().values():
            assert is_view_of_block(mod) and mod.weight_rows.dtype == mod.weight.dtype


def test_a_replaced_weight_is_refused_by_name_not_trained_silently():
    model = tiny_llama()
    hft = HalfFineTuner(model, granularity="block", seed=0)
    mod = next(iter(hft.row_layers().values()))
    mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    with pytest.raises(RuntimeError, match="no longer views of the weight"):
        model(input_ids=ids_batch())
    mod.set_rows(mod.rows)       # re-selecting the rows makes views of the new weight
    model(input_ids=ids_batch())
    assert is_view_of_block(mod)


# ------------------------------------------------------------------------------------------ stages, reset, remove

def test_next_stage_moves_the_blocks_and_reset_restores():
    model = tiny_llama()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    hft = HalfFineTuner(model, granularity="block", seed=4)
    old = {n: m.rows.clone() for n, m in hft.row_layers().items()}
    train(model, hft.make_optimizer(lr=1e-2), steps=2)
    hft.next_stage()
    moved = [n for n, m in hft.row_layers().items() if not torch.equal(old[n], m.rows)]
    assert moved
    for name, mod in hft.row_layers().items():
        assert is_view_of_block(mod)
        assert torch.equal(mod.rows, hft.selection()[name + ".weight"].nonzero().flatten())
    hft.reset("frozen")     # rows trained at stage 0 that are frozen now go back to pretrained values
    for name, mod in hft.row_layers().items():
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[mod.rows] = False
        assert torch.equal(mod.weight.detach()[keep], pre[name + ".weight"][keep])
    train(model, hft.make_optimizer(lr=1e-2), steps=1)
    hft.remove(restore=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]), n
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


# ------------------------------------------------------------------------------------------ integrations

def test_trainer_callback_block_uses_the_trainers_own_optimizer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from fusedtune.hft import HFTCallback
    model = tiny_llama()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = HFTCallback(granularity="block", seed=0, stage_every=2, merge_on_train_end=False)
    ds = [{"input_ids": ids, "labels": ids} for ids in ids_batch(3).repeat(4, 1)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.01, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    rows0 = {n: m.rows.clone() for n, m in cb.tuner.row_layers().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # no write-back warning: nothing to write back
        trainer.train()
    assert cb.tuner.stage == 1 and not cb._write_back
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in cb.tuner.trainable_parameters()}
    for name, mod in cb.tuner.row_layers().items():
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[rows0[name]] = False
        keep[mod.rows] = False                 # frozen in both stages
        assert torch.equal(mod.weight.detach()[keep], pre[name + ".weight"][keep]), name
        assert not torch.equal(mod.weight.detach()[~keep], pre[name + ".weight"][~keep]), name


def test_patch_method_hft_block():
    import fusedtune.methods.hft  # noqa: F401
    from fusedtune.patch import patch, unpatch
    model = tiny_llama()
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = patch(model, "hft", granularity="block", lr=1e-2)
    assert type(rep.optimizer) is torch.optim.AdamW
    lin_rows = [r for r in rep.rows if r.name.endswith("_proj")]
    assert len(lin_rows) == 14 and all("views of the weight" in r.path for r in lin_rows)
    assert all("torch.optim.AdamW" in r.path for r in rep.rows if not r.name.endswith("_proj"))
    assert rep.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.total_params == sum(p.numel() for p in pre.values())     # views not counted twice
    ids = ids_batch()
    rep.step(lambda: model(input_ids=ids, labels=ids).loss)
    unpatch(model, merge=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]), n


def test_bad_granularity_names_block():
    with pytest.raises(HFTError, match="'block'"):
        HalfFineTuner(tiny_llama(), granularity="blocks")


def test_opcheck_and_compile_with_the_views():
    lin = torch.nn.Linear(8, 6)
    m = RowMaskedLinear.from_linear(lin, torch.arange(1, 4), masters=False)
    x = torch.randn(4, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedtune.hft_row_linear.default,
                          (x, m.weight, m.weight_rows, m.rows, m.bias, m.bias_rows, "reference"))
    f = lambda x: m(x).pow(2).sum()  # noqa: E731
    f(x).backward()
    eager = m.weight_rows.grad.clone(), m.bias_rows.grad.clone(), x.grad.clone()
    m.weight_rows.grad = m.bias_rows.grad = x.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    for got, want in zip((m.weight_rows.grad, m.bias_rows.grad, x.grad), eager):
        torch.testing.assert_close(got, want)
    # the gradient is the dense one's block
    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    dw, db = torch.autograd.grad(torch.nn.functional.linear(x, w, b).pow(2).sum(), (w, b))
    torch.testing.assert_close(m.weight_rows.grad, dw[1:4])
    torch.testing.assert_close(m.bias_rows.grad, db[1:4])
