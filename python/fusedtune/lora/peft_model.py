"""Fused LoRA inside a peft model, in place: peft keeps its model, its API and its files.

    model = get_peft_model(base, LoraConfig(r=16, target_modules=[...]))   # or PeftModel.from_pretrained
    rep = fusedtune.lora.fuse_peft(model)     # every peft LoRA Linear now runs fusedtune's fused op
    print(rep)                                # which layers, which backend and path
    trainer = Trainer(model=model, ...)       # unchanged: a PeftModel (a 4-bit base stays trainable)
    fusedtune.lora.unfuse_peft(model)         # back to peft's own forward

Each peft `lora.Linear` (over nn.Linear, or GPT-2's Conv1D with fan_in_fan_out, whose weight the kernels
read transposed in place; and `lora.bnb.Linear4bit`, NF4) gets a subclass of its own class whose forward
is fusedtune.nn.LoRALinear's, reading the layer's own parameters (shared, never copied). Everything
else stays peft's: state-dict keys, save_pretrained / load_adapter, set_adapter, disable_adapter(),
merge / unmerge / merge_and_unload, adapter_names= mixed batches, and the layer's checks. The forward
follows the layer's current state on every call (active adapters, scaling, dropout, DoRA): a changed
adapter set is taken over on the next call. While the layer is merged or its adapters are disabled,
the forward is peft's (the base layer alone).

Refused with LoRAUnsupported, before any layer changes: peft LoRA layers the fused op does not cover
(Embedding, Conv, 8-bit, other quantization backends, LoRA variants other than DoRA, dropout modules
other than nn.Dropout), unless skip_unsupported=True, which fuses the
rest and lists the others in the report. Adapters added later that the fused op does not cover are
refused by the forward that meets them. Other refusals are LoRALinear's (e.g. several active adapters
with dropout in training).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..nn.lora import BASE, LoRALinear, is_bnb_4bit
from ..nn.plain import is_conv1d
from ..ops.lora import LoRAUnsupported

_VIEW = "_fusedtune_view"
_CLASSES: dict[type, type] = {}


def _is_peft_lora(module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - peft not installed: nothing to fuse
        return False
    return isinstance(module, LoraLayer)


def _fusable_classes() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear  # noqa: PLC0415
    out = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit  # noqa: PLC0415
        out.append(Linear4bit)
    except Exception:  # noqa: BLE001 - bitsandbytes missing
        pass
    return tuple(out)


def _why_not(layer) -> str | None:
    """Why the fused op cannot serve this peft LoRA layer (None: it can)."""
    cls = type(layer)
    if cls not in _fusable_classes():
        return (f"a peft {cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__} layer (fused: lora.Linear over nn.Linear, "
                "lora.bnb.Linear4bit over NF4)")
    base = layer.get_base_layer()
    from ..patch import bypassed_hooks  # noqa: PLC0415
    hooks = bypassed_hooks(base)
    if hooks:      # peft's forward calls the base layer; the fused op reads its weight
        return f"its base layer has a {hooks}, which the fused op (reading the weight directly) would not run"
    part = _hooked_part(layer)
    if part:       # peft's forward calls lora_A, lora_B, lora_dropout (and DoRA's magnitude); the fused op does not
        return f"its {part[0]} has a {part[1]}, which the fused op (reading the adapter weights directly) would not run"
    if is_bnb_4bit(base) and getattr(base.weight, "quant_type", "nf4") != "nf4":
        return f"a 4-bit base of quant_type {base.weight.quant_type!r} (NF4 only)"
    if not is_bnb_4bit(base) and type(base) is not nn.Linear and not is_conv1d(base):
        return f"a {type(base).__name__} base layer (nn.Linear, transformers' Conv1D or bnb NF4 only)"
    try:
        LoRALinear.from_peft(layer)
    except (LoRAUnsupported, TypeError) as e:
        return str(e).removeprefix("LoRALinear.from_peft: ")
    except ValueError as e:
        if "has merged adapters" not in str(e):   # merged adapters: fusable, the view is built when unmerged
            return str(e).removeprefix("LoRALinear.from_peft: ")
    return None


_PARTS = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")


def _hooked_part(layer) -> tuple[str, str] | None:
    """(module name, its hooks) of the first adapter module with hooks, or None; runs on every forward."""
    mods = layer._modules
    for part in _PARTS:
        d = mods.get(part)
        for n, m in ({} if d is None else d._modules).items():
            if m is not None and (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                                  or m._backward_hooks):
                from ..patch import bypassed_hooks  # noqa: PLC0415
                return f"{part}.{n}", bypassed_hooks(m)
    return None


def _signature(layer) -> tuple:
    """What the view copies from the layer, as one flat tuple: a change of any of it rebuilds the view. It
    runs on every forward, so it reads the module dicts directly (a few microseconds per layer)."""
    mods = layer._modules
    B, drop = mods["lora_B"]._modules, mods["lora_dropout"]._modules
    mags = mods.get("lora_magnitude_vector")
    mags = {} if mags is None else mags._modules
    scaling, dora = layer.scaling, layer.use_dora
    sig = [tuple(layer.active_adapters), id(mods["base_layer"])]
    for n, a in mods["lora_A"]._modules.items():
        d, m = drop.get(n), mags.get(n)
        sig += (n, id(a), id(B.get(n)), scaling.get(n), type(d), id(d), getattr(d, "p", None), dora.get(n),
                None if m is None else id(m.weight))
    return tuple(sig)


def _view(layer) -> LoRALinear:
    entry = layer.__dict__.get(_VIEW)
    sig = _signature(layer)
    if entry is None or entry[0] != sig:
        view = LoRALinear.from_peft(layer, backend=layer.__dict__.get("_fusedtune_backend"))
        entry = layer.__dict__[_VIEW] = (sig, view)   # not a submodule: no new state-dict keys
    view = entry[1]
    if view.training != layer.training:
        view.training = layer.training
    if view.disable_adapters:     # the forward handles disabled adapters before it asks for the view
        view.disable_adapters = False
    return view


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    self._check_forward_args(x, *args, **kwargs)
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        raise LoRAUnsupported(f"fused peft LoRA layer: extra forward arguments {sorted(kwargs)} / {len(args)} "
                              "positional (the fused op takes x and adapter_names only); fusedtune.lora.unfuse_peft "
                              "restores peft's forward")
    adapter_names = kwargs.get("adapter_names")
    if self.disable_adapters or (adapter_names is None and self.merged):
        return self._fusedtune_peft_class.forward(self, x)     # the base layer alone: peft's own path
    base = self.get_base_layer()
    if (base._forward_pre_hooks or base._forward_hooks or base._backward_pre_hooks or base._backward_hooks
            or getattr(base, "_hf_hook", None) is not None):   # registered after fuse_peft (which refuses them)
        from ..patch import bypassed_hooks  # noqa: PLC0415
        raise LoRAUnsupported(f"fused peft LoRA layer: its base layer now has a {bypassed_hooks(base)}, which the "
                              "fused op (reading the weight directly) would not run; fusedtune.lora.unfuse_peft(model) "
                              "restores peft's forward, which runs it")
    part = _hooked_part(self)
    if part:
        raise LoRAUnsupported(f"fused peft LoRA layer: its {part[0]} now has a {part[1]}, which the fused op (reading "
                              "the adapter weights directly) would not run; fusedtune.lora.unfuse_peft(model) restores "
                              "peft's forward, which runs it")
    if adapter_names is not None:   # an adapter this layer lacks (fewer target modules): its base, as peft's
        adapter_names = [n if n in self.lora_A else BASE for n in adapter_names]
    return _view(self)(x, adapter_names=adapter_names)


def _report(self) -> dict:
    if self.merged or self.disable_adapters:
        state = "merged adapters" if self.merged else "adapters disabled"
        return {"method": "lora", "backend": "peft", "path": f"peft layer with {state}: the base layer alone",
                "why_not": ""}
    out = dict(_view(self)._fusedtune_report())
    out["path"] = "peft layer, fused forward: " + out["path"]
    return out


def _train(self, mode: bool = True):
    """peft's train(), and the view forgets its cached DoRA norms (LoRALinear.train says why)."""
    entry = self.__dict__.get(_VIEW)
    if entry is not None:
        entry[1].forget_dora_norms()
    return self._fusedtune_peft_class.train(self, mode)


