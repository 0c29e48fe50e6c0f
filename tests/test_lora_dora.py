"""DoRA (peft's use_dora) in LoRALinear and fusedtune.ops.dora: the weight norm against its dense
definition, forward and gradients (magnitude included) against peft's DoRA layer and an fp64 computation,
dropout with the same mask, merge/unmerge, state dict and adapter files both ways with peft, QDoRA (NF4
base), the patch method, the inference cache, compile, and what is refused."""
import contextlib
import copy
import math
import pickle
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
from fusedtune.ops import _eager  # noqa: E402
from fusedtune.ops import dora as dora_ops  # noqa: E402
from fusedtune.patch import PatchError  # noqa: E402
from fusedtune.testing import assert_within_rule  # noqa: E402
from lora_cases import SeededDropout, dora64, norm64  # noqa: E402
from lora_cases import dora_outputs as outputs  # noqa: E402
from tiny_models import tiny_llama, train_losses  # noqa: E402


def _peft(lin, name="default", r=4, alpha=8, dropout=0.0, rslora=False, magnitude_seed=None):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, init_lora_weights=False,
                     use_dora=True)
    pe = peft_layer.Linear(lin, name, config=cfg, r=r, lora_alpha=alpha)
    pe.lora_A[name].float()
    pe.lora_B[name].float()
    if magnitude_seed is not None:     # a trained magnitude: not the norm it starts at
        gen = torch.Generator().manual_seed(magnitude_seed)
        s = pe.scaling[name]
        m = norm64(lin.weight, pe.lora_A[name].weight, pe.lora_B[name].weight, s).float()
        pe.lora_magnitude_vector[name].weight = nn.Parameter(m * (0.5 + torch.rand(m.shape, generator=gen)))
    return pe


