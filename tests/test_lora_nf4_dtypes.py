"""LoRA over an NF4 base in the dtype situations peft's QLoRA recipe makes (found by review, each test fails on the
code before): float32 activations into a bf16-compute layer (peft.prepare_model_for_kbit_training), a Linear4bit
without a compute dtype (bitsandbytes picks it from the input), bitsandbytes' CPU repacking of the weight, and
an odd number of weights (a last half byte)."""
import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
import bitsandbytes.functional as bnbf  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402

from fusedtune.nn import LoRALinear  # noqa: E402
from lora_cases import layer_outputs  # noqa: E402


def linear4bit(n_out, n_in, weight_dtype=torch.float32, compute_dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias).to(weight_dtype)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", module=q)
    if bias:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")


def peft_and_ours(base):
    """peft's layer with float32 adapters (get_peft_model's autocast_adapter_dtype; the layer built directly
    casts them to the compute dtype) and ours from it."""
    pe = PeftLinear4bit(copy.deepcopy(base), "default", config=LoraConfig(r=8, lora_alpha=16, init_lora_weights=False),
                        r=8, lora_alpha=16)
    pe.lora_A.float()
    pe.lora_B.float()
    return pe, LoRALinear.from_peft(copy.deepcopy(pe))


def test_float32_activations_into_a_bf16_compute_layer_keep_the_adapters_in_float32():
    """peft rounds the base to the compute dtype and runs the adapters in float32 on x itself; the fused op
    rounded x, the branch and its gradients to bf16 (adapter gradients ~7000x further from the truth)."""
    pe, ours = peft_and_ours(linear4bit(40, 128, compute_dtype=torch.bfloat16))
    x, dy = torch.randn(3, 11, 128), torch.randn(3, 11, 40)
    for a, p in zip(layer_outputs(ours, x, dy), layer_outputs(pe, x, dy)):
        torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-6)
    names = ["default", "__base__", "default"]                # the mixed-batch path too
    with torch.no_grad():
        got = ours(x, adapter_names=names)
        want = pe(x, adapter_names=names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_no_compute_dtype_follows_the_input_as_bitsandbytes_does(x_dtype):
    """Linear4bit(compute_dtype=None) computes in a float32 / bf16 input's dtype (and records it); the fused op
    took the dtype the weight was quantized from (float16 here: large activations overflowed)."""
    base = linear4bit(40, 128, weight_dtype=torch.float16, compute_dtype=None)
    pe, ours = peft_and_ours(base)
    x = (torch.randn(2, 5, 128) * 1e5).to(x_dtype)
    with torch.no_grad():
        got, want = ours(x), pe(x)
    assert torch.isfinite(got).all() and got.dtype == want.dtype
    # (bf16: peft rounds the base, then the sum; the fused op rounds once: 1-ulp differences)
    assert ((got - want).double().norm() / want.double().norm()) < (1e-2 if x_dtype == torch.bfloat16 else 1e-6)
    assert ours.base_layer.compute_dtype == x_dtype == pe.base_layer.compute_dtype


def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_is_read_in_the_standard_layout():
    """bitsandbytes' eval forward on a CPU with AVX512-BF16 repacks the weight in place; LoRALinear's base-only
    forward (adapters disabled) runs it. The next fused forward read the repacked bytes (IndexError)."""
    base = linear4bit(64, 128)
    base.support_avx512bf16_for_cpu = True        # what has_avx512bf16() says on such a CPU
    m = LoRALinear.from_linear(base, r=4, init_lora_weights=False).eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        m.enable_adapters(False)
        m(x)
        m.enable_adapters(True)
        assert getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        got = m(x)
    W = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)   # the layer's weight now
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    want = x @ W.t() + base.bias + m.scaling["default"] * (x @ A.t()) @ B.t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_odd_number_of_weights_is_read():
    """3 x 5 weights: bitsandbytes packs 8 bytes, the last one half used (the layer was refused)."""
    base = linear4bit(3, 5)
    m = LoRALinear.from_linear(base, r=2, init_lora_weights=False)
    x = torch.randn(2, 5)
    W = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    torch.testing.assert_close(m(x), x @ W.t() + base.bias + m.scaling["default"] * (x @ A.t()) @ B.t(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("double", [True, False])
def test_a_state_dict_restores_into_a_layer_of_other_weights(double):
    """The NF4 quant state (absmax, quant_map, nested ...) was an unexpected key (strict) or left at the fresh
    layer's scales under the loaded codes (strict=False: silently wrong); found by review."""
    def layer(seed):
        torch.manual_seed(seed)
        lin = nn.Linear(64, 32)
        q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double,
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double, module=q)
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return LoRALinear.from_linear(q.to("cpu"), r=4, init_lora_weights=False)
    src, dst = layer(0), layer(1)
    x = torch.randn(3, 64)
    dst(x)      # (its NF4 container made for the old scales)
    assert dst.load_state_dict(src.state_dict(), strict=True)
    qs, want = dst.base_layer.weight.quant_state, src.base_layer.weight.quant_state
    assert torch.equal(bnbf.dequantize_4bit(dst.base_layer.weight.data, qs),
                       bnbf.dequantize_4bit(src.base_layer.weight.data, want))
    assert torch.equal(dst(x), src(x))
