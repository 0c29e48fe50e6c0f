"""FP8 family on the CPU: the quantizers against first principles (torch's own float8 cast, per-tile
maxima), the scale rules (zero, inf, NaN, powers of two), the block-scaled GEMM against an fp64
product of the dequantized operands, SQNR targets and the outlier-channel comparison with tensorwise
scaling, FP8Linear training, opcheck, compile and bad input."""
import pytest
import torch

import fusedtune
from fusedtune.ops import fp8 as F8
from fusedtune.ops.fp8 import _gemm_op, _linear_op, _q1_op
from fusedtune.reference import fp8 as ref
from tiny_models import tiny_llama, train_losses

E4M3 = torch.float8_e4m3fn


def _x(M, K, seed=0, scale=1.0):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("M,K", [(1, 1), (5, 130), (200, 300), (128, 256)])
def test_quantize_1x128_from_first_principles(M, K):
    x = _x(M, K) * torch.logspace(-3, 3, K)[None, :]
    qr, sr, qc, sc = F8.fp8_quantize_1x128(x, backend="reference")
    assert qr.dtype == E4M3 and sr.shape == (M, (K + 127) // 128) and qc.shape == (K, M)
    for m in range(0, M, max(1, M // 7)):
        for kb in range(sr.shape[1]):
            tile = x[m, kb * 128:(kb + 1) * 128]
            s = tile.abs().max() / 448.0
            assert sr[m, kb].item() == pytest.approx(s.item(), rel=1e-7)
            assert torch.equal(qr[m, kb * 128:(kb + 1) * 128].view(torch.uint8), (tile / s).to(E4M3).view(torch.uint8))
    assert torch.equal(qc.view(torch.uint8), F8.fp8_quantize_1x128(x.t().contiguous(), backend="reference")[0]
                       .view(torch.uint8))
    assert ref.dequantize_rows(qr, sr).abs().max() <= x.abs().max() * (1 + 2 ** -4)


def test_quantize_128x128_transposes_with_its_scales():
    w = _x(300, 260, 1) * 0.02
    q, s = F8.fp8_quantize_128x128(w, backend="reference")
    assert s.shape == (3, 3)
    assert s[1, 2].item() == pytest.approx((w[128:256, 256:].abs().max() / 448).item(), rel=1e-7)
    qt, st = F8.fp8_quantize_128x128(w.t().contiguous(), backend="reference")
    assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8)) and torch.equal(st, s.t())


def test_scale_rules_zero_inf_nan_and_pow2():
    x = _x(4, 384, 2)
    x[0, :128] = 0.0
    x[1, 130] = float("inf")
    x[2, 300] = float("nan")
    qr, sr, _, _ = F8.fp8_quantize_1x128(x, backend="reference")
    assert sr[0, 0].item() == 1.0 and (qr[0, :128].float() == 0).all()
    assert torch.isnan(sr[1, 1]) and torch.isnan(qr[1, 128:256].float()).all()      # the whole tile
    assert torch.isnan(sr[2, 2]) and torch.isnan(ref.dequantize_rows(qr, sr)[2, 256:]).all()
    assert torch.isfinite(sr[1, 0]) and torch.isfinite(sr[1, 2])                      # neighbours unharmed
    _, sp, _, _ = F8.fp8_quantize_1x128(x, pow2=True, backend="reference")
    fin = torch.isfinite(sp)
    m, _ = torch.frexp(sp[fin])
    assert (m == 0.5).all() and (sp[fin] >= sr[fin]).all() and (sp[fin] < 2 * sr[fin]).all()
    # a nonzero tile whose amax / 448 underflows float32: scale 2^-149, finite codes, its zeros stay 0
    t = torch.zeros(2, 256)
    t[0, 3], t[1, 200] = 2.0 ** -145, -(2.0 ** -149)
    for backend in ("reference", None):
        qt, st, qc, sc = F8.fp8_quantize_1x128(t, backend=backend)
        assert st[0, 0].item() == st[1, 1].item() == 2.0 ** -149 and st[0, 1].item() == 1.0
        assert torch.equal(ref.dequantize_rows(qt, st), t)           # both values are multiples of 2^-149
        assert torch.isfinite(qc.float()).all() and torch.isfinite(sc).all()
    # amax / 448 subnormal: rounded down it would put x / s past 448 (saturated, -12.5% at 2^-140)
    for e in (-140, -130, -127):
        t = torch.zeros(1, 128)
        t[0, 0], t[0, 1] = 2.0 ** e, 0.37 * 2.0 ** e
        for backend in ("reference", None):
            qt, st, _, _ = F8.fp8_quantize_1x128(t, backend=backend)
            assert st[0, 0].item() * 448 >= 2.0 ** e
            deq = ref.dequantize_rows(qt, st)
            assert ((deq[0, :2] - t[0, :2]).abs() <= t[0, :2].abs() * 2.0 ** -4).all(), (e, deq[0, :2])
    # pow2 scales make x / s exact: dequantizing then re-quantizing reproduces the bytes
    q2, _ = ref.quantize_rows(torch.nan_to_num(ref.dequantize_rows(*ref.quantize_rows(_x(3, 256), True))), True)
    q1, _ = ref.quantize_rows(_x(3, 256), True)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))


