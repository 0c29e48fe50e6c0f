"""LoRA adapters built on a meta-device model (init_empty_weights / torch.device("meta"), then patch): they wait
for values. Loaded (load_state_dict(assign=True), load_adapter) they run; still on meta, or given uninitialised
memory by to_empty, every use of them is refused until they are loaded or initialised (init_adapters)."""
import math

import pytest
import torch
from torch import nn

import fusedtune
import fusedtune.lora as FL
from fusedtune.nn import LoRALinear

transformers = pytest.importorskip("transformers")
CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2)
IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))


def _llama(meta: bool):
    cfg = transformers.LlamaConfig(**CFG)
    if not meta:
        return transformers.LlamaForCausalLM(cfg)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def _meta_layer(bias=False):
    with torch.device("meta"):
        lin = nn.Linear(24, 20, bias=bias)
    return LoRALinear.from_linear(lin, r=4, backend="reference", lora_bias=bias)


def test_a_patched_meta_model_runs_once_its_saved_state_dict_is_assigned():
    """The resume-without-two-copies recipe: build on meta, patch, load_state_dict(saved, assign=True) of a
    patched model: the same logits, bit for bit, and the adapters train (the base stays frozen)."""
    torch.manual_seed(0)
    ref = _llama(False)
    fusedtune.patch(ref, "lora", backend="reference", init_lora_weights=False)   # B != 0: the adapters matter
    m = _llama(True)
    fusedtune.patch(m, "lora", backend="reference")
    q = m.model.layers[0].self_attn.q_proj
    assert q.waiting_adapters() == ["default"]
    m.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" not in k}, assign=True, strict=False)
    with pytest.raises(ValueError, match=r"LoRALinear.forward: adapter\(s\) \['default'\] were built on the meta "
                                         r"device.*still on the meta device"):
        q(torch.randn(3, 32))
    m.load_state_dict(ref.state_dict(), assign=True)
    assert not q.waiting_adapters()
    for name, b in list(m.named_buffers()):   # rotary inv_freq is not in a state dict (transformers' own matter)
        if b.is_meta:
            mod, _, attr = name.rpartition(".")
            setattr(m.get_submodule(mod), attr, ref.get_buffer(name).clone())
    assert torch.equal(m(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert q.lora_A["default"].weight.requires_grad and not q.base_layer.weight.requires_grad


def test_to_empty_memory_is_refused_until_init_adapters_gives_peft_initial_values():
    """to_empty gives a waiting adapter uninitialised memory: forward, merge, delta_weight and save_adapter are
    refused (before: NaN or garbage output, silently); init_adapters gives A kaiming-uniform and B zero (and the
    lora_bias zero), so the layer computes its base's output."""
    torch.manual_seed(0)
    layer = _meta_layer(bias=True)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.weight.normal_()
        layer.base_layer.bias.normal_()        # (the adapters keep to_empty's memory: unwritten)
    x, w0 = torch.randn(3, 24), layer.base_layer.weight.detach().clone()
    for call, what in [(lambda: layer(x), "forward"), (layer.merge, "merge"),
                       (lambda: layer.delta_weight("default"), "delta_weight")]:
        with pytest.raises(ValueError, match=f"LoRALinear.{what}: .*to_empty gave them uninitialised memory"):
            call()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged_adapters
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"save_adapter \(0\): .*init_adapters"):
        FL.save_adapter(model, "/nonexistent/never-written")
    assert FL.init_adapters(model) == ["0.default"]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert torch.count_nonzero(B.weight) == 0 and torch.count_nonzero(B.bias) == 0
    bound = 1 / math.sqrt(24)                      # kaiming_uniform(a=sqrt(5)) over fan_in 24, as peft and nn.Linear
    assert A.weight.abs().max() <= bound and A.weight.abs().max() > bound / 2
    assert torch.allclose(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)
    assert FL.init_adapters(model) == []           # initialised once: a second call leaves trained values alone


def test_init_adapters_while_the_base_is_meta_too_is_refused_and_changes_nothing():
    layer = _meta_layer()
    with pytest.raises(ValueError, match=r"init_adapters \(0\): adapter 'default' and the base weight are on the "
                                         r"meta device; load the base"):
        FL.init_adapters(nn.Sequential(layer))
    assert layer.waiting_adapters() == ["default"] and layer.lora_A["default"].weight.is_meta
    y = layer(torch.randn(2, 24, device="meta"))     # a meta forward (shape inference) is not refused
    assert y.shape == (2, 20) and y.is_meta


def test_meta_adapters_over_a_loaded_base_are_initialised_in_place_of_their_own():
    """Found by review: with the base assigned and the adapters still meta, the cure the errors named was
    model.to_empty, which wiped the loaded base. init_adapters gives the adapters memory of their own instead."""
    layer = _meta_layer(bias=True)
    w, b = torch.randn(20, 24), torch.randn(20)
    layer.base_layer.load_state_dict({"weight": w, "bias": b}, assign=True)
    assert FL.init_adapters(nn.Sequential(layer)) == ["0.default"]
    assert torch.equal(layer.base_layer.weight, w) and not layer.waiting_adapters()
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0 and not layer.lora_B["default"].bias.is_meta
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=0, atol=1e-6)


