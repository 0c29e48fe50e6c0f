"""fusedtune.sparse_delta artifacts: save/load (bit-exact), apply/revert/compose (exact round trips),
composable-sft import/export, refusals that leave everything untouched, and method="sparse_delta"."""
import copy
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from fusedtune import patch, unpatch  # noqa: E402
import fusedtune.methods.sparse_delta  # noqa: E402,F401  (registers method "sparse_delta")
from fusedtune import sparse_delta as sd  # noqa: E402
from fusedtune.sparse_delta import SparseDelta, SparseDeltaError  # noqa: E402

transformers.logging.set_verbosity_error()
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4, 0, 17], [6, 6, 0, 13, 21, 8, 1, 30, 2, 9]])


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_state(model, snap):
    st = model.state_dict()
    return set(st) == set(snap) and all(torch.equal(bits(st[k]), bits(snap[k])) for k in snap)


def random_delta(model, names, density=0.1, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    d = SparseDelta()
    for n in names:
        w = model.get_submodule(n).weight
        k = max(1, int(density * w.numel()))
        idx = torch.randperm(w.numel(), generator=g)[:k].sort().values.to(torch.int32)
        d.add(n, idx, torch.randn(k, generator=g) * scale, tuple(w.shape), w.dtype)
    return d


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj",
          "lm_head"]


# ----------------------------------------------------------------------------------------- save / load

def test_save_load_bit_exact(tmp_path):
    vals = torch.tensor([0.0, -0.0, 1e-45, -3.4e38, float("inf"), float("nan"), 1.2345678, -7e-39])
    nan_payload = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)
    vals = torch.cat([vals, nan_payload])
    d = SparseDelta(metadata={"task": "x"})
    d.add("a.b", torch.arange(0, 27, 3, dtype=torch.int32), vals, (5, 7), torch.bfloat16)
    d.add("c", torch.tensor([0, 4, 5], dtype=torch.int64), torch.randn(3, dtype=torch.float16), (2, 3))
    d.add("empty", torch.empty(0, dtype=torch.int32), torch.empty(0), (3, 3))
    p = tmp_path / "d.safetensors"
    sd.save(d, p, metadata={"note": "hello"})
    e = sd.load(p)
    assert e.equal(d) and e.names() == ["a.b", "c", "empty"]
    assert torch.equal(bits(e["a.b"].values), bits(vals))          # NaN payload and -0.0 kept
    assert e["a.b"].indices.dtype == torch.int32 and e["c"].values.dtype == torch.float32
    assert e["a.b"].shape == (5, 7) and e["a.b"].dtype == "bfloat16" and e["c"].dtype is None
    assert e.metadata == {"task": "x", "note": "hello"}
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert set(f.keys()) == {"a.b.indices", "a.b.values", "c.indices", "c.values", "empty.indices",
                                 "empty.values"}
        assert f.metadata()["format"] == "fusedtune.sparse_delta" and f.metadata()["format_version"] == "1"


