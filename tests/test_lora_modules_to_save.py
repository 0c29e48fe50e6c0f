"""LoRA with modules trained in full next to the adapters (peft's modules_to_save, e.g. embed_tokens and
lm_head for new tokens): patch trains them in the same optimizer, the adapter files carry them as peft
writes them (peft reads ours, we read peft's), unpatch(merge=False) restores them, overlaps are refused."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import fusedtune  # noqa: E402
from fusedtune.lora import load_adapter, save_adapter  # noqa: E402
from fusedtune.patch import PatchError  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
SAVE = ["embed_tokens", "lm_head"]
TARGETS = ["q_proj", "v_proj"]


def _trained(steps=3):
    m = tiny_llama()
    rep = fusedtune.patch(m, "lora", r=4, alpha=8, target_modules=TARGETS, modules_to_save=SAVE, lr=1e-2)
    for _ in range(steps):
        rep.step(lambda: m(IDS, labels=IDS).loss)
    return m, rep


def test_saved_modules_train_in_full_and_unpatch_restores_them():
    base = tiny_llama()
    m, rep = _trained()
    names = {r.name: r for r in rep.rows}
    assert names["lm_head"].params == 64 * 32 and names["model.embed_tokens"].params == 64 * 32
    assert rep.trainable_params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt_params = {id(p) for g in rep.optimizer.param_groups for p in g["params"]}
    assert id(m.lm_head.weight) in opt_params and id(m.model.embed_tokens.weight) in opt_params
    assert not torch.equal(m.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(m.model.embed_tokens.weight, base.model.embed_tokens.weight)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert "model.norm.weight" in frozen and "model.layers.0.mlp.up_proj.weight" in frozen
    merged = copy.deepcopy(m)
    fusedtune.unpatch(merged, merge=True)         # keeps what the full modules learned
    assert torch.equal(merged.lm_head.weight, m.lm_head.weight)
    fusedtune.unpatch(m, merge=False)             # back to the model as it was, flags too
    for (n, a), (_, b) in zip(m.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), n
    assert all(p.requires_grad for p in m.parameters())


def test_peft_reads_ours_and_we_read_peft(tmp_path):
    m, _ = _trained()
    cfg = save_adapter(m, tmp_path / "ours")
    assert cfg["modules_to_save"] == SAVE
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(pm(IDS).logits, m(IDS).logits, atol=1e-5, rtol=1e-5)
    # peft's file with trained full modules, into a model patched without modules_to_save
    pm2 = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            modules_to_save=SAVE, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "modules_to_save" in n:
                p.normal_()
    pm2.save_pretrained(str(tmp_path / "peft"))
    ours = tiny_llama()
    fusedtune.patch(ours, "lora", r=4, alpha=8, target_modules=TARGETS)
    loaded = load_adapter(ours, tmp_path / "peft")
    assert loaded[-2:] == ["lm_head.weight", "model.embed_tokens.weight"]
    torch.testing.assert_close(ours(IDS).logits, pm2(IDS).logits, atol=1e-5, rtol=1e-5)


def test_round_trip_is_bit_exact(tmp_path):
    a, _ = _trained()
    save_adapter(a, tmp_path)
    b = tiny_llama()
    fusedtune.patch(b, "lora", r=4, alpha=8, target_modules=TARGETS, modules_to_save=SAVE)
    load_adapter(b, tmp_path)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_refusals_leave_the_model_untouched(tmp_path):
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PatchError, match=r"modules_to_save \['model.layers.0.self_attn.q_proj'.*overlap"):
        fusedtune.patch(m, "lora", target_modules=TARGETS, modules_to_save=["q_proj"])
    with pytest.raises(PatchError, match=r"modules_to_save: .*\['no_such_module'\] matches none"):
        fusedtune.patch(m, "lora", target_modules=TARGETS, modules_to_save=["no_such_module"])
    assert fusedtune.report(m).method is None
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())
    a, _ = _trained(0)
    save_adapter(a, tmp_path)
    small = tiny_llama(vocab=48)
    fusedtune.patch(small, "lora", r=4, alpha=8, target_modules=TARGETS)
    keep = copy.deepcopy(small.state_dict())
    with pytest.raises(KeyError, match=r"lm_head.weight \(a modules_to_save weight \(64, 32\)\).*is \(48, 32\)"):
        load_adapter(small, tmp_path)
    assert all(torch.equal(v, keep[k]) for k, v in small.state_dict().items())


def _tied():
    import transformers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))


def test_a_tied_lm_head_is_refused_where_training_or_loading_it_would_change_the_embeddings(tmp_path):
    """lm_head tied to embed_tokens (Qwen2-0.5B, Llama-3.2-1B, Gemma): peft trains a copy; training or loading
    the shared weight in place changed the input embeddings too. Refused, model untouched; the advice given
    (an own weight) works; saving both trains the tied weight once."""
    m = _tied()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PatchError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        fusedtune.patch(m, "lora", r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not any(type(mod).__name__ == "LoRALinear" for mod in m.modules())
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())   # the advice
    m.config.tie_word_embeddings = False
    rep = fusedtune.patch(m, "lora", r=4, target_modules=TARGETS, modules_to_save=["lm_head"], lr=1e-2)
    emb = m.model.embed_tokens.weight.detach().clone()
    rep.step(lambda: m(IDS, labels=IDS).loss)
    assert torch.equal(m.model.embed_tokens.weight, emb)
    fusedtune.patch(_tied(), "lora", r=4, target_modules=TARGETS, modules_to_save=SAVE)   # both saved: accepted

    pm = peft.get_peft_model(_tied(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      modules_to_save=["lm_head"]))
    pm.save_pretrained(str(tmp_path))
    ours = _tied()
    fusedtune.patch(ours, "lora", r=4, alpha=8, target_modules=TARGETS)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="lm_head.weight .* is tied to model.embed_tokens.weight"):
        load_adapter(ours, tmp_path)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


def test_a_module_under_two_names_is_not_a_tie(tmp_path):
    """One module registered twice (an alias) holds its weight under two names: not tied to anything else,
    so modules_to_save and load_adapter take it (the tie check refused it by name)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
            self.aux = self.head

        def forward(self, x):
            return self.head(self.q_proj(x)) + self.aux(self.q_proj(x))
    m = Net()
    fusedtune.patch(m, "lora", r=2, target_modules=["q_proj"], modules_to_save=["head"])
    assert m.head.weight.requires_grad
    save_adapter(m, tmp_path)
    assert load_adapter(m, tmp_path)[-2:] == ["head.bias", "head.weight"]