@pytest.mark.parametrize("M,N,K", [(64, 48, 256), (33, 70, 200)])
@pytest.mark.parametrize("b_rows", [1, 128])
def test_gemm_equals_fp64_product_of_dequantized_blocks(M, N, K, b_rows):
    a_q, a_s = ref.quantize_rows(_x(M, K, 3))
    b = _x(N, K, 4)
    b_q, b_s = ref.quantize_rows(b) if b_rows == 1 else ref.quantize_128x128(b)
    got = F8.fp8_gemm(a_q, a_s, b_q, b_s, b_rows, torch.float32, backend="reference")
    bd = ref.dequantize_rows(b_q, b_s) if b_rows == 1 else ref.dequantize_blocks(b_q, b_s)
    exact = ref.dequantize_rows(a_q, a_s).double() @ bd.double().t()
    torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-5)


def test_sqnr_targets_and_outlier_channels_beat_tensorwise():
    x = _x(512, 1024, 5)
    w = _x(768, 1024, 6) * 0.02
    dy = _x(512, 768, 7)
    y = F8.fp8_linear(x, w, backend="reference")
    assert ref.sqnr_db(y, x @ w.t()) >= 25
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    F8.fp8_linear(xg, wg, backend="reference").backward(dy)
    assert ref.sqnr_db(xg.grad, dy @ w) >= 18 and ref.sqnr_db(wg.grad, dy.t() @ x) >= 18
    # outlier channels (two input features 100x larger): tiles without them keep their resolution, where a
    # tensorwise scale pushes the ordinary values down toward E4M3's subnormals
    xo = x.clone()
    xo[:, :2] *= 100
    s_t = xo.abs().max() / 448
    x_tw = (xo / s_t).to(E4M3).float() * s_t
    assert ref.sqnr_db(ref.dequantize_rows(*ref.quantize_rows(xo)), xo) > ref.sqnr_db(x_tw, xo) + 3
    s_w = w.abs().max() / 448
    y_tw = x_tw @ ((w / s_w).to(E4M3).float() * s_w).t()
    assert ref.sqnr_db(F8.fp8_linear(xo, w, backend="reference"), xo @ w.t()) > ref.sqnr_db(y_tw, xo @ w.t()) + 1


