"""fusedtune.patch / unpatch / report: layer swapping on tiny transformers models, the built-in
methods "full" and "mezo", and every refusal."""
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from fusedtune.patch import (DEFAULT_TARGETS, PatchError, SwapMethod, _state, find_targets, is_linear,  # noqa: E402
                             linear_names, methods, patch, register_method, report, unpatch, unregister_method)

transformers.logging.set_verbosity_error()


def _llama_like(name):
    cfg_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    cfg = cfg_cls(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model_cls(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


ARCHS = {"llama": lambda: _llama_like("Llama"), "qwen2": lambda: _llama_like("Qwen2"),
         "mistral": lambda: _llama_like("Mistral"), "gemma": lambda: _llama_like("Gemma"), "gpt2": _gpt2}
PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "gpt2": 4}


def make(arch, seed=0):
    torch.manual_seed(seed)
    m = ARCHS[arch]().eval()
    with torch.no_grad():   # non-zero biases so that a lost or transposed bias shows
        for mod in m.modules():
            if is_linear(mod) and getattr(mod, "bias", None) is not None:
                mod.bias.normal_(0, 0.1)
    return m


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [6, 6, 0, 13, 21, 8, 1, 30]])


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


# ------------------------------------------------------------------------------ a test-only method

class TaggedLinear(nn.Linear):
    """nn.Linear plus a trainable additive weight delta (zero at first): merge adds it."""
    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros_like(self.weight))

    def forward(self, x):
        return nn.functional.linear(x, self.weight + self.delta, self.bias)


def _plain(mod, weight):
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    return lin


class SwapTest(SwapMethod):
    def make(self, linear, name, **options):
        return TaggedLinear(linear)

    def merge(self, module):
        return _plain(module, module.weight + module.delta)

    def base(self, module):
        return _plain(module, module.weight)

    def describe(self, module):
        return "reference", "TaggedLinear", {"cuda": "test method"}


@pytest.fixture
def swap():
    register_method("test-swap", SwapTest)
    yield "test-swap"
    unregister_method("test-swap")


# ------------------------------------------------------------------------------ swapping

@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_default_targets_forward_and_unpatch(arch, swap):
    m = make(arch)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kinds = {n: type(mod) for n, mod in m.named_modules() if is_linear(mod)}
    ref = logits(m)
    rep = patch(m, swap)
    n_expected = PER_LAYER[arch] * 2
    swapped = [n for n, mod in m.named_modules() if isinstance(mod, TaggedLinear)]
    assert len(swapped) == n_expected == len(rep.rows)
    assert "lm_head" not in swapped and sorted(r.name for r in rep.rows) == sorted(swapped)
    out = logits(m)
    if arch == "gpt2":   # Conv1D's addmm and linear sum in a different order
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, ref)
    assert rep.trainable_params == sum(mod.delta.numel() for mod in m.modules() if isinstance(mod, TaggedLinear))
    assert all(not p.requires_grad for n, p in m.named_parameters() if not n.endswith(".delta"))
    unpatch(m, merge=True)
    now = {n: type(mod) for n, mod in m.named_modules() if is_linear(mod)}
    assert now == kinds   # exactly nn.Linear / Conv1D again, nothing left over
    assert not any(isinstance(mod, TaggedLinear) for mod in m.modules())
    after = m.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in m.parameters())
    assert torch.equal(logits(m), ref)


_SMALL = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
_SMALL_FOR = {"opt": dict(ffn_dim=40, word_embed_proj_dim=32),
              "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
              "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=16),
              "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
              "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2)}


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_default_targets_are_every_decoder_linear(model_type, swap):
    """Each architecture with defaults: they name every linear layer of the decoder blocks (not lm_head;
    qwen2_moe's 1-wide shared_expert_gate aside), and the swapped model computes what the original did."""
    kw = {**_SMALL, **_SMALL_FOR.get(model_type, {})}
    if model_type == "falcon":
        kw.pop("head_dim")     # a derived property there
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw)).eval()
    got = find_targets(m)
    layers = m.config.num_hidden_layers
    rest = set(linear_names(m)) - set(got) - {n for n in linear_names(m) if n.endswith("lm_head")}
    assert rest == {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(layers)} if model_type == "qwen2_moe" \
        else not rest
    ref = logits(m)
    patch(m, swap)
    out = logits(m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6) if model_type == "gpt2" else \
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unpatch_merges_the_update_with_the_right_orientation(arch, swap):
    m = make(arch)
    rep = patch(m, swap)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, TaggedLinear):
                mod.delta.copy_(0.05 * torch.randn(mod.delta.shape, generator=g))
    patched = logits(m)
    assert rep.rows and not torch.allclose(patched, logits(make(arch)))
    unpatch(m, merge=True)
    if arch == "gpt2":
        assert all(isinstance(mod, Conv1D) for n, mod in m.named_modules() if n.endswith(("c_attn", "c_fc")))
    torch.testing.assert_close(logits(m), patched, rtol=1e-5, atol=1e-5)


