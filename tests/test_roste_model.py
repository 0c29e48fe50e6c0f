"""Model-level RoSTE (fusedtune.roste): the offline fold + rotation keeps a float64 Llama / Qwen2 / Mistral
function, prepare quantizes and trains, K/V fake quantization matches first principles, the rotation
search picks the lower error computed independently here, the config round-trips, export reproduces
the prepared model exactly with integer codes, and every refusal names the problem and changes nothing."""
import copy
import math
import types

import pytest
import torch
from torch import nn

import fusedtune.roste as R
from fusedtune.nn import RoSTELinear
from fusedtune.reference import hadamard as href
from fusedtune.reference import roste as rref
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- helpers (first principles, not the code under test)

def tiny(kind: str, hidden: int = 64, intermediate: int = 96, dtype=torch.float32, **kw):
    common = dict(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    common.update(kw)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(head_dim=hidden // 4, **common))
    return model.to(dtype)


def randomize_norms_and_biases(model):
    """Random RMSNorm weights (so folding matters) and random biases (so Q^T b matters)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)


def float64_norms(model):
    """HF's RMSNorm normalizes in float32 even for a float64 model (~1e-7 relative); for the exactness
    test each norm instance computes the same formula in the input's dtype instead."""
    def fwd(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(fwd, m)


def fq_first_principles(y: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Asymmetric min-max fake quantization of each row (last dim) in float64, written from the formula."""
    y = y.double()
    lo, hi = y.amin(-1, keepdim=True) * clip, y.amax(-1, keepdim=True) * clip
    levels = 2 ** bits - 1
    s = (hi - lo) / levels
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(y / s) + z, 0, levels)
    return (q - z) * s


def orthonormal_hadamard(n: int) -> torch.Tensor:
    return href.hadamard_matrix(n) / math.sqrt(n)      # H H^T = n I is checked in test_roste_ops


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_unchanged(model, snap):
    sd, mods, hooks = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def single_layer(weight: torch.Tensor, rotate=False) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
    return nn.Sequential(RoSTELinear.from_linear(lin, 4, 4, rotate=rotate))


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- step a + b: the function is unchanged

@pytest.mark.parametrize("kind,kw", [("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
                                     ("qwen2", {}), ("mistral", {})])
def test_rotate_model_keeps_the_float64_function(kind, kw):
    model = tiny(kind, dtype=torch.float64, **kw).eval()
    randomize_norms_and_biases(model)
    float64_norms(model)
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    e0 = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        want = model(IDS).logits
    rep = R.rotate_model(model)
    with torch.no_grad():
        got = model(IDS).logits
    # float64 rounding of a 2-layer model with O(1) logits is ~1e-15; 1e-10 leaves a wide margin while any
    # wrong fold / transpose / bias rotation moves the logits by O(0.1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the embedding really is rotated by H_n / sqrt(n) (a matmul with the explicit matrix)
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), e0 @ orthonormal_hadamard(64),
                               atol=1e-12, rtol=0)
    assert not torch.allclose(model.model.embed_tokens.weight, e0)
    norms = [model.model.norm] + [m for layer in model.model.layers
                                  for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    tied = kw.get("tie_word_embeddings", False)
    assert rep["untied_lm_head"] is tied and rep["hidden_size"] == 64
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    if tied:
        assert model.config.tie_word_embeddings is False


def test_head_rotation_rotates_each_value_head_and_keeps_the_function():
    """R2 against an explicit matrix: with head_rotation the value heads of v_proj are those without it
    multiplied by H_d / sqrt(d) (v_h -> v_h R), and the float64 function is still the same."""
    models = [tiny("qwen2", dtype=torch.float64).eval() for _ in range(2)]
    for m in models:
        randomize_norms_and_biases(m)
        float64_norms(m)
    with torch.no_grad():
        want = models[0](IDS).logits
    R.rotate_model(models[0], head_rotation=True)
    R.rotate_model(models[1], head_rotation=False)
    Rd = orthonormal_hadamard(16)
    v1, v0 = models[0].model.layers[0].self_attn.v_proj, models[1].model.layers[0].self_attn.v_proj
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(v1(x).reshape(5, 2, 16), v0(x).reshape(5, 2, 16) @ Rd, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(models[0](IDS).logits, want, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- step c: quantized layers, training

def test_prepare_replaces_the_projections_and_w8a8_stays_close():
    model = tiny_llama(64, 96)
    with torch.no_grad():
        base = model(IDS, labels=IDS).loss.item()
    rep = R.prepare(model, w_bits=8, a_bits=8)
    layer = model.model.layers[1]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        m = getattr(layer.self_attn, p)
        assert type(m) is RoSTELinear and m.rotate is False and (m.w_bits, m.a_bits, m.clip_ratio) == (8, 8, 0.95)
    assert layer.mlp.down_proj.rotate is True and layer.mlp.gate_proj.rotate is False
    assert type(model.lm_head) is nn.Linear
    assert len(rep.quantized) == 14 and rep.rotated_online == ["model.layers.0.mlp.down_proj",
                                                               "model.layers.1.mlp.down_proj"]
    assert "lm_head" in rep.unquantized and rep.kv_bits is None and not rep.untied_lm_head
    with torch.no_grad():
        q8 = model(IDS, labels=IDS).loss.item()
    # 8-bit per-token / per-channel quantization with clip 0.95 perturbs each activation by ~1% of its
    # range; the loss of the tiny model (ln 64 ~ 4.16) moves by far less than 1%, but it does move
    assert q8 != base and abs(q8 - base) < 0.01 * base


@pytest.mark.parametrize("bits,kv", [(8, None), (4, 4)])
def test_prepared_model_trains_every_parameter(bits, kv):
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=bits, a_bits=bits, kv_bits=kv)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert no_grad == [], no_grad
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- step d: K/V fake quantization

class Recorder:
    """An attention implementation that records the (q, k, v) it is given and runs sdpa."""
    def __init__(self):
        self.seen = []

    def __call__(self, module, q, k, v, mask, **kw):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        self.seen.append((module.layer_idx, q.detach(), k.detach(), v.detach()))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, **kw)


@pytest.mark.parametrize("rotate", [True, False])
def test_kv_quantized_after_rope_inside_attention_and_removable(rotate):
    from transformers import AttentionInterface
    rec = Recorder()
    AttentionInterface.register("fusedtune_test_recorder", rec)
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=8, a_bits=8)
    model.set_attn_implementation("fusedtune_test_recorder")
    with torch.no_grad():
        plain = model(IDS).logits
    raw = {i: (q, k, v) for i, q, k, v in rec.seen}                 # post-RoPE q, k, v without KV quant
    rec.seen.clear()
    names = R.add_kv_quant(model, 3, 0.9, rotate=rotate)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert model.config._attn_implementation == "fusedtune_roste_kv_fusedtune_test_recorder"
    assert all(s.base == "fusedtune_test_recorder" for _, s in R.kv_specs(model))
    with torch.no_grad():
        logits_kv = model(IDS).logits
    _, q, k, v = rec.seen[0]                                          # layer 0: same inputs as without KV quant
    q0, k0, v0 = (t.double() for t in raw[0])
    H = orthonormal_hadamard(16).t() if rotate else torch.eye(16, dtype=torch.float64)   # x -> x H^T / sqrt(d)
    torch.testing.assert_close(q.double(), q0 @ H, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), fq_first_principles(k0 @ H, 3, 0.9), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.double(), fq_first_principles(v0, 3, 0.9), atol=1e-5, rtol=1e-5)
    assert max(len(set(r.tolist())) for r in k.reshape(-1, 16)) <= 2 ** 3
    assert not torch.allclose(logits_kv, plain, atol=1e-4)
    assert R.unprepare_kv(model) == 2 and R.kv_specs(model) == []
    assert model.config._attn_implementation == "fusedtune_test_recorder"
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_kv_quantized_attention_keeps_the_causal_and_padding_masks(impl):
    """transformers builds the attention mask with the mask function registered for the implementation's
    name; the wrapping implementation lacked one, so eager attention saw the future and sdpa the padding."""
    model = tiny_llama(64, 96)
    model.set_attn_implementation(impl)
    R.prepare(model, w_bits=8, a_bits=8, kv_bits=8)
    model.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    later = ids.clone()
    later[:, 7] = (ids[:, 7] + 1) % 64                      # only the last token differs
    mask = torch.ones_like(ids)
    mask[:, :3] = 0                                         # three left pads
    pads = ids.clone()
    pads[:, :3] = (ids[:, :3] + 7) % 64                     # only the pad tokens differ
    with torch.no_grad():
        a, b = model(ids).logits, model(later).logits
        c, d = model(ids, attention_mask=mask).logits, model(pads, attention_mask=mask).logits
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.equal(a[:, 7], b[:, 7])
    assert torch.equal(c[:, 3:], d[:, 3:])


def test_prepare_with_kv_reports_and_refuses_twice():
    model = tiny_llama(64, 96)
    rep = R.prepare(model, w_bits=8, a_bits=8, kv_bits=4)
    assert rep.kv_bits == 4 and rep.kv_quantized == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert any("after RoPE behind a head_dim Hadamard rotation" in n for n in rep.notes)
    with pytest.raises(ValueError, match="already quantizes K/V"):
        R.add_kv_quant(model, 4)
    # K/V quantized alone first: prepare with kv_bits refuses before it rotates or swaps anything
    plain = tiny_llama(64, 96)
    R.add_kv_quant(plain, 4)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="already quantizes K/V"):
        R.prepare(plain, w_bits=8, a_bits=8, kv_bits=4)
    assert not any(isinstance(m, RoSTELinear) for m in plain.modules())
    after = plain.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- search_rotation / apply_rotation / RotationConfig

def independent_errors(w, x, bits=4, clip=0.95):
    """(err_rot, err_plain) with an explicit Hadamard matmul and the float64 first-principles quantizer. The
    online rotation (fusedtune.ops.roste.hadamard, RoSTELinear) is x -> x H^T / sqrt(n); H^T != H for the
    Paley factors (96 = 12 x 8), so Q here is the transposed matrix."""
    Q = orthonormal_hadamard(w.shape[1]).t()
    wd, xd = w.double(), x.double()
    mse = lambda y, b: (fq_first_principles(y, b, clip) - y).pow(2).mean().item()  # noqa: E731
    return mse(wd @ Q, bits) + mse(xd @ Q, bits), mse(wd, bits) + mse(xd, bits)


def test_search_rotates_a_layer_with_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, 5] *= 50
    w = torch.randn(32, 64, generator=g)
    cfg = R.search_rotation(single_layer(w), [x[:256], x[256:]])
    rot, plain = independent_errors(w, x)
    # float32 vs float64 quantization may move a rare value to the next level: far below 1e-3 relative
    assert cfg.err_rotated["0"] == pytest.approx(rot, rel=1e-3)
    assert cfg.err_plain["0"] == pytest.approx(plain, rel=1e-3)
    assert rot < 0.5 * plain and cfg.rotate == {"0": True}


@pytest.mark.parametrize("case", ["hadamard_spread", "plus_minus_one"])
def test_search_picks_the_lower_error_where_rotation_does_not_help(case):
    g = torch.Generator().manual_seed(1)
    Q = orthonormal_hadamard(64)
    if case == "hadamard_spread":                    # X = Z Q^T, W = V Q^T: rotating gives back Gaussians Z, V
        x = (torch.randn(512, 64, generator=g, dtype=torch.float64) @ Q.t()).float()
        w = (torch.randn(32, 64, generator=g, dtype=torch.float64) @ Q.t()).float()
    else:                                            # two-valued rows: rotation makes them Gaussian-like
        x = torch.randint(0, 2, (512, 64), generator=g).float() * 2 - 1
        w = torch.randint(0, 2, (32, 64), generator=g).float() * 2 - 1
    cfg = R.search_rotation(single_layer(w), [x])
    rot, plain = independent_errors(w, x)
    assert abs(rot - plain) > 0.02 * plain           # not a near tie, so the float32/float64 gap cannot flip it
    assert cfg.rotate["0"] == (rot < plain)
    assert cfg.err_rotated["0"] == pytest.approx(rot, rel=1e-3) and cfg.err_plain["0"] == pytest.approx(plain,
                                                                                                        rel=1e-3)
    if case == "plus_minus_one":
        assert cfg.rotate["0"] is False


def test_search_on_a_prepared_model_apply_and_round_trip(tmp_path):
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=4, a_bits=4)
    model.train()
    snap = snapshot(model)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    cfg = R.search_rotation(model, [IDS, {"input_ids": IDS[:1]}], layers=names)
    assert_unchanged(model, snap)                                   # no hooks left, nothing changed
    assert model.training and all(m.training for m in model.modules())
    assert list(cfg.rotate) == names
    # the captured inputs are what the layer sees: recompute them with our own hook and compare the errors
    xs = []
    h = model.get_submodule(names[1]).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 96)))
    model.eval()
    with torch.no_grad():
        model(IDS)
        model(IDS[:1])
    h.remove()
    rot, plain = independent_errors(model.get_submodule(names[1]).weight.detach(), torch.cat(xs))
    assert cfg.err_rotated[names[1]] == pytest.approx(rot, rel=1e-3)
    assert cfg.err_plain[names[1]] == pytest.approx(plain, rel=1e-3)

    path = tmp_path / "rot.json"
    cfg.save(path)
    back = R.RotationConfig.load(path)
    assert back == cfg
    flipped = R.RotationConfig({n: not v for n, v in cfg.rotate.items()})
    changed = R.apply_rotation(model, flipped)
    assert changed == flipped.rotate
    assert all(model.get_submodule(n).rotate == v for n, v in flipped.rotate.items())
    assert model.model.layers[0].mlp.down_proj.rotate is True           # not named: kept
    path.write_text(path.read_text().replace('"version": 1', '"version": 7'))
    with pytest.raises(ValueError, match="version 7"):
        R.RotationConfig.load(path)


def test_sizes_without_hadamard_can_only_stay_unrotated():
    model = single_layer(torch.randn(8, 68))                           # 68 = 17 x 4: no construction
    cfg = R.search_rotation(model, [torch.randn(16, 68)])
    assert cfg.rotate == {"0": False} and cfg.err_rotated == {"0": None} and cfg.err_plain["0"] > 0
    with pytest.raises(ValueError, match="cannot rotate 0 .in_features 68."):
        R.apply_rotation(model, R.RotationConfig({"0": True}))
    with pytest.raises(ValueError, match="does not have.*'nope'"):
        R.apply_rotation(model, R.RotationConfig({"0": False, "nope": True}))
    assert model[0].rotate is False


# ---------------------------------------------------------------- export

def test_export_reproduces_the_prepared_model_with_integer_codes():
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=3, a_bits=4, kv_bits=4)
    R.apply_rotation(model, R.RotationConfig({"model.layers.0.self_attn.q_proj": True,
                                              "model.layers.1.mlp.down_proj": False}))
    model.eval()
    snap = snapshot(model)
    q = R.export(model, gemm="fake")
    assert_unchanged(model, snap)
    assert len(R.kv_specs(model)) == 2 and len(R.kv_specs(q)) == 2
    assert q.config._attn_implementation == model.config._attn_implementation == "fusedtune_roste_kv_sdpa"
    with torch.no_grad():
        # the codes reproduce the fake-quantized weight bit for bit and the activations run the same op,
        # so the logits are identical, not merely close
        assert torch.equal(q(IDS).logits, model(IDS).logits)
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, R.QuantizedLinear)]
    assert len(layers) == 14 and not any(isinstance(m, RoSTELinear) for m in q.modules())
    for n, m in layers:
        assert m.codes.dtype == torch.uint8 and int(m.codes.max()) <= 2 ** 3 - 1
        assert m.scale.dtype == torch.float32 and m.scale.shape == (m.out_features, 1)
        assert len(m.codes.unique()) > 2                              # real codes, not a constant
    qq = q.get_submodule("model.layers.0.self_attn.q_proj")
    src = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert qq.rotate is True and q.get_submodule("model.layers.1.mlp.down_proj").rotate is False
    # one layer against first principles: the dequantized codes are the 3-bit fake quant of W H^T / sqrt(n)
    want = fq_first_principles(src.weight.detach().double() @ orthonormal_hadamard(64).t(), 3, 0.95)
    torch.testing.assert_close(qq.dequantized_weight().double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(qq.dequantized_weight(), src.quantized_weight().detach())
    # 3-bit codes are stored two per byte, and the state dict round-trips into a fresh copy
    assert qq.qweight.dtype == torch.uint8 and qq.qweight.shape == (qq.out_features, 32)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.qweight" in sd and not any(k.endswith(".codes") for k in sd)
    q2 = R.export(model, gemm="fake")
    with torch.no_grad():
        for t in q2.state_dict().values():
            t.zero_() if t.is_floating_point() or t.dtype == torch.uint8 else None
    q2.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(q2(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("gemm", ["integer", "fake"])
def test_exported_model_cast_to_a_16_bit_dtype_keeps_its_quantized_weights(gemm):
    """.to(bf16) / .half() of an exported model: scale and zero points stay float32 (they were cast: the
    integer GEMM refused them, the fake one rounded the exported weight), the bias converts."""
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer = RoSTELinear.from_linear(lin, w_bits=4, a_bits=8, rotate=True).eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    q = R.export(layer, gemm=gemm)
    with torch.no_grad():
        want = q(x)
        for dtype in (torch.bfloat16, torch.float16):
            c = copy.deepcopy(q).to(dtype)
            assert c.scale.dtype == c.zero.dtype == torch.float32 and c.bias.dtype == dtype
            assert torch.equal(c.scale, q.scale) and torch.equal(c.zero, q.zero)
            if dtype == torch.bfloat16:
                assert torch.equal(c(x), want)
            else:
                assert c(x.half()).dtype == torch.float16


def test_integer_gemm_export_matches_first_principles():
    """gemm="integer" (the default): every exported layer computes sx sw sum_k (qx - zx)(qw - zw) + b from
    the activation codes of its (rotated) input exactly (float64 of the codes, rounded once), and the
    model's logits stay within float32 rounding of the fake-quantized model's."""
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=4, a_bits=6, kv_bits=None)
    model.eval()
    q = R.export(model)
    qf = R.export(model, gemm="fake")
    seen = {}
    for name, m in q.named_modules():
        if isinstance(m, R.QuantizedLinear):
            assert m.gemm == "integer"
            m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
    with torch.no_grad():
        li, lf = q(IDS).logits, qf(IDS).logits
    assert len(seen) == 14
    torch.testing.assert_close(li, lf, atol=1e-4, rtol=1e-4)
    assert not torch.equal(li, lf)       # a different (exact) computation, not the fake path in disguise
    for name, (x, out) in seen.items():
        m = q.get_submodule(name)
        y = (x.double() @ orthonormal_hadamard(x.shape[-1]).t()).float() if m.rotate else x.float()
        qx, sx, zx = rref.quantize(y.reshape(-1, y.shape[-1]), 6, "token", False, m.clip_ratio)
        want = ((qx.double() - zx.double()) @ (m.codes.double() - m.zero.double()).t()) * sx.double() \
            * m.scale.double().t()
        torch.testing.assert_close(out.reshape(want.shape).double(), want, atol=1e-5, rtol=1e-6,
                                   msg=f"{name}")


def test_integer_gemm_refusals():
    lin = RoSTELinear.from_linear(torch.nn.Linear(8, 4), w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match="gemm must be one of"):
        R.QuantizedLinear.from_roste(lin, gemm="int4")
    big = torch.zeros(2, 65537, dtype=torch.uint8)
    one = torch.ones(2, 1)
    with pytest.raises(ValueError, match="in_features <= 65536"):
        R.QuantizedLinear(big, one, one, None, 4, 4, False, 1.0)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_code_packing_round_trips(bits, n):
    from fusedtune.roste.export import pack_codes, unpack_codes
    codes = torch.randint(0, 2 ** bits, (3, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == ((3, (n + 1) // 2) if bits <= 4 else (3, n))
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    if bits <= 4 and n >= 2:   # layout: code 0 in the low nibble of byte 0, code 1 in its high nibble
        assert int(packed[0, 0]) == int(codes[0, 0]) + 16 * int(codes[0, 1])


# ---------------------------------------------------------------- refusals: clear errors, nothing changed

def test_unsupported_architectures_are_refused_by_name():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    snap = snapshot(gpt2)
    for fn in (R.prepare, R.rotate_model):
        with pytest.raises(TypeError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
            fn(gpt2)
    assert_unchanged(gpt2, snap)
    with pytest.raises(TypeError, match="expected a Hugging Face causal LM"):
        R.prepare("model")


def test_unsupported_sizes_are_refused_before_any_change():
    model = tiny("llama", 68, 96, num_attention_heads=2, num_key_value_heads=1)   # hidden 68 = 17 x 4
    snap = snapshot(model)
    for fn in (R.prepare, R.rotate_model):
        with pytest.raises(ValueError, match="hidden size 68 has no Hadamard construction.*supported"):
            fn(model)
    assert_unchanged(model, snap)

    model = tiny_llama(64, 68)                                        # intermediate 68: down_proj's online R4
    snap = snapshot(model)
    with pytest.raises(ValueError, match="intermediate size.*68 has no Hadamard"):
        R.prepare(model)
    assert_unchanged(model, snap)
    off = R.RotationConfig({f"model.layers.{i}.mlp.down_proj": False for i in range(2)})
    rep = R.prepare(model, rotation=off)                              # no online rotation: accepted
    assert rep.rotated_online == [] and model.model.layers[0].mlp.down_proj.rotate is False


def test_bad_arguments_are_refused_before_any_change():
    model = tiny_llama(64, 96)
    snap = snapshot(model)
    for kwargs, err, msg in [(dict(w_bits=9), ValueError, "w_bits must be an int in \\[2, 8\\], got 9"),
                             (dict(a_bits=1), ValueError, "a_bits must be"),
                             (dict(kv_bits=1), ValueError, "kv_bits must be None or an int"),
                             (dict(kv_bits=True), ValueError, "kv_bits must be"),
                             (dict(clip_ratio=0.0), ValueError, "clip_ratio must be a number in \\(0, 1\\]"),
                             (dict(clip_ratio=1.5), ValueError, "clip_ratio"),
                             (dict(rotation={"a": True}), TypeError, "rotation must be a RotationConfig"),
                             (dict(rotation=R.RotationConfig({"model.layers.9.mlp.down_proj": True})), ValueError,
                              "does not have.*layers.9")]:
        with pytest.raises(err, match=msg):
            R.prepare(model, **kwargs)
        assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="is torch.float64.*model.float"):
        R.prepare(model.double())
    model.float()
    R.prepare(model)
    with pytest.raises(ValueError, match="already has RoSTELinear"):
        R.prepare(model)
    plain = tiny_llama(64, 96)
    for fn, args, err, msg in [(R.search_rotation, ([IDS],), ValueError, "no RoSTELinear layers"),
                               (R.export, (), ValueError, "no RoSTELinear layers")]:
        with pytest.raises(err, match=msg):
            fn(plain, *args)
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        R.search_rotation(model, [])
    with pytest.raises(TypeError, match="wrap it in a list"):
        R.search_rotation(model, IDS)
    with pytest.raises(TypeError, match="each calibration batch must be"):
        R.search_rotation(model, [3])
    with pytest.raises(ValueError, match="not RoSTELinear layers"):
        R.search_rotation(model, [IDS], layers=["lm_head"])
    with pytest.raises(TypeError, match="rotate must map layer names"):
        R.RotationConfig({"a": 1})
    with pytest.raises(ValueError, match="add_kv_quant: kv_bits"):
        R.add_kv_quant(model, 9)


def test_int_linear_refuses_bad_input_by_name():
    from fusedtune.ops.roste import int_linear
    y = torch.randn(3, 8)
    qw, sw, zw = torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4), torch.zeros(4)
    uw = torch.zeros(4, dtype=torch.float64)
    assert int_linear(y, 4, 1.0, qw, 4, sw, zw, uw).shape == (3, 4)
    bad = [((y, 9, 1.0, qw, 4, sw, zw, uw), "a_bits must be an int in"),
           ((y, 4, 0.0, qw, 4, sw, zw, uw), "clip_ratio"),
           ((y, 4, 1.0, qw, 8, sw, zw, uw), r"qweight must be contiguous uint8 \[N, 8\]"),
           ((y, 4, 1.0, qw.int(), 4, sw, zw, uw), "qweight"),
           ((y, 4, 1.0, qw, 4, sw.double(), zw, uw), "sw must be contiguous torch.float32"),
           ((y, 4, 1.0, qw, 4, sw, zw, uw.float()), "uw must be contiguous torch.float64"),
           ((y, 4, 1.0, qw, 4, sw, zw[:3], uw), r"zw must be .* shape \(4,\)"),
           ((y.int(), 4, 1.0, qw, 4, sw, zw, uw), "float32/bfloat16/float16")]
    for args, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            int_linear(*args)
    with pytest.raises(ValueError, match="bias must be"):
        int_linear(y, 4, 1.0, qw, 4, sw, zw, uw, bias=torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="above 65536"):
        int_linear(torch.zeros(1, 65538), 4, 1.0, torch.zeros(1, 32769, dtype=torch.uint8), 4, sw[:1], zw[:1], uw[:1])


def test_search_measures_at_the_layers_own_settings_unless_told():
    """A model prepared at W4A8 is scored at A8 by default (it used to be scored at the A4 default)."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g)
    m = single_layer(w)
    m[0].a_bits, m[0].clip_ratio = 8, 1.0
    cfg = R.search_rotation(m, [x])
    assert (cfg.w_bits, cfg.a_bits, cfg.clip_ratio) == (4, 8, 1.0)
    at4 = R.search_rotation(m, [x], a_bits=4)
    assert at4.a_bits == 4 and at4.err_plain["0"] > cfg.err_plain["0"]


def test_search_refuses_layers_that_disagree_without_explicit_bits():
    model = tiny_llama(64, 96)
    R.prepare(model, w_bits=4, a_bits=4)
    model.model.layers[0].mlp.down_proj.a_bits = 8
    with pytest.raises(ValueError, match="the layers differ in a_bits"):
        R.search_rotation(model, [IDS])
    assert R.search_rotation(model, [IDS], a_bits=4).a_bits == 4


@pytest.mark.parametrize("kw,msg", [(dict(w_bits=16), "w_bits must be an int in \\[2, 8\\]"),
                                    (dict(a_bits=1), "a_bits must be"), (dict(clip_ratio=0.0), "clip_ratio must be"),
                                    (dict(ste="sign"), "ste must be 'identity' or 'clipped'")])
def test_roste_linear_refuses_bad_settings_when_made(kw, msg):
    from fusedtune.nn import RoSTELinear
    with pytest.raises(ValueError, match=msg):
        RoSTELinear.from_linear(torch.nn.Linear(64, 32), **kw)
