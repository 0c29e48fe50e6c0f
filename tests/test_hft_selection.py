"""HFT selection (fusedtune.hft.HalfFineTuner): the category rule per layer, determinism, frozen
parameters untouched, optimizer state at about half, reset, the patch method, the Trainer callback,
and row granularity (when fusedtune.nn.RowMaskedLinear is available)."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HFT tests build tiny transformers models")

from fusedtune.hft import HalfFineTuner, HFTError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from fakes import DeepSpeedWrapped, ZeroLike  # noqa: E402
from tiny_models import moment_bytes, one_thread, train_steps  # noqa: E402,F401

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def _row_linear():
    try:
        from fusedtune.nn import RowMaskedLinear
        return RowMaskedLinear
    except Exception:  # noqa: BLE001
        return None


needs_rows = pytest.mark.skipif(_row_linear() is None,
                                reason="row granularity needs fusedtune.nn.RowMaskedLinear (not importable here)")


def tiny(kind="llama", layers=4, gqa=True, hidden=32, inter=48, vocab=64, seed=0):
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=64,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig}[kind]
    if kind == "gemma":
        kw["head_dim"] = hidden // 4
    if kind == "llama":
        kw["tie_word_embeddings"] = False
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg(**kw))


def per_layer(sel, layers):
    """From selection(): per layer the sets of trained attention / MLP matrices and norms."""
    out = []
    for i in range(layers):
        p = f"model.layers.{i}."
        out.append({"attn": {s for s in ATTN if sel[f"{p}self_attn.{s}.weight"] is True},
                    "mlp": {s for s in MLP if sel[f"{p}mlp.{s}.weight"] is True},
                    "norm": {s for s in NORMS if sel[f"{p}{s}.weight"] is True}})
    return out


def batch(vocab=64, n=4, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def train(model, opt, steps=3, seed=1):
    train_steps(model, opt, batch(model.config.vocab_size, seed=seed), steps)


state_bytes = moment_bytes    # the moments (exp_avg + exp_avg_sq; the step counters are not counted)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ the rule

@pytest.mark.parametrize("kind,layers", [("llama", 4), ("llama", 6), ("qwen2", 4), ("mistral", 4), ("gemma", 4)])
def test_selection_counts_match_the_rule_per_layer(kind, layers):
    model = tiny(kind, layers)
    hft = HalfFineTuner(model, seed=3)
    sel = hft.selection()
    lay = per_layer(sel, layers)
    for i, c in enumerate(lay):
        assert len(c["attn"]) == 2, (i, c)
        assert len(c["mlp"]) in (1, 2), (i, c)
        assert len(c["norm"]) == 1, (i, c)
    # exactly half of the MLP matrices: 2 in half of the layers, 1 in the others
    assert sum(len(c["mlp"]) == 2 for c in lay) == layers // 2
    assert sum(len(c["mlp"]) for c in lay) == 3 * layers // 2
    # embeddings, lm_head and the final norm train
    assert sel["model.embed_tokens.weight"] is True and sel["lm_head.weight"] is True
    assert sel["model.norm.weight"] is True
    # requires_grad follows the selection, for every parameter (biases go with their matrix)
    named = dict(model.named_parameters(remove_duplicate=False))
    assert set(sel) == set(named)
    for name, p in named.items():
        assert p.requires_grad is sel[name], name
    if kind == "qwen2":
        for i, c in enumerate(lay):
            for s in ("q_proj", "k_proj", "v_proj"):
                assert sel[f"model.layers.{i}.self_attn.{s}.bias"] is (s in c["attn"])
    if kind == "gemma":  # tied embeddings: one parameter, trained, counted once
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert sum(p is model.lm_head.weight for p in hft.trainable_parameters()) == 1
    # the per-layer table says the same
    rows = hft.summary_rows()
    for i, c in enumerate(lay):
        assert set(rows[i]["attn"]) == c["attn"] and set(rows[i]["mlp"]) == c["mlp"]
        assert set(rows[i]["norm"]) == c["norm"]
    text = hft.summary()
    assert "2/4" in text and "lm_head" in text and "total" in text


def test_which_layers_get_two_mlp_matrices_depends_on_the_seed():
    patterns = set()
    for seed in range(8):
        hft = HalfFineTuner(tiny(layers=6), seed=seed)
        patterns.add(tuple(len(c["mlp"]) for c in per_layer(hft.selection(), 6)))
    assert len(patterns) > 1


def test_odd_layer_count_trains_floor_of_half_the_mlp_matrices():
    hft = HalfFineTuner(tiny(layers=3))
    lay = per_layer(hft.selection(), 3)
    assert [len(c["attn"]) for c in lay] == [2, 2, 2]
    assert sum(len(c["mlp"]) for c in lay) == 4          # (3L - 1) / 2 of 3L = 4 of 9
    assert sum(len(c["norm"]) for c in lay) == 3


def test_other_ratios_generalize():
    hft = HalfFineTuner(tiny(layers=4), ratio=0.25)
    lay = per_layer(hft.selection(), 4)
    assert [len(c["attn"]) for c in lay] == [1] * 4
    assert sum(len(c["mlp"]) for c in lay) == 3 and all(len(c["mlp"]) <= 1 for c in lay)   # round(0.25*12)
    assert sum(len(c["norm"]) for c in lay) == 2 and all(len(c["norm"]) <= 1 for c in lay)
    model = tiny(layers=2)
    HalfFineTuner(model, ratio=1.0)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw,word", [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": "half"}, "ratio"),
                                     ({"granularity": "column"}, "granularity"), ({"seed": 1.5}, "seed")])
def test_bad_arguments_are_refused(kw, word):
    model = tiny(layers=2)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(HFTError, match=word):
        HalfFineTuner(model, **kw)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_deterministic_from_seed_and_stage():
    base = tiny(layers=6)
    a = HalfFineTuner(copy.deepcopy(base), seed=7)
    b = HalfFineTuner(copy.deepcopy(base), seed=7)
    c = HalfFineTuner(copy.deepcopy(base), seed=8)
    assert a.selection() == b.selection()
    assert a.selection() != c.selection()
    stage1 = a.selection(stage=1)
    assert stage1 != a.selection()
    assert a.next_stage() == 1 and a.stage == 1
    assert a.selection() == stage1 == b.selection(stage=1)
    for name, p in a.model.named_parameters(remove_duplicate=False):
        assert p.requires_grad is stage1[name]
    a.set_stage(0)
    assert a.selection() == b.selection()


def test_gpt2_is_refused_clearly():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(HFTError) as e:
        HalfFineTuner(model)
    msg = str(e.value)
    assert "gpt2" in msg and "q_proj" in msg and "gate" in msg and "c_attn" in msg
    assert all(p.requires_grad for p in model.parameters())


@needs_rows
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_row_granularity_refuses_hooked_linears(granularity):
    """A RowMaskedLinear computes from the weights without calling the module it replaces: a hook on that module
    would silently stop running. Refused before anything changes; matrix granularity swaps nothing and takes it."""
    model = tiny(layers=2)
    calls = []
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(HFTError, match=r"layers.1.mlp.up_proj has a forward hook.*granularity='matrix'"):
        HalfFineTuner(model, granularity=granularity)
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    HalfFineTuner(model, granularity="matrix")
    model(batch())
    assert calls == [1]


def test_one_tuner_per_model_and_remove_restores_flags():
    model = tiny(layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    hft = HalfFineTuner(model)
    with pytest.raises(HFTError, match="already"):
        HalfFineTuner(model)
    hft.remove()
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed" not in n)
    HalfFineTuner(model).remove()
    with pytest.raises(HFTError, match="removed"):
        hft.next_stage()


# ------------------------------------------------------------------------------------------ training

def test_frozen_parameters_bitwise_unchanged_after_adamw_steps():
    model = tiny(layers=4)
    before = params_of(model)
    hft = HalfFineTuner(model, seed=1)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen
    # the optimizer over the trainable parameters, with weight decay (which would move anything it held)
    opt = torch.optim.AdamW(hft.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, steps=3)
    after = dict(model.named_parameters())
    for n in frozen:
        assert after[n].grad is None, n
        assert torch.equal(after[n].detach(), before[n]), n
    for n, p in after.items():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), n
    # a naive optimizer over every parameter does not touch the frozen ones either (no grad, no state)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt2, steps=2)
    for n in frozen:
        assert torch.equal(after[n].detach(), before[n]), n
        assert after[n] not in opt2.state


def _expected_trainable(layers, hidden, inter, vocab):
    """Elements the rule trains when q/k/v/o are all hidden x hidden (no GQA) and gate/up/down all
    hidden*inter: half of attention, half of MLP (even layer count), one norm of two per layer,
    the final norm, embeddings and lm_head."""
    attn = 4 * hidden * hidden * layers
    mlp = 3 * hidden * inter * layers
    norms = 2 * hidden * layers
    total = attn + mlp + norms + hidden + 2 * vocab * hidden
    trained = attn // 2 + mlp // 2 + norms // 2 + hidden + 2 * vocab * hidden
    return trained, total


def test_optimizer_state_is_about_half_of_full_adamw():
    L, H, inter, V = 4, 48, 80, 32
    base = tiny(layers=L, gqa=False, hidden=H, inter=inter, vocab=V)
    trained, total = _expected_trainable(L, H, inter, V)
    assert sum(p.numel() for p in base.parameters()) == total
    full = copy.deepcopy(base)
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-3)
    train(full, opt_full, steps=1)
    model = copy.deepcopy(base)
    hft = HalfFineTuner(model, seed=5)
    assert sum(p.numel() for p in hft.trainable_parameters()) == trained
    opt = torch.optim.AdamW(hft.trainable_parameters(), lr=1e-3)
    train(model, opt, steps=1)
    frac = state_bytes(opt) / state_bytes(opt_full)
    assert state_bytes(opt_full) == 8 * total
    assert frac == pytest.approx(trained / total, abs=1e-12)
    assert 0.5 < frac < 0.5 + (2 * V * H + 2 * H * L) / total   # half, plus the always-trained head/tail
    # the optimizer HFT builds (MaskedAdamW) keeps the same moments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the AdamW fallback warns where MaskedAdamW is not built
        opt_m = hft.make_optimizer(lr=1e-3, weight_decay=0.0)
    train(model, opt_m, steps=1)
    assert state_bytes(opt_m) == state_bytes(opt)


def test_optimizer_state_with_gqa_matches_the_selected_sizes():
    model = tiny(layers=6)
    hft = HalfFineTuner(model, seed=2)
    sel = hft.selection()
    named = dict(model.named_parameters())
    expected = sum(named[n].numel() for n, v in sel.items() if v is True and n in named)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # every parameter given; only grads get state
    train(model, opt, steps=1)
    assert state_bytes(opt) == 8 * expected


@pytest.mark.parametrize("snapshot", [True, "lazy"])
def test_reset_restores_pretrained_values_bitwise(snapshot):
    model = tiny(layers=4)
    pre = params_of(model)
    hft = HalfFineTuner(model, seed=4, snapshot=snapshot)
    full = sum(p.numel() * 4 for p in model.parameters())
    trained0 = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert hft.snapshot_bytes == (full if snapshot is True else trained0) and trained0 < full
    train(model, torch.optim.AdamW(hft.trainable_parameters(), lr=1e-2), steps=2)
    stage0 = {n for n, p in model.named_parameters() if p.requires_grad}
    hft.next_stage()
    stage1 = {n for n, p in model.named_parameters() if p.requires_grad}
    if snapshot == "lazy":   # what stage 1 newly trains is copied now, before it trains
        assert hft.snapshot_bytes == sum(p.numel() * 4 for n, p in model.named_parameters()
                                         if n in stage0 | stage1)
    train(model, torch.optim.AdamW(hft.trainable_parameters(), lr=1e-2), steps=2)
    now = params_of(model)
    # "frozen": what stage 0 trained and stage 1 freezes goes back; what trains now keeps its values
    touched = hft.reset("frozen")
    assert set(touched) == set(pre) - stage1
    for n, p in model.named_parameters():
        if n in stage1:
            assert torch.equal(p.detach(), now[n]), n
        else:
            assert torch.equal(p.detach(), pre[n]), n
    assert stage0 - stage1, "the test needs something trained in stage 0 and frozen in stage 1"
    # names restrict the reset to a module
    hft.reset("selected", names=["model.layers.0"])
    for n, p in model.named_parameters():
        want = pre[n] if (n.startswith("model.layers.0.") or n not in stage1) else now[n]
        assert torch.equal(p.detach(), want), n
    hft.reset("all")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]), n
    with pytest.raises(HFTError, match="part"):
        hft.reset("some")
    with pytest.raises(HFTError, match="model.layers.99"):
        hft.reset("all", names=["model.layers.99"])
    m2 = tiny(layers=2)
    with pytest.raises(HFTError, match="snapshot"):
        HalfFineTuner(m2, snapshot=False).reset()


def test_fusedtune_hft_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"   # make any import of it fail
            "import fusedtune, fusedtune.hft\n"
            "try:\n    fusedtune.hft.HFTCallback\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------ fusedtune.patch

def test_patch_method_hft():
    import fusedtune.methods.hft  # noqa: F401  (registers "hft" even before fusedtune.methods imports it)
    from fusedtune.patch import PatchError, methods, patch, report, unpatch
    assert "hft" in methods()
    model = tiny(layers=2)
    pre = params_of(model)
    with pytest.raises(PatchError, match="target_modules"):
        patch(model, "hft", target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = patch(model, "hft", lr=1e-2, seed=1)
    assert rep.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.trainable_params < rep.total_params
    names = [r.name for r in rep.rows]
    assert names[:2] == ["model.layers.0", "model.layers.1"] and "lm_head" in names
    assert "trains attn" in rep.rows[0].path and "mlp" in rep.rows[0].path
    ids = batch()
    l0 = float(rep.step(lambda: model(input_ids=ids, labels=ids).loss))
    for _ in range(3):
        l1 = float(rep.step(lambda: model(input_ids=ids, labels=ids).loss))
    assert l1 < l0
    assert report(model).method == "hft"
    unpatch(model, merge=False)          # pretrained weights back, flags back
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]) and p.requires_grad, n


# ------------------------------------------------------------------------------------------ Trainer

def _trainer(model, tmp_path, callbacks, steps=4, lr=1e-2, args_kw=None, **kw):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    ds = [{"input_ids": ids, "labels": ids} for ids in batch(n=16, seed=3)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=steps, per_device_train_batch_size=4,
        learning_rate=lr, weight_decay=0.01, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", seed=0, **(args_kw or {}))
    return transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks, **kw)


def _inner(opt):
    return getattr(opt, "optimizer", opt)


def test_trainer_callback_applies_hft_and_changes_stage(tmp_path):
    from fusedtune.hft import HFTCallback
    model = tiny(layers=4)
    pre = params_of(model)
    cb = HFTCallback(seed=2, stage_every=2)
    trainer = _trainer(model, tmp_path, [cb], steps=4)
    assert cb.tuner is not None and cb.tuner.stage == 0        # applied at on_init_end
    sel0, sel1 = cb.tuner.selection(0), cb.tuner.selection(1)
    trainer.train()
    assert cb.tuner.stage == 1
    opt = _inner(trainer.optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in cb.tuner.trainable_parameters()}
    assert all(id(p) in in_opt for p in opt.state)
    for n, p in model.named_parameters():
        if not sel0[n] and not sel1[n]:
            assert torch.equal(p.detach(), pre[n]), n            # frozen in both stages: untouched
        else:
            assert not torch.equal(p.detach(), pre[n]), n        # trained in some stage: moved
    # norms and biases sit in the no-decay group, matrices in the decay group
    for g in opt.param_groups:
        for p in g["params"]:
            if p.ndim == 1:
                assert g["weight_decay"] == 0.0


def test_trainer_callback_added_after_the_trainer_was_built(tmp_path):
    from fusedtune.hft import HFTCallback
    model = tiny(layers=2)
    pre = params_of(model)
    trainer = _trainer(model, tmp_path, None, steps=3)
    cb = HFTCallback(seed=0)
    trainer.add_callback(cb)
    trainer.train()                      # the optimizer was built over every parameter, then synced
    opt = _inner(trainer.optimizer)
    trainable = cb.tuner.trainable_parameters()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert state_bytes(opt) == 8 * sum(p.numel() for p in trainable)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]) is (not p.requires_grad), n


# ------------------------------------------------------------------------------------------ rows

@needs_rows
@pytest.mark.parametrize("kind", ["llama", "qwen2"])      # qwen2: q/k/v have biases
def test_row_granularity_swaps_layers_and_keeps_frozen_rows(kind):
    from fusedtune.hft import row_count
    RowMaskedLinear = _row_linear()
    model = tiny(kind, layers=2)
    pre = params_of(model)
    hft = HalfFineTuner(model, granularity="row", seed=1)
    rows = hft.row_layers()
    assert len(rows) == 2 * 7
    for name, mod in rows.items():
        assert isinstance(mod, RowMaskedLinear) and model.get_submodule(name) is mod
        assert mod.rows.numel() == row_count(mod.out_features, 0.5) == round(mod.out_features / 2)
        assert not mod.weight.requires_grad and mod.weight_rows.requires_grad
        if mod.bias is not None:    # the bias trains at the selected rows, through its master
            assert not mod.bias.requires_grad and mod.bias_rows.requires_grad
            assert mod.bias_rows.shape == mod.rows.shape and mod.bias_rows.dtype == torch.float32
        else:
            assert mod.bias_rows is None
    n_bias = sum(m.bias is not None for m in rows.values())
    assert n_bias == (2 * 3 if kind == "qwen2" else 0)
    sel = hft.selection()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert sel[q].dtype == torch.bool and torch.equal(sel[q].nonzero().flatten(), rows[q[:-7]].rows.cpu())
    if kind == "qwen2":
        assert torch.equal(sel[q[:-6] + "bias"], sel[q])
    assert sum(len([k for k in NORMS if sel[f"model.layers.{i}.{k}.weight"]]) for i in range(2)) == 2
    opt = hft.make_optimizer(lr=1e-2, weight_decay=0.1)
    train(model, opt, steps=3)
    for name, mod in rows.items():
        w0 = pre[name + ".weight"]
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[mod.rows] = False
        assert torch.equal(mod.weight.detach()[keep], w0[keep]), name
        assert not torch.equal(mod.weight.detach()[~keep], w0[~keep]), name
        assert torch.equal(mod.weight.detach()[mod.rows], mod.weight_rows.detach().to(mod.weight.dtype))
        if mod.bias is not None:
            b0 = pre[name + ".bias"]
            assert torch.equal(mod.bias.detach()[keep], b0[keep]), name
            assert not torch.equal(mod.bias.detach()[~keep], b0[~keep]), name
            assert torch.equal(mod.bias.detach()[mod.rows], mod.bias_rows.detach().to(mod.bias.dtype))
    # moments only for the selected rows (+ the whole-vector parameters)
    assert state_bytes(opt) == 8 * sum(p.numel() for p in hft.trainable_parameters())
    # next stage: new rows; reset restores rows in the full weight and the masters
    old = {n: m.rows.clone() for n, m in rows.items()}
    hft.next_stage()
    assert any(not torch.equal(old[n], m.rows) for n, m in hft.row_layers().items())
    hft.reset("all")
    for name, mod in hft.row_layers().items():
        assert torch.equal(mod.weight.detach(), pre[name + ".weight"])
        assert torch.equal(mod.weight_rows.detach(), pre[name + ".weight"][mod.rows].float())
        if mod.bias is not None:
            assert torch.equal(mod.bias.detach(), pre[name + ".bias"])
            assert torch.equal(mod.bias_rows.detach(), pre[name + ".bias"][mod.rows].float())
    # back to nn.Linear with the current weights
    hft.remove()
    for name in rows:
        lin = model.get_submodule(name)
        assert type(lin) is torch.nn.Linear and torch.equal(lin.weight.detach(), pre[name + ".weight"])
        if lin.bias is not None:
            assert torch.equal(lin.bias.detach(), pre[name + ".bias"])


@needs_rows
def test_row_granularity_trainer_callback(tmp_path):
    from fusedtune.hft import HFTCallback
    from fusedtune.optim import MaskedAdamW
    model = tiny(layers=2)
    pre = params_of(model)
    cb = HFTCallback(granularity="row", seed=0)
    trainer = _trainer(model, tmp_path, [cb], steps=3,
                       optimizer_cls_and_kwargs=(MaskedAdamW, {"lr": 1e-2}))
    layers = cb.tuner.row_layers()
    rows = {n: m.rows.clone() for n, m in layers.items()}
    trainer.train()
    assert isinstance(_inner(trainer.optimizer), MaskedAdamW) and not cb._write_back
    for name, r in rows.items():
        lin = model.get_submodule(name)
        assert type(lin) is torch.nn.Linear                  # merged at on_train_end
        keep = torch.ones(lin.out_features, dtype=torch.bool)
        keep[r] = False
        assert torch.equal(lin.weight.detach()[keep], pre[name + ".weight"][keep])
        assert not torch.equal(lin.weight.detach()[~keep], pre[name + ".weight"][~keep])


def test_trainer_callback_stage_per_epoch(tmp_path):
    from fusedtune.hft import HFTCallback
    model = tiny(layers=2)
    cb = HFTCallback(seed=1, stage_every="epoch")
    trainer = _trainer(model, tmp_path, [cb], steps=-1, args_kw={"num_train_epochs": 2})   # 4 steps per epoch
    seen = []
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(cb.tuner.stage)

    trainer.add_callback(Spy())
    trainer.train()
    assert seen == [0] * 4 + [1] * 4


@needs_rows
def test_row_granularity_trainer_default_optimizer_writes_rows_back_and_changes_stage(tmp_path):
    from fusedtune.hft import HFTCallback
    model = tiny(layers=2)
    pre = params_of(model)
    cb = HFTCallback(granularity="row", seed=3, stage_every=2, merge_on_train_end=False)
    trainer = _trainer(model, tmp_path, [cb], steps=4)
    rows0 = {n: m.rows.clone() for n, m in cb.tuner.row_layers().items()}
    with pytest.warns(UserWarning, match="copies the trained rows"):
        trainer.train()
    assert cb.tuner.stage == 1 and cb._write_back
    opt = _inner(trainer.optimizer)
    assert not hasattr(opt, "state_bytes")                    # the Trainer's own torch AdamW
    masters = [m.weight_rows for m in cb.tuner.row_layers().values()]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in masters) and in_opt == {id(p) for p in cb.tuner.trainable_parameters()}
    for name, mod in cb.tuner.row_layers().items():
        assert torch.equal(mod.weight.detach()[mod.rows], mod.weight_rows.detach().to(mod.weight.dtype))
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[rows0[name]] = False
        keep[mod.rows] = False                                 # frozen in both stages
        assert torch.equal(mod.weight.detach()[keep], pre[name + ".weight"][keep]), name
        assert not torch.equal(mod.weight.detach()[~keep], pre[name + ".weight"][~keep]), name


@needs_rows
def test_patch_method_hft_rows():
    import fusedtune.methods.hft  # noqa: F401
    from fusedtune.patch import patch, unpatch
    model = tiny(layers=2)
    rep = patch(model, "hft", granularity="row", lr=1e-2)
    row_rows = [r for r in rep.rows if r.name.endswith("_proj")]
    assert len(row_rows) == 14 and all("rows train" in r.path for r in row_rows)
    assert all(r.backend in ("cpu", "reference", "cuda", "triton") for r in row_rows)
    ids = batch()
    rep.step(lambda: model(input_ids=ids, labels=ids).loss)
    unpatch(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())


def test_lazy_snapshot_refuses_to_reset_what_changed_while_frozen():
    """snapshot='lazy' never copied a frozen parameter; if it was modified in place anyway, reset names
    it and restores nothing (rather than leaving it silently wrong)."""
    model = tiny(layers=2)
    pre = params_of(model)
    hft = HalfFineTuner(model, seed=0, snapshot="lazy")
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad and n.endswith("proj.weight"))
    train(model, torch.optim.AdamW(hft.trainable_parameters(), lr=1e-2), steps=2)
    after = params_of(model)
    with torch.no_grad():
        model.get_parameter(frozen).mul_(2)
    with pytest.raises(HFTError, match=frozen.replace(".", "\\.")):
        hft.reset("all")
    for n, p in model.named_parameters():              # nothing was reset
        if n != frozen:
            assert torch.equal(p.detach(), after[n]), n
    with pytest.raises(HFTError, match="snapshot=True"):
        hft.reset("frozen", names=[frozen])
    hft.reset("selected")                              # what trains was copied: still restorable
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), pre[n]), n
    with pytest.raises(HFTError, match="snapshot must be"):
        HalfFineTuner(tiny(layers=2), snapshot="yes")


def test_lazy_snapshot_survives_rewrites_with_the_same_values_and_refuses_what_changed_before_training():
    """A load_state_dict of the same values (Trainer's load_best_model_at_end, a resume, DDP's broadcast)
    moves the version counters but not the bits: reset still works. A parameter that changed while
    frozen and then trains in a later stage has no pretrained copy: reset('selected') names it."""
    model = tiny(layers=4)
    pre = params_of(model)
    hft = HalfFineTuner(model, seed=4, snapshot="lazy")
    model.load_state_dict(model.state_dict())           # same values, new versions
    train(model, torch.optim.AdamW(hft.trainable_parameters(), lr=1e-2), steps=2)
    model.load_state_dict(model.state_dict())
    hft.reset("all")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]), n
    stage0 = {n for n, p in model.named_parameters() if p.requires_grad}
    stage1 = set(n for n, v in hft.selection(1).items() if v is True)
    late = next(n for n in sorted(stage1 - stage0) if n.endswith("proj.weight"))
    with torch.no_grad():
        model.get_parameter(late).add_(1.0)             # changed while frozen, before stage 1 trains it
    hft.next_stage()
    assert model.get_parameter(late).requires_grad
    with pytest.raises(HFTError, match=late.replace(".", "\\.") + ".*no pretrained copy"):
        hft.reset("selected")


@needs_rows
def test_lazy_snapshot_in_row_granularity_restores_everything():
    model = tiny("qwen2", layers=2)
    pre = params_of(model)
    hft = HalfFineTuner(model, granularity="row", seed=2, snapshot="lazy")
    train(model, hft.make_optimizer(lr=1e-2), steps=2)
    hft.next_stage()
    train(model, hft.make_optimizer(lr=1e-2), steps=2)
    hft.remove(restore=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), pre[n]), n


_FAMILIES = {"opt": dict(ffn_dim=40, word_embed_proj_dim=32), "phi3": {}, "phi": {}, "starcoder2": {},
             "gpt_neox": {}, "falcon": {}, "bloom": {}, "olmo2": {}}


def _family(model_type, layers=4):
    kw = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, **_FAMILIES[model_type])
    if model_type == "falcon":
        kw.pop("head_dim")          # a derived property there
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw))


@pytest.mark.parametrize("model_type", sorted(_FAMILIES))
def test_other_families_take_the_category_rule(model_type):
    """Phi-3's fused qkv_proj / gate_up_proj, OPT's fc1 / fc2, GPT-NeoX / Falcon / BLOOM's query_key_value:
    half of each layer's attention and MLP matrices (balanced over the layers when a count is odd) and of
    its norms train, everything else stays bit for bit; row granularity keeps frozen rows."""
    model = _family(model_type)
    before = params_of(model)
    hft = HalfFineTuner(model, seed=3)
    L = len(hft.map.layers)
    for cat in ("attn", "mlp", "norm"):
        n = len(getattr(hft.map.layers[0], cat if cat != "norm" else "norms"))
        counts = [len(m[cat]) for m in hft.members()]
        assert sum(counts) == (n * L) // 2 and all(n // 2 <= c <= (n + 1) // 2 for c in counts), (cat, counts)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    train(model, hft.make_optimizer(lr=1e-2, weight_decay=0.1), steps=2)
    after = dict(model.named_parameters())
    assert frozen and all(torch.equal(after[n].detach(), before[n]) for n in frozen)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in after.items() if p.requires_grad)
    hft.remove()
    if _row_linear() is None:
        return
    model = _family(model_type, layers=2)
    before = params_of(model)
    hft = HalfFineTuner(model, granularity="row", seed=3)
    assert len(hft.row_layers()) == 2 * (len(hft.map.layers[0].attn) + len(hft.map.layers[0].mlp))
    train(model, hft.make_optimizer(lr=1e-2), steps=2)
    for name, mod in hft.row_layers().items():
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[mod.rows] = False
        assert torch.equal(mod.weight.detach()[keep], before[name + ".weight"][keep]), name
        assert not torch.equal(mod.weight.detach()[~keep], before[name + ".weight"][~keep]), name


def test_trainer_callback_refuses_stage_changes_with_several_processes():
    """Found by audit: under DDP (the wrapper fixed the trainable set) a stage change let the ranks train apart
    without a word. The callback sees the Trainer's world size at on_init_end."""
    from types import SimpleNamespace

    from fusedtune.hft import HFTCallback
    model = tiny(layers=2)
    with pytest.raises(HFTError, match=r"stage_every=2\) with 2 processes"):
        HFTCallback(seed=0, stage_every=2).on_init_end(SimpleNamespace(world_size=2), None, None, model=model)
    assert all(p.requires_grad for p in model.parameters())       # nothing applied
    cb = HFTCallback(seed=0, stage=1)                              # one stage per Trainer: fine
    cb.on_init_end(SimpleNamespace(world_size=2, resume_from_checkpoint=None), None, None, model=model)
    assert cb.tuner.stage == 1