def test_unpatch_without_merge_restores_base_weights(swap):
    m = make("gpt2")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    patch(m, swap)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, TaggedLinear):
                mod.delta.fill_(0.5)
    unpatch(m, merge=False)
    assert all(torch.equal(m.state_dict()[k], before[k]) for k in before)


def test_target_modules_forms(swap):
    m = make("llama")
    rep = patch(m, swap, target_modules=["q_proj", "v_proj"])
    assert sorted(r.name.rsplit(".", 1)[1] for r in rep.rows) == ["q_proj"] * 2 + ["v_proj"] * 2
    unpatch(m)
    rep = patch(m, swap, target_modules="all-linear")
    assert len(rep.rows) == 14 and "lm_head" not in [r.name for r in rep.rows]
    unpatch(m)
    rep = patch(m, swap, target_modules=["lm_head"])   # only when named
    assert [r.name for r in rep.rows] == ["lm_head"]
    unpatch(m)
    rep = patch(m, swap, target_modules=r"model\.layers\.1\.mlp\..*")
    assert [r.name.rsplit(".", 1)[1] for r in rep.rows] == ["gate_proj", "up_proj", "down_proj"]
    unpatch(m)


def test_gpt2_all_linear_skips_tied_lm_head(swap):
    m = make("gpt2")
    rep = patch(m, swap, target_modules="all-linear")
    assert len(rep.rows) == 8 and all("lm_head" not in r.name for r in rep.rows)
    unpatch(m)


def test_swap_training_step_trains_only_the_method_parameters(swap):
    m = make("llama")
    rep = patch(m, swap, target_modules=["q_proj"])
    frozen = {n: p.clone() for n, p in m.named_parameters() if not n.endswith(".delta")}
    loss = rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    assert any(mod.delta.abs().sum() > 0 for mod in m.modules() if isinstance(mod, TaggedLinear))
    unpatch(m)


def test_report_table(swap):
    m = make("llama")
    assert report(m).method is None and "not patched" in str(report(m))
    patch(m, swap, target_modules=["o_proj"])
    rep = report(m)
    assert [r.backend for r in rep.rows] == ["reference", "reference"]
    assert rep.rows[0].why_not == "cuda: test method"
    text = str(rep)
    for col in ("name", "method", "backend", "path", "why not fused", "params"):
        assert col in text.splitlines()[1]
    assert "model.layers.0.self_attn.o_proj" in text
    unpatch(m)


# ------------------------------------------------------------------------------ refusals

def test_unknown_method_lists_registered():
    with pytest.raises(PatchError, match=r"unknown method 'nope'.*full.*mezo"):
        patch(make("llama"), "nope")


def test_no_match_lists_linear_names(swap):
    m = make("llama")
    with pytest.raises(PatchError, match=r"matches none.*model\.layers\.0\.self_attn\.q_proj"):
        patch(m, swap, target_modules=["qkv"])
    with pytest.raises(PatchError, match=r"\['v_prj'\] match none"):
        patch(m, swap, target_modules=["q_proj", "v_prj"])
    assert _state(m) is None and not any(isinstance(x, TaggedLinear) for x in m.modules())


def test_bad_target_modules(swap):
    m = make("llama")
    with pytest.raises(PatchError, match="empty list"):
        patch(m, swap, target_modules=[])
    with pytest.raises(PatchError, match="regular expression"):
        patch(m, swap, target_modules="q_proj(")
    with pytest.raises(PatchError, match="target_modules must be"):
        patch(m, swap, target_modules=[1, 2])


def test_unknown_architecture_needs_targets(swap):
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PatchError, match=r"no default target_modules.*Linear layers here: 0, 2"):
        patch(m, swap)
    rep = patch(m, swap, target_modules=["0"])
    assert [r.name for r in rep.rows] == ["0"]
    unpatch(m)


