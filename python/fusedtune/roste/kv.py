"""K/V fake quantization by forward hooks on k_proj / v_proj (per token and KV head, over head_dim).

The hook reshapes the projection output to [..., n_kv_heads, head_dim] and fake-quantizes each
(token, head) row with fusedtune.ops.roste.rotate_fake_quant (asymmetric min-max, clip_ratio,
rotate=False, straight-through gradient). Because the attention forward is not patched, K is
quantized BEFORE RoPE here; RoSTE / QuaRot quantize K after RoPE, with an online head-dim rotation.

The hook objects are KVFakeQuant instances; unprepare_kv finds and removes them by type, so it also
works on a deep copy (fusedtune.roste.export) whose hook handles would point at the original.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.roste import rotate_fake_quant
from .checks import check_bits, check_clip


class KVFakeQuant:
    """A forward hook: out -> per-(token, head) fake quant over head_dim."""

    def __init__(self, bits: int, clip_ratio: float, n_heads: int, head_dim: int, backend: str | None = None):
        self.bits, self.clip_ratio, self.n_heads, self.head_dim, self.backend = (bits, float(clip_ratio), n_heads,
                                                                                 head_dim, backend)

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        if out.shape[-1] != self.n_heads * self.head_dim:
            raise ValueError(f"KV fake quant: expected a last dim of {self.n_heads} x {self.head_dim}, got "
                             f"{tuple(out.shape)}")
        y = out.reshape(*out.shape[:-1], self.n_heads, self.head_dim)
        y = rotate_fake_quant(y, self.bits, "token", False, self.clip_ratio, rotate=False, backend=self.backend)
        return y.reshape(out.shape)

    def __repr__(self) -> str:
        return (f"KVFakeQuant(bits={self.bits}, clip_ratio={self.clip_ratio}, heads={self.n_heads}, "
                f"head_dim={self.head_dim})")


def kv_hooks(model: nn.Module) -> list[tuple[str, KVFakeQuant]]:
    """(module name, hook) of every KV fake-quant hook in the model."""
    return [(name, h) for name, mod in model.named_modules() for h in mod._forward_hooks.values()
            if isinstance(h, KVFakeQuant)]


def add_kv_quant(model: nn.Module, kv_bits: int, clip_ratio: float = 0.95, backend: str | None = None) -> list[str]:
    """Register the KV fake-quant hooks on every layer's k_proj and v_proj (model.model.layers[i].self_attn);
    returns the hooked module names. Refuses a model that already has them (unprepare_kv first)."""
    from .architecture import inspect_model  # noqa: PLC0415
    from ..nn import RoSTELinear  # noqa: PLC0415
    check_bits("add_kv_quant", "kv_bits", kv_bits)
    check_clip("add_kv_quant", clip_ratio)
    arch = inspect_model(model, "add_kv_quant", (nn.Linear, RoSTELinear))
    if kv_hooks(model):
        raise ValueError("add_kv_quant: the model already has KV fake-quant hooks; call "
                         "fusedtune.roste.unprepare_kv(model) first")
    names = []
    for i, layer in enumerate(model.model.layers):
        for p in ("k_proj", "v_proj"):
            getattr(layer.self_attn, p).register_forward_hook(
                KVFakeQuant(kv_bits, clip_ratio, arch.n_kv_heads, arch.head_dim, backend))
            names.append(f"model.layers.{i}.self_attn.{p}")
    return names


def unprepare_kv(model: nn.Module) -> int:
    """Remove every KV fake-quant hook from the model; returns how many were removed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unprepare_kv: expected an nn.Module, got {type(model).__name__}")
    removed = 0
    for mod in model.modules():
        for key in [k for k, h in mod._forward_hooks.items() if isinstance(h, KVFakeQuant)]:
            del mod._forward_hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(mod, extra, {}).pop(key, None)
            removed += 1
    return removed
