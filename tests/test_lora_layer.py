"""LoRALinear against peft's LoRA layer: forward and gradients for random configurations, several
adapters, mixed batches, set_scale, merge/unmerge, state-dict keys, peft round trips, what is refused,
and the 'lora' patch method on a transformers model."""
import copy
import math
import random

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

import fusedtune  # noqa: E402
from fusedtune.nn import LoRALinear  # noqa: E402
from fusedtune.nn.lora import LoRAUnsupported  # noqa: E402
from fusedtune.testing import assert_within_rule  # noqa: E402
from lora_cases import SeededDropout, exact64, layer_outputs  # noqa: E402
from tiny_models import tiny_llama, train_losses  # noqa: E402


def _peft(lin, name="default", r=4, alpha=8, dropout=0.0, rslora=False, **kw):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, init_lora_weights=False, **kw)
    return peft_layer.Linear(lin, name, config=cfg, r=r, lora_alpha=alpha)


def _rand_config(i):
    rnd = random.Random(i)
    return dict(K=rnd.choice([1, 17, 64, 129]), N=rnd.choice([3, 31, 96]), r=rnd.choice([1, 2, 8, 33, 256]),
                alpha=rnd.choice([1, 8, 32]), bias=rnd.random() < 0.5, rslora=rnd.random() < 0.5,
                dtype=rnd.choice([torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("i", range(10))
def test_forward_and_grads_match_peft(i):
    c = _rand_config(i)
    torch.manual_seed(i)
    lin = nn.Linear(c["K"], c["N"], bias=c["bias"]).to(c["dtype"])
    pe = _peft(lin, r=c["r"], alpha=c["alpha"], rslora=c["rslora"])
    pe.lora_A["default"].float()
    pe.lora_B["default"].float()
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x = torch.randn(2, 13, c["K"]).to(c["dtype"])
    dy = torch.randn(2, 13, c["N"]).to(c["dtype"])
    res = {"peft": layer_outputs(pe, x, dy), "ours": layer_outputs(ours, x, dy)}
    s = pe.scaling["default"]
    assert s == pytest.approx(c["alpha"] / (math.sqrt(c["r"]) if c["rslora"] else c["r"]))
    y64, g64 = exact64(x, lin.weight, [pe.lora_A["default"].weight], [pe.lora_B["default"].weight], [s],
                       lin.bias, dy=dy)
    atol = 1e-5 if c["dtype"] == torch.float32 else 2e-2
    for j, (a, p, e) in enumerate(zip(res["ours"], res["peft"], [y64] + g64)):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_within_rule(a.reshape(e.shape), e, p.reshape(e.shape), f"config {c} output {j}", atol=atol)


def test_state_dict_keys_are_peft_keys_and_load_both_ways():
    lin = nn.Linear(20, 12)
    pe = _peft(copy.deepcopy(lin))
    ours = LoRALinear.from_linear(copy.deepcopy(lin), r=4, alpha=8)
    assert sorted(ours.state_dict()) == sorted(pe.state_dict())
    ours.load_state_dict(pe.state_dict())
    x = torch.randn(3, 20)
    torch.testing.assert_close(ours(x), pe(x))


def test_several_adapters_active_and_mixed_batches_match_peft():
    torch.manual_seed(1)
    lin = nn.Linear(24, 16)
    pe = _peft(lin, "a", r=3, alpha=6)
    pe.update_layer("b", 7, 3.0, LoraConfig(r=7, lora_alpha=3.0, init_lora_weights=False))
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x = torch.randn(4, 5, 24)
    for active in (["a"], ["b"], ["a", "b"]):
        pe.set_adapter(active)
        ours.set_adapter(active)
        torch.testing.assert_close(ours(x), pe(x), atol=1e-5, rtol=1e-5)
    names = ["b", "__base__", "a", "b"]
    pe.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, adapter_names=names), pe(x, adapter_names=names), atol=1e-5, rtol=1e-5)
    assert ours.lora_A["a"].weight.requires_grad and ours.lora_A["b"].weight.requires_grad
    ours.set_adapter("a")
    assert not ours.lora_A["b"].weight.requires_grad


def test_set_scale_and_scale_layer_follow_peft():
    lin = nn.Linear(10, 6)
    pe = _peft(lin, r=2, alpha=4, rslora=True)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x = torch.randn(3, 10)
    pe.set_scale("default", 0.3)
    ours.set_scale("default", 0.3)
    assert ours.scaling["default"] == pytest.approx(pe.scaling["default"])
    torch.testing.assert_close(ours(x), pe(x))
    ours.scale_layer(2.0)
    pe.scale_layer(2.0)
    torch.testing.assert_close(ours(x), pe(x))
    ours.unscale_layer(4.0)
    pe.unscale_layer(4.0)
    assert ours.scaling["default"] == pytest.approx(pe.scaling["default"])
    torch.testing.assert_close(ours(x), pe(x))
    ours.unscale_layer()                  # None: back to alpha / sqrt(r) (rslora)
    pe.unscale_layer()
    assert ours.scaling["default"] == pytest.approx(pe.scaling["default"]) == 4 / math.sqrt(2)
    torch.testing.assert_close(ours(x), pe(x))
    assert ours.get_base_layer() is ours.base_layer and pe.get_base_layer() is pe.base_layer


def test_merge_takes_peft_argument_order():
    """merge(safe_merge, adapter_names) positionally, as peft's: merge(True) is a safe merge; an adapter name
    in safe_merge's place is refused with the signature, the weight untouched."""
    torch.manual_seed(4)
    lin = nn.Linear(12, 6)
    pe = _peft(lin, r=2, alpha=4)
    nn.init.normal_(pe.lora_B["default"].weight)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    w0 = ours.base_layer.weight.detach().clone()
    with pytest.raises(TypeError, match="peft's order.*adapter_names="):
        ours.merge(["default"])
    assert torch.equal(ours.base_layer.weight, w0) and not ours.merged
    ours.merge(True, ["default"])
    pe.merge(True, ["default"])
    assert ours.merged_adapters == pe.merged_adapters == ["default"]
    torch.testing.assert_close(ours.base_layer.weight, pe.base_layer.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_unmerge_round_trip_is_exact(dtype):
    torch.manual_seed(2)
    ours = LoRALinear.from_linear(nn.Linear(32, 16).to(dtype), r=4, alpha=8, init_lora_weights=False)
    w0 = ours.base_layer.weight.detach().clone()
    x = torch.randn(5, 32).to(dtype)
    y = ours(x)
    ours.merge()
    assert ours.merged and not torch.equal(ours.base_layer.weight, w0)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), y, **tol)       # merged forward = adapter forward (one rounding of W)
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, w0)      # bit-exact restore
    torch.testing.assert_close(ours(x), y)