def test_fp8_linear_training_follows_bf16():
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    net8 = torch.nn.Sequential(FP8Linear.from_linear(torch.nn.Linear(64, 256)), torch.nn.GELU(),
                               FP8Linear.from_linear(torch.nn.Linear(256, 10)))
    net8.load_state_dict(net.state_dict())
    data = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    target = (data[:, :10] * 2).argmax(1)
    losses = {}
    for name, m in (("fp32", net), ("fp8", net8)):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        cur = []
        for i in range(60):
            b = slice((i * 32) % 256, (i * 32) % 256 + 32)
            loss = torch.nn.functional.cross_entropy(m(data[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            cur.append(loss.item())
        losses[name] = cur
    a, b = sum(losses["fp32"][-10:]) / 10, sum(losses["fp8"][-10:]) / 10
    assert b < losses["fp8"][0] * 0.5 and abs(a - b) < 0.1 * max(a, 0.1) + 0.05


def test_saves_fp8_activations_not_16bit_copies():
    x = torch.randn(300, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F8.fp8_linear(x, w, backend="reference")
    assert saved and all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in saved)
    assert not any(t.dtype == torch.bfloat16 and t.shape == x.shape for t in saved)


def test_128x128_block_rules_zero_inf_nan():
    """An all-zero block has scale 1 and codes 0; a block holding inf or NaN has scale NaN, so it
    dequantizes to NaN (a non-finite weight never becomes finite numbers); other blocks are untouched."""
    w = _x(256, 256, 3)
    w[:128, :128] = 0.0
    w[:128, 128:][5, 7] = float("inf")
    w[128:, :128][1, 2] = float("nan")
    for b in ("reference",) + (("cpu",) if fusedtune._ext.loaded() else ()):
        q, s = F8.fp8_quantize_128x128(w, backend=b)
        assert s[0, 0].item() == 1.0 and (q[:128, :128].float() == 0).all()
        assert torch.isnan(s[0, 1]) and torch.isnan(s[1, 0])
        assert torch.isfinite(s[1, 1]) and s[1, 1] > 0
        deq = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
        assert torch.isnan(deq[:128, 128:]).all() and torch.isnan(deq[128:, :128]).all()
        assert torch.isfinite(deq[128:, 128:]).all()


def test_opcheck():
    x = _x(40, 300, 8)
    torch.library.opcheck(_q1_op, (x, False, True, "reference"))
    torch.library.opcheck(F8._q128_op, (_x(70, 300, 9), False, False, "reference"))
    torch.library.opcheck(F8._q128_op, (_x(70, 300, 9), False, True, "reference"))
    a_q, a_s = ref.quantize_rows(x)
    b_q, b_s = ref.quantize_128x128(_x(70, 300, 9))
    torch.library.opcheck(_gemm_op, (a_q, a_s, b_q, b_s, 128, False, "float32", "reference"),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))  # test_schema multiplies fp8 inputs
    w = _x(70, 300, 9).requires_grad_()
    torch.library.opcheck(_linear_op, (x.requires_grad_(), w, None, b_q, b_s, None, False, True, "reference", "reference"),
                          test_utils=("test_faketensor", "test_autograd_registration"))
    if fusedtune._ext.loaded():   # the C++ quantizer has a fake too (found by review: it had none)
        for block in (False, True):
            for copy in (False, True):
                torch.library.opcheck(torch.ops.fusedtune.fp8_quant_kernel.default, (_x(70, 300, 9), block, copy, False))


@pytest.mark.parametrize("trainable", [False, True])
def test_compile_fullgraph(trainable):
    """Compiled (fullgraph) equals eager: output, dX, and dW and db when the weight trains."""
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    layer = FP8Linear(96, 40, bias=True, backend="reference")
    layer.weight.requires_grad_(trainable)
    layer.bias.requires_grad_(trainable)
    x = torch.randn(3, 7, 96, requires_grad=True)
    dy = torch.randn(3, 7, 40)
    params = [x] + ([layer.weight, layer.bias] if trainable else [])
    eager = layer(x)
    g_eager = torch.autograd.grad(eager, params, dy)
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    g_comp = torch.autograd.grad(comp, params, dy)
    torch.testing.assert_close(comp, eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_and_patch_method():
    model = tiny_llama(64, 128)
    ids = torch.randint(0, 64, (2, 16))
    m2 = fusedtune.fp8.convert(tiny_llama(64, 128, seed=1))
    from fusedtune.nn import FP8Linear
    assert sum(isinstance(m, FP8Linear) for m in m2.modules()) == 14 and type(m2.lm_head) is torch.nn.Linear
    rep = fusedtune.patch(model, "fp8", lr=3e-3)
    assert rep.trainable_params == sum(p.numel() for p in model.parameters())
    losses = train_losses(rep, model, ids, 6)
    assert losses[-1] < losses[0]
    fusedtune.unpatch(model)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_convert_of_a_bare_linear_returns_its_fp8_linear():
    """The model itself a Linear (fqn ""): returned converted, as torchao's convert_to_float8_training does (it
    came back unconverted with a child named '' and duplicate state-dict keys; found by audit)."""
    from fusedtune.nn import FP8Linear
    lin = torch.nn.Linear(256, 128)
    seen = []
    got = fusedtune.fp8.convert(lin, module_filter_fn=lambda m, fqn: seen.append(fqn) or True)
    assert seen == [""] and isinstance(got, FP8Linear) and got.weight is lin.weight
    assert sorted(got.state_dict()) == ["bias", "weight"] and list(lin.named_children()) == []
    assert fusedtune.fp8.convert(lin, module_filter_fn=lambda m, fqn: False) is lin


def test_convert_takes_linear_subclasses_and_every_name_of_a_shared_layer():
    """nn.Linear subclasses with 16/32-bit weights (Falcon's FalconLinear) are converted, as torchao's swap
    does, and a layer registered under two names becomes one FP8Linear under both (found by review: the
    subclasses stayed, silently, and the second name kept the nn.Linear)."""
    from fusedtune.nn import FP8Linear

    class MyLinear(torch.nn.Linear):
        pass

    shared = torch.nn.Linear(128, 128)
    model = torch.nn.ModuleDict({"sub": MyLinear(128, 64), "a": shared, "b": shared})
    fusedtune.fp8.convert(model)
    assert isinstance(model["sub"], FP8Linear) and model["sub"].weight is not None
    assert isinstance(model["a"], FP8Linear) and model["a"] is model["b"] and model["a"].weight is shared.weight


def test_convert_refuses_before_any_change():
    """What fusedtune.patch refuses, convert refuses too, changing nothing: hooks on a layer it would swap (they
    stopped running), an unknown backend or one that cannot run here (the first forward failed), a model DDP
    wraps (found by review)."""
    model = tiny_llama(64, 128)
    model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda *a: None)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="k_proj has a forward pre-hook.*Nothing was changed"):
        fusedtune.fp8.convert(model)
    plain = tiny_llama(64, 128)
    for backend, msg in (("foo", "unknown backend 'foo'"), ("cuda", "backend 'cuda' cannot run the FP8 linear on cpu")):
        with pytest.raises(ValueError, match=msg):
            fusedtune.fp8.convert(plain, backend=backend)
        with pytest.raises(ValueError, match=msg):
            fusedtune.nn.FP8Linear.from_linear(torch.nn.Linear(8, 8), backend=backend)
    with pytest.raises(TypeError, match="torch.float64 weights.*Nothing was changed"):
        fusedtune.fp8.convert(plain.double())
    assert [type(m) for m in model.modules()] == before == [type(m) for m in plain.modules()]


def test_reset_parameters_initializes_as_nn_linear():
    """An init loop over a model built on the meta device (to_empty, then reset_parameters) reaches FP8Linear
    (it had no reset_parameters: its weights stayed uninitialized)."""
    from fusedtune.nn import FP8Linear
    with torch.device("meta"):
        layer = FP8Linear.from_linear(torch.nn.Linear(256, 128))
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    torch.manual_seed(0)
    want = torch.nn.Linear(256, 128)
    assert torch.equal(layer.weight, want.weight) and torch.equal(layer.bias, want.bias)


def test_convert_takes_gpt2_conv1d():
    """GPT-2's Conv1D layers become FP8Linear over the transposed weight; the logits follow the model's."""
    from fusedtune.nn import FP8Linear
    from tiny_models import tiny_gpt2
    model = tiny_gpt2(hidden=128).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        fusedtune.fp8.convert(model)
        got = model(ids).logits
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 8       # 4 per block, lm_head kept
    assert type(model.lm_head) is torch.nn.Linear
    sqnr = 10 * torch.log10(want.square().mean() / (got - want).square().mean())
    assert sqnr > 25, f"SQNR {sqnr:.1f} dB"


def test_bad_inputs():
    with pytest.raises(TypeError, match="must be float32/bfloat16/float16"):
        F8.fp8_quantize_1x128(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        F8.fp8_quantize_128x128(torch.zeros(4))
    a_q, a_s = ref.quantize_rows(_x(8, 256))
    b_q, b_s = ref.quantize_128x128(_x(16, 256))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F8.fp8_gemm(a_q.float(), a_s, b_q, b_s)
    with pytest.raises(ValueError, match="b_block_rows must be 1"):
        F8.fp8_gemm(a_q, a_s, b_q, b_s, 64)
    with pytest.raises(ValueError, match="scales must be"):
        F8.fp8_gemm(a_q, a_s, b_q, b_s, 1)
    with pytest.raises(ValueError, match="A has K=256, B has K=128"):
        F8.fp8_gemm(a_q, a_s, b_q[:, :128], b_s[:, :1])
    with pytest.raises(ValueError, match="x has 5 features"):
        F8.fp8_linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="bias must be a float tensor of shape \\[3\\]"):
        F8.fp8_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(1))   # used to broadcast silently
    with pytest.raises(ValueError, match="one device"):
        F8.fp8_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, device="meta"))
    w = torch.randn(130, 256)
    w_q, w_s = F8.fp8_quantize_128x128(w, backend="reference")
    x = torch.randn(2, 256)
    for bad_q, bad_s in ((w_q, None), (w_q, w_s[:, :1]), (w_q, torch.ones(130, 2)), (w_q.float(), w_s),
                         (w_q[:128], w_s), (w_q, w_s.double())):
        with pytest.raises(ValueError, match="w_q and w_s must be fp8_quantize_128x128"):
            F8.fp8_linear(x, w, w_q=bad_q, w_s=bad_s, backend="reference")
    F8.fp8_linear(x, w, w_q=w_q, w_s=w_s, backend="reference")
    with pytest.raises(ValueError, match="without w_q"):
        F8.fp8_linear(x, w, w_s=w_s, backend="reference")


