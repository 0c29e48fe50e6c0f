"""lora_bias (peft's LoraConfig(lora_bias=True)): lora_B carries a trainable bias b and the adapter adds
scale * b. Against peft's layer and an fp64 reference: forward, gradients (b's included), several adapters,
mixed batches, merge / unmerge, to_linear, peft round trips, adapter files, fuse_peft, what is refused."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

import fusedtune  # noqa: E402
from fusedtune.nn import LoRALinear  # noqa: E402
from fusedtune.ops.lora import LoRAUnsupported  # noqa: E402
from fusedtune.testing import assert_within_rule  # noqa: E402
from lora_cases import exact64  # noqa: E402
from tiny_models import one_thread, tiny_llama  # noqa: E402,F401


def _peft(lin, name="default", r=4, alpha=8):
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, lora_bias=True)
    pe = peft_layer.Linear(lin, name, config=cfg, r=r, lora_alpha=alpha)
    _random_bias(pe, name)
    return pe


def _random_bias(layer, name, seed=4):
    with torch.no_grad():
        b = layer.lora_B[name].bias
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)))


def _outputs(layer, x, dy):
    """[y, dx, dA, dB, db] of one forward + backward."""
    xi = x.clone().requires_grad_()
    y = layer(xi)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    return [y] + list(torch.autograd.grad(y, [xi, A.weight, B.weight, B.bias], dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_bias", [True, False])
def test_forward_and_grads_within_rule_against_peft(dtype, base_bias):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=base_bias).to(dtype)
    pe = _peft(lin)
    pe.lora_A["default"].float()
    pe.lora_B["default"].float()
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    assert ours.lora_bias == {"default": True}
    x = torch.randn(3, 7, 40).to(dtype)
    dy = torch.randn(3, 7, 24).to(dtype)
    got, want = _outputs(ours, x, dy), _outputs(pe, x, dy)
    s = pe.scaling["default"]
    b = pe.lora_B["default"].bias.double()
    total = s * b if lin.bias is None else lin.bias.double() + s * b
    y64, g64 = exact64(x, lin.weight, [pe.lora_A["default"].weight], [pe.lora_B["default"].weight], [s], total,
                       dy=dy)
    db64 = s * dy.double().reshape(-1, 24).sum(0)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for j, (a, p, e) in enumerate(zip(got, want, [y64] + g64 + [db64])):
        assert a.dtype == p.dtype and a.shape == p.shape, j
        assert_within_rule(a.reshape(e.shape), e, p.reshape(e.shape), f"output {j}", atol=atol)


def test_several_adapters_and_mixed_batches_match_peft():
    torch.manual_seed(1)
    lin = nn.Linear(24, 16)
    pe = _peft(lin, "a", r=3, alpha=6)
    pe.update_layer("b", 5, 3.0, LoraConfig(r=5, lora_alpha=3.0, init_lora_weights=False))        # no bias
    pe.update_layer("c", 2, 4.0, LoraConfig(r=2, lora_alpha=4.0, init_lora_weights=False, lora_bias=True))
    _random_bias(pe, "c", seed=9)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x = torch.randn(4, 5, 24)
    for active in (["a"], ["b"], ["a", "b", "c"]):
        pe.set_adapter(active)
        ours.set_adapter(active)
        torch.testing.assert_close(ours(x), pe(x), atol=1e-5, rtol=1e-5)
    assert ours.lora_B["c"].bias.requires_grad
    names = ["c", "__base__", "a", "b"]
    pe.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, adapter_names=names), pe(x, adapter_names=names), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x[:2], adapter_names=["__base__", "b"]), pe(x[:2], adapter_names=["__base__", "b"]))


def test_merge_unmerge_and_to_linear():
    torch.manual_seed(2)
    ours = LoRALinear.from_linear(nn.Linear(32, 16).bfloat16(), r=4, alpha=8, init_lora_weights=False,
                                  lora_bias=True)
    assert torch.equal(ours.lora_B["default"].bias, torch.zeros(16)), "peft's init: b = 0"
    _random_bias(ours, "default")
    w0, b0 = ours.base_layer.weight.detach().clone(), ours.base_layer.bias.detach().clone()
    x = torch.randn(5, 32).bfloat16()
    y = ours(x)
    lin = ours.to_linear()
    torch.testing.assert_close(lin(x), y, atol=3e-2, rtol=3e-2)
    assert not torch.allclose(ours.to_linear(merge=False)(x).float(), y.float(), atol=0.1)
    ours.merge()
    assert not torch.equal(ours.base_layer.bias, b0)
    torch.testing.assert_close(ours(x), y, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours.to_linear(merge=False).bias, b0)
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, w0) and torch.equal(ours.base_layer.bias, b0)     # bit-exact
    ours.merge(exact_unmerge=False)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.bias, b0, atol=2e-2, rtol=1e-2)


def test_merge_without_a_base_bias_is_refused_untouched_and_to_linear_gets_one():
    ours = LoRALinear.from_linear(nn.Linear(12, 8, bias=False), r=2, init_lora_weights=False, lora_bias=True)
    _random_bias(ours, "default")
    w0 = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no bias to merge"):
        ours.merge()
    assert torch.equal(ours.base_layer.weight, w0) and not ours.merged
    x = torch.randn(3, 12)
    lin = ours.to_linear()
    assert lin.bias is not None
    torch.testing.assert_close(lin(x), ours(x), atol=1e-5, rtol=1e-5)


def test_peft_round_trip_and_refusals():
    ours = LoRALinear.from_linear(nn.Linear(12, 8), r=2, init_lora_weights=False, lora_bias=True)
    _random_bias(ours, "default")
    pe = ours.to_peft()
    assert pe.lora_bias["default"] and pe.lora_B["default"].bias is ours.lora_B["default"].bias
    x = torch.randn(4, 12)
    torch.testing.assert_close(pe(x), ours(x))
    assert sorted(ours.state_dict()) == sorted(pe.state_dict())
    with pytest.raises(LoRAUnsupported, match="lora_bias is not supported with DoRA"):
        LoRALinear.from_linear(nn.Linear(12, 8), use_dora=True, lora_bias=True)
    with pytest.raises(LoRAUnsupported, match="init_lora_weights='pissa'"):
        LoRALinear.from_linear(nn.Linear(12, 8), init_lora_weights="pissa", lora_bias=True)
    with pytest.raises(LoRAUnsupported, match="DoRA with lora_bias"):
        ours.set_dora("default", True)
    assert not ours.use_dora["default"]


def test_adapter_files_both_ways_and_patch_option(tmp_path):
    model = tiny_llama()
    fusedtune.patch(model, "lora", r=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    layers = fusedtune.lora.lora_layers(model)
    for m in layers.values():
        _random_bias(m, "default")
        assert m.lora_B["default"].bias.requires_grad
    ids = torch.randint(0, 64, (2, 7))
    cfg = fusedtune.lora.save_adapter(model, tmp_path / "ours")
    assert cfg["lora_bias"] is True
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(pm(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    pm.save_pretrained(str(tmp_path / "peft"))
    other = tiny_llama()
    fusedtune.patch(other, "lora", r=4, target_modules=["q_proj", "v_proj"])
    fusedtune.lora.load_adapter(other, tmp_path / "peft", adapter_name="loaded")
    for m in fusedtune.lora.lora_layers(other).values():
        m.set_adapter("loaded")
        assert m.lora_bias == {"default": False, "loaded": True}
    torch.testing.assert_close(other(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lora_bias"):     # into an existing adapter without a bias
        fusedtune.lora.load_adapter(other, tmp_path / "peft", adapter_name="default")


def test_fuse_peft_takes_lora_bias_adapters():
    pm = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_bias=True))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_()
    fused = copy.deepcopy(pm)
    fusedtune.lora.fuse_peft(fused)
    ids = torch.randint(0, 64, (2, 7))
    want, got = pm(ids, labels=ids), fused(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    grads = dict(fused.named_parameters())
    biases = [n for n, p in pm.named_parameters() if n.endswith("lora_B.default.bias")]
    assert len(biases) == 4
    for n in biases:
        torch.testing.assert_close(grads[n].grad, dict(pm.named_parameters())[n].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lora_bias_matches_reference(dtype):
    """The fused Triton GEMM adds the float32 bias (base bias + scale * b) in its epilogue; gradients of b
    come from the op's dbias."""
    torch.manual_seed(5)
    made = LoRALinear.from_linear(nn.Linear(40, 24).to(dtype), r=4, alpha=8, init_lora_weights=False, lora_bias=True)
    _random_bias(made, "default")
    outs = {}
    for backend in ("reference", "triton"):
        layer = copy.deepcopy(made)
        layer.backend = backend
        x = torch.randn(9, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
        dy = torch.randn(9, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
        outs[backend] = _outputs(layer, x, dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for j, (a, b) in enumerate(zip(outs["triton"], outs["reference"])):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output {j}: {m}")
