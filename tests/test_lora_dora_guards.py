"""DoRA and adapter-management edges found by review (each test fails on the code before): a DoRA merge after
another adapter's, the eval norm cache under torch's fused AdamW, weak references under swap_tensors
conversions, and load_adapter's refusals that came after it had changed layers."""
import copy

import pytest
import torch
from torch import nn

import fusedtune.lora as FL
from fusedtune.nn import FP8Linear, LoRALinear
from fusedtune.ops.lora import LoRAUnsupported


def two_adapters():
    torch.manual_seed(0)
    f = LoRALinear(nn.Linear(32, 40))
    f.add_adapter("a", 4, 8, init_lora_weights=False)
    f.add_adapter("d", 4, 8, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        f.lora_magnitude_vector["d"].weight.mul_(1 + 0.2 * torch.randn(40))
    return f


@pytest.mark.parametrize("exact_unmerge", [True, False])
def test_a_dora_merge_after_another_takes_the_norm_of_the_unmerged_weight(exact_unmerge):
    """peft: W <- m / ||W0 + dW_d|| * (W + dW_d) with W = W0 + dW_a (the norm over W was 22% off)."""
    f = two_adapters()
    W0 = f.base_layer.weight.detach().double().clone()
    dA = f.delta_weight("a").double()
    dD = f.delta_weight("d").double()
    m = f.lora_magnitude_vector["d"].weight.detach().double()
    want = (m / (W0 + dD).norm(dim=1))[:, None] * (W0 + dA + dD)
    f.merge(adapter_names=["a"], exact_unmerge=exact_unmerge)
    f.merge(adapter_names=["d"], exact_unmerge=exact_unmerge)
    torch.testing.assert_close(f.base_layer.weight.double(), want, rtol=1e-5, atol=1e-6)
    f.unmerge()
    torch.testing.assert_close(f.base_layer.weight.double(), W0, rtol=0, atol=1e-5)


def test_the_eval_norm_cache_follows_a_fused_adamw_step():
    """torch's fused AdamW writes without bumping version counters: the norm cached in eval mode went stale."""
    torch.manual_seed(0)
    f = LoRALinear.from_linear(nn.Linear(32, 40), r=4, init_lora_weights=False, use_dora=True).eval()
    opt = torch.optim.AdamW([p for p in f.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(6, 32)
    with torch.no_grad():
        f(x)                                                   # fills the cache
    f(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        got = f(x)
        f.forget_dora_norms()
        assert torch.equal(got, f(x))


def test_conversions_and_loads_that_swap_tensors_work_after_an_eval_forward():
    f = LoRALinear.from_linear(nn.Linear(32, 40), r=4, init_lora_weights=False, use_dora=True).eval()
    sd = copy.deepcopy(f.state_dict())
    with torch.no_grad():
        f(torch.randn(2, 32))                                  # caches the norm (weak references)
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        f.to(torch.float64)
        f.load_state_dict({k: v.double() for k, v in sd.items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)
    assert f.base_layer.weight.dtype == torch.float64


class Two(nn.Module):
    def __init__(self, dora, fp8_second=False):
        super().__init__()
        torch.manual_seed(0)
        self.q = LoRALinear.from_linear(nn.Linear(32, 40), r=4, alpha=8, init_lora_weights=False, use_dora=dora)
        base = FP8Linear.from_linear(nn.Linear(32, 40), backend="reference") if fp8_second else nn.Linear(32, 40)
        self.k = LoRALinear.from_linear(base, r=4, alpha=8, init_lora_weights=False, use_dora=dora and not fp8_second)


def test_load_adapter_refuses_before_changing_a_layer(tmp_path):
    src = Two(dora=True)
    FL.save_adapter(src, tmp_path)
    merged = Two(dora=True)
    merged.k.merge()
    before = copy.deepcopy(merged.state_dict())
    with pytest.raises(ValueError, match="merged into its weight; unmerge\\(\\) it first.*nothing was changed"):
        FL.load_adapter(merged, tmp_path)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in before.items())
    assert merged.q.scaling == {"default": 2.0}
    fp8 = Two(dora=False, fp8_second=True)
    with pytest.raises(LoRAUnsupported, match="DoRA over an FP8Linear base.*nothing was changed"):
        FL.load_adapter(fp8, tmp_path, adapter_name="new")
    assert list(fp8.q.r) == ["default"] and list(fp8.k.r) == ["default"]


def test_compiled_no_grad_forward_of_dora_and_a_compiled_inference_forward_before_training():
    """A compiled DoRA forward without grad (eval, generate) failed inside dynamo (the Function's variadic forward
    took ctx as its first input); a compiled inference-mode forward cached an inference-tensor scale table and every
    later training forward failed on it (found by review)."""
    import torch as _t

    from fusedtune.nn import LoRALinear as _L
    _t.manual_seed(0)
    dora = _L.from_linear(_t.nn.Linear(64, 96), r=8, alpha=16, use_dora=True).eval()
    x = _t.randn(2, 5, 64)
    with _t.no_grad():
        want = dora(x)
        _t._dynamo.reset()
        assert _t.equal(_t.compile(dora, backend="eager")(x), want)
    plain = _L.from_linear(_t.nn.Linear(64, 96), r=8, alpha=16)
    _t._dynamo.reset()
    f = _t.compile(plain, backend="eager")
    with _t.inference_mode():
        f(x)
    assert not any(t.is_inference() for t in plain._tables.values())
    f(x.clone().requires_grad_()).sum().backward()
    plain(x.clone().requires_grad_()).sum().backward()