def _fused_class(cls: type) -> type:
    fused = _CLASSES.get(cls)
    if fused is None:
        name = f"Fused{cls.__name__}"
        fused = type(name, (cls,), {"forward": _forward, "train": _train, "_fusedtune_report": _report,
                                    "_fusedtune_peft_class": cls,
                                    "__module__": __name__, "__qualname__": name,
                                    "__doc__": f"peft's {cls.__name__} with fusedtune's fused LoRA forward"})
        _CLASSES[cls] = fused
        setattr(sys.modules[__name__], name, fused)   # importable by name (pickle)
    return fused


def __getattr__(name: str):
    """Fused classes by name, made on first use (so a pickled fused model loads in a fresh process)."""
    if name.startswith("Fused") and name[5:]:
        for cls in _fusable_classes():
            if cls.__name__ == name[5:]:
                return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_peft: model must be a torch.nn.Module (a peft model), got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if _is_peft_lora(m)}


def fuse_peft(model: nn.Module, skip_unsupported: bool = False, backend: str | None = None):
    """Give every peft LoRA Linear layer of `model` (a PeftModel, or any module holding peft LoRA layers)
    fusedtune's fused forward, in place. Returns a fusedtune PatchReport of the layers (print it). Layers
    the fused op does not cover are refused with LoRAUnsupported before anything changes, or, with
    skip_unsupported=True, left to peft and listed in the report. backend: as LoRALinear's."""
    layers = _peft_layers(model)
    if not layers:
        raise ValueError("fuse_peft: the model holds no peft LoRA layers (get_peft_model / PeftModel.from_pretrained "
                         "with a LoraConfig first; for a model without peft, use fusedtune.patch(model, 'lora'))")
    why = {n: w for n, m in layers.items() if not getattr(m, "_fusedtune_peft_class", None) and (w := _why_not(m))}
    if why and not skip_unsupported:
        first = next(iter(why))
        raise LoRAUnsupported(f"fuse_peft: {len(why)} peft LoRA layer(s) the fused op does not cover, e.g. {first}: "
                              f"{why[first]}; nothing was changed (skip_unsupported=True fuses the others)")
    for name, m in layers.items():
        if name in why:
            continue
        if not getattr(m, "_fusedtune_peft_class", None):
            m.__class__ = _fused_class(type(m))
        m.__dict__.pop(_VIEW, None)
        m.__dict__["_fusedtune_backend"] = backend
    return peft_report(model, always=True)


