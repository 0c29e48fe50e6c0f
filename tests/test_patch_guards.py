"""patch / unpatch edges found by review (each test fails on the code before): PiSSA/OLoRA on a tied lm_head, QLoRA's
unpatch(merge=False) of a tied lm_head, a PatchReport stepping after unpatch."""
import pytest
import torch

import fusedtune
from fusedtune.patch import PatchError

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def tied_qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_decomposing_init_on_a_tied_lm_head_is_refused(init):
    """The residual W - s B A was written into the weight the input embedding shares (output off at step 0)."""
    model = tied_qwen2()
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(PatchError, match="shared with \\['model.embed_tokens'\\].*own weight first"):
        fusedtune.patch(model, "lora", r=4, init_lora_weights=init, target_modules=["lm_head"])
    assert torch.equal(model.model.embed_tokens.weight, emb) and model.lm_head.weight is model.model.embed_tokens.weight


def test_qlora_unpatch_without_merge_gives_a_tied_lm_head_its_exact_weight_back():
    """The NF4 layer never wrote the shared weight; unpatch(merge=False) copied its dequantized base into it."""
    pytest.importorskip("bitsandbytes")
    model = tied_qwen2()
    emb = model.model.embed_tokens.weight.detach().clone()
    fusedtune.patch(model, "qlora", target_modules=["lm_head"])
    fusedtune.unpatch(model, merge=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)