def test_patch_twice_and_unpatch_unpatched(swap):
    m = make("llama")
    with pytest.raises(PatchError, match="not patched"):
        unpatch(m)
    patch(m, swap)
    with pytest.raises(PatchError, match="already patched with method 'test-swap'"):
        patch(m, "mezo")
    unpatch(m)
    with pytest.raises(PatchError, match="not patched"):
        unpatch(m)


def test_a_model_with_a_patched_part_or_inside_a_patched_model_is_refused():
    """patch(model.model) then patch(model) wrapped the LoRA layers' own base and adapters in LoRA layers;
    patch(model) then patch(model.model, ...) touched the swapped-in layers. Both refused, nothing changed."""
    m = make("llama")
    patch(m.model, "lora", r=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PatchError, match="submodule model is patched already .method 'lora'"):
        patch(m, "lora", r=2, target_modules="all-linear")
    assert before.keys() == m.state_dict().keys()
    unpatch(m.model)
    patch(m, "lora", r=2)
    for sub in (m.model, m.model.layers[0].self_attn.q_proj):
        with pytest.raises(PatchError, match="another fusedtune.patch swapped in"):
            patch(sub, "full")
    unpatch(m)
    patch(m.model, "full")                        # nothing left over from the unpatched layers
    unpatch(m.model)


@pytest.mark.parametrize("fn", [lambda x: patch(x, "full"), unpatch, report])
def test_not_a_module(fn):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fn({"weight": torch.zeros(2)})


def test_unknown_option_is_refused_before_anything_changes():
    m = make("llama")
    with pytest.raises(PatchError, match=r"does not take option\(s\) \['rank'\].*eps.*lr"):
        patch(m, "mezo", rank=4)
    assert _state(m) is None and all(p.requires_grad for p in m.parameters())


def test_bad_option_value_leaves_model_unpatched():
    m = make("llama")
    with pytest.raises(ValueError, match="lr must be > 0"):
        patch(m, "mezo", lr=-1.0)
    assert _state(m) is None and all(p.requires_grad for p in m.parameters())


def test_failing_swap_restores_the_model(swap):
    class Boom(SwapTest):
        def make(self, linear, name, **options):
            if name.endswith("v_proj"):
                raise RuntimeError("cannot swap this one")
            return super().make(linear, name)
    register_method("test-boom", Boom)
    try:
        m = make("llama")
        kinds = [type(x) for x in m.modules()]
        with pytest.raises(RuntimeError, match="cannot swap"):
            patch(m, "test-boom")
        assert [type(x) for x in m.modules()] == kinds and _state(m) is None
    finally:
        unregister_method("test-boom")


def test_register_method_refusals():
    with pytest.raises(TypeError, match="not a subclass"):
        register_method("x", object)
    with pytest.raises(PatchError, match="already registered"):
        register_method("mezo", SwapTest)
    with pytest.raises(PatchError, match="no method named"):
        unregister_method("never-registered")


# ------------------------------------------------------------------------------ mezo and full

def test_mezo_selects_parameters_and_restores_requires_grad():
    m = make("llama")
    m.model.norm.weight.requires_grad_(False)     # a user's own choice, restored by unpatch
    rep = patch(m, "mezo", target_modules=["q_proj", "v_proj"], lr=1e-3, seed=3)
    from fusedtune.optim import MeZO
    assert isinstance(rep.optimizer, MeZO)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{k}_proj.weight" for i in (0, 1) for k in "qv"}
    assert rep.trainable_params == sum(p.numel() for n, p in m.named_parameters() if n in trainable)
    assert rep.rows and all(r.method == "mezo" for r in rep.rows)
    assert sum(r.params for r in rep.rows) == rep.trainable_params
    from fusedtune.ops.zo import zo_backend
    assert {r.backend for r in rep.rows} == {zo_backend("cpu")["backend"]}
    frozen = {n: p.clone() for n, p in m.named_parameters() if n not in trainable}
    w = m.model.layers[0].self_attn.q_proj.weight.clone()
    rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)
    assert set(rep.optimizer.last) >= {"loss_plus", "loss_minus", "projected_grad"}
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, w)
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    with pytest.raises(PatchError, match="in place"):
        unpatch(m, merge=False)
    assert report(m).method == "mezo"   # a refused unpatch leaves the model patched
    unpatch(m)
    assert not m.model.norm.weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "model.norm.weight")