def test_no_transposed_x_copy_without_grad(monkeypatch):
    """Under no_grad (eval) the forward keeps no column-wise FP8 copy of x for a weight gradient, and no
    transposed FP8 weight for dX unless x needs a gradient; when it does, the weight quantizer's transposed
    bytes are w_q's exactly."""
    seen = []
    real = F8._linear
    monkeypatch.setattr(F8, "_linear", lambda *a: (seen.append((a[7], a[5])), real(*a))[1])
    w = torch.nn.Parameter(torch.randn(128, 256))
    x = torch.randn(4, 256)
    with torch.no_grad():
        F8.fp8_linear(x, w, backend="reference")
    F8.fp8_linear(x, w, backend="reference")
    F8.fp8_linear(x.requires_grad_(), w, backend="reference")
    assert [a for a, _ in seen] == [False, True, True]
    assert seen[0][1] is None and seen[1][1] is None
    q, _ = F8.fp8_quantize_128x128(w.detach(), backend="reference")
    assert seen[2][1].shape == (256, 128) and torch.equal(seen[2][1].view(torch.uint8), q.view(torch.uint8).t())


def test_fp8_base_under_lora_trains_adapters_and_passes_gradients_to_the_input():
    from fusedtune.nn import FP8Linear, LoRALinear
    torch.manual_seed(0)
    base = FP8Linear.from_linear(torch.nn.Linear(256, 192), backend="reference")
    layer = LoRALinear.from_linear(base, r=8, alpha=16, init_lora_weights=False)
    assert not base.weight.requires_grad and layer._fusedtune_report()["path"].startswith("FP8Linear base")
    x = torch.randn(3, 40, 256, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, [x, A, B], dy)
    # against the same FP8 base output plus an fp64 LoRA branch
    want = base(x).double() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    assert ref.sqnr_db(gx, dy @ (base.weight + 2.0 * B @ A).detach()) >= 18
    torch.testing.assert_close(gB.double(), 2.0 * dy.reshape(-1, 192).double().t() @ (x.reshape(-1, 256).double()
                               @ A.double().t()), atol=1e-3, rtol=1e-4)


