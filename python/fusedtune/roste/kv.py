"""K/V fake quantization inside attention, after RoPE (RoSTE / QuaRot's KV-cache quantization).

add_kv_quant registers the attention function "fusedtune_roste_kv_<base>" with transformers'
AttentionInterface (and, under the same name, the mask function of the implementation it wraps, so the
model builds the same causal / padding / sliding-window mask as before), gives every attention module a
KVQuant spec (bits, clip_ratio, rotate, the implementation it wraps: sdpa, eager, flash...) and switches
the model to it (model.set_attn_implementation). The function receives the query, key and value states after RoPE,
[batch, heads, tokens, head_dim]:
    rotate (RoSTE's R3)  q <- q H^T / sqrt(d), k <- k H^T / sqrt(d) over head_dim (d): q k^T is unchanged,
                         outliers of K are spread before quantizing
    K, V                 fake-quantized per (batch, head, token) over head_dim: asymmetric min-max with
                         clip_ratio, straight-through gradient (fusedtune.ops.roste.rotate_fake_quant)
then runs the wrapped implementation on them. V is not rotated (its rotation would have to be undone
in o_proj). With a KV cache the cache holds full-precision K/V (it is updated before this function
runs) and each step quantizes all of them here, as a full forward would; training runs without a cache.
unprepare_kv restores the wrapped implementation. deepcopy (fusedtune.roste.export) carries the specs
and the setting along.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.roste import hadamard, rotate_fake_quant
from .checks import check_backend, check_bits, check_clip, check_hadamard, own_config

NAME = "fusedtune_roste_kv"


@dataclass
class KVQuant:
    bits: int
    clip_ratio: float
    rotate: bool
    base: str                  # the attention implementation this one wraps
    backend: str | None = None

    def __setstate__(self, state) -> None:
        """Unpickled (torch.load of a whole model, in another process): the attention function and its mask
        are registered with transformers again, else the model's first forward fails on their name."""
        self.__dict__.update(state)
        _register(self.base)


def _base_function(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if base == "eager" and eager is not None:
        return eager
    raise RuntimeError(f"fusedtune.roste KV quantization: cannot find the attention implementation {base!r}")


def kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                 **kwargs):
    """The registered attention function (module docstring)."""
    spec: KVQuant | None = getattr(module, "_fusedtune_kv", None)
    if spec is None:
        raise RuntimeError(f"fusedtune.roste: this model's attention implementation is fusedtune's K/V fake "
                           f"quantization, but its {type(module).__name__} modules have none set up: the model was "
                           "built from the config of a prepared model (a copy of it, or the same object) without "
                           "being prepared. Call fusedtune.roste.prepare(model, ..., kv_bits=...), or "
                           "model.set_attn_implementation('sdpa' or 'eager')")
    if spec.rotate:
        query = hadamard(query, backend=spec.backend)
        key = hadamard(key, backend=spec.backend)
    key = rotate_fake_quant(key, spec.bits, "token", False, spec.clip_ratio, rotate=False, backend=spec.backend)
    value = rotate_fake_quant(value, spec.bits, "token", False, spec.clip_ratio, rotate=False, backend=spec.backend)
    return _base_function(module, spec.base)(module, query, key, value, attention_mask, **kwargs)


def attention_name(base: str) -> str:
    """The name the model's attention implementation takes while it quantizes K/V over `base`."""
    return f"{NAME}_{base}"


def _register(base: str) -> str:
    """Registers kv_attention under attention_name(base), and base's mask function under it too:
    transformers builds the attention mask (causal, padding, sliding window) with the mask function
    registered for the implementation's name, and none at all for a name without one, so the wrapped
    implementation would see no mask (eager: the future; sdpa: the padding)."""
    from transformers import AttentionInterface
    name = attention_name(base)
    AttentionInterface.register(name, kv_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:   # transformers before its mask interface: the model builds its masks itself
        return name
    mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    return name


def kv_specs(model: nn.Module) -> list[tuple[str, KVQuant]]:
    """(attention module name, spec) of every attention module with K/V quantization."""
    return [(name, m._fusedtune_kv) for name, m in model.named_modules() if hasattr(m, "_fusedtune_kv")]


def add_kv_quant(model: nn.Module, kv_bits: int, clip_ratio: float = 0.95, rotate: bool = True,
                 backend: str | None = None) -> list[str]:
    """Quantize K (after RoPE, rotated over head_dim when rotate) and V in every layer's attention;
    returns the attention module names. Refuses a model that has it already (unprepare_kv first), and
    a head_dim without a Hadamard construction when rotate."""
    from ..nn import RoSTELinear  # noqa: PLC0415
    from .architecture import inspect_model  # noqa: PLC0415
    what = "add_kv_quant"
    check_bits(what, "kv_bits", kv_bits)
    check_clip(what, clip_ratio)
    arch = inspect_model(model, what, (nn.Linear, RoSTELinear))
    check_backend(what, backend, next(model.parameters()).device)
    if kv_specs(model):
        raise ValueError(f"{what}: the model already quantizes K/V; call fusedtune.roste.unprepare_kv(model) first")
    if rotate:
        check_hadamard(what, "head_dim (rotate=True rotates q and k over it)", arch.head_dim)
    base = getattr(model.config, "_attn_implementation", None) or "eager"
    while base.startswith(NAME + "_"):   # a config copied from a quantizing model: wrap what that one wrapped
        base = base[len(NAME) + 1:]
    own_config(model)
    name = _register(base)
    names = []
    for i, layer in enumerate(model.model.layers):
        layer.self_attn._fusedtune_kv = KVQuant(int(kv_bits), float(clip_ratio), bool(rotate), base, backend)
        names.append(f"model.layers.{i}.self_attn")
    model.set_attn_implementation(name)
    handle = model.register_forward_pre_hook(_check_still_quantizing)
    model.__dict__["_fusedtune_kv_hook"] = (name, handle.id)
    return names


def _check_still_quantizing(model: nn.Module, args) -> None:
    """A forward pre-hook of the model: refuses a forward after the attention implementation was switched
    (model.set_attn_implementation("sdpa") after prepare), which ran attention without the K/V quantization,
    silently."""
    name = model.__dict__.get("_fusedtune_kv_hook", (None,))[0]
    now = getattr(model.config, "_attn_implementation", None)
    if name is not None and now != name:
        raise RuntimeError(f"fusedtune.roste: the model's attention implementation is now {now!r}, so K/V are no "
                           f"longer quantized (it was {name!r}, set by add_kv_quant / prepare); call "
                           "fusedtune.roste.unprepare_kv(model), switch the implementation, then add_kv_quant again")


def unprepare_kv(model: nn.Module) -> int:
    """Remove the K/V quantization (the wrapped attention implementation comes back); returns the number
    of attention modules it was removed from."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unprepare_kv: expected an nn.Module, got {type(model).__name__}")
    specs = kv_specs(model)
    for name, _ in specs:
        del model.get_submodule(name)._fusedtune_kv
    hook = model.__dict__.pop("_fusedtune_kv_hook", None)
    if hook is not None:
        model._forward_pre_hooks.pop(hook[1], None)
    if specs:
        model.set_attn_implementation(specs[0][1].base)
    return len(specs)
