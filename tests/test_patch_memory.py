"""What patch keeps in memory, and models loaded in 4 bits.

- A patched model holds its target weights once: the swapped layers build on the original weights'
  storage, and neither a copy nor the original module stays alive elsewhere. Before, every swapping
  method copied each target weight and kept the original module for unpatch: twice the model's weights
  (QLoRA kept the 16-bit originals next to the NF4 copy, which defeats its purpose).
- A model loaded in 4 bits (transformers' BitsAndBytesConfig, the common QLoRA path): lora and qlora put
  adapters over its Linear4bit layers as they are (before: a crash), unpatch(merge=False) hands the very
  layers back; every other method refuses by name before anything changes."""
import gc
import weakref

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fusedtune  # noqa: E402
from fusedtune.patch import PatchError, find_targets, methods, missing_requirements  # noqa: E402

from tiny_models import load_4bit, tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
SWAPPING = ["fp8", "fp8_lora", "lora", "roste", "sparse_delta"]


def _opts(name):
    return {"backend": "reference"} if name.startswith("fp8") else {}


@pytest.mark.parametrize("name", SWAPPING)
def test_patched_model_holds_each_target_weight_once(name):
    m = tiny_llama()
    targets = find_targets(m)
    ptrs = {m.get_submodule(t).weight.untyped_storage().data_ptr() for t in targets}
    refs = [weakref.ref(m.get_submodule(t)) for t in targets]
    fusedtune.patch(m, name, **_opts(name))
    gc.collect()
    live = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    assert ptrs <= live                                  # the swapped layers use the original storage
    inside = {id(x) for x in m.modules()}
    held = {id(t) for t in list(m.parameters()) + list(m.buffers())}
    for r in refs:   # an original module lives on only inside the model, or (kept for unpatch) holding nothing
        o = r()      # but tensors the model holds itself
        assert o is None or id(o) in inside or all(id(t) in held for t in list(o.parameters()) + list(o.buffers()))


def test_unpatch_after_sharing_gives_the_trained_and_the_original_weights():
    """Sharing must not let a method's in-place work reach what unpatch(merge=False) returns."""
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = fusedtune.patch(m, "sparse_delta", density=0.2)
    for _ in range(3):
        rep.step(lambda: m(IDS, labels=IDS).loss)
    fusedtune.unpatch(m, merge=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    d = tmp_path_factory.mktemp("tiny4bit")
    tiny_llama().save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_over_a_model_loaded_in_4_bits(four_bit_dir, name):
    m = load_4bit(four_bit_dir)
    q = m.model.layers[0].self_attn.q_proj
    packed = q.weight.untyped_storage().data_ptr()
    rep = fusedtune.patch(m, name, r=4, alpha=8)
    assert any("Trainer refuses" in n for n in rep.notes)        # transformers' check for a PeftModel
    with pytest.raises(ValueError, match="purely quantized"):    # (if it goes, drop the note)
        transformers.Trainer(model=m, args=transformers.TrainingArguments(output_dir=str(four_bit_dir / "t"),
                                                                          report_to=[], use_cpu=True))
    lay = m.model.layers[0].self_attn.q_proj
    assert lay.base_layer is q and q.weight.untyped_storage().data_ptr() == packed   # not re-quantized, not copied
    losses = [float(rep.step(lambda: m(IDS, labels=IDS).loss)) for _ in range(3)]
    assert losses[-1] < losses[0]
    fusedtune.unpatch(m, merge=False)
    assert m.model.layers[0].self_attn.q_proj is q                # the 4-bit layer, as it was loaded
    assert not any(p.requires_grad for p in q.parameters())


def test_merge_of_a_4_bit_layer_is_the_dequantized_merged_linear(four_bit_dir):
    m = load_4bit(four_bit_dir)
    rep = fusedtune.patch(m, "lora", r=4, alpha=8)
    rep.step(lambda: m(IDS, labels=IDS).loss)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m.model.layers[0].self_attn.q_proj(x)
    fusedtune.unpatch(m, merge=True)
    lin = m.model.layers[0].self_attn.q_proj
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(methods()) - {"lora", "qlora"}))
def test_other_methods_refuse_a_4_bit_model_untouched(four_bit_dir, name):
    if missing_requirements(methods()[name]):
        pytest.skip(f"{name} needs {missing_requirements(methods()[name])}")
    m = load_4bit(four_bit_dir)
    kinds = {n: type(x) for n, x in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((PatchError, ValueError), match=r"4.bit|uint8"):
        fusedtune.patch(m, name, **_opts(name))
    assert {n: type(x) for n, x in m.named_modules()} == kinds
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert fusedtune.report(m).method is None


def test_weights_in_other_formats_are_refused():
    m = tiny_llama()
    q = m.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)   # e.g. an FP8 checkpoint
    with pytest.raises(PatchError, match=r"q_proj is a Linear, weights of torch.float8_e4m3fn"):
        fusedtune.patch(m, "lora")
    assert fusedtune.report(m).method is None