def test_mixed_adapter_batch_over_an_fp8_base_runs_the_base_in_fp8():
    """adapter_names over an FP8Linear base: each sample gets what a batch of its adapter alone gets (the
    base's FP8 GEMM plus its branch), gradients included (found by review: the mixed path ran the base's
    high-precision weight, so a sample's output depended on its batch)."""
    from fusedtune.nn import FP8Linear, LoRALinear
    torch.manual_seed(0)
    base = FP8Linear.from_linear(torch.nn.Linear(256, 192), backend="reference")
    layer = LoRALinear.from_linear(base, r=8, alpha=16, init_lora_weights=False, lora_bias=True)
    layer.add_adapter("b", r=4, alpha=4, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
    for prm in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
        prm.requires_grad_(True)
    x = torch.randn(3, 40, 256)
    names = ["b", "__base__", "default"]
    xs = x.clone().requires_grad_(True)
    y = layer(xs, adapter_names=names)
    A = layer.lora_A["b"].weight
    gx, gA = torch.autograd.grad(y[0].sum(), [xs, A])
    want = []
    for i, n in enumerate(names):
        if n == "__base__":
            want.append(base(x[i:i + 1]))
        else:
            layer.set_adapter(n)
            want.append(layer(x[i:i + 1]))
    torch.testing.assert_close(y, torch.cat(want), atol=1e-5, rtol=1e-5)
    layer.set_adapter("b")
    xb = x[:1].clone().requires_grad_(True)
    gxb, gAb = torch.autograd.grad(layer(xb).sum(), [xb, A])
    torch.testing.assert_close(gx[:1], gxb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gA, gAb, atol=1e-4, rtol=1e-5)
    assert not gx[1:].any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_gives_the_autocast_dtype_as_nn_linear_does(backend):
    """Under torch.autocast(bf16) over float32 x and weight, FP8Linear (and LoRA over it) return bf16 like
    nn.Linear (they returned float32): the op sees x and the bias in bf16, the weight's FP8 copy as without
    autocast; gradients reach x and the trained weight in float32."""
    from fusedtune.nn import FP8Linear, LoRALinear
    if backend == "cpu" and not fusedtune._ext.loaded():
        pytest.skip("fusedtune._C is not built")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192)
    layer = FP8Linear.from_linear(lin, backend=backend)
    layer.weight.requires_grad_(True)
    x = torch.randn(2, 24, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want = F8.fp8_linear(x.detach().bfloat16(), layer.weight.detach(), layer.bias.detach().bfloat16(),
                         backend=backend)
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    lora = LoRALinear.from_linear(FP8Linear.from_linear(torch.nn.Linear(256, 192), backend=backend), r=4, alpha=8,
                                  init_lora_weights=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lora(x)
    assert z.dtype == torch.bfloat16
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = lora.base_layer(x)
        branch = 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    # z = bf16(base + bf16(branch)) against bf16(base + branch): the branch's own rounding apart, one bf16 ulp
    torch.testing.assert_close(z.double(), base.double() + branch, atol=2 ** -8 * float(branch.abs().max()),
                               rtol=2 ** -7)


@pytest.mark.parametrize("cap,refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False),
                                         ((10, 0), False)])
def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch, request, cap, refused):
    """On an A100 (sm_80) or sm_86 the Triton FP8 path refuses with an error that names the GPU's arch
    and the bf16 way out; sm_89 and newer pass. (The capability query is stubbed: no GPU here.)"""
    import types
    from fusedtune import backend as B
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(B, "resolve", lambda op, device, has, backend=None: "triton")
    F8._cuda_arch_gap.cache_clear()            # the answer is cached per GPU: stubbed capabilities each start anew
    request.addfinalizer(F8._cuda_arch_gap.cache_clear)
    gap = F8.fp8_arch_gap(torch.device("cuda", 0))
    assert (gap is not None) == refused
    t = types.SimpleNamespace(device=torch.device("cuda", 0))
    if refused:
        assert f"sm_{cap[0]}{cap[1]}" in gap and "sm_89" in gap
        with pytest.raises(B.BackendError, match=f"sm_{cap[0]}{cap[1]}.*bf16 nn.Linear"):
            F8._resolve("fp8_gemm", t, None)
    else:
        assert F8._resolve("fp8_gemm", t, None) == "triton"
    assert F8.fp8_arch_gap("cpu") is None


