"""Caches first built during a torch.inference_mode forward hold normal tensors (an inference tensor that
a later training forward saves for backward raises there, on every step from then on). The whole-model
check, every patch method, is in test_patch_training_modes.py; here the caches themselves."""
import torch

from fusedtune.nn import FP8Linear, LoRALinear
from fusedtune.reference import hadamard as href
from fusedtune.reference import zo as zref


def _normal(ts):
    ts = [t for t in ts if t is not None]
    return ts and not any(t.is_inference() for t in ts)


def test_module_level_tables():
    href.factor_matrix.cache_clear()
    zref._table_cpu.cache_clear()
    with torch.inference_mode():
        assert _normal([href.factor_matrix(12), href.factor_matrix(24), zref.normal_table()])
    assert _normal([href.factor_matrix(12), zref.normal_table()])


def test_layer_caches():
    fp8 = FP8Linear.from_linear(torch.nn.Linear(128, 64), backend="reference").requires_grad_(False)
    lora = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2)
    with torch.inference_mode():
        fp8(torch.randn(3, 128))
        lora(torch.randn(3, 16))
    assert _normal(fp8._cache[1]) and _normal(list(lora._tables.values()))


def test_a_fresh_layer_compiles_fullgraph_on_its_first_call():
    """The scale table built inside the trace: the cache scope asked is_inference_mode_enabled, which dynamo
    refuses (the compile tests called the layer eagerly first, so the table was cached)."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(40, 24), r=4, init_lora_weights=False)
    x = torch.randn(3, 40, requires_grad=True)
    y = torch.compile(layer, fullgraph=True, backend="eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))


def test_layers_built_and_run_under_inference_mode():
    """Found by audit: a layer made under inference_mode (a model loaded and patched for evaluation) has
    inference-tensor parameters, which have no version counter; FP8Linear, SparseDeltaLinear and
    RowMaskedLinear read it and raised. They run now, giving nn.Linear's output where the layer starts as the
    base (and FP8Linear its own uncached result); deltas written in inference mode still reach the output."""
    from fusedtune.nn import RowMaskedLinear, SparseDeltaLinear
    x = torch.randn(4, 256)
    with torch.inference_mode():
        lin = torch.nn.Linear(256, 128).requires_grad_(False)
        want = lin(x)
        sd = SparseDeltaLinear.from_linear(lin, density=0.05, seed=0)
        row = RowMaskedLinear.from_linear(lin, torch.arange(0, 128, 2))
        fp8 = FP8Linear.from_linear(lin, backend="reference")
        assert torch.equal(sd(x), want) and torch.equal(row(x), want)
        assert torch.equal(fp8(x), fp8(x)) and fp8._cache is None
        sd.values.add_(1.0)        # written in inference mode: merged again before the next forward
        assert not torch.equal(sd(x), want)
