"""method="lora", "qlora" and "fp8_lora": LoRA adapters on the target linears, fused (fusedtune.nn.LoRALinear).

    rep = fusedtune.patch(model, "lora", r=16, alpha=32, dropout=0.05, lr=2e-4)
    rep = fusedtune.patch(model, "qlora", r=16, alpha=32)     # base weights quantized to NF4 first
    rep = fusedtune.patch(model, "fp8_lora", r=16)            # base GEMMs in FP8 (FP8Linear), sm_89+
    rep = fusedtune.patch(model, "lora", r=16, use_dora=True) # DoRA (peft's use_dora; "qlora" too: QDoRA)
    rep = fusedtune.patch(model, "lora", r=16, init_lora_weights="pissa")   # or "olora": A, B from W, W the residual
    rep = fusedtune.patch(model, "lora", r=16, lora_bias=True)  # peft's lora_bias: lora_B has a trainable bias
    fusedtune.unpatch(model)                  # nn.Linear with the adapters merged (qlora: dequantized base;
                                              # refused for a lora_bias on a layer without a bias, as peft)
    fusedtune.unpatch(model, merge=False)     # nn.Linear with the base weights alone

Every target linear becomes a LoRALinear with one adapter ("default"; peft's init: A kaiming-uniform,
B zero, so the model is unchanged at step 0); the adapters train with torch.optim.AdamW, everything
else is frozen, except the modules named in modules_to_save (peft's option, e.g. ["embed_tokens",
"lm_head"] for new tokens): their own parameters train in full in the same optimizer, in place;
fusedtune.lora.save_adapter writes them as peft does, unpatch(merge=False) restores their old values.
qlora quantizes each target's weight with bitsandbytes (NF4, blocksize 64, double quantization by
default) into a bnb.nn.Linear4bit whose compute dtype is the weight's dtype. A model loaded in 4 bits
(transformers' BitsAndBytesConfig) keeps its Linear4bit layers under lora and qlora alike (adapters over
them; unpatch(merge=False) hands them back); fp8_lora needs 16/32-bit weights.
init_lora_weights="pissa" / "pissa_niter_<k>" / "olora" (peft's) start A and B from each weight's top-r
SVD / QR and leave the residual W - scale B A as the base (under qlora / fp8_lora the 16/32-bit weight is
decomposed and the residual quantized, as PiSSA's QLoRA recipe does): the model is unchanged at step 0
(up to the rounding of the residual) and unpatch(merge=False) gives the residual base.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.plain import refuse_meta
from ..patch import (PatchError, SwapMethod, is_bnb_4bit, is_conv1d, outermost_modules, register_method,
                     shared_outside)


class LoRAMethod(SwapMethod):
    swaps_aliases = False   # peft's rule: a module under several names gets adapters under its first name only
    loose_options = ("init_lora_weights",)   # True, False or a name ("gaussian", "pissa", ...)
    options = {"r": 8, "alpha": 16, "dropout": 0.0, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
               "lora_bias": False,
               "adapter_dtype": torch.float32,
               "lr": 2e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "backend": None,
               "modules_to_save": None}
    demo = {"lr": 1e-2, "r": 8, "alpha": 16, "step_multiplier": 1}

    def saved_modules(self, model, targets, options):
        names = options["modules_to_save"]
        if names is None or (isinstance(names, (list, tuple)) and not names):
            return []
        try:
            found = outermost_modules(model, names)
        except PatchError as e:
            raise PatchError(f"method {self.name!r}: modules_to_save: {e}") from None
        clash = [n for n in found if any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in targets)]
        if clash:
            raise PatchError(f"method {self.name!r}: modules_to_save {clash[:4]} overlap the LoRA targets (a module "
                             "either gets adapters or trains in full)")
        tied = shared_outside(model, found)
        if tied:
            saved, other = tied
            raise PatchError(f"method {self.name!r}: modules_to_save: {saved} is tied to {other}, which is not saved "
                             f"(tied embeddings): training it in place would change {other} too, where peft trains a "
                             "copy; save both, or give it its own weight first (e.g. model.lm_head.weight = "
                             "nn.Parameter(model.lm_head.weight.detach().clone()); model.config.tie_word_embeddings = "
                             "False)")
        return found

    def takes(self, kind: str) -> bool:
        return kind in ("linear", "conv1d", "4bit")   # 4bit: QLoRA over a model loaded in 4 bits

    def rewrites_base(self, options) -> bool:
        from ..nn.lora import _decomposition  # noqa: PLC0415
        try:
            return bool(_decomposition(options["init_lora_weights"]))
        except Exception:  # noqa: BLE001 - a bad value is refused by make(), before anything is written
            return False

    def base_layer(self, linear: nn.Linear, **options) -> nn.Module:
        return linear

    def base_for(self, module: nn.Module) -> nn.Module:
        """Plain LoRA takes GPT-2's Conv1D as it is: LoRALinear reads its (in, out) weight transposed, so
        nothing is copied and the base keeps Conv1D's layout in the state dict (as peft's does). The
        quantizing methods build their base from the nn.Linear."""
        return module if self.name == "lora" and is_conv1d(module) else super().base_for(module)

    def make(self, linear, name, r, alpha, dropout, use_rslora, use_dora, init_lora_weights, lora_bias, adapter_dtype,
             backend, **options):
        from ..nn import LoRALinear  # noqa: PLC0415
        from ..nn.lora import _decomposition  # noqa: PLC0415
        loaded_4bit = is_bnb_4bit(linear)
        kw = dict(r=int(r), alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                  backend=backend, lora_bias=bool(lora_bias))
        if not _decomposition(init_lora_weights) or type(linear) is not nn.Linear or self.name == "lora":
            base = self.base_layer(linear, backend=backend, **options)
            m = LoRALinear.from_linear(base, use_dora=bool(use_dora), init_lora_weights=init_lora_weights, **kw)
        else:   # PiSSA / OLoRA under qlora / fp8_lora: decompose the 16/32-bit weight, quantize the residual
            dense = LoRALinear.from_linear(linear, init_lora_weights=init_lora_weights, **kw)
            m = LoRALinear.from_linear(self.base_layer(linear, backend=backend, **options), **kw)
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(dense.lora_A["default"].weight)
                m.lora_B["default"].weight.copy_(dense.lora_B["default"].weight)
            m.init_lora_weights["default"] = init_lora_weights
            m.set_dora("default", bool(use_dora))
        m._fusedtune_loaded_4bit = loaded_4bit   # unpatch(merge=False) hands the 4-bit layer back as it was
        # a later model.half() / .to(bf16) keeps the adapters in adapter_dtype (nn/lora.py LoRALinear._apply)
        m.keep_adapter_dtype = adapter_dtype is not None
        return m

    def merge(self, module) -> nn.Linear:
        return module.to_linear(merge=True)

    def remove(self, model, merge):
        if merge:   # refused before anything changes, as peft's merge_and_unload and LoRALinear.merge refuse it
            bare = [n for n in self.swapped if (m := model.get_submodule(n)).base_layer.bias is None
                    and m._bias_delta(m.active_adapters) is not None]
            if bare:
                raise PatchError(
                    f"fusedtune.unpatch(merge=True): {bare[0]}{f' and {len(bare) - 1} more' if len(bare) > 1 else ''} "
                    "has no bias, and its adapter has a lora_bias: the merged layer would need a bias the model "
                    "does not declare (a transformers config's attention_bias / mlp_bias), and save_pretrained / "
                    "from_pretrained would drop it; peft's merge_and_unload refuses this too. Nothing was changed. "
                    "Save the adapters (fusedtune.lora.save_adapter) and unpatch(model, merge=False), or build "
                    "biased layers yourself with LoRALinear.to_linear()")
        super().remove(model, merge)

    def base(self, module) -> nn.Module:
        if getattr(module, "_fusedtune_loaded_4bit", False):
            return module.base_layer            # a layer loaded in 4 bits comes back as it was
        return module.to_linear(merge=False)

    def describe(self, module) -> tuple[str, str, str]:
        from ..hft.tuner import describe_row_layer  # noqa: PLC0415  (any layer with _fusedtune_report)
        return describe_row_layer(module)

    def make_optimizer(self, params, lr, weight_decay, betas, eps, **_):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)

    def apply(self, model, targets, **options):
        if not isinstance(options["r"], int) or options["r"] <= 0:
            raise PatchError(f"method {self.name!r}: r must be a positive int, got {options['r']!r}")
        if not 0.0 <= float(options["dropout"]) < 1.0:
            raise PatchError(f"method {self.name!r}: dropout must be in [0, 1), got {options['dropout']!r}")
        return super().apply(model, targets, **options)

    def report(self, model):
        rep = super().report(model)
        if getattr(model, "is_quantized", False):   # loaded through transformers' quantizer (e.g. load_in_4bit)
            rep.notes.append("the model was loaded quantized: transformers.Trainer refuses such a model unless it is a "
                             "PeftModel; for Trainer, load it in 16 bits and use method 'qlora' (quantizes the "
                             "targets itself), or train with rep.step / your own loop")
        return rep


class QLoRAMethod(LoRAMethod):
    options = {**LoRAMethod.options, "blocksize": 64, "double_quant": True}
    requires = ("bitsandbytes",)
    demo = dict(LoRAMethod.demo)

    def apply(self, model, targets, **options):
        try:
            import bitsandbytes  # noqa: F401,PLC0415
        except Exception as e:  # noqa: BLE001
            raise PatchError(f"method 'qlora' needs bitsandbytes (pip install bitsandbytes): {e}") from e
        return super().apply(model, targets, **options)

    def base_layer(self, linear: nn.Linear, blocksize, double_quant, **_) -> nn.Module:
        import bitsandbytes as bnb  # noqa: PLC0415
        if is_bnb_4bit(linear):
            return linear                        # loaded in 4 bits already: LoRA over it as it is
        refuse_meta("qlora", linear.weight, "the base is quantized to NF4 now (load the model's weights, then patch)")
        dev, dt = linear.weight.device, linear.weight.dtype
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dt, compress_statistics=double_quant, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                     blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                                     module=q)   # bitsandbytes keeps the quant_state on q as well (FSDP)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q.to(dev)


class FP8LoRAMethod(LoRAMethod):
    """LoRA over an FP8 base: each target's frozen weight runs through fusedtune.nn.FP8Linear (block-scaled
    E4M3 GEMMs for y and dX; its FP8 copy quantized once and cached while the weight is unchanged), the
    adapters train in their own dtype (float32 by default). Speed, not memory: the high-precision weight
    stays (unpatch gives it back, merged or not). Needs sm_89+ on a GPU (refused before anything is
    swapped on sm_80/86)."""
    options = {**LoRAMethod.options, "pow2": False}
    demo = dict(LoRAMethod.demo)

    def takes(self, kind: str) -> bool:
        return kind in ("linear", "conv1d")     # FP8 GEMMs quantize 16/32-bit weights, not 4-bit codes

    def apply(self, model, targets, **options):
        if options["use_dora"]:
            raise PatchError(f"method {self.name!r}: use_dora is not supported over FP8 bases (DoRA's weight norm "
                             "needs the dense weight); use 'lora' or 'qlora'")
        from .fp8 import refuse_fp8_gap  # noqa: PLC0415
        refuse_fp8_gap(self.name, model, targets, options["backend"])
        return super().apply(model, targets, **options)

    def base_layer(self, linear: nn.Linear, pow2, backend, **_) -> nn.Module:
        from ..nn import FP8Linear  # noqa: PLC0415
        return FP8Linear.from_linear(linear, pow2=pow2, backend=backend)


register_method("lora", LoRAMethod)
register_method("qlora", QLoRAMethod)
register_method("fp8_lora", FP8LoRAMethod)
