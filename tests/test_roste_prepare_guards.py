"""fusedtune.roste.prepare's guards (found by review): a pickled K/V-quantized model runs in a process that never
registered its attention function; a checkpoint of a prepared model is not rotated a second time (which
undid the rotation); models sharing a config object stay apart; models it would break -- offloaded weights,
hooks on the projections, inference tensors, a backend RoSTE's ops cannot run -- are refused before anything
changes."""
import pickle

import pytest
import torch

import fusedtune.roste as R
from fusedtune.nn import RoSTELinear
from test_roste_model import IDS, assert_unchanged, snapshot, tiny

transformers = pytest.importorskip("transformers")


def _forget_registration(name):
    """What a fresh process has: no attention function (nor mask function) under the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def test_a_pickled_kv_quantized_model_runs_where_its_attention_was_never_registered():
    model = tiny("llama")
    R.prepare(model, 4, 4, kv_bits=4)
    want = model(IDS).logits
    blob = pickle.dumps(model)
    _forget_registration(model.config._attn_implementation)
    assert torch.equal(pickle.loads(blob)(IDS).logits, want)


def test_a_checkpoint_of_a_prepared_model_is_not_rotated_again(tmp_path):
    first = tiny("llama")
    R.prepare(first, 4, 4)
    want = first(IDS).logits
    first.save_pretrained(tmp_path)              # what a user keeps: plain weights, the config
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rotated already.*Nothing was changed"):
        R.rotate_model(again)
    rep = R.prepare(again, 4, 4)
    assert any("rotated already" in n for n in rep.notes)
    assert torch.equal(again(IDS).logits, want)


def test_offloaded_weights_are_refused():
    accelerate = pytest.importorskip("accelerate")
    model = tiny("llama")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    before = [type(m) for m in model.modules()]
    for fn in (R.prepare, R.rotate_model):
        with pytest.raises(ValueError, match="offloaded by accelerate.*Nothing was changed"):
            fn(model)
    assert [type(m) for m in model.modules()] == before


def test_hooks_on_the_projections_are_refused():
    model = tiny("llama")
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj has a forward hook.*Nothing was changed"):
        R.prepare(model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("share", ["module", "norm"])
def test_weights_shared_across_layers_are_refused(share):
    """Folding each layer's norm and merging the rotation once per place would rotate a shared weight twice (before
    the refusal: logits 0.3 off, silently)."""
    model = tiny("llama", tie_word_embeddings=True)           # (a tied lm_head stays fine: it is untied)
    a, b = model.model.layers[0], model.model.layers[1]
    if share == "module":
        b.mlp.down_proj = a.mlp.down_proj
        want = "model.layers.1.mlp.down_proj.weight is the same parameter as model.layers.0.mlp.down_proj.weight"
    else:
        b.input_layernorm.weight = a.input_layernorm.weight
        want = "model.layers.1.input_layernorm.weight is the same parameter as model.layers.0.input_layernorm.weight"
    snap = snapshot(model)
    for fn in (R.prepare, R.rotate_model):
        with pytest.raises(TypeError, match=want.replace(".", r"\.") + r" \(shared across layers\)"):
            fn(model)
    assert_unchanged(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_inference_tensors_are_refused_before_the_lm_head_is_untied():
    with torch.inference_mode():
        model = tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for fn in (R.prepare, R.rotate_model):
        with pytest.raises(ValueError, match="inference tensor.*Nothing was changed"):
            fn(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


@pytest.mark.parametrize("backend", ["bogus", "cuda"])
def test_a_backend_the_ops_cannot_run_is_refused_before_any_change(backend):
    """(cuda: the fake quantization has no CUDA kernel, and this is a CPU model)"""
    model = tiny("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run RoSTE's ops"):
        R.prepare(model, 4, 4, kv_bits=4, backend=backend)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run"):
        RoSTELinear.from_linear(torch.nn.Linear(64, 64), backend=backend)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run"):
        R.add_kv_quant(model, 4, backend=backend)
    assert_unchanged(model, snap)


def test_search_leaves_padding_tokens_out_of_the_activation_errors():
    """A dict batch's attention_mask: the padded positions are not calibration data (found by review: they
    entered the activation errors). A right-padded batch gives the errors of its sequences unpadded."""
    model = tiny("llama")
    R.prepare(model, 4, 4)
    a, b = IDS[0], IDS[1, :7]
    padded = {"input_ids": torch.stack([a, torch.cat([b, torch.full((5,), 63)])]),
              "attention_mask": torch.stack([torch.ones(12, dtype=torch.long),
                                             torch.cat([torch.ones(7, dtype=torch.long), torch.zeros(5, dtype=torch.long)])])}
    got = R.search_rotation(model, [padded])
    want = R.search_rotation(model, [a[None], b[None]])
    for n in want.rotate:
        assert got.err_plain[n] == pytest.approx(want.err_plain[n], rel=1e-4), n
        assert got.err_rotated[n] == pytest.approx(want.err_rotated[n], rel=1e-4), n


def test_switching_the_attention_implementation_after_prepare_is_refused_at_the_forward():
    """model.set_attn_implementation after prepare(kv_bits=...) ran attention without the K/V quantization,
    silently."""
    model = tiny("llama")
    R.prepare(model, 4, 4, kv_bits=4)
    quantized = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match=f"now 'eager', so K/V are no longer quantized.*was {quantized!r}"):
        model(IDS)
    model.set_attn_implementation(quantized)
    model(IDS)
    R.unprepare_kv(model)
    assert not model._forward_pre_hooks
    model.set_attn_implementation("sdpa")
    model(IDS)


def test_models_sharing_a_config_object_are_prepared_independently():
    """transformers models built from one config object share it (LlamaForCausalLM(cfg), from_config): prepare
    wrote its rotation record, untied embeddings and K/V attention into it, so the second model was not rotated
    ("rotated already"), a plain one failed in attention, and a second K/V prepare wrapped its own function
    (RecursionError). Found by review. Each prepared model now gets its own config."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    a, b, plain = (transformers.LlamaForCausalLM(cfg) for _ in range(3))
    want = plain(IDS).logits
    base_impl = cfg._attn_implementation
    rep_a = R.prepare(a, 8, 8, kv_bits=8)
    assert a.config is not cfg and a.model.layers[0].self_attn.config is a.config
    assert R.prepare(b, 8, 8, kv_bits=8).folded_norms == rep_a.folded_norms == 3   # b rotated too
    assert cfg._attn_implementation == base_impl and not hasattr(cfg, "fusedtune_roste_rotation")
    assert torch.equal(plain(IDS).logits, want)                    # the third model: untouched
    fresh = transformers.LlamaForCausalLM(a.config)                # a config copied from a prepared model
    with pytest.raises(RuntimeError, match="K/V fake quantization, but its LlamaAttention modules have none set up"):
        fresh(IDS)
    rep = R.prepare(fresh, 8, 8, kv_bits=8)                        # wraps the base implementation, not itself
    assert rep.folded_norms == 0 and any("rotated already" in n for n in rep.notes)   # its config says so
    assert fresh.config._attn_implementation == a.config._attn_implementation
    assert torch.isfinite(fresh(IDS).logits).all() and torch.isfinite(b(IDS).logits).all()
