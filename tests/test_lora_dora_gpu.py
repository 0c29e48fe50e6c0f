"""DoRA on a GPU (its own file, so the GPU check runs it beside the other LoRA tests): the layer against
peft's DoRA layer within DESIGN.md's rule of the fp64 definition, and the dropout-delta kernel bit for bit."""
import pytest
import torch

from fusedtune.reference.lora import dropout_mask
from fusedtune.testing import assert_within_rule

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,p,schedule", [(torch.bfloat16, 0.0, "fused"), (torch.bfloat16, 0.1, "fused"),
                                              (torch.float32, 0.0, "fused"), (torch.float32, 0.1, "fused"),
                                              (torch.bfloat16, 0.0, "cublas")])
def test_dora_layer_within_rule_against_peft(dtype, p, schedule, monkeypatch):
    """DoRA on the Triton kernels at a Llama layer shape: output, dX, dA, dB and the magnitude's gradient
    within the rule of the fp64 definition, peft's DoRA layer (same precision, same mask) the yardstick;
    on each base-GEMM schedule (cublas: torch.mm, then the expand kernel writes F and the scaled output)."""
    from fusedtune.ops import lora_triton
    monkeypatch.setattr(lora_triton, "CUBLAS_MIN_WORK", 0 if schedule == "cublas" else 2**62)
    import copy
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import layer as peft_layer
    from torch import nn
    from fusedtune.nn import LoRALinear
    from fusedtune.ops.lora import _seed_tensor
    from lora_cases import SeededDropout
    from lora_cases import dora64, dora_outputs as outputs
    torch.manual_seed(0)
    lin = nn.Linear(4096, 1024, bias=False, device="cuda").to(dtype)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=p, use_dora=True, init_lora_weights=False)
    pe = peft_layer.Linear(lin, "default", config=cfg, r=16, lora_alpha=32)
    for mod in (pe.lora_A["default"], pe.lora_B["default"], pe.lora_magnitude_vector["default"]):
        mod.float()
    with torch.no_grad():
        pe.lora_magnitude_vector["default"].weight.mul_(torch.rand(1024, device="cuda") + 0.5)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    assert ours._fusedtune_report()["backend"] == "triton"
    x = torch.randn(4, 512, 4096, device="cuda").to(dtype)
    dy = torch.randn(4, 512, 1024, device="cuda").to(dtype)
    torch.manual_seed(1)
    seed = int(_seed_tensor(None, p))
    if p:
        pe.lora_dropout["default"] = SeededDropout(p, seed)
    torch.manual_seed(1)
    got, want = outputs(ours, x, dy), outputs(pe, x, dy)
    keep = dropout_mask(2048, 4096, seed, p, "cuda") if p else None
    exact = dora64(x, lin.weight, pe.lora_A["default"].weight, pe.lora_B["default"].weight, pe.scaling["default"],
                   pe.lora_magnitude_vector["default"].weight, None, dy, keep, p)
    atol = 1e-4 if dtype == torch.float32 else 1e-2
    for j, (a, b, e) in enumerate(zip(got, want, exact)):
        assert_within_rule(a.reshape(e.shape), e, b.reshape(e.shape), f"{dtype} p={p} output {j}", atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_delta_kernel_is_bit_exact_on_the_gpu(dtype):
    """DoRA's dropout(x) - x: the Triton kernel (no FMA contraction) equals the reference bit for bit."""
    from fusedtune.ops.dora import _dropout_delta
    x = torch.randn(4097, 4095, device="cuda").to(dtype)
    assert torch.equal(_dropout_delta(x, 0.1, 77, "triton"), _dropout_delta(x, 0.1, 77, "reference"))