def test_mezo_all_parameters_loss_falls():
    m = make("llama")
    rep = patch(m, "mezo", lr=3e-3, eps=1e-3)
    assert rep.trainable_params == rep.total_params == sum(p.numel() for p in m.parameters())
    start = m(input_ids=IDS, labels=IDS).loss.item()
    for _ in range(60):
        rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)
    assert m(input_ids=IDS, labels=IDS).loss.item() < start - 0.05
    unpatch(m)


def test_mezo_reference_backend_is_reported():
    m = make("llama")
    rep = patch(m, "mezo", backend="reference")
    assert {r.backend for r in rep.rows} == {"reference"}
    assert "reference" in rep.rows[0].path
    unpatch(m)


def test_full_fine_tuning_trains_and_reports():
    m = make("gpt2")
    rep = patch(m, "full", lr=1e-2)
    assert isinstance(rep.optimizer, torch.optim.AdamW)
    assert [r.backend for r in rep.rows] == ["torch"] and rep.rows[0].why_not
    losses = [rep.step(lambda: m(input_ids=IDS, labels=IDS).loss).item() for _ in range(10)]
    assert losses[-1] < losses[0]
    unpatch(m)
    assert _state(m) is None


def test_methods_registry_has_builtins():
    ms = methods()
    assert {"full", "mezo"} <= set(ms)
    assert ms["mezo"].zeroth_order and not ms["full"].zeroth_order


def _params_and_flags(m):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()}


def _same_params_and_flags(m, before):
    now = _params_and_flags(m)
    return now.keys() == before.keys() and all(torch.equal(now[n][0], before[n][0]) and now[n][1] == before[n][1]
                                               for n in before)


@pytest.mark.parametrize("method,opts", [("lora", {"lr": -1.0}), ("lora", {"betas": (0.9,)}),
                                         ("sparse_delta", {"lr": -1.0}), ("sparse_delta", {"delta_grad": "gemm"}),
                                         ("lora", {"alpha": "x"}),
                                         ("lora", {"r": 20, "init_lora_weights": "pissa"})])
def test_a_refused_patch_leaves_the_model_as_it_was(method, opts):
    """Refused after some layers were swapped (the optimizer's options; PiSSA on a k_proj of 16 outputs after
    q_proj's weight became the residual): modules, weights and requires_grad flags all as before."""
    m = make("llama")
    m.model.embed_tokens.weight.requires_grad_(False)
    kinds = [type(x) for x in m.modules()]
    before = _params_and_flags(m)
    with pytest.raises((ValueError, TypeError, IndexError)):
        patch(m, method, **opts)
    assert _state(m) is None and [type(x) for x in m.modules()] == kinds
    assert _same_params_and_flags(m, before)


def test_sparse_delta_patch_passes_delta_grad_to_every_layer():
    from fusedtune.nn import SparseDeltaLinear
    m = make("llama")
    patch(m, "sparse_delta", delta_grad="dense")
    layers = [x for x in m.modules() if isinstance(x, SparseDeltaLinear)]
    assert layers and all(x.delta_grad == "dense" for x in layers)
    unpatch(m)


