"""LoRA over transformers' Conv1D (GPT-2; peft's fan_in_fan_out layers): the fused op reads the (in, out)
weight transposed in place. Every comparison is against peft's own layer or model, or against the same
adapter over an nn.Linear holding the transposed weight."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fusedtune.lora import fuse_peft  # noqa: E402
from fusedtune.nn import LoRALinear  # noqa: E402
from fusedtune.ops.lora import LoRAUnsupported  # noqa: E402
from tiny_models import adamw_losses, one_thread, tiny_gpt2  # noqa: E402,F401

TARGETS = ["c_attn", "c_proj", "c_fc"]      # per block: qkv, both output projections (c_proj), the MLP's up
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _pair(backend=None, **cfg):
    """(peft's GPT-2 LoRA model, a deep copy of it with fused layers, fuse_peft's report)."""
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                               "fan_in_fan_out": True, **cfg}))
    _randomize_B(pm)
    fused = copy.deepcopy(pm)
    return pm, fused, fuse_peft(fused, backend=backend)


def _same_training(pm, fused, ids=IDS, what=""):
    want, got = pm(ids, labels=ids), fused(ids, labels=ids)
    _close(got.logits, want.logits, f"{what} logits")
    want.loss.backward()
    got.loss.backward()
    mine = dict(fused.named_parameters())
    trained = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    for n, p in trained:
        assert mine[n].grad is not None, n
        _close(mine[n].grad, p.grad, n)
    return [n for n, _ in trained]


def _conv_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_fused_gpt2_equals_peft_forward_and_gradients(monkeypatch):
    pm, fused, rep = _pair()
    assert len(rep.rows) == 8 and all(r.backend == "cpu" for r in rep.rows), rep.table()
    assert all("Conv1D base" in r.path for r in rep.rows), rep.table()
    calls = []
    orig = LoRALinear.forward
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x, adapter_names=None: calls.append(1) or orig(self, x))
    pm.eval(), fused.eval()
    assert len(_same_training(pm, fused)) == 16
    assert len(calls) == 8, "every GPT-2 LoRA layer took the fused forward"
    assert fused.state_dict().keys() == pm.state_dict().keys()
    for m in _conv_layers(fused):       # the view shares the Conv1D's own weight: nothing was copied
        view = m.__dict__["_fusedtune_view"][1]
        assert view.fan_in_fan_out and view.base_weight().data_ptr() == m.base_layer.weight.data_ptr()
        assert view.base_weight().shape == (m.base_layer.nf, m.base_layer.nx)


def test_fused_gpt2_trains_as_peft_and_merges():
    pm, fused, _ = _pair(lora_dropout=0.0)
    losses = [adamw_losses(model, IDS, 3, lr=1e-2) for model in (pm, fused)]   # frozen parameters get no grad
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-5, rtol=1e-5)
    want = pm(IDS).logits
    fused.merge_adapter()                   # peft's own merge (fan_in_fan_out) under the fused forward
    _close(fused(IDS).logits, want, "merged")
    fused.unmerge_adapter()
    _close(fused(IDS).logits, want, "unmerged")
    _close(fused.merge_and_unload()(IDS).logits, want, "merge_and_unload")


def test_fused_gpt2_dora_equals_peft():
    pm, fused, rep = _pair(use_dora=True)
    assert all("DoRA" in r.path for r in rep.rows), rep.table()
    trained = _same_training(pm, fused, what="DoRA")
    assert len([n for n in trained if "lora_magnitude_vector" in n]) == 8


def test_inconsistent_fan_in_fan_out_is_refused():
    pm, _, _ = _pair()
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    layer.fan_in_fan_out = False        # a Conv1D read as [out, in] would compute garbage: refused
    with pytest.raises(LoRAUnsupported, match="fan_in_fan_out=False over a Conv1D"):
        LoRALinear.from_peft(layer)
    with pytest.raises(LoRAUnsupported, match="c_attn.*fan_in_fan_out.*nothing was changed"):
        fuse_peft(pm)


def _conv_and_linear(nf=24, nx=40, seed=0):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.weight.normal_(0, 0.2)
        conv.bias.normal_(0, 0.1)
    lin = torch.nn.Linear(nx, nf)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return conv, lin


def _same_adapter(src: LoRALinear, dst: LoRALinear, name="default"):
    with torch.no_grad():
        dst.lora_A[name].weight.copy_(src.lora_A[name].weight)
        dst.lora_B[name].weight.copy_(src.lora_B[name].weight)


def test_from_linear_over_conv1d_equals_the_linear_layer():
    conv, lin = _conv_and_linear()
    a, b = LoRALinear.from_linear(conv, r=5, alpha=10), LoRALinear.from_linear(lin, r=5, alpha=10)
    assert (a.in_features, a.out_features) == (40, 24) and a.fan_in_fan_out and not b.fan_in_fan_out
    with torch.no_grad():
        b.lora_B["default"].weight.normal_(0, 0.3)
    _same_adapter(b, a)
    x = torch.randn(3, 5, 40, requires_grad=True)
    xb = x.detach().clone().requires_grad_()
    ya, yb = a(x), b(xb)
    _close(ya, yb, "forward")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    _close(x.grad, xb.grad, "dx")
    for n in ("lora_A", "lora_B"):
        _close(getattr(a, n)["default"].weight.grad, getattr(b, n)["default"].weight.grad, n)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert a.state_dict()["base_layer.weight"].shape == (40, 24)     # Conv1D's layout, as peft keeps it
    with torch.no_grad():
        want = a(x)
        before = conv.weight.clone()
        a.merge()                                   # into the Conv1D's own (in, out) weight
        assert not torch.equal(conv.weight, before)
        _close(conv.weight.t(), b.to_linear().weight, "merged weight")
        _close(a(x), want, "merged forward")
        a.unmerge()
        assert torch.equal(conv.weight, before), "unmerge restores the Conv1D weight bit-exactly"
        lin2 = a.to_linear()
        assert type(lin2) is torch.nn.Linear and lin2.weight.shape == (24, 40)
        _close(lin2(x), want, "to_linear")


def test_to_peft_and_from_peft_round_trip_over_conv1d():
    conv, _ = _conv_and_linear(seed=2)
    a = LoRALinear.from_linear(conv, r=3, alpha=6, use_rslora=True)
    with torch.no_grad():
        a.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(4, 40)
    layer = a.to_peft()
    assert layer.fan_in_fan_out and layer.get_base_layer() is conv
    with torch.no_grad():
        _close(layer(x), a(x), "peft's layer made by to_peft")
        back = LoRALinear.from_peft(layer)
        _close(back(x), a(x), "from_peft")
        _close(layer.get_delta_weight("default"), a.delta_weight("default").t(), "peft's (in, out) delta")


def test_pissa_over_conv1d_equals_peft():
    """PiSSA rewrites the base as the residual W - s B A: over a Conv1D, in its (in, out) layout, as peft's."""
    conv, _ = _conv_and_linear(seed=4)
    theirs = copy.deepcopy(conv)
    a = LoRALinear.from_linear(conv, r=4, alpha=8, init_lora_weights="pissa")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", fan_in_fan_out=True)
    layer = peft.tuners.lora.Linear(theirs, "default", config=cfg, r=4, lora_alpha=8, init_lora_weights="pissa",
                                    is_target_conv_1d_layer=True)
    _close(conv.weight, theirs.weight, "residual base")
    _close(a.lora_A["default"].weight, layer.lora_A["default"].weight, "A")
    _close(a.lora_B["default"].weight, layer.lora_B["default"].weight, "B")