def test_unmerge_without_stash_is_within_merge_rounding_and_safe_merge_refuses():
    torch.manual_seed(3)
    ours = LoRALinear.from_linear(nn.Linear(32, 16).bfloat16(), r=4, alpha=8, init_lora_weights=False)
    w0 = ours.base_layer.weight.detach().clone()
    ours.merge(exact_unmerge=False)
    ours.unmerge()
    # subtracting the delta again: off by at most the two roundings (1 ulp of the merged and the result)
    err = (ours.base_layer.weight.float() - w0.float()).abs()
    ulp = w0.float().abs().clamp_min(1e-30) * 2.0 ** -8
    delta = ours.delta_weight("default").abs()
    assert bool((err <= 2 * ulp + delta * 2.0 ** -7).all())
    with torch.no_grad():
        ours.lora_B["default"].weight[0, 0] = float("inf")
    w1 = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        ours.merge(safe_merge=True)
    assert torch.equal(ours.base_layer.weight, w1) and not ours.merged


def test_unmerge_of_one_merge_call_subtracts_its_summed_deltas():
    """merge(["a", "b", "c"]) adds the deltas' sum in one rounding; unmerge without the saved copy
    subtracts that same sum (not one delta at a time: three roundings more)."""
    torch.manual_seed(6)
    m = LoRALinear.from_linear(nn.Linear(48, 40), r=4, init_lora_weights=False, adapter_name="a")
    for n in ("b", "c"):
        m.add_adapter(n, 3, init_lora_weights=False)
    for n in ("a", "b", "c"):
        nn.init.normal_(m.lora_B[n].weight, std=0.3)
    m.merge(adapter_names=["a", "b", "c"], exact_unmerge=False)
    merged = m.base_layer.weight.detach().clone()
    m.unmerge()
    want = merged - sum(m.delta_weight(n) for n in ("a", "b", "c"))
    assert torch.equal(m.base_layer.weight.detach(), want)