def test_fp8_lora_patch_method():
    """patch(model, "fp8_lora"): FP8Linear bases (frozen) under fused-API LoRA adapters; only the adapters
    train; unpatch gives nn.Linear back, W0 exactly (merge=False) or W0 + s B A (merge=True)."""
    from fusedtune.nn import FP8Linear, LoRALinear
    model = tiny_llama(128, 256)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    rep = fusedtune.patch(model, "fp8_lora", r=4, alpha=8, lr=1e-2)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, FP8Linear) for m in layers)
    assert rep.trainable_params == sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                                       for m in layers)
    assert all("FP8Linear base" in r.path for r in rep.rows)
    losses = train_losses(rep, model, ids, 6)
    assert losses[-1] < losses[0]
    q = model.model.layers[0].self_attn.q_proj
    want = w0["model.layers.0.self_attn.q_proj.weight"] + 2.0 * (q.lora_B["default"].weight @ q.lora_A["default"].weight)
    import copy
    m2 = copy.deepcopy(model)
    fusedtune.unpatch(model, merge=False)
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    fusedtune.unpatch(m2)
    torch.testing.assert_close(m2.model.layers[0].self_attn.q_proj.weight, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["fp8", "fp8_lora"])
def test_fp8_methods_refuse_gpus_without_fp8_before_swapping(monkeypatch, method):
    from fusedtune.patch import PatchError
    monkeypatch.setattr(F8, "fp8_arch_gap", lambda device: "FP8 tensor cores need sm_89 or newer; this GPU is sm_80")
    model = tiny_llama(64, 128)
    before = [type(m) for m in model.modules()]
    with pytest.raises(PatchError, match="sm_80.*use method 'lora'/'full'"):
        fusedtune.patch(model, method)
    assert [type(m) for m in model.modules()] == before and all(p.requires_grad for p in model.parameters())
    rep = fusedtune.patch(model, method, backend="reference")    # the emulation runs anywhere
    assert rep.rows