def test_adapters_given_new_tensors_by_any_loader_are_ready():
    """Found by review: accelerate's loaders (set_module_tensor_to_device) and swap_tensors set parameters directly;
    the adapters stayed 'waiting' and init_adapters, the cure the error named, reset the loaded values."""
    layer = _meta_layer()
    layer.base_layer.weight = nn.Parameter(torch.randn(20, 24), requires_grad=False)
    A, B = torch.randn(4, 24), torch.randn(20, 4)
    layer.lora_A["default"].weight = nn.Parameter(A)
    layer.lora_B["default"].weight = nn.Parameter(B)
    assert layer.waiting_adapters() == [] and FL.init_adapters(nn.Sequential(layer)) == []
    assert torch.equal(layer.lora_B["default"].weight, B)


def test_load_adapter_into_a_meta_built_model_assigns_the_files_tensors(tmp_path):
    """load_adapter copied into the meta adapters: a no-op on meta, silently (the adapter stayed empty)."""
    torch.manual_seed(0)
    ref = _llama(False)
    fusedtune.patch(ref, "lora", backend="reference", init_lora_weights=False)
    FL.save_adapter(ref, str(tmp_path))
    m = _llama(True)
    fusedtune.patch(m, "lora", backend="reference")
    FL.load_adapter(m, str(tmp_path))
    m.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" not in k}, assign=True, strict=False)
    for name, lay in FL.lora_layers(m).items():
        want = FL.lora_layers(ref)[name]
        assert not lay.waiting_adapters()
        assert torch.equal(lay.lora_B["default"].weight, want.lora_B["default"].weight)
        x = torch.randn(2, lay.in_features)
        assert torch.equal(lay(x), want(x))


def test_a_copying_load_into_meta_adapters_and_to_empty_after_loading_leave_them_waiting(tmp_path):
    """Found by review: load_state_dict without assign=True copies nothing into meta adapters (torch only warns),
    yet they counted as loaded; and to_empty after load_adapter gave the loaded adapters new memory unseen. Both
    left NaN/garbage outputs without an error; they wait (and are refused) instead."""
    import warnings
    torch.manual_seed(0)
    ref = _llama(False)
    fusedtune.patch(ref, "lora", backend="reference", init_lora_weights=False)
    m = _llama(True)
    fusedtune.patch(m, "lora", backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # (torch: "copying from a non-meta parameter ... is a no-op")
        m.load_state_dict(ref.state_dict())
    q = m.model.layers[0].self_attn.q_proj
    assert q.waiting_adapters() == ["default"]
    FL.save_adapter(ref, str(tmp_path))
    FL.load_adapter(m, str(tmp_path))
    assert not q.waiting_adapters() and not q.lora_A["default"].weight.is_meta
    m.to_empty(device="cpu")
    assert q.waiting_adapters() == ["default"]
    with pytest.raises(ValueError, match="to_empty gave them uninitialised memory"):
        q(torch.randn(2, 32))
