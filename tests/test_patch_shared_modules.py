"""A module registered under two names (a projection shared across layers): the swapping methods that change the
layer's numerics or train its weight put one new layer in every place, so the places stay one module; the LoRA
methods wrap the first name only, as peft does, and say so in the report."""
import copy

import pytest
import torch

import fusedtune
from tiny_models import one_thread, tiny_gpt2, tiny_llama  # noqa: F401

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
METHODS = [("fp8", {}), ("roste", dict(w_bits=4, a_bits=8)), ("sparse_delta", {})]


def places(model):
    """The two places of the shared projection: (block 0's, block 1's) parent module and attribute."""
    if hasattr(model, "transformer"):
        return [(b.mlp, "c_fc") for b in model.transformer.h]
    return [(b.mlp, "up_proj") for b in model.model.layers]


def build(kind: str, share: bool):
    model = tiny_llama() if kind == "llama" else tiny_gpt2()
    (p0, attr), (p1, _) = places(model)
    src = getattr(p0, attr)
    setattr(p1, attr, src if share else copy.deepcopy(src))
    return model


def at(model):
    return [getattr(parent, attr) for parent, attr in places(model)]


def layer_grads(model):
    return [{n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None} for m in at(model)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_one_layer_serves_both_places(kind, method, kw):
    shared, copied = build(kind, True), build(kind, False)
    rep = fusedtune.patch(shared, method, **kw)
    fusedtune.patch(copied, method, **kw)
    if method == "sparse_delta":     # the copy's second layer picked positions of its own: give it the first's
        c0, c1 = at(copied)
        c1.set_indices(c0.indices)
    first, second = at(shared)
    assert first is second and type(first).__name__ != type(at(build(kind, True))[0]).__name__
    assert any("also registered as" in n and "one layer serves every place" in n for n in rep.notes)
    # the same numerics in both places: the model equals one whose second place holds a copy of the layer
    torch.testing.assert_close(shared(IDS).logits, copied(IDS).logits, rtol=0, atol=0)
    # and the shared layer's gradient sums the two places' gradients
    shared(IDS, labels=IDS).loss.backward()
    copied(IDS, labels=IDS).loss.backward()
    (g,), (g0, g1) = layer_grads(shared)[:1], layer_grads(copied)
    assert g and g.keys() == g0.keys()
    for n in g:
        torch.testing.assert_close(g[n], g0[n] + g1[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_unpatch_keeps_one_module(kind, method, kw):
    model = build(kind, True)
    rep = fusedtune.patch(model, method, lr=1e-2, **kw)
    for _ in range(2):
        rep.step(lambda: model(IDS, labels=IDS).loss)
    trained = model(IDS).logits.detach()
    fusedtune.unpatch(model, merge=True)
    first, second = at(model)
    assert first is second and type(first).__name__ in ("Linear", "Conv1D")
    if method == "sparse_delta":      # the merged weights in both places: the trained model exactly
        torch.testing.assert_close(model(IDS).logits, trained, rtol=0, atol=0)


def test_rollback_restores_every_place(monkeypatch):
    """A failure while patching (here at a target after the shared one) leaves the shared module in both places."""
    from fusedtune.methods.fp8 import FP8Method
    model = build("llama", True)
    orig = at(model)[0]
    real, calls = FP8Method.make, []

    def make(self, linear, name, **options):
        calls.append(name)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real(self, linear, name, **options)

    monkeypatch.setattr(FP8Method, "make", make)
    with pytest.raises(RuntimeError, match="boom"):
        fusedtune.patch(model, "fp8", target_modules=["up_proj", "down_proj", "gate_proj"])
    assert "model.layers.0.mlp.up_proj" in calls[:3]
    assert at(model) == [orig, orig]
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")} == {"Linear"}


@pytest.mark.parametrize("method", ["lora", "fp8_lora"])
def test_lora_wraps_the_first_name_only(method):
    """peft's rule (its injection walks named_modules, which lists a module once): the second place keeps the
    original module and runs without the adapter; the report says so."""
    model = build("llama", True)
    orig = at(model)[0]
    rep = fusedtune.patch(model, method, r=4, target_modules=["up_proj"])
    first, second = at(model)
    assert type(first).__name__ == "LoRALinear" and second is orig
    assert any("keep the original module" in n for n in rep.notes)
    fusedtune.unpatch(model, merge=True)
    assert at(model) == [orig, orig]


def test_hft_names_the_shared_module():
    model = build("llama", True)
    with pytest.raises(Exception, match=r"up_proj \(the same module as model\.layers\.0\.mlp\.up_proj"):
        fusedtune.patch(model, "hft")
