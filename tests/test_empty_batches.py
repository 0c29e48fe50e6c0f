"""Every layer takes a batch of 0 tokens ([0, in] and [b, 0, in]: an empty micro-batch, an MoE expert that
no token was routed to, the last uneven shard of a dataset): the output has the right shape, and the
backward gives zero gradients of the right shapes. Before: FP8Linear (its 1x128 quantizer) failed on
it, and the CUDA Hadamard kernel would have launched a grid of 0 blocks (a launch error). On a GPU
the same cases run with the default (fused) backends."""
import pytest
import torch
from torch import nn

from fusedtune.nn import FP8Linear, LoRALinear, RoSTELinear, RowMaskedLinear, SparseDeltaLinear
from fusedtune.ops.fp8 import fp8_arch_gap, fp8_quantize_1x128
from fusedtune.ops.roste import hadamard, rotate_fake_quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IN, OUT = 256, 128


def _fp8(lin):
    gap = fp8_arch_gap(lin.weight.device)
    return FP8Linear.from_linear(lin, backend="reference" if gap else None)


LAYERS = {
    "lora": lambda lin: LoRALinear.from_linear(lin, r=8, init_lora_weights=False),
    "sparse_delta": lambda lin: SparseDeltaLinear.from_linear(lin, density=0.02, seed=1),
    "hft_row": lambda lin: RowMaskedLinear.from_linear(lin, torch.arange(0, OUT, 2)),
    "fp8": _fp8,
    "roste": lambda lin: RoSTELinear.from_linear(lin),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, IN), (2, 0, IN)])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_takes_an_empty_batch(kind, shape, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = LAYERS[kind](nn.Linear(IN, OUT, device=device, dtype=dtype))
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], OUT) and y.dtype == dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    trained = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:     # zeros of the right shape, as nn.Linear gives (None where the op never ran)
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name


@pytest.mark.parametrize("device", DEVICES)
def test_ops_take_zero_rows(device):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(0, 4096, device=device, dtype=dtype)
        assert hadamard(x).shape == x.shape
        assert rotate_fake_quant(x, 4).shape == x.shape
    q_row, s_row, q_col, s_col = fp8_quantize_1x128(torch.randn(0, 256, device=device), backend="reference")
    assert q_row.shape == (0, 256) and s_row.shape == (0, 2) and q_col.shape == (256, 0) and s_col.shape == (256, 0)