def test_a_tied_head_keeps_the_embedding_trainable_after_unpatch():
    m = make("gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    patch(m, "lora", target_modules=["lm_head"])
    unpatch(m, merge=False)
    assert m.transformer.wte.weight.requires_grad


def test_an_unknown_backend_is_refused_by_patch():
    m = make("llama")
    for method in ("lora", "sparse_delta", "roste", "hft"):
        with pytest.raises(PatchError, match="unknown backend 'bogus'"):
            patch(m, method, backend="bogus")
        assert _state(m) is None


class _SubLinear(nn.Linear):
    """A model's own nn.Linear subclass (as Falcon's FalconLinear), with an attribute of its own."""
    tag = "mine"


@pytest.mark.parametrize("method,merge", [("lora", True), ("lora", False), ("fp8_lora", True), ("fp8_lora", False),
                                          ("roste", True)])
def test_unpatch_hands_back_the_models_own_modules(method, merge):
    """As peft's merge_and_unload: the same module objects come back (a subclass stays one, its attributes
    kept), their weight and bias Parameters the same objects, holding the merged (or the base) weights. (A
    target with hooks is refused: test_targets_with_hooks_are_refused_and_nothing_changes.)"""
    from fusedtune.patch import missing_requirements
    if missing_requirements(methods()[method]):
        pytest.skip(f"{method} needs {missing_requirements(methods()[method])}")
    m = make("llama")
    attn = m.model.layers[0].self_attn
    sub = _SubLinear(attn.q_proj.in_features, attn.q_proj.out_features, bias=True)
    with torch.no_grad():
        sub.weight.copy_(attn.q_proj.weight)
        sub.bias.normal_()
    attn.q_proj = sub
    w, b, w0, b0 = sub.weight, sub.bias, sub.weight.detach().clone(), sub.bias.detach().clone()
    rep = patch(m, method, target_modules=["q_proj", "v_proj"],
                **({"init_lora_weights": False} if "lora" in method else {}))
    rep.step(lambda: m(IDS, labels=IDS).loss)
    layer = attn.q_proj
    assert layer is not sub
    want = rep._impl.merge(layer) if merge else rep._impl.base(layer)   # what unpatch computes (no side effects)
    want_w, want_b = want.weight.detach().clone(), want.bias.detach().clone()
    unpatch(m, merge=merge)
    assert attn.q_proj is sub and type(sub) is _SubLinear and sub.tag == "mine"
    assert sub.weight is w and sub.bias is b
    assert torch.equal(sub.weight.detach(), want_w) and torch.equal(sub.bias.detach(), want_b)
    assert torch.equal(sub.weight.detach(), w0) != merge   # the merged update (RoSTE: the trained weight) or w0
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("merge", [False, True])
def test_unpatch_keeps_a_tied_head_tied(merge):
    """LoRA on GPT-2's lm_head (tied to wte): after unpatch the head and the embedding are one Parameter
    again, holding the base (merge=False) or the merged weight; sparse_delta refuses the tied target."""
    m = make("gpt2")
    w0 = m.lm_head.weight.detach().clone()
    patch(m, "lora", target_modules=["lm_head"], init_lora_weights=False)
    want = w0 + m.lm_head.delta_weight("default") if merge else w0
    if merge:
        with pytest.warns(UserWarning, match="lm_head.*tied.*transformer.wte"):
            unpatch(m, merge=True)           # (as peft's merge: the embedding gets the delta too)
    else:
        unpatch(m, merge=False)
    assert m.lm_head.weight is m.transformer.wte.weight
    torch.testing.assert_close(m.lm_head.weight.detach(), want, rtol=0 if not merge else 1e-6,
                               atol=0 if not merge else 1e-6)
    before = _params_and_flags(m)
    with pytest.raises(PatchError, match="shared with.*wte.*tied"):
        patch(m, "sparse_delta", target_modules=["lm_head"])
    assert _state(m) is None and _same_params_and_flags(m, before)


def _llama_cfg(**kw):
    return transformers.LlamaConfig(**{**_SMALL, "num_hidden_layers": 1, **kw})


def test_unpatch_after_an_assign_load_gives_new_modules():
    """Build on meta, patch, load with assign=True (the big-model recipe): the layers hold new Parameters, so
    unpatch must not write into the original modules' stale (meta) ones; it hands back new modules instead."""
    sd = transformers.LlamaForCausalLM(_llama_cfg()).state_dict()
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(_llama_cfg())
    orig = m.model.layers[0].self_attn.q_proj
    patch(m, "fp8", target_modules=["q_proj"], backend="reference")
    m.load_state_dict(sd, assign=True)
    unpatch(m)
    q = m.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q is not orig and not q.weight.is_meta
    assert torch.equal(q.weight.detach(), sd["model.layers.0.self_attn.q_proj.weight"])   # fp8's merge: its weight
    assert _state(m) is None


def test_a_tied_embedding_as_a_saved_module_is_refused_and_unpatch_restores_one_saved_with_its_tie():
    """embed_tokens saved while lm_head (tied to it) is a LoRA target: training the shared weight in place would
    move lm_head's frozen base too (peft trains a copy): refused, nothing changed. Saved together, the tied
    weight trains once and unpatch(merge=False) gives it back, tie kept."""
    m = transformers.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    e0 = m.model.embed_tokens.weight.detach().clone()
    with pytest.raises(PatchError, match="model.embed_tokens.weight is tied to lm_head.weight"):
        patch(m, "lora", target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"], lr=1e-2)
    assert _state(m) is None and type(m.lm_head) is nn.Linear
    rep = patch(m, "lora", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], lr=1e-2)
    rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)
    assert not torch.equal(m.model.embed_tokens.weight.detach(), e0)
    unpatch(m, merge=False)
    assert torch.equal(m.model.embed_tokens.weight.detach(), e0) and m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("method", ["lora", "fp8", "sparse_delta"])