def peft_report(model: nn.Module, always: bool = False):
    """The PatchReport of a model's peft LoRA layers: backend and path of the fused ones (computed now), and
    why the others are not fused (None: the model has no fused peft layer). fusedtune.report(model) gives it
    for a model that fusedtune.patch did not patch."""
    from ..hft.tuner import describe_row_layer  # noqa: PLC0415
    from ..patch import PatchReport, ReportRow, count, unique_params  # noqa: PLC0415
    layers = _peft_layers(model)
    if not always and not any(getattr(m, "_fusedtune_peft_class", None) for m in layers.values()):
        return None
    rows = []
    for name, m in layers.items():
        params = count(p for p in m.parameters() if p.requires_grad)
        if getattr(m, "_fusedtune_peft_class", None):
            rows.append(ReportRow(name, "lora", *describe_row_layer(m), params))
        else:
            rows.append(ReportRow(name, "lora", "peft", f"peft's {type(m).__name__} (not fused)",
                                  _why_not(m) or "not fused (fuse_peft(model) fuses it)", params))
    params = unique_params(model.parameters())
    return PatchReport("lora (peft, fused)", rows, trainable_params=count(p for p in params if p.requires_grad),
                       total_params=count(params))


def unfuse_peft(model: nn.Module) -> list[str]:
    """Give the fused peft layers of `model` peft's own forward back; returns their names."""
    done = []
    for name, m in _peft_layers(model).items():
        cls = getattr(m, "_fusedtune_peft_class", None)
        if cls is not None:
            m.__class__ = cls
            m.__dict__.pop(_VIEW, None)
            m.__dict__.pop("_fusedtune_backend", None)
            done.append(name)
    return done