def test_frozen_weight_copy_follows_writes_and_forget_weight():
    """A frozen weight's FP8 copy is cached; a write through the weight refreshes it, a write through
    .data (which torch does not count) needs forget_weight()."""
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    m = FP8Linear.from_linear(torch.nn.Linear(256, 128), backend="reference")
    m.weight.requires_grad_(False)
    x = torch.randn(4, 256)
    y0 = m(x)
    with torch.no_grad():
        m.weight.mul_(2.0)
    y1 = m(x)
    torch.testing.assert_close(y1 - m.bias, 2 * (y0 - m.bias), rtol=1e-6, atol=1e-5)   # powers of two: exact
    m.weight.data.mul_(2.0)
    assert torch.equal(m(x), y1)                                   # stale, as documented
    m.forget_weight()
    torch.testing.assert_close(m(x) - m.bias, 4 * (y0 - m.bias), rtol=1e-6, atol=1e-5)


def test_a_new_weight_tensor_at_the_old_ones_address_is_quantized_again():
    """A replaced frozen weight (or torch.func.functional_call's) may take the freed memory of the old one at
    the same version, 0: the copy is keyed on the tensor itself too (found by review: the old FP8 copy was
    used, output off by ~140%). numpy gives two tensors over one buffer, both at version 0."""
    import pickle
    import numpy as np
    from fusedtune.nn import FP8Linear
    torch.manual_seed(0)
    buf = np.empty((128, 256), dtype=np.float32)
    w1, w2 = torch.randn(128, 256), torch.randn(128, 256)
    m = FP8Linear(256, 128, bias=False, backend="reference")
    x = torch.randn(4, 256)
    buf[...] = w1.numpy()
    m.weight = torch.nn.Parameter(torch.from_numpy(buf), requires_grad=False)
    y1 = m(x)
    buf[...] = w2.numpy()                    # (a write torch does not see, as a reallocation)
    p2 = torch.nn.Parameter(torch.from_numpy(buf), requires_grad=False)
    assert p2.data_ptr() == m.weight.data_ptr() and p2._version == m.weight._version
    m.weight = p2
    want = FP8Linear(256, 128, bias=False, backend="reference")
    want.weight = torch.nn.Parameter(w2.clone(), requires_grad=False)
    assert torch.equal(m(x), want(x)) and not torch.equal(want(x), y1)
    assert torch.equal(pickle.loads(pickle.dumps(m))(x), want(x))       # the cache is not pickled