def test_targets_with_hooks_are_refused_and_nothing_changes(method):
    """A swapped layer computes from the weights without calling the module: hooks on a target would silently
    stop running (found by audit: an accelerate-dispatched model failed on its first forward)."""
    m = transformers.LlamaForCausalLM(_llama_cfg())
    m.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda *a: None)
    m.model.layers[0].mlp.down_proj.register_full_backward_hook(lambda *a: None)
    before = _params_and_flags(m)
    with pytest.raises(PatchError, match=r"target model.layers.0.mlp.up_proj has a forward pre-hook \(1 more"):
        patch(m, method)
    assert _state(m) is None and _same_params_and_flags(m, before)
    assert type(m.model.layers[0].mlp.up_proj) is nn.Linear
    rep = patch(m, method, target_modules=["q_proj"], backend="reference")   # hooks elsewhere: fine
    assert len(rep.rows) == 1
    unpatch(m)


@pytest.mark.parametrize("method", ["lora", "mezo"])
def test_an_accelerate_offloaded_model_is_refused(method):
    """accelerate's cpu_offload keeps the weights on the meta device between forwards: every method would read or
    write them in place (lora failed on its first forward with a device mix error)."""
    accelerate = pytest.importorskip("accelerate")
    m = transformers.LlamaForCausalLM(_llama_cfg())
    accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    assert m.model.layers[0].self_attn.q_proj.weight.is_meta
    with pytest.raises(PatchError, match="offloaded by accelerate.*Nothing was changed"):
        patch(m, method)
    assert _state(m) is None and type(m.model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("method", ["full", "mezo"])
def test_parameters_frozen_before_the_patch_stay_frozen(method):
    """full and mezo trained (mezo: perturbed) every parameter in scope, frozen ones too (found by audit; the
    swapping methods kept them frozen). Now frozen stays frozen and unchanged; all frozen is refused."""
    m = transformers.LlamaForCausalLM(_llama_cfg())
    m.model.embed_tokens.requires_grad_(False)
    e0 = m.model.embed_tokens.weight.detach().clone()
    q0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rep = patch(m, method, **({"lr": 1e-2} if method == "full" else {"lr": 1e-2, "eps": 1e-2, "backend": "reference"}))
    assert not m.model.embed_tokens.weight.requires_grad
    assert rep.trainable_params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert any("frozen before the patch stay frozen" in n for n in rep.notes)
    for _ in range(2):
        rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)
    assert torch.equal(m.model.embed_tokens.weight.detach(), e0)
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight.detach(), q0)
    unpatch(m)
    assert not m.model.embed_tokens.weight.requires_grad and m.model.layers[0].self_attn.q_proj.weight.requires_grad
    m.requires_grad_(False)
    with pytest.raises(PatchError, match="every selected parameter has requires_grad=False"):
        patch(m, method)
    assert _state(m) is None


