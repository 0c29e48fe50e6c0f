"""Pieces the fused linear ops (lora, fp8, sparse_delta, hft) share: the one-device check of their
arguments and of their shapes, the dense weight gradient of a base weight the caller trains too, the
refusal of a double backward the merged-weight ops would get wrong, and whether a host check can read an
index tensor."""
from __future__ import annotations

import torch


def check_one_device(what: str, *tensors: torch.Tensor | None) -> None:
    """Refuse arguments on more than one device (else the forward runs and the backward fails on a
    gradient's device). None entries are skipped."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devs))}")


def check_linear_shapes(what: str, x: torch.Tensor, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, dy: torch.Tensor | None = None) -> None:
    """x (and dy) with a feature dimension; weight 2-D [out, in] matching x's features; bias [out]."""
    for name, t in (("x", x), ("dy", dy)):
        if t is not None and t.dim() == 0:
            raise ValueError(f"{what}: {name} must have at least one dimension (the features), got a 0-d tensor")
    if weight is None:
        return
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{what}: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{what}: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def dense_weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x over every leading dimension, [out, in] in dy's dtype (what F.linear's backward
    gives a weight that requires a gradient)."""
    return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def refuse_double_backward(what: str, ctx, trainable: int, part: str) -> None:
    """A backward with create_graph=True (grad mode on) that computes dx = dy @ W from the merged weight W:
    dx depends on the trainable input `trainable` (the deltas, the row masters) through W, which autograd
    cannot see, so a second-order gradient would silently lack that term. Refused instead, as the other fused
    layers' double backward is ("no autograd formula")."""
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[trainable] and torch.is_grad_enabled():
        raise RuntimeError(f"{what}: double backward (create_graph=True) is not supported while its {part} "
                           "train: the input gradient is computed from the merged weight, so its dependence on "
                           f"the {part} would be missing from a second-order gradient")


def values_readable(t: torch.Tensor) -> bool:
    """Whether a host-side check may read t's values: not while compiling, not on meta or fake tensors
    (shape inference: they have none; the check runs on the real call)."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or \
            torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)