@pytest.mark.parametrize("method", ["lora", "full", "mezo"])
def test_a_report_refuses_to_step_after_unpatch(method):
    model = tied_qwen2()
    rep = fusedtune.patch(model, method)
    fusedtune.unpatch(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PatchError, match="the model was unpatched"):
        rep.step(lambda: model(IDS, labels=IDS).loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_qlora_follows_a_dtype_conversion_after_patching():
    """model.to(bf16) after a qlora patch: the NF4 layers compute in bf16, and unpatch gives bf16 linears (they came
    back float32, and the next forward failed)."""
    pytest.importorskip("bitsandbytes")
    model = tied_qwen2()
    fusedtune.patch(model, "qlora")
    model.to(torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16
    fusedtune.unpatch(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model(IDS).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("method,opts,why", [
    ("lora", {"use_dora": "no"}, "use_dora='no': takes True or False"),     # a truthy string turned DoRA on
    ("lora", {"lr": "1e-3"}, "lr='1e-3': takes a number"),
    ("lora", {"dropout": True}, "dropout=True: takes a number"),
    ("lora", {"betas": 0.9}, r"betas=0.9: takes 2 numbers"),
    ("lora", {"adapter_dtype": "bf16"}, "adapter_dtype='bf16': takes a torch.dtype"),
    ("hft", {"granularity": 1}, "granularity=1: takes a string"),
    ("mezo", {"fold": 1}, "fold=1: takes True or False"),
])
def test_patch_options_of_the_wrong_type_are_refused_before_any_change(method, opts, why):
    model = tied_qwen2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PatchError, match=why):
        fusedtune.patch(model, method, **opts)
    assert not any(isinstance(m, fusedtune.nn.LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patch_options_take_what_their_defaults_stand_for():
    """ints for float options, lists for betas, a name where the option takes one (init_lora_weights, snapshot)."""
    fusedtune.patch(tied_qwen2(), "lora", alpha=8.0, lr=1, betas=[0.9, 0.99], init_lora_weights="gaussian")
    fusedtune.patch(tied_qwen2(), "hft", snapshot="lazy")


def test_a_patched_tied_lm_head_saves_with_save_pretrained(tmp_path):
    """The tied weight moved to lm_head.base_layer.weight, a name transformers did not know as tied: safetensors
    refused the shared tensor (save_pretrained and every Trainer checkpoint failed; found by review)."""
    from safetensors.torch import load_file
    model = tied_qwen2()
    fusedtune.patch(model, "lora", r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.base_layer.weight" not in saved and "model.embed_tokens.weight" in saved
    again = tied_qwen2()
    fusedtune.patch(again, "lora", r=4, target_modules=["q_proj", "lm_head"])
    missing, unexpected = again.load_state_dict(saved, strict=False)
    assert missing == ["lm_head.base_layer.weight"] and not unexpected   # the tied copy, loaded with the embedding
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("method,opts,what", [
    ("lora", {"use_dora": True}, "LoRALinear.add_adapter"), ("qlora", {}, "qlora"),
    ("sparse_delta", {}, "SparseDeltaLinear.from_linear"), ("hft", {"granularity": "row"}, "HalfFineTuner"), ("hft", {}, "HalfFineTuner"),
    ("mezo", {}, "zo_apply_")])
def test_a_model_on_the_meta_device_is_refused_where_values_are_made_now(method, opts, what):
    """A model built on meta (init_empty_weights) and patched: new adapters, delta positions and row masters would
    hold garbage after to_empty, with no error (found by review: LoRA's output was NaN, DoRA's magnitude never set,
    SparseDeltaLinear's indices unsorted and out of range); refused, naming the cause, nothing changed. (Plain LoRA
    adapters wait for values instead: tests/test_lora_meta.py.)"""
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(cfg)
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=f"{what}.*meta device"):
        fusedtune.patch(model, method, **opts)
    assert [type(m) for m in model.modules()] == kinds and fusedtune.report(model).method is None
    assert all(p.requires_grad for p in model.parameters())


def test_report_step_refuses_trainable_parameters_its_optimizer_lacks():
    """An adapter added after patch (add_adapter + set_adapter) trains, gets gradients, and report.step's optimizer
    never held it: the loss stayed flat, silently (found by audit). Refused before anything runs."""
    from fusedtune.lora import lora_layers
    model = tied_qwen2()
    rep = fusedtune.patch(model, "lora", r=4, target_modules=["q_proj"])
    for lay in lora_layers(model).values():
        lay.add_adapter("task2", r=2)           # (becomes the active, trainable one)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for r in (rep, fusedtune.report(model)):       # (the report fusedtune.report gives checks it too)
        with pytest.raises(PatchError, match=r"report.step: 2 parameter\(s\) of the model train .*lora_A.task2.weight"):
            r.step(lambda: model(input_ids=IDS, labels=IDS).loss)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    rep.optimizer.add_param_group({"params": [p for n, p in model.named_parameters() if "task2" in n]})
    rep.step(lambda: model(input_ids=IDS, labels=IDS).loss)
    assert not torch.equal(model.get_parameter(next(n for n in before if "lora_B.task2" in n)),
                           before[next(n for n in before if "lora_B.task2" in n)])


@pytest.mark.parametrize("method", ["full", "mezo"])
def test_weight_decay_spares_biases_and_norms_as_trainer_does(method):
    """patch(..., weight_decay=w) decayed every parameter, RMSNorm gains and q/k/v biases included (found by audit);
    transformers.Trainer and MeZO's own code exempt them. The groups now are Trainer's own split."""
    model = tied_qwen2()
    want = set(transformers.Trainer.get_decay_parameter_names(None, model))
    rep = fusedtune.patch(model, method, weight_decay=0.1, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in rep.optimizer.param_groups}
    want &= set(names.values())                  # (Trainer lists the tied lm_head.weight under both names)
    assert set(groups) == {0.1, 0.0} and groups[0.1] == want
    assert any("q_proj.bias" in n for n in groups[0.0]) and any("norm" in n for n in groups[0.0])
    assert len(groups[0.0]) + len(want) == len(names)
    if method == "mezo":     # its report counts the parameters of each dtype (indices across the two groups)
        fusedtune.unpatch(model)
        model.to(torch.bfloat16)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.data = p.data.float()
        rep = fusedtune.patch(model, method, weight_decay=0.1)
        by_dtype = {}
        for p in model.parameters():
            by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel()
        got = {r.name.split(", ")[1]: r.params for r in rep.rows}
        assert got == {k.replace("torch.", ""): v for k, v in by_dtype.items()}


def test_half_fine_tuner_optimizer_spares_norms_with_its_default_weight_decay():
    """Found by review: make_optimizer(lr=...) (weight_decay left to MaskedAdamW's default 0.01) decayed the norms."""
    from fusedtune.hft import HalfFineTuner
    model = tied_qwen2()
    opt = HalfFineTuner(model).make_optimizer(lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd["model.norm.weight"] == 0.0 and wd["model.layers.0.self_attn.q_proj.bias"] == 0.0
    assert {v for n, v in wd.items() if "norm" not in n and "bias" not in n} == {0.01}


def test_roste_names_the_layer_it_cannot_rotate():
    """(it raised the op's bare 'hadamard: size 200 ... not supported', naming no layer and no way out)"""
    from tiny_models import tiny_llama
    model = tiny_llama(hidden=200, intermediate=256)
    with pytest.raises(PatchError, match=r"input size of model\.layers\.0\.self_attn\.q_proj 200 has no Hadamard "
                                         r"construction.*rotate=False.*Nothing was changed"):
        fusedtune.patch(model, "roste")
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")} == {"Linear"}
    rep = fusedtune.patch(model, "roste", rotate=False)
    assert len(rep.rows) == 14
