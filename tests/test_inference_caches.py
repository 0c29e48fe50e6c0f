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