def test_trainer_callback_leaves_deepspeeds_optimizer_alone_or_refuses():
    """Found by review: under DeepSpeed the callback's sync replaced ZeRO's flattened partition in its optimizer
    by the model's parameters (which get no gradients there): nothing would train. Matrix granularity selected
    at on_init_end (before the engine is built) leaves the optimizer as it is; what needs the optimizer
    adjusted is refused by name."""
    from types import SimpleNamespace

    from fusedtune.hft import HFTCallback
    args = SimpleNamespace(world_size=1, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, epoch=0.0)

    def wrapped():
        flat = torch.nn.Parameter(torch.zeros(32))
        return flat, DeepSpeedWrapped(ZeroLike(torch.optim.AdamW([flat], lr=1e-3)))

    cb = HFTCallback(seed=0, stage=1)
    model = tiny(layers=2)
    cb.on_init_end(args, state, None, model=model)
    flat, opt = wrapped()
    cb.on_train_begin(args, state, None, model=model, optimizer=opt)
    assert [p for g in opt.param_groups for p in g["params"]] == [flat]
    late = HFTCallback(seed=0)                                   # added after the Trainer (and the engine) was made
    flat, opt = wrapped()
    with pytest.raises(HFTError, match="added after the Trainer was made"):
        late.on_train_begin(args, state, None, model=tiny(layers=2), optimizer=opt)
    rows = HFTCallback(seed=0, granularity="row")
    model = tiny(layers=2)
    rows.on_init_end(args, state, None, model=model)
    with pytest.raises(HFTError, match="row granularity"):
        rows.on_train_begin(args, state, None, model=model, optimizer=opt)
    assert [p for g in opt.param_groups for p in g["params"]] == [flat]