def test_olora_over_conv1d_equals_olora_over_the_linear():
    """OLoRA over a Conv1D decomposes the [out, in] weight, as over the equivalent nn.Linear (peft 0.21's
    olora_init ignores fan_in_fan_out: it factors the (in, out) weight and leaves A and B mis-shaped)."""
    conv, lin = _conv_and_linear(seed=5)
    a = LoRALinear.from_linear(conv, r=4, alpha=8, init_lora_weights="olora")
    b = LoRALinear.from_linear(lin, r=4, alpha=8, init_lora_weights="olora")
    _close(conv.weight.t(), lin.weight, "residual base")
    for n in ("lora_A", "lora_B"):
        _close(getattr(a, n)["default"].weight, getattr(b, n)["default"].weight, n)
    x = torch.randn(3, 40)
    with torch.no_grad():
        _close(a(x), b(x), "forward")


@pytest.mark.interp
def test_triton_reads_the_conv1d_weight_transposed():
    """The Triton kernels (interpreted, float32) over a fused GPT-2: the transposed weight's strides go to
    the GEMMs (forward and dX), and logits and gradients equal peft's."""
    pm, fused, rep = _pair(backend="triton", target_modules=["c_attn", "c_fc"])
    assert {r.backend for r in rep.rows} == {"triton"}, rep.table()
    pm.eval(), fused.eval()
    assert len(_same_training(pm, fused, IDS[:1, :5], "triton")) == 8


def test_fused_gpt2_mixed_batch_and_generate_equal_peft():
    pm, fused, _ = _pair()
    for model in (pm, fused):
        model.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, fan_in_fan_out=True))
        model.eval()
    _randomize_B(pm, seed=3)
    fused.load_state_dict(pm.state_dict())
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["two", "__base__", "default"]
    _close(fused(ids, adapter_names=names).logits, pm(ids, adapter_names=names).logits, "mixed batch")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(input_ids=IDS, **kw), pm.generate(input_ids=IDS, **kw))


def test_patch_lora_keeps_gpt2_conv1d_bases():
    """fusedtune.patch(gpt2, "lora") wraps each Conv1D as it is (no transposed copy): the base is the model's
    own module, the state dict keeps Conv1D's (in, out) layout, and unpatch(merge=False) gives the weights
    back bit for bit."""
    import fusedtune
    from transformers.pytorch_utils import Conv1D
    model = tiny_gpt2()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    before = {n: m.weight.detach().clone() for n, m in convs.items()}
    fusedtune.patch(model, "lora", r=4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(layers) == set(convs)
    for n, layer in layers.items():
        assert layer.base_layer is convs[n] and layer.fan_in_fan_out
        assert model.state_dict()[f"{n}.base_layer.weight"].shape == before[n].shape
    fusedtune.unpatch(model, merge=False)
    for n, w in before.items():
        m = model.get_submodule(n)
        assert isinstance(m, Conv1D) and torch.equal(m.weight, w)
