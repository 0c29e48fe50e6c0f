"""PiSSA and OLoRA initialization (peft's init_lora_weights="pissa" / "pissa_niter_<k>" / "olora"): the
adapters and the residual base equal peft's, the layer's output is unchanged, adapter files load as peft
loads them (the residual rebuilt from the original model), the patch methods (qlora: the residual
quantized), and what is refused."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

import fusedtune  # noqa: E402
from fusedtune.nn import LoRALinear  # noqa: E402
from fusedtune.nn.lora import LoRAUnsupported  # noqa: E402
from tiny_models import tiny_llama, train_losses  # noqa: E402


def _pair(lin, init, r=4, alpha=8, rslora=False, seed=0):
    torch.manual_seed(seed)
    pe = peft_layer.Linear(copy.deepcopy(lin), "default", config=LoraConfig(r=r, lora_alpha=alpha,
                                                                           use_rslora=rslora,
                                                                           init_lora_weights=init),
                           r=r, lora_alpha=alpha)
    torch.manual_seed(seed)
    ours = LoRALinear.from_linear(copy.deepcopy(lin), r=r, alpha=alpha, use_rslora=rslora, init_lora_weights=init)
    return pe, ours


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
@pytest.mark.parametrize("shape,dtype,rslora", [((24, 40), torch.float32, False), ((48, 20), torch.float32, True),
                                                ((32, 32), torch.bfloat16, False)])
def test_adapters_and_residual_equal_peft_and_keep_the_output(init, shape, dtype, rslora):
    torch.manual_seed(1)
    lin = nn.Linear(shape[1], shape[0]).to(dtype)
    pe, ours = _pair(lin, init, rslora=rslora)
    # peft moves the adapters to a bf16 base's dtype after computing the residual from float32 ones; ours
    # stay float32 (adapter_dtype), so the adapters agree to bf16 rounding and the residuals exactly
    near = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for part in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, part)["default"].weight, getattr(pe, part)["default"].weight.float(),
                                   **near)
    torch.testing.assert_close(ours.base_layer.weight, pe.base_layer.weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.base_layer.weight.float(), lin.weight.float(), atol=1e-3)   # W is the residual
    assert ours.init_lora_weights["default"] == init
    x = torch.randn(5, shape[1]).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ours(x), lin(x), **tol)                # residual + s B A = W
    torch.testing.assert_close(ours.to_linear(merge=True).weight, lin.weight, **tol)


def test_pissa_takes_the_top_singular_directions():
    torch.manual_seed(2)
    lin = nn.Linear(30, 20)
    ours = LoRALinear.from_linear(copy.deepcopy(lin), r=3, alpha=6, init_lora_weights="pissa")
    s = ours.scaling["default"]
    S = torch.linalg.svdvals(lin.weight.double())
    delta = s * ours.lora_B["default"].weight.double() @ ours.lora_A["default"].weight.double()
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:3], S[:3], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(ours.base_layer.weight.double())[:17], S[3:], rtol=1e-4,
                               atol=1e-5)


def test_adapter_files_load_onto_the_original_model_as_peft_loads_them(tmp_path):
    base = tiny_llama()
    targets = ["q_proj", "v_proj"]
    fusedtune.patch(trained := copy.deepcopy(base), "lora", target_modules=targets, r=4, alpha=8,
                    init_lora_weights="pissa")
    with torch.no_grad():                          # "training": the adapters move
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 10))
    trained.eval()
    want = trained(ids).logits
    cfg = fusedtune.lora.save_adapter(trained, str(tmp_path))
    assert cfg["init_lora_weights"] == "pissa"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))   # peft: residual from the original
    pm.eval()
    torch.testing.assert_close(pm(ids).logits, want, atol=1e-4, rtol=1e-4)
    mine = copy.deepcopy(base)
    fusedtune.patch(mine, "lora", target_modules=targets, r=4, alpha=8)      # plain adapters, original base
    fusedtune.lora.load_adapter(mine, str(tmp_path))
    mine.eval()
    torch.testing.assert_close(mine(ids).logits, want, atol=1e-4, rtol=1e-4)
    again = copy.deepcopy(base)
    fusedtune.patch(again, "lora", target_modules=targets, r=4, alpha=8, init_lora_weights="pissa")
    fusedtune.lora.load_adapter(again, str(tmp_path))                        # already the residual: kept
    again.eval()
    torch.testing.assert_close(again(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,init", [("lora", "olora"), ("qlora", "pissa")])
def test_patch_with_a_decomposition_keeps_the_model_and_trains(method, init):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 12))
    y0 = model(ids).logits
    rep = fusedtune.patch(model, method, r=4, alpha=8, lr=1e-2, init_lora_weights=init, use_dora=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.init_lora_weights == {"default": init} and q.use_dora == {"default": True}
    assert q.lora_magnitude_vector["default"].weight.requires_grad
    residual = W - q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    base = q.to_linear(merge=False).weight      # qlora: the NF4 base dequantized
    if method == "qlora":                       # the residual was quantized, not W
        assert (base - residual).abs().max() < 0.5 * (base - W).abs().max()
        tol = 0.3
    else:
        torch.testing.assert_close(base, residual, rtol=1e-5, atol=1e-6)
        tol = 1e-4
    torch.testing.assert_close(model(ids).logits, y0, atol=tol, rtol=tol)
    losses = train_losses(rep, model, ids, 8)
    assert losses[-1] < losses[0]


def test_refused_inits():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"r <= min\(in, out\) = 8"):
        LoRALinear.from_linear(copy.deepcopy(lin), r=9, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="must be an int"):
        LoRALinear.from_linear(copy.deepcopy(lin), r=2, init_lora_weights="pissa_niter_x")
    with pytest.raises(LoRAUnsupported, match="'pissa_niter_<k>' or 'olora'"):
        LoRALinear.from_linear(copy.deepcopy(lin), r=2, init_lora_weights="loftq")
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    with pytest.raises(LoRAUnsupported, match="initialize on the 16/32-bit model, then quantize the residual"):
        LoRALinear.from_linear(q, r=2, init_lora_weights="olora")