def test_save_model_and_load_refusals(tmp_path):
    m = tiny_llama()
    rep = patch(m, "sparse_delta", density=0.05, seed=3)
    for _, layer in sd.sparse_layers(m):
        with torch.no_grad():
            layer.values.normal_()
    p = tmp_path / "m.safetensors"
    sd.save(m, p)
    got = sd.load(p)
    assert got.equal(sd.extract(m)) and len(got) == len(rep.rows) == 14
    assert got["model.layers.0.mlp.up_proj"].shape == (40, 32)
    with pytest.raises(SparseDeltaError, match="no fusedtune.nn.SparseDeltaLinear"):
        sd.save(tiny_llama(), tmp_path / "x.safetensors")
    # a foreign safetensors file, a tampered one
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SparseDeltaError, match="not a fusedtune sparse-delta file"):
        sd.load(tmp_path / "foreign.safetensors")
    meta = {"format": "fusedtune.sparse_delta", "format_version": "1",
            "layers": '{"l": {"shape": [2, 3], "dtype": null, "k": 2}}'}
    save_file({"l.indices": torch.tensor([4, 1], dtype=torch.int32), "l.values": torch.zeros(2)},
              str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(SparseDeltaError, match="unsorted index at position 1"):
        sd.load(tmp_path / "bad.safetensors")
    save_file({"l.indices": torch.tensor([1, 4], dtype=torch.int64), "l.values": torch.zeros(2)},
              str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(SparseDeltaError, match="int32 and float32"):
        sd.load(tmp_path / "bad2.safetensors")
    save_file({"l.indices": torch.tensor([1, 4], dtype=torch.int32), "l.values": torch.zeros(2)},
              str(tmp_path / "bad3.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(SparseDeltaError, match="format version '9'"):
        sd.load(tmp_path / "bad3.safetensors")
    # a layer table of the wrong shape: refused with the reason, not an AttributeError
    good = {"l.indices": torch.tensor([1, 4], dtype=torch.int32), "l.values": torch.zeros(2)}
    for table, user, match in (('["l"]', None, "'layers' is a list"),
                               ('{"l": [2, 3]}', None, "layer 'l''s entry is a list"),
                               ('{"l": {"shape": [2, 3], "k": "2"}}', None, "lists k='2' but stores 2"),
                               ('{"l": {"shape": [2, 3], "k": 2}}', "[1]", "'user' is a list"),
                               ('{"l": {"shape": [2, 3], "k": 2, "dtype": 5}}', None, "dtype must be a torch dtype"),
                               ('{"l": {"shape": [2, 3], "k": 2, "dtype": ["x"]}}', None, r"got \['x'\]")):
        bad = {**meta, "layers": table, **({"user": user} if user else {})}
        save_file(good, str(tmp_path / "bad4.safetensors"), metadata=bad)
        with pytest.raises(SparseDeltaError, match=match):
            sd.load(tmp_path / "bad4.safetensors")


@pytest.mark.parametrize("idx, match", [
    (torch.tensor([0, 3, 3, 5], dtype=torch.int32), "duplicate index at position 2: 3 after 3"),
    (torch.tensor([0, 5, 3], dtype=torch.int32), "unsorted index at position 2: 3 after 5"),
    (torch.tensor([0, 3, 35], dtype=torch.int32), r"out of range at position 2: got 35, need 0 <= index < 35"),
    (torch.tensor([-1, 3], dtype=torch.int32), "out of range at position 0: got -1"),
])
def test_bad_indices_refused_untouched(idx, match):
    keep = idx.clone()
    vals = torch.randn(idx.numel())
    vkeep = vals.clone()
    d = SparseDelta()
    with pytest.raises(SparseDeltaError, match=match):
        d.add("layer", idx, vals, (5, 7))
    assert len(d) == 0 and torch.equal(idx, keep) and torch.equal(vals, vkeep)


def test_bad_values_and_shapes_refused():
    d = SparseDelta()
    with pytest.raises(TypeError, match="float64"):
        d.add("l", torch.tensor([1, 2]), torch.zeros(2, dtype=torch.float64), (2, 2))
    with pytest.raises(TypeError, match="integer tensor"):
        d.add("l", torch.tensor([1.0, 2.0]), torch.zeros(2), (2, 2))
    with pytest.raises(SparseDeltaError, match=r"expected shape \(2,\)"):
        d.add("l", torch.tensor([1, 2]), torch.zeros(3), (2, 2))
    with pytest.raises(SparseDeltaError, match="1-D"):
        d.add("l", torch.tensor([[1, 2]]), torch.zeros(2), (2, 2))
    with pytest.raises(SparseDeltaError, match="shape must be"):
        d.add("l", torch.tensor([1, 2]), torch.zeros(2), (2,))
    assert len(d) == 0


# ----------------------------------------------------------------------------------------- apply / revert

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_revert_exact(dtype):
    m = tiny_llama(dtype)
    snap = snapshot(m)
    d = random_delta(m, LAYERS)
    h = sd.apply(m, d, scale=0.5)
    for n in LAYERS:
        w0 = snap[f"{n}.weight"].view(-1)
        ld = d[n]
        want = w0.clone()
        want[ld.indices.long()] = (w0[ld.indices.long()].float() + ld.values * 0.5).to(dtype)
        assert torch.equal(bits(m.get_submodule(n).weight.view(-1)), bits(want))
    assert not same_state(m, snap)
    assert sd.applied(m) == [h]
    twin = copy.deepcopy(m)             # a model with applied deltas still copies and pickles
    pickle.loads(pickle.dumps(h))
    assert same_state(twin, snapshot(m))
    sd.revert(m, d)                     # by the SparseDelta object
    assert same_state(m, snap) and sd.applied(m) == []
    h2 = sd.apply(m, d)
    h2.revert()                         # by the handle
    assert same_state(m, snap)
    with pytest.raises(SparseDeltaError, match="already reverted"):
        sd.revert(m, h2)
    with pytest.raises(SparseDeltaError, match="not applied to this model"):
        sd.revert(m, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compose_apply_revert(dtype):
    m = tiny_llama(dtype)
    snap = snapshot(m)
    d1 = random_delta(m, LAYERS[:3], density=0.3, seed=1)
    d2 = random_delta(m, LAYERS[1:], density=0.3, seed=2)
    c = sd.compose([d1, d2], scales=[1.0, -2.0])
    assert c.names() == LAYERS
    for n in LAYERS:
        want = torch.zeros(c[n].shape).view(-1)
        for d, s in ((d1, 1.0), (d2, -2.0)):
            if n in d:
                want[d[n].indices.long()] += s * d[n].values
        nz = torch.zeros_like(want, dtype=torch.bool)
        for d in (d1, d2):
            if n in d:
                nz[d[n].indices.long()] = True
        assert torch.equal(c[n].indices.long(), nz.nonzero().flatten())          # union, sorted
        assert torch.equal(c[n].values, want[nz])                                 # summed in fp32
    h = sd.apply(m, c)
    w = m.get_submodule(LAYERS[1]).weight.view(-1)
    w0 = snap[f"{LAYERS[1]}.weight"].view(-1)
    i = c[LAYERS[1]].indices.long()
    assert torch.equal(bits(w[i]), bits((w0[i].float() + c[LAYERS[1]].values).to(dtype)))
    sd.revert(m, h)
    assert same_state(m, snap)
    # stacked application: reverse order is exact; the wrong order is refused with nothing changed
    h1, h2 = sd.apply(m, d1), sd.apply(m, d2)
    mid = snapshot(m)
    with pytest.raises(SparseDeltaError, match="reverse order"):
        sd.revert(m, h1)
    assert same_state(m, mid)
    sd.revert(m, h2)
    sd.revert(m, h1)
    assert same_state(m, snap)
    with pytest.raises(SparseDeltaError, match="different shapes"):
        sd.compose([d1, SparseDelta().add(LAYERS[0], torch.tensor([0]), torch.ones(1), (3, 3))])


def test_apply_refusals_leave_model_untouched():
    m = tiny_llama()
    snap = snapshot(m)
    good = random_delta(m, LAYERS[:2])
    bad_shape = sd.compose([good, SparseDelta().add("model.layers.1.mlp.up_proj", torch.tensor([1]), torch.ones(1),
                                                      (32, 40))])   # transposed shape
    with pytest.raises(SparseDeltaError, match=r"\(out, in\) = \(32, 40\), the model's is \(40, 32\)"):
        sd.apply(m, bad_shape)
    unknown = sd.compose([good, SparseDelta().add("model.nope", torch.tensor([1]), torch.ones(1), (4, 4))])
    with pytest.raises(SparseDeltaError, match="'model.nope', which the model does not have"):
        sd.apply(m, unknown)
    not_linear = sd.compose([good, SparseDelta().add("model.norm", torch.tensor([1]), torch.ones(1), (1, 32))])
    with pytest.raises(SparseDeltaError, match="RMSNorm"):
        sd.apply(m, not_linear)
    assert same_state(m, snap) and sd.applied(m) == []
    with pytest.raises(TypeError, match="SparseDelta"):
        sd.apply(m, {"x": 1})


def test_revert_refuses_changed_weights_unless_forced():
    m = tiny_llama()
    snap = snapshot(m)
    d = random_delta(m, LAYERS[:1])
    h = sd.apply(m, d)
    w = m.get_submodule(LAYERS[0]).weight
    i = int(d[LAYERS[0]].indices[0])
    with torch.no_grad():
        w.view(-1)[i] += 1.0
    changed = snapshot(m)
    with pytest.raises(SparseDeltaError, match="changed at 1 of"):
        sd.revert(m, h)
    assert same_state(m, changed)
    sd.revert(m, h, force=True)
    assert same_state(m, snap)


def test_revert_after_layers_were_swapped():
    m = tiny_llama()
    snap = snapshot(m)
    d = random_delta(m, LAYERS[:2])
    h = sd.apply(m, d)
    patch(m, "sparse_delta", density=0.1)
    with pytest.raises(SparseDeltaError, match="replaced since apply"):
        sd.revert(m, h)
    unpatch(m, merge=False)                    # new nn.Linear objects holding W0 + delta
    sd.revert(m, h, force=True)
    assert same_state(m, snap)


def test_apply_to_sparse_delta_linear_keeps_own_deltas():
    m = tiny_llama(torch.bfloat16)
    patch(m, "sparse_delta", density=0.2, seed=0)
    layers = dict(sd.sparse_layers(m))
    for layer in layers.values():
        with torch.no_grad():
            layer.values.normal_(0, 0.01)
            layer.merge_()
    before = snapshot(m)
    name = LAYERS[0]
    layer = layers[name]
    own = layer.indices.long()
    # a delta that overlaps the layer's own positions in half its entries
    other = torch.tensor(sorted(set(own[::2].tolist()) | {0, 1, 2, 5} - set(own[1::2].tolist())))
    d = SparseDelta().add(name, other, torch.randn(other.numel()) * 0.1, (32, 32))
    h = sd.apply(m, d)
    w0 = before[f"{name}.weight"].view(-1).clone()
    w0[own] = before[f"{name}.base_values"]                       # the layer's frozen base W0
    new_base = w0.clone()
    new_base[other] = (w0[other].float() + d[name].values).to(torch.bfloat16)
    assert torch.equal(bits(layer.base_values), bits(new_base[own]))
    want = new_base.clone()
    want[own] = (new_base[own].float() + layer.values.detach()).to(torch.bfloat16)
    assert torch.equal(bits(layer.weight.view(-1)), bits(want))
    sd.revert(m, h)
    assert same_state(m, before)
    unpatch(m)


def test_apply_to_gpt2_conv1d():
    cfg = transformers.GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    snap = snapshot(m)
    name = "transformer.h.0.mlp.c_fc"            # Conv1D weight (in=32, out=128)
    d = SparseDelta().add(name, torch.tensor([0, 1, 33, 127 * 32 + 31]), torch.tensor([1.0, 2.0, 3.0, 4.0]),
                          (128, 32))
    h = sd.apply(m, d)
    lin_w = m.get_submodule(name).weight.t()     # nn.Linear semantics (out, in)
    want = snap[f"{name}.weight"].t().clone()
    for flat, v in zip([0, 1, 33, 127 * 32 + 31], [1.0, 2.0, 3.0, 4.0]):
        want[flat // 32, flat % 32] += v
    assert torch.equal(lin_w, want)
    sd.revert(m, h)
    assert same_state(m, snap)


# ----------------------------------------------------------------------------------------- composable-sft

def _decode_like_composable_sft(enc):
    """composable-sft's decoding, written from the format description: cumulative sum of the steps,
    then coordinates with the first dimension varying fastest."""
    size = list(enc["size"])
    flat = np.cumsum(np.asarray(enc["index_steps"], dtype=np.int64))
    coords = np.stack([(flat // int(np.prod(size[:d]))) % size[d] for d in range(len(size))])
    dense = torch.zeros(size)
    dense[tuple(torch.as_tensor(coords))] = enc["values"].float()
    return dense


def _rename_in_pickle(src, dst, old: bytes, new: bytes):
    """A copy of the torch.save archive src with `old` replaced by `new` in its pickle (GLOBAL opcodes)."""
    import zipfile
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        hits = 0
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                hits += data.count(old)
                data = data.replace(old, new)
            zout.writestr(info, data)
    assert hits, "the pickle does not hold the name to rename"


def test_composable_sft_round_trip_and_weights(tmp_path):
    m = tiny_llama()
    d = random_delta(m, LAYERS, density=0.2)
    enc = sd.to_composable_sft(d)
    assert set(enc["body"]) == {f"{n}.weight" for n in LAYERS}
    for n in LAYERS:
        e = enc["body"][f"{n}.weight"]
        steps = np.asarray(e["index_steps"])
        assert tuple(e["size"]) == d[n].shape and steps[0] >= 0 and (steps[1:] > 0).all()
        assert torch.equal(_decode_like_composable_sft(e), d.dense(n))         # column-major, delta-encoded
        colmajor = np.cumsum(steps)
        r, c = d[n].indices.long() // d[n].shape[1], d[n].indices.long() % d[n].shape[1]
        assert not np.array_equal(colmajor, d[n].indices.numpy()) or d[n].k < 2     # really a different order
        assert sorted(colmajor.tolist()) == sorted((r + c * d[n].shape[0]).tolist())
    back = sd.from_composable_sft(enc, m)
    assert back.equal(d)
    # a file as composable-sft writes it (first step a numpy int64) read with weights_only=True
    body = {k: {**v, "index_steps": [np.int64(v["index_steps"][0])] + v["index_steps"][1:]}
            for k, v in enc["body"].items()}
    torch.save({"body": body}, tmp_path / "pytorch_diff.bin")
    assert sd.from_composable_sft(tmp_path, m).equal(d)
    # the same file pickled under numpy 1.x, whose scalar lives at numpy.core.multiarray (it was refused
    # without trust_pickle; found by audit)
    _rename_in_pickle(tmp_path / "pytorch_diff.bin", tmp_path / "np1" / "pytorch_diff.bin",
                      b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
    assert sd.from_composable_sft(tmp_path / "np1", m).equal(d)
    # applying it as composable-sft does (param += dense diff) gives the same weights as sd.apply
    ref = tiny_llama()
    with torch.no_grad():
        for pname, e in enc["body"].items():
            ref.get_parameter(pname).add_(_decode_like_composable_sft(e))
    sd.apply(m, back)
    assert same_state(m, snapshot(ref))
    # export to a directory, re-import
    os.makedirs(tmp_path / "out")
    sd.to_composable_sft(d, tmp_path / "out")
    assert sd.from_composable_sft(tmp_path / "out" / "pytorch_diff.bin", m).equal(d)


def test_composable_sft_of_gpt2_reads_the_same_on_a_patched_model():
    """GPT-2's Conv1D weights sit in the SFT as (in, out); a model patched with sparse_delta holds the
    layer as a SparseDeltaLinear (out, in) and must read and write the same file the same way (square
    c_proj included, where a transposed reading would not be refused)."""
    cfg = transformers.GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(cfg)
    patched = copy.deepcopy(plain)
    patch(patched, "sparse_delta", density=0.05, seed=0)
    names = ["transformer.h.0.attn.c_proj", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    g = torch.Generator().manual_seed(3)
    body = {}
    for n in names:
        w = plain.get_submodule(n).weight                   # Conv1D: (in, out)
        flat = torch.randperm(w.numel(), generator=g)[:20].sort().values
        steps = torch.diff(flat, prepend=torch.zeros(1, dtype=torch.int64))
        body[f"{n}.weight"] = {"size": w.shape, "index_steps": steps.tolist(), "values": torch.randn(20, generator=g)}
    from_plain = sd.from_composable_sft(body, plain)
    assert sd.from_composable_sft(body, patched).equal(from_plain)
    for n in names:   # column-major over (in, out) is row-major over (out, in): the same flat positions
        assert from_plain[n].indices.tolist() == np.cumsum(body[f"{n}.weight"]["index_steps"]).tolist()
    enc = sd.to_composable_sft(from_plain, model=patched)
    for n in names:
        assert tuple(enc["body"][f"{n}.weight"]["size"]) == tuple(plain.get_submodule(n).weight.shape)
        assert enc["body"][f"{n}.weight"]["index_steps"] == body[f"{n}.weight"]["index_steps"]
    unpatch(patched)


def test_a_lone_layer_is_refused_by_name():
    from fusedtune.nn import SparseDeltaLinear
    layer = SparseDeltaLinear.from_linear(nn.Linear(8, 4), density=0.5)
    with pytest.raises(SparseDeltaError, match="no module name"):
        sd.extract(layer)


def test_composable_sft_refusals():
    m = tiny_llama()
    d = random_delta(m, LAYERS[:1])
    enc = sd.to_composable_sft(d)
    e = enc["body"][f"{LAYERS[0]}.weight"]
    emb = {"size": torch.Size([48, 32]), "index_steps": [3, 5], "values": torch.ones(2)}
    body = {**enc["body"], "model.embed_tokens.weight": emb}
    with pytest.raises(SparseDeltaError, match="not weights of linear layers.*embed_tokens"):
        sd.from_composable_sft(body, m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = sd.from_composable_sft({"body": body}, m, strict=False)
    assert got.equal(d) and any("skipped 1" in str(x.message) for x in w)
    assert got.metadata["composable_sft_skipped"] == "model.embed_tokens.weight"
    bad = {f"{LAYERS[0]}.weight": {**e, "index_steps": [e["index_steps"][0], 0] + e["index_steps"][2:]}}
    with pytest.raises(SparseDeltaError, match=r"index_steps\[1\] = 0"):
        sd.from_composable_sft(bad, m)
    bad = {f"{LAYERS[0]}.weight": {**e, "size": torch.Size([16, 64])}}
    with pytest.raises(SparseDeltaError, match="does not match the model's weight"):
        sd.from_composable_sft(bad, m)
    bad = {f"{LAYERS[0]}.weight": {**e, "index_steps": e["index_steps"][:-1] + [10 ** 6]}}
    with pytest.raises(SparseDeltaError, match="outside"):
        sd.from_composable_sft(bad, m)


def test_composable_sft_newer_names_dense_part_and_missing_parameters(tmp_path):
    """composable-sft's later file layout ({"diffs", "abs"}) imports as the older one ({"body", "head"}) does, and
    an export carries both names, so either version applies it (found by review: the later layout was refused with
    a misleading error, and an export read by it applied nothing). A dense part is refused with strict=True (it
    was dropped without a word) and warned about with strict=False; a parameter the model lacks is refused with
    strict=False too, whatever its leaf name (a missing bias was skipped as 'not a linear-layer weight')."""
    m = tiny_llama()
    d = random_delta(m, LAYERS[:2])
    enc = sd.to_composable_sft(d, tmp_path)
    assert enc["diffs"] is enc["body"]
    on_disk = torch.load(tmp_path / "pytorch_diff.bin", weights_only=False)
    assert set(on_disk) == {"body", "diffs"} and on_disk["diffs"] is on_disk["body"]     # stored once
    assert sd.from_composable_sft({"diffs": enc["body"], "abs": {}}, m).equal(d)
    torch.save({"diffs": enc["body"], "abs": {}}, tmp_path / "pytorch_diff.bin")
    assert sd.from_composable_sft(tmp_path, m).equal(d)
    head = {"lm_head.weight": torch.zeros(48, 32)}
    for key in ("head", "abs"):
        with pytest.raises(SparseDeltaError, match=f"dense parameters.*{key}.*lm_head"):
            sd.from_composable_sft({"body": enc["body"], key: head}, m)
        with pytest.warns(UserWarning, match="not imported"):
            got = sd.from_composable_sft({"body": enc["body"], key: head}, m, strict=False)
        assert got.equal(d) and "lm_head.weight" in got.metadata["composable_sft_head"]
    one = {"size": torch.Size([7]), "index_steps": [0], "values": torch.ones(1)}
    for leaf in ("bias", "weight"):
        with pytest.raises(SparseDeltaError, match=f"layers.7.mlp.down_proj.{leaf}'.*does not have"):
            sd.from_composable_sft({f"model.layers.7.mlp.down_proj.{leaf}": one}, m, strict=False)


# ----------------------------------------------------------------------------------------- the method

def test_method_trains_and_unpatch_restores(tmp_path):
    m = tiny_llama()
    base = snapshot(m)
    rep = patch(m, "sparse_delta", density=0.05, seed=0, lr=3e-2)
    assert "SparseDeltaAdamW" in type(rep.optimizer).__name__
    assert rep.trainable_params == sum(l.values.numel() for _, l in sd.sparse_layers(m))
    assert "sparse_delta" in str(rep)
    idx = {n: l.indices.clone() for n, l in sd.sparse_layers(m)}
    assert not torch.equal(idx["model.layers.0.self_attn.q_proj"], idx["model.layers.1.self_attn.q_proj"])
    losses = [float(rep.step(lambda: m(input_ids=IDS, labels=IDS).loss)) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.1
    sd.save(m, tmp_path / "d.safetensors")
    with torch.no_grad():
        trained = m(input_ids=IDS).logits
    unpatch(m)                                            # merged
    assert all(type(m.get_submodule(n)) is nn.Linear for n in idx)
    with torch.no_grad():
        assert torch.equal(m(input_ids=IDS).logits, trained)
    merged = snapshot(m)
    # the saved delta applied to a fresh base model gives the same weights, bit for bit
    fresh = tiny_llama()
    h = sd.apply(fresh, sd.load(tmp_path / "d.safetensors"))
    assert same_state(fresh, merged)
    sd.revert(fresh, h)
    assert same_state(fresh, base)
    # merge=False: exactly W0
    m2 = tiny_llama()
    rep = patch(m2, "sparse_delta", density=0.05, lr=3e-2)
    for _ in range(3):
        rep.step(lambda: m2(input_ids=IDS, labels=IDS).loss)
    unpatch(m2, merge=False)
    assert same_state(m2, base)
    assert all(p.requires_grad for p in m2.parameters())


def test_layer_dtype_names_are_torchs_and_other_names_kept():
    """The dtype field is information only: names of torch dtypes become torch's ('half' -> 'float16', as
    torch.float16 does, so compose sees one dtype), other strings (a file's own 'bf16') are kept, and a
    value that is no name at all is refused."""
    idx, val = torch.tensor([0, 2], dtype=torch.int32), torch.ones(2)
    names = [sd.SparseDelta().add("l", idx, val, (2, 2), d)["l"].dtype
             for d in (torch.float16, "half", "torch.float16", "bf16", None)]
    assert names == ["float16", "float16", "float16", "bf16", None]
    with pytest.raises(SparseDeltaError, match="dtype must be a torch dtype or a name"):
        sd.SparseDelta().add("l", idx, val, (2, 2), 3.5)
