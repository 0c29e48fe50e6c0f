"""Pieces the fused linear ops (lora, fp8, sparse_delta, hft) share: the one-device check of their
arguments and the dense weight gradient of a base weight the caller trains too."""
from __future__ import annotations

import torch


def check_one_device(what: str, *tensors: torch.Tensor | None) -> None:
    """Refuse arguments on more than one device (else the forward runs and the backward fails on a
    gradient's device). None entries are skipped."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devs))}")


def dense_weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x over every leading dimension, [out, in] in dy's dtype (what F.linear's backward
    gives a weight that requires a gradient)."""
    return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
