"""LoRA over a bitsandbytes NF4 base (QLoRA) on the CPU: the NF4 reading bit-exact against
bitsandbytes' own dequantize, LoRALinear over bnb.nn.Linear4bit against peft's QLoRA layer, the path
choice (the 'qlora' patch method is tested with 'lora' in test_lora_layer.py)."""
import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from fusedtune.nn import LoRALinear  # noqa: E402
from fusedtune.ops import lora as lora_ops  # noqa: E402
from fusedtune.reference.nf4 import Nf4Weight, dequantize  # noqa: E402
from fusedtune.testing import assert_within_rule  # noqa: E402
from lora_cases import exact64, layer_outputs  # noqa: E402


@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 130), 64), ((33, 64), 64), ((96, 256), 128), ((40, 96), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_bit_exact_with_bitsandbytes(double, shape, blocksize, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double, blocksize=blocksize)
    st.dtype = dtype
    ours = dequantize(Nf4Weight.from_bnb(q, st), dtype)
    if shape[1] % blocksize == 0 or shape[1] % 2:
        assert torch.equal(ours, bnbf.dequantize_4bit(q, st))
    # bitsandbytes' generic dequantization (its reference, what its CUDA kernels compute). Its native CPU
    # kernel disagrees with it for even rows that are not a multiple of the block size ((40, 96) here)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = st.absmax if not double else bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    generic = _dequantize_4bit_compute(q.reshape(-1), absmax, st.code, blocksize, shape, dtype)
    assert torch.equal(ours, generic)


def _linear4bit(lin, dtype=torch.float32, double=True):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                          compress_statistics=double, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=double,
                                 quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")


@pytest.mark.parametrize("double", [True, False])
def test_lora_over_linear4bit_matches_peft_qlora(double):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    torch.manual_seed(0)
    base = _linear4bit(nn.Linear(128, 40), double=double)  # in % 64 == 0 (bnb's CPU kernel: see above)
    pe = PeftLinear4bit(copy.deepcopy(base), "default", config=LoraConfig(r=8, lora_alpha=16, init_lora_weights=False),
                        r=8, lora_alpha=16)
    ours = LoRALinear.from_peft(copy.deepcopy(pe))
    assert ours._fusedtune_report()["method"] == "qlora"
    x = torch.randn(3, 11, 128)
    dy = torch.randn(3, 11, 40)
    res = {"peft": layer_outputs(pe, x, dy), "ours": layer_outputs(ours, x, dy)}
    Wd = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    y64, g64 = exact64(x, Wd, [pe.lora_A["default"].weight], [pe.lora_B["default"].weight], [2.0], base.bias, dy=dy)
    for j, (a, p, e) in enumerate(zip(res["ours"], res["peft"], [y64] + g64)):
        assert_within_rule(a.reshape(e.shape), e, p.reshape(e.shape), f"output {j}", atol=1e-5)


def test_nf4_path_is_chosen_by_rows_and_reported(monkeypatch):
    assert lora_ops.NF4_FUSED_MAX_ROWS == 0   # the measured default (H200 at 16 rows: buffer 37% ahead in run 3, 7% behind in run 2)
    assert lora_ops.nf4_path(1, True) == lora_ops.nf4_path(16, True) == lora_ops.nf4_path(4096, True) == "buffer"
    monkeypatch.setattr(lora_ops, "NF4_FUSED_MAX_ROWS", 256)
    assert lora_ops.nf4_path(1, True) == "fused"
    assert lora_ops.nf4_path(lora_ops.NF4_FUSED_MAX_ROWS, True) == "fused"
    assert lora_ops.nf4_path(lora_ops.NF4_FUSED_MAX_ROWS + 1, True) == "buffer"
    assert lora_ops.nf4_path(0, True) == "buffer"   # an empty batch: no GEMM to fuse into
    assert lora_ops.nf4_path(10**6, None) == ""
    ours = LoRALinear.from_linear(_linear4bit(nn.Linear(64, 32)), r=4)
    ours(torch.randn(2, 5, 64))
    rep = ours._fusedtune_report()
    assert rep["method"] == "qlora" and "NF4" in rep["path"]


def test_merge_into_nf4_is_refused_and_to_linear_dequantizes():
    from fusedtune.nn.lora import LoRAUnsupported
    lin = nn.Linear(64, 32)
    ours = LoRALinear.from_linear(_linear4bit(lin), r=4, init_lora_weights=False)
    with pytest.raises(LoRAUnsupported, match="NF4"):
        ours.merge()
    plain = ours.to_linear()
    x = torch.randn(4, 64)
    torch.testing.assert_close(plain(x), ours(x), atol=1e-5, rtol=1e-5)
    base = ours.to_linear(merge=False)
    assert torch.equal(base.weight, dequantize(Nf4Weight.from_bnb(ours.base_layer.weight), torch.float32))


def test_qlora_layer_compiles_fullgraph():
    ours = LoRALinear.from_linear(_linear4bit(nn.Linear(64, 32)), r=4)
    x = torch.randn(2, 5, 64)
    want = ours(x)
    got = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)


def test_fsdp_quant_storage_reads_the_same_nf4_bytes():
    """FSDP-QLoRA stores the packed weight in another dtype (quant_storage); the bytes are the same."""
    base = _linear4bit(nn.Linear(64, 32))
    want = dequantize(Nf4Weight.from_bnb(base.weight))
    q16 = base.weight.data.reshape(-1).view(torch.bfloat16)
    got = dequantize(Nf4Weight.from_bnb(q16, base.weight.quant_state))
    assert torch.equal(got, want)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_packed_weight_without_its_quant_state_takes_the_kept_one(storage):
    """FSDP2's fully_shard swaps the Params4bit for a plain parameter of the same bytes (uint8, or FSDP-QLoRA's
    quant_storage dtype): the layer's output and gradients stay the same bits (tests/test_patch_fsdp.py
    trains it sharded). A Params4bit made without module= leaves no copy on the Linear4bit: the layer's own."""
    torch.manual_seed(0)
    base = _linear4bit(nn.Linear(64, 32))
    assert getattr(base, "quant_state", None) is None
    layer = LoRALinear.from_linear(base, r=4, alpha=8, init_lora_weights=False)
    x = torch.randn(5, 64, requires_grad=True)
    want = layer(x)
    want_dx, = torch.autograd.grad(want.sum(), x)
    packed = base.weight.data.reshape(-1).view(storage).clone()
    base.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
    assert getattr(base.weight, "quant_state", None) is None
    got = layer(x)
    got_dx, = torch.autograd.grad(got.sum(), x)
    assert torch.equal(got, want) and torch.equal(got_dx, want_dx)
    base.weight = nn.Parameter(torch.randn(32, 64), requires_grad=False)   # a dense weight again: dense
    assert layer._quant_state() is None
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ base.weight.t() + base.bias + layer.scaling["default"] * (x @ A.t()) @ B.t()
    torch.testing.assert_close(layer(x), want)


def test_nf4_bad_inputs_are_refused_clearly():
    base = _linear4bit(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="has no quant_state"):
        Nf4Weight.from_bnb(base.weight.data)                   # a bare tensor, no state given
    st = copy.copy(base.weight.quant_state)
    st.quant_type = "fp4"
    with pytest.raises(NotImplementedError, match="supports the NF4 4-bit type, not 'fp4'"):
        Nf4Weight.from_bnb(base.weight.data, st)
    with pytest.raises(ValueError, match="does not hold 32x64 nibbles"):
        Nf4Weight.from_bnb(base.weight.data.reshape(-1)[:100], base.weight.quant_state)
