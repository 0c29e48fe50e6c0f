"""LoRA adapters as files in peft's format: bit-exact round trips, peft reads ours, we read peft's."""
import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import fusedtune  # noqa: E402
from fusedtune.lora import load_adapter, save_adapter  # noqa: E402
from fusedtune.patch import PatchError  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402


def _model():
    return tiny_llama()


def _trained(model, r=4):
    fusedtune.patch(model, "lora", r=r, alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for m in fusedtune.lora.lora_layers(model).values():
            m.lora_B["default"].weight.normal_()
    return model


def test_round_trip_is_bit_exact(tmp_path):
    a = _trained(_model())
    cfg = save_adapter(a, tmp_path)
    assert cfg["r"] == 4 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    b = _model()
    fusedtune.patch(b, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    loaded = load_adapter(b, tmp_path)
    assert len(loaded) == 6
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_peft_reads_ours_and_we_read_peft(tmp_path):
    ours = _trained(_model())
    save_adapter(ours, tmp_path / "ours")
    ids = torch.randint(0, 64, (2, 9))
    pm = peft.PeftModel.from_pretrained(_model(), str(tmp_path / "ours"))
    torch.testing.assert_close(pm(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
    # peft's own file (with a per-module rank) into an unpatched-adapter model: adapters are added
    pm2 = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        rank_pattern={"model.layers.1.self_attn.q_proj": 6},
                                                        init_lora_weights=False))
    pm2.save_pretrained(str(tmp_path / "peft"))
    m = _model()
    fusedtune.patch(m, "lora", r=2, target_modules=["q_proj", "v_proj"])
    load_adapter(m, tmp_path / "peft", adapter_name="from_peft")
    for lay in fusedtune.lora.lora_layers(m).values():
        lay.set_adapter("from_peft")
    assert fusedtune.lora.lora_layers(m)["model.layers.1.self_attn.q_proj"].r["from_peft"] == 6
    torch.testing.assert_close(m(ids).logits, pm2(ids).logits, atol=1e-5, rtol=1e-5)


def test_an_adapter_loaded_under_a_new_name_is_inactive_and_frozen_as_peft_loads_it(tmp_path):
    """The loaded adapter was activated and the trained one frozen: the optimizer of the patch then stepped
    frozen parameters (nothing trained) and the forward ran the loaded adapter."""
    save_adapter(_trained(_model()), tmp_path)
    m = _model()
    rep = fusedtune.patch(m, "lora", r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = m(ids).logits
    load_adapter(m, tmp_path, adapter_name="ref")
    for lay in fusedtune.lora.lora_layers(m).values():
        assert lay.active_adapters == ["default"]
        assert all(p.requires_grad for p in lay._adapter_params("default"))
        assert not any(p.requires_grad for p in lay._adapter_params("ref"))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)
    Bs = [lay.lora_B["default"].weight for lay in fusedtune.lora.lora_layers(m).values()]
    held = {id(p) for g in rep.optimizer.param_groups for p in g["params"]}
    assert all(id(B) in held for B in Bs)
    start = [B.detach().clone() for B in Bs]
    rep.step(lambda: m(ids, labels=ids).loss)
    assert all(not torch.equal(a, B) for a, B in zip(start, Bs))    # (A has no gradient while B is zero)


def test_refusals_leave_the_model_untouched(tmp_path):
    a = _trained(_model())
    save_adapter(a, tmp_path)
    b = _model()
    fusedtune.patch(b, "lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="r=8, the file has r=4"):
        load_adapter(b, tmp_path)
    c = _model()
    fusedtune.patch(c, "lora", r=4, target_modules=["q_proj"])
    with pytest.raises(KeyError, match="no LoRALinear at"):
        load_adapter(c, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    with pytest.raises(ValueError, match="no LoRALinear layer"):
        save_adapter(_model(), tmp_path / "x")


def test_alpha_pattern_is_matched_as_peft_does_and_overwrites_take_the_file_settings(tmp_path):
    pm = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       alpha_pattern={"v_proj": 32}, init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    m = _model()
    fusedtune.patch(m, "lora", r=4, alpha=1, target_modules=["q_proj", "v_proj"])
    load_adapter(m, tmp_path)                       # overwrites "default" (alpha 1) with the file's alphas
    lay = fusedtune.lora.lora_layers(m)
    assert lay["model.layers.0.self_attn.v_proj"].scaling["default"] == 32 / 4
    assert lay["model.layers.0.self_attn.q_proj"].scaling["default"] == 8 / 4
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(m(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_models_are_refused_with_the_way_over(tmp_path):
    """patch() on a model holding peft's LoRA layers would stack adapters on peft's wrappers: refused, naming
    the way over (save_pretrained, unload, patch, load_adapter), which gives peft's outputs."""
    pm = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 9))
    want = pm(ids).logits
    for m in (pm, pm.get_base_model()):
        with pytest.raises(PatchError, match=r"holds peft layers .*load_adapter"):
            fusedtune.patch(m, "lora")
    pm.save_pretrained(str(tmp_path))
    base = pm.unload()
    fusedtune.patch(base, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    load_adapter(base, tmp_path)
    torch.testing.assert_close(base(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("alora_invocation_tokens", [5, 6]), ("use_qalora", True),
                                         ("layer_replication", [[0, 1]]), ("init_lora_weights", "mica"),
                                         ("init_lora_weights", "corda")])
def test_adapters_of_lora_variants_are_refused_not_loaded_as_plain_lora(tmp_path, field, value):
    """aLoRA (an adapter acting from its invocation tokens on) and the others loaded as plain LoRA, silently
    different from peft."""
    import json
    from fusedtune.ops.lora import LoRAUnsupported
    save_adapter(_trained(_model()), tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    m = _model()
    fusedtune.patch(m, "lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoRAUnsupported, match=field):
        load_adapter(m, tmp_path, adapter_name="other")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert all(set(lay.r) == {"default"} for lay in fusedtune.lora.lora_layers(m).values())


def test_target_modules_select_exactly_the_trained_layers(tmp_path):
    """The last names alone (["down_proj", "q_proj"] for layer 0's down_proj only) made peft put adapters on
    every module of those names; full names where the last names select more (found by review)."""
    m = _model()
    fusedtune.patch(m, "lora", r=4, target_modules=["model.layers.0.mlp.down_proj", "q_proj"])
    cfg = save_adapter(m, tmp_path)
    assert cfg["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                     "model.layers.1.self_attn.q_proj"]
    pm = peft.PeftModel.from_pretrained(_model(), str(tmp_path))
    got = sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A"))
    assert got == sorted(fusedtune.lora.lora_layers(m))
    assert save_adapter(_trained(_model()), tmp_path / "b")["target_modules"] == ["down_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_an_adapter_with_trained_biases_survives_load_and_save(tmp_path, bias):
    """peft's bias="lora_only"/"all": load_adapter loaded the biases, save_adapter wrote bias="none" without
    them, so peft read back another model (found by review)."""
    from tiny_models import tiny_llama
    base = tiny_llama(attention_bias=True)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                  bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.5)
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    m = copy.deepcopy(base)
    fusedtune.patch(m, "lora", r=4, alpha=8, target_modules=["q_proj"])
    load_adapter(m, tmp_path / "peft")
    cfg = save_adapter(m, tmp_path / "ours")
    assert cfg["bias"] == bias
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_loading_a_file_that_covers_fewer_layers_warns_about_the_rest(tmp_path):
    """A q/v-only file loaded into a model whose `default` adapter also covers down_proj: down_proj keeps its old
    (trained) values, and a user comparing checkpoints got a mixture without a word (found by audit; peft warns of
    missing adapter keys)."""
    src = tiny_llama()
    fusedtune.patch(src, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(src, tmp_path)
    b = _trained(_model())
    with pytest.warns(UserWarning, match=r"no weights for adapter 'default' of 2 LoRALinear layer\(s\) "
                                         r"\(model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj\)"):
        load_adapter(b, tmp_path)
    c = _trained(_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(c, tmp_path, adapter_name="other")    # a new name: nothing stale