def test_to_peft_round_trip_shares_parameters():
    ours = LoRALinear.from_linear(nn.Linear(12, 8), r=2, alpha=4, dropout=0.1, init_lora_weights=False)
    ours.add_adapter("second", 3, 6)
    ours.set_adapter(["default", "second"])
    pe = ours.to_peft()
    assert pe.lora_A["default"].weight is ours.lora_A["default"].weight
    ours.eval()
    pe.eval()
    x = torch.randn(4, 12)
    torch.testing.assert_close(ours(x), pe(x))
    back = LoRALinear.from_peft(pe)
    assert back.r == ours.r and back.lora_dropout_p == ours.lora_dropout_p


def test_to_peft_keeps_disabled_adapters_and_the_mode():
    ours = LoRALinear.from_linear(nn.Linear(12, 8), r=2, alpha=4, dropout=0.5, init_lora_weights=False)
    ours.enable_adapters(False)
    ours.eval()
    pe = ours.to_peft()
    assert pe.disable_adapters and not pe.training
    assert not any(p.requires_grad for p in ours._adapter_params("default"))   # peft's switch freezes them
    x = torch.randn(4, 12)
    torch.testing.assert_close(pe(x), ours.base_layer(x))
    ours.enable_adapters(True)
    ours.train()
    pe = ours.to_peft()
    assert not pe.disable_adapters and pe.training


def test_from_peft_keeps_what_the_base_trains():
    """peft's bias="lora_only"/"all" trains the base bias: the fused layer trains it too (gradient as peft)."""
    torch.manual_seed(4)
    pe = _peft(nn.Linear(12, 8))
    for p in pe.base_layer.parameters():
        p.requires_grad_(False)
    pe.base_layer.bias.requires_grad_(True)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    assert ours.base_layer.bias.requires_grad and not ours.base_layer.weight.requires_grad
    x = torch.randn(5, 12)
    pe(x).square().sum().backward()
    ours(x).square().sum().backward()
    torch.testing.assert_close(ours.base_layer.bias.grad, pe.base_layer.bias.grad, rtol=1e-5, atol=1e-5)
    refused = _peft(nn.Linear(12, 8))
    refused.lora_dropout["default"] = nn.ReLU()
    refused.base_layer.bias.requires_grad_(True)
    with pytest.raises(LoRAUnsupported):
        LoRALinear.from_peft(refused)
    assert refused.base_layer.bias.requires_grad                    # a refusal changes nothing


def test_unsupported_peft_features_are_refused():
    lin = nn.Linear(12, 8)
    other = _peft(copy.deepcopy(lin))
    other.lora_variant["default"] = type("VeloraLinearVariant", (), {})()    # a variant other than DoRA
    with pytest.raises(LoRAUnsupported, match="is a VeloraLinearVariant adapter; not supported"):
        LoRALinear.from_peft(other)
    two = LoRALinear.from_linear(copy.deepcopy(lin), r=2, dropout=0.1)
    two.add_adapter("b", 2, dropout=0.1)
    two.set_adapter(["default", "b"])
    with pytest.raises(LoRAUnsupported, match="independent mask per adapter"):
        two(torch.randn(2, 12))
    two.eval()
    two(torch.randn(2, 12))                 # no dropout in eval: fine
    with pytest.raises(KeyError, match="unknown adapters"):
        two(torch.randn(2, 3, 12), adapter_names=["default", "nope"])
    with pytest.raises(KeyError, match="no adapter named"):
        two.set_adapter("nope")
    with pytest.raises(TypeError, match="base layer must be nn.Linear, transformers. Conv1D, .*got Conv1d"):
        LoRALinear(nn.Conv1d(3, 3, 1))