def _config(i):
    rnd = random.Random(i)
    return dict(K=rnd.choice([1, 17, 64, 129]), N=rnd.choice([3, 31, 96]), r=rnd.choice([1, 2, 8, 33]),
                alpha=rnd.choice([1, 8, 32]), bias=rnd.random() < 0.5, rslora=rnd.random() < 0.5,
                dtype=rnd.choice([torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K,N,r", [(1, 3, 1), (17, 31, 8), (129, 96, 33)])
def test_weight_norm_matches_the_dense_definition(K, N, r, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(K * N + r)
    W = torch.randn(N, K, generator=gen).to(dtype)
    A, B = torch.randn(r, K, generator=gen) / K ** 0.5, torch.randn(N, r, generator=gen)
    want = norm64(W, A, B, 0.7)
    for chunk in (1 << 24, 2 * K):            # W in one piece, and in row chunks of two rows
        monkeypatch.setattr(dora_ops, "_CHUNK", chunk)
        got = dora_ops.dora_weight_norm(W, A, B, 0.7)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


def test_weight_norm_keeps_its_relative_accuracy_where_the_adapter_nearly_cancels_the_weight():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 16, generator=gen), torch.randn(8, 2, generator=gen)
    W = -0.5 * (B @ A) + 1e-3 * torch.randn(8, 16, generator=gen)   # ||W + 0.5 B A|| ~ 1e-3 ||W||
    n = dora_ops.dora_weight_norm(W, A, B, 0.5)
    want = norm64(W, A, B, 0.5)
    assert (want < 2e-2 * torch.linalg.vector_norm(W.double(), dim=1)).all()
    torch.testing.assert_close(n.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("i", range(8))
def test_forward_and_grads_match_peft(i):
    c = _config(i)
    torch.manual_seed(i)
    lin = nn.Linear(c["K"], c["N"], bias=c["bias"]).to(c["dtype"])
    pe = _peft(lin, r=c["r"], alpha=c["alpha"], rslora=c["rslora"], magnitude_seed=i)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    assert ours.use_dora == {"default": True}
    x = torch.randn(2, 7, c["K"]).to(c["dtype"])
    dy = torch.randn(2, 7, c["N"]).to(c["dtype"])
    got, want = outputs(ours, x, dy), outputs(pe, x, dy)
    s = pe.scaling["default"]
    assert s == pytest.approx(c["alpha"] / (math.sqrt(c["r"]) if c["rslora"] else c["r"]))
    exact = dora64(x, lin.weight, pe.lora_A["default"].weight, pe.lora_B["default"].weight, s,
                   pe.lora_magnitude_vector["default"].weight, lin.bias, dy)
    atol = 1e-5 if c["dtype"] == torch.float32 else 2e-2
    for j, (a, p, e) in enumerate(zip(got, want, exact)):
        assert a.dtype == p.dtype and a.shape == p.shape, (j, a.dtype, p.dtype)
        assert_within_rule(a.reshape(e.shape), e, p.reshape(e.shape), f"config {c} output {j}", atol=atol)


@pytest.mark.parametrize("i", range(3))
def test_training_with_dropout_matches_peft_with_the_same_mask(i):
    """peft's DoRA with dropout rescales the base output of the dropped input (one more GEMM): the same."""
    from fusedtune.ops.lora import _seed_tensor
    from fusedtune.reference.lora import dropout_mask
    c = dict(_config(50 + i), dtype=torch.float32)
    p = 0.25
    torch.manual_seed(i)
    lin = nn.Linear(c["K"], c["N"], bias=c["bias"])
    pe = _peft(lin, r=c["r"], alpha=c["alpha"], rslora=c["rslora"], dropout=p, magnitude_seed=i)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x, dy = torch.randn(3, 5, c["K"]), torch.randn(3, 5, c["N"])
    torch.manual_seed(100 + i)
    seed = int(_seed_tensor(None, p))          # the seed our layer draws for this forward
    pe.lora_dropout["default"] = SeededDropout(p, seed)
    torch.manual_seed(100 + i)
    got, want = outputs(ours, x, dy), outputs(pe, x, dy)
    keep = dropout_mask(15, c["K"], seed, p)
    exact = dora64(x, lin.weight, pe.lora_A["default"].weight, pe.lora_B["default"].weight, pe.scaling["default"],
                   pe.lora_magnitude_vector["default"].weight, lin.bias, dy, keep, p)
    for j, (a, b, e) in enumerate(zip(got, want, exact)):
        assert_within_rule(a.reshape(e.shape), e, b.reshape(e.shape), f"config {c} output {j}", atol=1e-5)
    ours.eval()                                # no dropout in eval: the mask no longer matters
    y_eval = ours(x)
    assert not torch.allclose(y_eval, got[0], atol=1e-4)


def test_new_adapter_leaves_the_output_unchanged_and_magnitude_trains():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    m = LoRALinear.from_linear(copy.deepcopy(lin), r=4, use_dora=True, init_lora_weights=False)
    mag = m.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(mag.double(), norm64(lin.weight, m.lora_A["default"].weight,
                                                    m.lora_B["default"].weight, m.scaling["default"]), rtol=1e-6, atol=0)
    plain = LoRALinear.from_linear(copy.deepcopy(lin), r=4, init_lora_weights=False)
    with torch.no_grad():
        plain.lora_A["default"].weight.copy_(m.lora_A["default"].weight)
        plain.lora_B["default"].weight.copy_(m.lora_B["default"].weight)
    x = torch.randn(5, 20)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-6)     # g = 1 at the start: plain LoRA
    assert mag.requires_grad and [n for n, p in m.named_parameters() if p.requires_grad] == [
        "lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(x).square().sum().backward()
    before = mag.detach().clone()
    opt.step()
    assert not torch.equal(mag, before)


def test_merge_unmerge_and_to_linear_follow_forward_and_peft():
    torch.manual_seed(3)
    lin = nn.Linear(24, 16)
    pe = _peft(copy.deepcopy(lin), magnitude_seed=3)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    ours.eval()
    x = torch.randn(6, 24)
    y = ours(x)
    lin_merged = ours.to_linear(merge=True)
    torch.testing.assert_close(lin_merged(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.to_linear(merge=False).weight, lin.weight, rtol=0, atol=0)
    w0 = ours.base_layer.weight.detach().clone()
    ours.merge()
    pe.merge()
    torch.testing.assert_close(ours.base_layer.weight, pe.base_layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.to_linear(merge=False).weight, w0, rtol=0, atol=0)
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, w0)                       # the stash: bit-exact
    ours.merge(exact_unmerge=False)
    torch.testing.assert_close(ours.to_linear(merge=False).weight, w0, rtol=1e-5, atol=1e-6)
    ours.unmerge()                                                       # W / g - dW, as peft
    pe.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pe.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_peft_round_trip_and_set_dora():
    torch.manual_seed(4)
    lin = nn.Linear(20, 12)
    pe = _peft(copy.deepcopy(lin), magnitude_seed=4)
    ours = LoRALinear.from_linear(copy.deepcopy(lin), r=4, alpha=8, use_dora=True)
    assert sorted(ours.state_dict()) == sorted(pe.state_dict())
    ours.load_state_dict(pe.state_dict())
    x = torch.randn(3, 20)
    torch.testing.assert_close(ours(x), pe(x), rtol=1e-5, atol=1e-6)
    back = ours.to_peft()
    assert back.use_dora["default"]
    assert back.lora_magnitude_vector["default"].weight is ours.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-6)
    again = LoRALinear.from_peft(back)
    assert again.lora_magnitude_vector["default"].weight is ours.lora_magnitude_vector["default"].weight
    y = ours(x)
    ours.set_dora("default", False)           # a plain adapter: the magnitude goes, the output changes
    assert "default" not in ours.lora_magnitude_vector and not ours.use_dora["default"]
    assert not torch.allclose(ours(x), y, atol=1e-4)
    y_plain = ours(x)
    ours.set_dora("default", True)            # back to DoRA: the magnitude starts at the norm, no change
    torch.testing.assert_close(ours(x), y_plain, rtol=1e-5, atol=1e-6)


def test_adapter_files_round_trip_with_peft(tmp_path):
    model = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                               init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.5)
    pm.save_pretrained(tmp_path / "peft")
    fusedtune.patch(model, "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8, use_dora=True)
    loaded = fusedtune.lora.load_adapter(model, str(tmp_path / "peft"))
    assert len(loaded) == 4
    ids = torch.randint(0, 64, (2, 10))
    pm.eval()
    model.eval()
    want = pm(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    cfg = fusedtune.lora.save_adapter(model, str(tmp_path / "ours"))
    assert cfg["use_dora"] is True
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama()), str(tmp_path / "ours"))
    pm2.eval()
    torch.testing.assert_close(pm2(ids).logits, want, atol=1e-5, rtol=1e-5)
    model2 = tiny_llama()
    fusedtune.patch(model2, "lora", target_modules=["q_proj", "v_proj"], r=4, alpha=8)   # plain adapters:
    fusedtune.lora.load_adapter(model2, str(tmp_path / "ours"))                       # become DoRA ones
    model2.eval()
    torch.testing.assert_close(model2(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_adapter_file_whose_config_and_tensors_disagree_is_refused(tmp_path):
    model = tiny_llama()
    fusedtune.patch(model, "lora", target_modules=["q_proj"], r=4, use_dora=True)
    fusedtune.lora.save_adapter(model, str(tmp_path))
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="use_dora=False but the file has a lora_magnitude_vector"):
        fusedtune.lora.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patch_with_dora_trains_from_an_unchanged_model():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    y0 = model(ids).logits
    rep = fusedtune.patch(model, "lora", r=4, alpha=8, lr=1e-2, use_dora=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.use_dora == {"default": True} and "DoRA" in rep.rows[0].path
    torch.testing.assert_close(model(ids).logits, y0, atol=1e-5, rtol=1e-5)
    mag0 = q.lora_magnitude_vector["default"].weight.detach().clone()
    losses = train_losses(rep, model, ids, 8)
    assert losses[-1] < losses[0]
    assert not torch.equal(q.lora_magnitude_vector["default"].weight, mag0)
    model.eval()
    y = model(ids).logits
    fusedtune.unpatch(model)
    torch.testing.assert_close(model(ids).logits, y, atol=1e-4, rtol=1e-4)


def test_qdora_matches_peft_over_the_same_nf4_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(6)
    lin = nn.Linear(64, 32, bias=True)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu") if not torch.cuda.is_available() else q.cuda()
    dev = q.weight.device
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    from peft.tuners.lora.bnb import Linear4bit
    pe = Linear4bit(q, "default", config=cfg, r=4, lora_alpha=8)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    x, dy = torch.randn(2, 5, 64, device=dev), torch.randn(2, 5, 32, device=dev)
    got, want = outputs(ours, x, dy), outputs(pe, x, dy)
    for j, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output {j}")
    with pytest.raises(LoRAUnsupported, match="NF4"):
        ours.merge()


def test_inference_caches_the_norm_until_the_adapter_changes():
    torch.manual_seed(7)
    m = LoRALinear.from_linear(nn.Linear(16, 8), r=2, use_dora=True, init_lora_weights=False)
    m.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y0 = m(x)
        assert len(m._dora_norms) == 1
        m.lora_B["default"].weight.mul_(2.0)         # an in-place change (an optimizer step) bumps the version
        y1 = m(x)
    fresh = LoRALinear.from_linear(nn.Linear(16, 8), r=2, use_dora=True, init_lora_weights=False)
    fresh.load_state_dict(m.state_dict())
    fresh.train()                                   # no cache in training
    torch.testing.assert_close(y1, fresh(x).detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y0, y1)
    assert not fresh._dora_norms


def test_the_norm_cache_is_forgotten_at_train_and_skips_inference_tensors():
    """Writes that bump no version counter (bitsandbytes' optimizers, .data) between evaluations: the next
    eval recomputes the norm once the model went through train() (Trainer's loop), in a layer and in a
    peft model fused in place. Parameters made under inference_mode (no version counter) are not cached."""
    torch.manual_seed(7)
    m = LoRALinear.from_linear(nn.Linear(16, 8), r=2, use_dora=True, init_lora_weights=False)
    x = torch.randn(3, 16)

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return model(x)
    y0 = evaluate(m)
    m.train()
    m.lora_B["default"].weight.data.mul_(2.0)       # no version bump
    fresh = copy.deepcopy(m)
    fresh.forget_dora_norms()
    assert not torch.allclose(evaluate(m), y0) and torch.equal(evaluate(m), evaluate(fresh))

    import peft
    model = peft.get_peft_model(tiny_llama(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"],
                                                         init_lora_weights=False))
    ids = torch.randint(0, 64, (1, 6))
    ref = copy.deepcopy(model)
    fusedtune.lora.fuse_peft(model)
    for step in range(2):
        for mm in (model, ref):
            mm.train()
            for n, p in mm.named_parameters():
                if "lora_B" in n:
                    p.data.add_(0.5)
            mm.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        inf = LoRALinear.from_linear(nn.Linear(16, 8), r=2, use_dora=True, init_lora_weights=False).eval()
        assert inf(x).shape == (3, 8) and not inf._dora_norms


def test_the_norm_cache_never_serves_another_adapter_tensor():
    """An adapter deleted and added again under its name can get the freed memory back (same address, same
    version count): the cached norm belongs to the old tensors and is not served. The cache is not
    pickled (it holds weak references)."""
    torch.manual_seed(0)
    N, K, r = 512, 1024, 64
    m = LoRALinear.from_linear(nn.Linear(K, N), r=r, init_lora_weights=False, use_dora=True, adapter_name="a")
    m.eval()
    x = torch.randn(2, K)
    with torch.no_grad():
        for _ in range(3):
            m(x)
            m.delete_adapter("a")
            assert "a" not in m._dora_norms
            m.add_adapter("a", r, use_dora=True)          # B = 0: the output is the base layer's
            torch.testing.assert_close(m(x), m.base_layer(x), rtol=1e-6, atol=1e-6)
            nn.init.normal_(m.lora_B["a"].weight)
        y = m(x)
        assert m._dora_norms
        back = pickle.loads(pickle.dumps(m))
        assert not back._dora_norms
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)
        twin = copy.deepcopy(m)                            # (its cache points at m's tensors: recomputed)
        nn.init.normal_(twin.lora_B["a"].weight)
        assert not torch.allclose(twin(x), y)


def test_dora_and_plain_merged_one_after_another_unmerge_in_reverse():
    """merge(d) then merge(p), or p then d, without the saved copy: unmerge undoes them in the reverse
    order (W / g - dW for the DoRA one), as peft; to_linear(merge=False) gives the same weight."""
    torch.manual_seed(5)
    for order in (("d", "p"), ("p", "d")):
        m = LoRALinear.from_linear(nn.Linear(24, 16), r=4, init_lora_weights=False, use_dora=True, adapter_name="d")
        m.add_adapter("p", 3, init_lora_weights=False)
        nn.init.normal_(m.lora_B["d"].weight, std=0.3)
        nn.init.normal_(m.lora_B["p"].weight, std=0.3)
        w0 = m.base_layer.weight.detach().clone()
        for n in order:
            m.merge(adapter_names=n, exact_unmerge=False)
        assert m.merged_adapters == list(order)
        torch.testing.assert_close(m.to_linear(merge=False).weight, w0, rtol=1e-5, atol=1e-6)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    with pytest.raises(LoRAUnsupported, match="in one call; merge a DoRA adapter alone"):
        m.merge(adapter_names=["d", "p"])
    assert not m.merged


def test_compile_matches_eager():
    torch.manual_seed(8)
    m = LoRALinear.from_linear(nn.Linear(24, 16), r=4, use_dora=True, init_lora_weights=False)
    x, dy = torch.randn(2, 3, 24), torch.randn(2, 3, 16)
    want = outputs(m, x, dy)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = outputs(cm, x, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_prologue_op(dtype):
    """fusedtune::dora_dy: its schema, fake and reference (opcheck), and the prologue's math from the
    definition: dF = dy * g in float32 and rounded, and the column sums of dy * F and dy."""
    from fusedtune.ops.dora import _dora_dy_op
    dy, F = torch.randn(7, 5).to(dtype), torch.randn(7, 5).to(dtype)
    g = torch.rand(5) + 0.5
    torch.library.opcheck(_dora_dy_op, (dy, F, g, "reference"))
    dF, low, dg, db = _dora_dy_op(dy, F, g, "reference")
    assert torch.equal(dF, dy.float() * g) and low.dtype == dtype and torch.equal(low, (dy.float() * g).to(dtype))
    torch.testing.assert_close(dg, (dy.double() * F.double()).sum(0).float())
    torch.testing.assert_close(db, dy.double().sum(0).float())


def test_unsupported_dora_uses_are_refused():
    lin = nn.Linear(12, 8)
    m = LoRALinear.from_linear(copy.deepcopy(lin), r=2, use_dora=True)
    m.add_adapter("plain", 2)
    m.set_adapter(["default", "plain"])
    with pytest.raises(LoRAUnsupported, match="activate a DoRA adapter alone"):
        m(torch.randn(2, 12))
    with pytest.raises(LoRAUnsupported, match="merge a DoRA adapter alone"):
        m.merge()
    assert not m.merged
    m.eval()
    with pytest.raises(LoRAUnsupported, match="mixed-batch forward"):
        m(torch.randn(2, 3, 12), adapter_names=["default", "plain"])
    m(torch.randn(2, 3, 12), adapter_names=["plain", "__base__"])     # plain adapters alone: fine
    with pytest.raises(ValueError, match="magnitude must be"):
        dora_ops.dora_linear(torch.randn(2, 12), lin.weight, torch.randn(2, 12), torch.randn(8, 2), 1.0,
                             torch.ones(7))
    with pytest.raises(PatchError, match="use_dora is not supported over FP8"):
        fusedtune.patch(tiny_llama(), "fp8_lora", r=2, use_dora=True)


def test_a_trained_bias_gets_its_gradient():
    """peft's bias="all" trains the base bias: the op's bias gradient is the column sum of dy."""
    torch.manual_seed(9)
    lin = nn.Linear(16, 8)
    pe = _peft(copy.deepcopy(lin), magnitude_seed=9)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    for layer in (pe, ours):
        layer.base_layer.bias.requires_grad_(True)
    x, dy = torch.randn(5, 16), torch.randn(5, 8)
    got = torch.autograd.grad(ours(x), [ours.base_layer.bias], dy)[0]
    want = torch.autograd.grad(pe(x), [pe.base_layer.bias], dy)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, dy.sum(0), rtol=1e-6, atol=1e-6)


def test_op_refuses_a_bias_of_the_wrong_shape():
    lin = nn.Linear(12, 8)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \[8\]"):
        dora_ops.dora_linear(torch.randn(2, 12), lin.weight, torch.randn(2, 12), torch.randn(8, 2), 1.0,
                             torch.ones(8), torch.ones(7))


def test_vmap_over_examples_matches_the_batched_forward():
    """vmap over a batch of examples (no gradient) gives the batched call's rows (the op runs once per example;
    under torch.func transforms the op's setup_context and backward run as a user autograd.Function)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 4, 16, generator=g), torch.randn(8, 16, generator=g)
    A, B, m = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, generator=g) + 0.5
    want = dora_ops.dora_linear(x, w, A, B, 2.0, m)
    got = torch.func.vmap(lambda xi: dora_ops.dora_linear(xi, w, A, B, 2.0, m))(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _spy_backward(monkeypatch, route, seen):
    """Wrap the backward that `route` runs: the direct route's Function, the op's registered autograd, or the
    Function torch.func transforms take."""
    def wrap(real):
        def spy(ctx, dy, dt, dF):
            seen.append((dy is not None, dt, dF))
            return real(ctx, dy, dt, dF)
        return spy
    if route == "direct":
        monkeypatch.setattr(dora_ops._dora.fn, "backward", staticmethod(wrap(dora_ops._dora.fn.backward)))
    elif route == "dispatcher":
        monkeypatch.setattr(dora_ops._dora_op, "_backward_fn", wrap(dora_ops._dora_op._backward_fn))
    else:
        monkeypatch.setattr(dora_ops._DoRAFunctorch, "backward",
                            staticmethod(wrap(dora_ops._DoRAFunctorch.backward)))


def _routed_grads(route, x, w, A, B, m, *args, **kw):
    """(y, dx, dA, dB, dm) of sum(y * ones) through `route`."""
    if route == "functorch":
        y, vjp = torch.func.vjp(lambda *t: dora_ops.dora_linear(t[0], w, t[1], t[2], 2.0, t[3], *args, **kw),
                                x, A, B, m)
        return [y, *vjp(torch.ones_like(y))]
    leaves = [t.detach().requires_grad_() for t in (x, A, B, m)]
    with (_eager.dispatcher_only() if route == "dispatcher" else contextlib.nullcontext()):
        y = dora_ops.dora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, leaves[3], *args, **kw)
    node = y.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0]
    name = type(node).__name__
    assert name.startswith("Eager_fusedtune_dora_linear" if route == "direct" else
                           "GeneratedBackwardFor_fusedtune_dora_linear"), name
    return [y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))]


@pytest.mark.parametrize("route", ["direct", "dispatcher", "functorch"])
def test_backward_gets_no_gradient_buffers_for_the_saved_intermediates(monkeypatch, route):
    """t and F are outputs of the op only to be saved: autograd must not hand backward zero-filled gradients for
    them (F's is a float32 [T, N], ~470 MB a layer at Llama-3-8B gate/up). Every route: the direct eager call,
    the op's registered autograd (export, compile) and the Function torch.func transforms take."""
    seen = []
    _spy_backward(monkeypatch, route, seen)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 16, generator=g)
    w, A = torch.randn(8, 16, generator=g), torch.randn(2, 16, generator=g)
    B, m = torch.randn(8, 2, generator=g), torch.rand(8, generator=g) + 0.5
    _routed_grads(route, x, w, A, B, m)
    assert seen == [(True, None, None)]


def test_every_route_gives_the_same_bits():
    """The direct eager call (EagerOp's Function), the op's registered autograd (torch.ops: export, compile) and
    torch.func.vjp (the Function with setup_context) run the same forward, saved tensors and backward: every
    gradient is bit-identical, with dropout and bias."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 16, generator=g)
    w, A = torch.randn(8, 16, generator=g), torch.randn(2, 16, generator=g)
    B, m, b = torch.randn(8, 2, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    outs = [_routed_grads(r, x, w, A, B, m, b, dropout_p=0.25, seed=3)
            for r in ("direct", "dispatcher", "functorch")]
    for route in outs[1:]:
        for a, c in zip(outs[0], route):
            assert torch.equal(a, c)


def test_weight_norm_leaves_a_float32_weight_untouched():
    """The norm adds s * B . A to a copy of each row chunk in place: never to the weight itself (a float32
    weight's .to(float32) would be the weight)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 24, generator=g)
    A, B = torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g)
    w0 = w.clone()
    got = dora_ops.dora_weight_norm(w, A, B, 1.5)
    assert torch.equal(w, w0)
    torch.testing.assert_close(got, (w.double() + 1.5 * B.double() @ A.double()).norm(dim=1).float(), rtol=1e-5,
                               atol=0)


def test_weight_norm_sums_in_float32_under_autocast():
    """The norm's float32 sums do not follow a caller's autocast (the layer computes it outside its own
    autocast-off scope): the same bits with bf16 autocast on as off."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 48, generator=g).bfloat16()
    A, B = torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g)
    want = dora_ops.dora_weight_norm(w, A, B, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dora_ops.dora_weight_norm(w, A, B, 2.0)
    assert got.dtype == torch.float32 and torch.equal(got, want)