def _peft_file(path, seed, save=("lm_head",)):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           modules_to_save=list(save), init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * (seed + 1))
    pm.save_pretrained(str(path))
    return pm


def test_modules_loaded_in_full_are_saved_back_and_a_second_copy_is_refused(tmp_path):
    """Found by audit: a peft file's modules_to_save loaded with load_adapter were left out of save_adapter (the
    re-saved adapter was 1.2 off in logits, read by peft), and a second adapter's file overwrote the head of the
    first (peft keeps one copy per adapter; fusedtune keeps one, so it refuses)."""
    pm = _peft_file(tmp_path / "a", 0)
    _peft_file(tmp_path / "b", 1)
    ours = tiny_llama()
    fusedtune.patch(ours, "lora", r=4, alpha=8, target_modules=TARGETS)
    load_adapter(ours, tmp_path / "a")
    cfg = save_adapter(ours, tmp_path / "again")
    assert cfg["modules_to_save"] == ["lm_head"]
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "again"))
    torch.testing.assert_close(back(IDS).logits, pm(IDS).logits, atol=1e-5, rtol=1e-5)
    head = ours.lm_head.weight.detach().clone()
    with pytest.raises(fusedtune.lora.LoRAUnsupported, match=r"trains 'lm_head' in full .*adapter 'default'"):
        load_adapter(ours, tmp_path / "b", adapter_name="other")
    assert torch.equal(ours.lm_head.weight, head)
    assert all("other" not in lay.r for lay in fusedtune.lora.lora_layers(ours).values())
    load_adapter(ours, tmp_path / "b")                    # under the same name: the file's head replaces it
    assert not torch.equal(ours.lm_head.weight, head)
    for lay in fusedtune.lora.lora_layers(ours).values():   # a deleted adapter trains nothing in full any more
        lay.add_adapter("keep", r=2)
        lay.delete_adapter("default")
    load_adapter(ours, tmp_path / "a", adapter_name="other")