def test_dropout_only_in_training():
    torch.manual_seed(4)
    ours = LoRALinear.from_linear(nn.Linear(16, 8), r=4, dropout=0.5, init_lora_weights=False)
    x = torch.randn(6, 16)
    ours.eval()
    y_eval = ours(x)
    ours.dropout_free = None
    ours.train()
    assert not torch.equal(ours(x), y_eval)
    ours.set_dropout("default", 0.0)
    torch.testing.assert_close(ours(x), y_eval)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_patch_trains_and_unpatches_merged_or_base(method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(ids).logits
    rep = fusedtune.patch(model, method, r=4, alpha=8, lr=1e-2)
    assert len(rep.rows) == 14 and all(r.method == method for r in rep.rows)
    base = type(model.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert base == ("Linear4bit" if method == "qlora" else "Linear")
    if method == "lora":
        torch.testing.assert_close(model(ids).logits, y0)      # B = 0 at init: the model is unchanged
    losses = train_losses(rep, model, ids, 8)
    assert losses[-1] < losses[0]
    model.eval()
    y_trained = model(ids).logits
    fusedtune.unpatch(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(model(ids).logits, y_trained, atol=1e-4, rtol=1e-4)
    model2 = tiny_llama()
    fusedtune.patch(model2, method, r=4)
    fusedtune.unpatch(model2, merge=False)
    if method == "lora":      # the base weights exactly (qlora: their NF4 dequantization)
        assert all(torch.equal(v, w0[k]) for k, v in model2.state_dict().items())


def test_patched_model_matches_peft_model():
    model = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
    fusedtune.patch(model, "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    own = model.state_dict()
    for k, v in pm.state_dict().items():       # peft's keys carry base_model.model. in front
        own_key = k.removeprefix("base_model.model.")
        assert own_key in own, own_key
        with torch.no_grad():
            own[own_key].copy_(v)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_mixed_merges_and_to_linear_follow_forward():
    torch.manual_seed(5)
    m = LoRALinear.from_linear(nn.Linear(16, 8).bfloat16(), r=2, init_lora_weights=False)
    m.add_adapter("b", 3, init_lora_weights=False)
    w0 = m.base_layer.weight.detach().clone()
    x = torch.randn(4, 16).bfloat16()
    m.merge(adapter_names="default", exact_unmerge=False)        # no saved copy: a later exact merge cannot be exact
    m.merge(adapter_names="b")
    assert m._stash is None and m.merged_adapters == ["default", "b"]
    y = m(x)
    torch.testing.assert_close(m.to_linear()(x), y)   # merged: the current weight, no delta added twice
    base = m.to_linear(merge=False).weight
    assert (base.float() - w0.float()).abs().max() < 0.05
    m.unmerge()
    assert not m.merged and (m.base_layer.weight.float() - w0.float()).abs().max() < 0.05


def test_bias_gradient_keeps_the_bias_dtype():
    from fusedtune.ops import lora_linear
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    W = torch.randn(6, 8, dtype=torch.bfloat16)
    b = torch.randn(6, dtype=torch.float32, requires_grad=True)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    (gb,) = torch.autograd.grad(lora_linear(x, W, A, B, 1.0, bias=b).float().sum(), b)
    assert gb.dtype == torch.float32 and torch.equal(gb, torch.full((6,), 5.0))


def test_op_refuses_summed_adapters_with_dropout_and_bad_groups():
    from fusedtune.ops import lora_linear_grouped, lora_linear_multi
    from fusedtune.ops.lora import LoRAUnsupported, scale_table
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    ads = [(torch.randn(2, 8), torch.randn(6, 2), 1.0), (torch.randn(3, 8), torch.randn(6, 3), 2.0)]
    with pytest.raises(LoRAUnsupported, match="independent mask per adapter"):
        lora_linear_multi(x, W, ads, dropout_p=0.1)
    A, B = torch.randn(5, 8), torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"row_group values must lie in \[-1, 2\)"):
        lora_linear_grouped(x, W, A, B, scale_table([2, 3], [1.0, 2.0], "cpu"), torch.tensor([0, 1, 2, -1]))


def test_report_names_the_backward_schedule():
    from fusedtune.nn.lora import _backward_schedule
    assert "once" in _backward_schedule(16) and "lora_dy_kernel" in _backward_schedule(64)
    assert "r > 64" in _backward_schedule(80) and _backward_schedule(0) == ""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "twice" in _backward_schedule(16) and "deterministic" in _backward_schedule(16)
    finally:
        torch.use_deterministic_algorithms(old)


def test_autocast_matches_peft_under_autocast():
    """HF Trainer bf16=True on an fp32 model: the layer runs in the autocast dtype as peft's does."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    pe = _peft(lin, r=8, alpha=16)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x, dy = torch.randn(3, 5, 64), torch.randn(3, 5, 48).bfloat16()
    res = {}
    for name, layer in (("peft", pe), ("ours", ours)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res[name] = layer_outputs(layer, x, dy)
    y64, g64 = exact64(x, lin.weight, [pe.lora_A["default"].weight], [pe.lora_B["default"].weight],
                       [pe.scaling["default"]], lin.bias, dy=dy)
    for j, (a, p, e) in enumerate(zip(res["ours"], res["peft"], [y64] + g64)):
        assert a.dtype == p.dtype and a.shape == p.shape, (j, a.dtype, p.dtype)
        assert_within_rule(a.reshape(e.shape), e, p.reshape(e.shape), f"autocast output {j}", atol=2e-2)


def test_patched_model_trains_under_autocast():
    m = tiny_llama(seed=1)
    fusedtune.patch(m, "lora", r=4, alpha=8)
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_linear_subclasses_and_fp4_bases_are_refused():
    """A subclass of nn.Linear with its own forward would be replaced by x W^T: silently wrong."""
    class Zero(nn.Linear):
        def forward(self, x):
            return torch.zeros(*x.shape[:-1], self.out_features)
    with pytest.raises(TypeError, match="Zero \\(a subclass of nn.Linear"):
        LoRALinear.from_linear(Zero(8, 4), r=2)
    bnb = pytest.importorskip("bitsandbytes")
    fp4 = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="fp4", device="meta")
    fp4.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="fp4")
    fp4 = fp4.to("cpu")
    with pytest.raises(LoRAUnsupported, match="must be NF4, got quant_type='fp4'"):
        LoRALinear.from_linear(fp4, r=2)


def test_peft_names_get_delta_weight_and_enable_adapters():
    lin = nn.Linear(16, 8)
    m = LoRALinear.from_linear(lin, r=2, init_lora_weights=False)
    assert torch.equal(m.get_delta_weight("default"), m.delta_weight("default"))
    x = torch.randn(3, 16)
    m.enable_adapters(False)
    torch.testing.assert_close(m(x), lin(x))
    assert not any(p.requires_grad for p in m._adapter_params("default"))   # as peft: disabled adapters freeze
    m.enable_adapters(True)
    assert all(p.requires_grad for p in m._adapter_params("default"))
    assert not torch.allclose(m(x), lin(x))


def test_model_level_mixed_batch_matches_per_adapter_runs():
    """fusedtune.lora.adapter_names: peft's model(..., adapter_names=...) for a patched model. Adapter b
    covers only the attention projections: the other layers serve b's sample with their base (peft's
    mixed batch skips a layer's missing adapters)."""
    from fusedtune.lora import adapter_names, lora_layers
    m = tiny_llama(seed=2)
    fusedtune.patch(m, "lora", r=4, alpha=8)
    layers = lora_layers(m)
    for name, lay in layers.items():
        lay.add_adapter("a", r=4, alpha=8, init_lora_weights=False)
        if "self_attn" in name:
            lay.add_adapter("b", r=2, alpha=4, init_lora_weights=False)
    assert 0 < sum("b" in lay.r for lay in layers.values()) < len(layers)
    layers = layers.values()
    ids = torch.randint(0, 64, (3, 10))
    names = ["a", "__base__", "b"]
    with torch.no_grad(), adapter_names(m, names):
        mixed = m(ids).logits
    assert all(lay._batch_names is None and not lay._forward_pre_hooks for lay in layers)   # the context is gone
    for i, n in enumerate(names):
        for lay in layers:
            lay.enable_adapters(n in lay.r)
            if n in lay.r:
                lay.set_adapter(n)
        with torch.no_grad():
            want = m(ids).logits[i]
        torch.testing.assert_close(mixed[i], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match=r"unknown adapters \['c'\]"):
        with adapter_names(m, ["a", "c", "b"]):
            pass


def test_adapter_names_reach_a_model_compiled_before_the_context():
    """Found by audit: the context added forward pre-hooks, which a graph compiled outside it does not guard on
    (torch._dynamo skips hook guards by default): every sample got the active adapter, silently. The layers'
    forward reads the names from an attribute now, which the compiled graph guards on."""
    from fusedtune.lora import adapter_names, lora_layers
    torch._dynamo.reset()
    m = tiny_llama(seed=4).eval()
    fusedtune.patch(m, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for lay in lora_layers(m).values():
        lay.add_adapter("a", r=2, alpha=4, init_lora_weights=False)
        lay.set_adapter("default")
        nn.init.normal_(lay.lora_B["default"].weight, std=0.3)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(6))
    names = ["a", "__base__", "default"]
    with torch.no_grad():
        with adapter_names(m, names):
            want = m(ids).logits
        compiled = torch.compile(m, backend="aot_eager")
        plain = compiled(ids).logits
        with adapter_names(m, names):
            got = compiled(ids).logits
        again = compiled(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    with adapter_names(m, names):                  # a copy made inside the context is not inside it
        copied = copy.deepcopy(m)
    assert all(lay._batch_names is None for lay in lora_layers(copied).values())


def test_mixed_batch_follows_generate_copies():
    """generate copies each sample num_beams (num_return_sequences) times, consecutively: every copy takes
    its sample's adapter, in the forward and in generate itself (greedy beam search per sample, run alone
    with its adapter set, gives the same tokens); other batch sizes are refused."""
    from fusedtune.lora import adapter_names, lora_layers
    m = tiny_llama(seed=3).eval()
    fusedtune.patch(m, "lora", r=4, alpha=8)
    layers = lora_layers(m).values()
    for lay in layers:
        lay.add_adapter("a", r=4, alpha=8, init_lora_weights=False)
        nn.init.normal_(lay.lora_B["a"].weight, std=0.5)   # an adapter that changes the greedy tokens
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    names = ["a", "__base__"]
    with torch.no_grad(), adapter_names(m, names):
        one = m(ids).logits
        three = m(ids.repeat_interleave(3, 0)).logits
        beams = m.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False, attention_mask=torch.ones_like(ids))
        with pytest.raises(ValueError, match=r"one name per sample \(3\), got 2"):
            m(ids[:1].repeat(3, 1))
    torch.testing.assert_close(three, one.repeat_interleave(3, 0), rtol=1e-5, atol=1e-5)
    for i, n in enumerate(names):
        for lay in layers:
            lay.enable_adapters(n != "__base__")
            if n != "__base__":
                lay.set_adapter(n)
        alone = m.generate(ids[i:i + 1], max_new_tokens=5, num_beams=2, do_sample=False,
                           attention_mask=torch.ones_like(ids[i:i + 1]))
        assert torch.equal(beams[i], alone[0])
    base0 = m.generate(ids[:1], max_new_tokens=5, num_beams=2, do_sample=False,   # adapters off (last: base)
                       attention_mask=torch.ones_like(ids[:1]))
    assert not torch.equal(beams[0], base0[0])         # sample 0's adapter changed its tokens


@pytest.mark.parametrize("i", range(4))
def test_forward_and_grads_match_peft_with_dropout(i):
    """Training with dropout: peft's layer with the same mask gives the same output and gradients."""
    from fusedtune.ops.lora import _seed_tensor
    c = _rand_config(100 + i)
    p = 0.1 if i % 2 else 0.3
    torch.manual_seed(i)
    lin = nn.Linear(c["K"], c["N"], bias=c["bias"]).to(c["dtype"])
    pe = _peft(lin, r=c["r"], alpha=c["alpha"], rslora=c["rslora"], dropout=p)
    pe.lora_A["default"].float()
    pe.lora_B["default"].float()
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    ours.train()
    pe.train()
    x = torch.randn(2, 13, c["K"]).to(c["dtype"])
    dy = torch.randn(2, 13, c["N"]).to(c["dtype"])
    torch.manual_seed(1000 + i)
    seed = int(_seed_tensor(None, p))          # the seed our layer draws for this forward
    pe.lora_dropout["default"] = SeededDropout(p, seed)
    torch.manual_seed(1000 + i)
    got = layer_outputs(ours, x, dy)
    want = layer_outputs(pe, x, dy)
    atol = 1e-5 if c["dtype"] == torch.float32 else 2e-2
    for j, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3 if c["dtype"] == torch.float32 else 2e-2,
                                   atol=atol, msg=f"config {c} p={p} output {j}")
    # and the mask mattered: without dropout the output differs
    ours.set_dropout("default", 0.0)
    torch.manual_seed(1000 + i)
    assert not torch.allclose(ours(x).float(), got[0].float(), atol=atol)


def test_lora_dropout_is_peft_module_dict():
    """lora_dropout[name] is peft's module (nn.Dropout, nn.Identity for p=0): code that reads or sets
    its .p works; lora_dropout_p is a read-only view of it; a custom dropout module is refused, not
    silently replaced by no dropout."""
    from fusedtune.ops.lora import LoRAUnsupported
    ours = LoRALinear.from_linear(nn.Linear(16, 8), r=4, dropout=0.25)
    ours.add_adapter("b", r=2, dropout=0.0)
    ours.set_adapter("default")
    assert isinstance(ours.lora_dropout["default"], nn.Dropout) and ours.lora_dropout["default"].p == 0.25
    assert isinstance(ours.lora_dropout["b"], nn.Identity)
    assert dict(ours.lora_dropout_p) == {"default": 0.25, "b": 0.0}
    ours.train()
    ours.lora_dropout["default"].p = 0.5                       # peft-style edit reaches the fused op
    assert ours._dropout(["default"]) == 0.5
    with pytest.raises(TypeError):
        ours.lora_dropout_p["default"] = 0.1                   # read-only: not silently ignored
    assert not any(k.startswith("lora_dropout") for k in ours.state_dict())
    ours.delete_adapter("b")
    assert list(ours.lora_dropout) == ["default"]
    back = ours.to_peft()                                      # (the module skips without peft)
    assert back.lora_dropout["default"].p == 0.5
    back.lora_dropout["default"] = nn.AlphaDropout(0.1)
    with pytest.raises(LoRAUnsupported, match="AlphaDropout"):
        LoRALinear.from_peft(back)
    ours.lora_dropout["default"] = nn.AlphaDropout(0.1)
    with pytest.raises(LoRAUnsupported, match="AlphaDropout"):
        ours(torch.randn(3, 16))


def test_deleting_the_active_adapter_activates_the_first_remaining_one_as_peft():
    """It left no active adapter (the base layer alone, silently); peft activates the first remaining
    adapter by name with a warning, or keeps the other active ones."""
    peft_layer = pytest.importorskip("peft.tuners.lora.layer")
    torch.manual_seed(0)
    ours = LoRALinear.from_linear(nn.Linear(16, 8), r=4, adapter_name="a", init_lora_weights=False)
    ours.add_adapter("z", r=2, init_lora_weights=False)
    ours.add_adapter("b", r=2, init_lora_weights=False)
    ours.add_adapter("c", r=2, init_lora_weights=False)
    theirs = ours.to_peft()
    for m in (ours, theirs):
        m.set_adapter(["a", "c"])
        m.delete_adapter("a")
    assert ours.active_adapters == theirs.active_adapters == ["c"]
    for m in (ours, theirs):
        m.set_adapter("b")
        with pytest.warns(UserWarning, match="b'? was active"):
            m.delete_adapter("b")
    assert ours.active_adapters == theirs.active_adapters == ["c"]     # the first remaining name in sorted
    for m in (ours, theirs):                                            # order (peft's), not the first added
        m.set_adapter("c")
        with pytest.warns(UserWarning, match="c'? was active"):
            m.delete_adapter("c")
    assert ours.active_adapters == theirs.active_adapters == ["z"]
    assert all(p.requires_grad for p in ours._adapter_params("z"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert isinstance(theirs, peft_layer.Linear)