def test_no_input_features_gives_the_bias_as_f_linear():
    """Found by audit: in_features 0 failed in a reshape(-1, 0)."""
    x, w, b = torch.randn(2, 3, 0), torch.randn(6, 0), torch.randn(6)
    assert torch.equal(F8.fp8_linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_writes_the_canonical_nan_byte(dtype):
    """Every NaN byte is 0x7F, as the kernels write it (found by audit: the reference kept a negative NaN's
    sign, 0xFF, and on CPU every bf16 NaN is negative, so "the same bytes in every backend" did not hold)."""
    x = torch.randn(8, 256)
    x[0, 3], x[5, 200] = -float("nan"), float("nan")
    x = x.to(dtype)
    for q in (F8.fp8_quantize_1x128(x, transpose=True, backend="reference")[0::2]
              + F8.fp8_quantize_128x128(x, transpose=True, backend="reference")[0::2]):
        b, nan = q.view(torch.uint8), torch.isnan(q.float())
        assert nan.any() and bool((b[nan] == 0x7F).all()), b[nan].unique()


def test_fp8_base_under_lora_with_dropout_compiles_once_into_one_graph():
    """LoRA dropout over an FP8 base (fusedtune::lora_dropout) under torch.compile: one graph (fullgraph), no
    recompile from step to step, the eager steps' outputs and gradients; the op passes opcheck. (Inside a whole
    model the seed read as a Python int broke the graph at every layer: tests/test_patch_training_modes.py.)"""
    from fusedtune.nn import FP8Linear, LoRALinear
    from fusedtune.ops.lora_dropout import _op as dropout_op
    base = FP8Linear.from_linear(torch.nn.Linear(256, 64), backend="reference")
    layer = LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.25, init_lora_weights=False)
    torch._dynamo.reset()
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 256, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            outs = []
            for f in (comp, layer):
                torch.manual_seed(step)
                y = f(x)
                outs.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.lora_A["default"].weight])))
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(dropout_op, (x.detach().reshape(-1, 256).requires_grad_(), torch.tensor(7), 0.25))
    with pytest.raises(TypeError, match="seed"):
        from fusedtune.ops.lora_dropout import lora_dropout
        lora_dropout(x.reshape(-1, 256), 0.25, 7)


def test_fp8_base_under_lora_rounds_base_plus_branch_once():
    """The LoRA branch over an FP8 base is added to the base output in float32 and rounded once (found by review: it
    was rounded to float16 first, so a branch above 65504 that the base output cancels gave inf)."""
    from fusedtune.nn import FP8Linear, LoRALinear
    lin = torch.nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        lin.weight.fill_(-1.0)                                   # base: x W^T = -12800
    layer = LoRALinear.from_linear(FP8Linear.from_linear(lin, backend="reference"), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1.0 / 128)
        layer.lora_B["default"].weight.fill_(70000.0 / 1600)     # branch: 2 * 800 * B = 70000
    with torch.autocast("cpu", torch.float16):
        y = layer(torch.full((2, 128), 100.0))
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and float(y[0, 0]) == pytest.approx(57200, rel=1e-2)
