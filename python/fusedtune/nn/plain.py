"""Turning a fusedtune layer back into a plain nn.Linear (shared by every family's layers)."""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored transposed (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def refuse_meta(what: str, weight: torch.Tensor, needs: str) -> None:
    """Refuse a weight on the meta device (a model built under init_empty_weights / torch.device("meta")), where
    the layer needs its values now (`needs`): what it made would hold garbage after to_empty, with no error."""
    if weight.is_meta:
        raise ValueError(f"{what}: the weight is on the meta device and holds no values, but {needs}. Materialise "
                         "the model first (model.to_empty(device=...) and load its state dict, or from_pretrained "
                         "without init_empty_weights), then call this. Nothing was changed")


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias`, on their device and dtype."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