@pytest.mark.parametrize("method", ["lora", "qlora", "fp8_lora"])
def test_a_dtype_conversion_after_the_patch_keeps_the_adapters_float32(method):
    """model.half() after patching made the adapters float16 and AdamW's first steps NaN (eps 1e-8 underflows;
    0/0 where a gradient is zero; found by audit), while patching a float16 model gave float32 adapters. The
    patched layers keep adapter_dtype through conversions; the base converts."""
    from fusedtune.patch import missing_requirements
    if missing_requirements(methods()[method]):
        pytest.skip(f"{method} needs {missing_requirements(methods()[method])}")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(_llama_cfg())
    rep = patch(m, method)
    m.half()
    q = m.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == q.lora_B["default"].weight.dtype == torch.float32
    assert m.model.embed_tokens.weight.dtype == torch.float16
    losses = [float(rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    m.to(torch.bfloat16)
    assert q.lora_A["default"].weight.dtype == torch.float32
    from fusedtune.nn import LoRALinear
    layer = LoRALinear.from_linear(nn.Linear(8, 4), r=2)     # a layer made directly converts as before
    assert layer.bfloat16().lora_A["default"].weight.dtype == torch.bfloat16


def test_unpatch_merge_refuses_a_lora_bias_on_a_layer_without_one():
    """lora_bias=True on Llama (no biases): a merged layer would need a bias the config does not declare, which
    save_pretrained / from_pretrained drop (found by audit: logits changed after the round trip). Refused as
    peft's merge_and_unload, the model still patched and unchanged; merge=False works. With biases in the
    config the lora bias merges into them, and a frozen model stays frozen."""
    m = transformers.LlamaForCausalLM(_llama_cfg())
    patch(m, "lora", target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B["default"].bias.normal_()
    before = _params_and_flags(m)
    with pytest.raises(PatchError, match=r"q_proj and 1 more has no bias.*lora_bias.*Nothing was changed"):
        unpatch(m, merge=True)
    assert _state(m) is not None and _same_params_and_flags(m, before)
    unpatch(m, merge=False)
    assert m.model.layers[0].self_attn.q_proj.bias is None

    m = transformers.LlamaForCausalLM(_llama_cfg(attention_bias=True))
    m.requires_grad_(False)
    b0 = m.model.layers[0].self_attn.q_proj.bias.detach().clone()
    patch(m, "lora", target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    lb = m.model.layers[0].self_attn.q_proj.lora_B["default"]
    with torch.no_grad():
        lb.bias.normal_()
    want = b0 + m.model.layers[0].self_attn.q_proj.scaling["default"] * lb.bias.detach()
    unpatch(m, merge=True)
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.bias.detach(), want)
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("method,options", [("lora", {"target_modules": ["q_proj"]}), ("hft", {})])
def test_unpatch_after_an_assign_load_restores_the_models_flags(method, options):
    """load_state_dict(assign=True) on a patched model puts new Parameters into every module (they keep the
    patch's flags: LoRA freezes the embeddings and norms, HFT half the matrices); unpatch gives the model's
    parameters, new ones included, the flags they had before the patch."""
    m = transformers.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True))   # the assign-load unties lm_head
    m.model.norm.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in m.named_parameters(remove_duplicate=False)}
    patch(m, method, backend="reference", **options)
    assert {n: p.requires_grad for n, p in m.named_parameters(remove_duplicate=False)} != before
    m.load_state_dict(m.state_dict(), assign=True)
    unpatch(m)
    assert {n: p.requires_grad for n, p in m.named_parameters(remove_duplicate=False)} == before


def test_qlora_counts_the_weights_its_packed_base_holds():
    """A packed NF4 byte holds two weights: the report counted one (total 72,128 against lora's 118,208 on the
    same model; the trainable fraction 13% for 7.9%). peft counts two."""
    from fusedtune.patch import missing_requirements
    if missing_requirements(methods()["qlora"]):
        pytest.skip(f"qlora needs {missing_requirements(methods()['qlora'])}")
    reps = {}
    for method in ("lora", "qlora"):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(_llama_cfg())
        n = sum(p.numel() for p in m.parameters())
        reps[method] = patch(m, method, r=4)
        assert reps[method].total_params == n + reps[method].trainable_params
    assert reps["lora"].total_params == reps["qlora"].total_params


def test_report_step_refuses_replaced_parameters_but_copies_and_extra_tensors_work():
    """report.step checks, by one identity test, that the model still holds a parameter its optimizer steps
    (fully_shard replaces them all; the FSDP case runs in test_patch_fsdp.py). A copy of (model, report), a
    pickled report and a tensor added to the optimizer from outside the model still step."""
    import copy
    import io
    model = _llama_like("Llama")
    rep = patch(model, "lora")
    ids = torch.randint(0, 48, (2, 6))
    prompt = nn.Parameter(torch.zeros(3))
    rep.optimizer.add_param_group({"params": [prompt]})
    rep.step(lambda: model(ids, labels=ids).loss + prompt.sum())
    m2, rep2 = copy.deepcopy((model, rep))
    rep2.step(lambda: m2(ids, labels=ids).loss)
    torch.save(rep, io.BytesIO())
    module, name, _ = rep._probe
    module.register_parameter(name, nn.Parameter(module._parameters[name].detach().clone()))
    with pytest.raises(PatchError, match="no longer the model's"):
        rep.step(lambda: model(ids, labels=ids).loss)
