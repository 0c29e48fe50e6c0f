"""MaskedAdamW: AdamW as one fused multi-tensor pass, with moments only for what trains.

Works on ordinary parameters (fp32/bf16/fp16, contiguous; moments in fp32; one rounding per step) and on the
row masters of fusedtune.nn.RowMaskedLinear (weight_rows, bias_rows), whose updated rows are written
into the layer's full weight (bias) in the same pass, so frozen rows are never touched and no
optimizer state exists for them.
"""
from __future__ import annotations

import torch

from ..nn.masters import owner_of
from ..ops.hft import _check_adamw_lists, masked_adamw_
from ..reference.adamw import check_hparams
from .fused_adamw import FusedAdamW


class MaskedAdamW(FusedAdamW):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 backend: str | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, backend)

    def _check_param(self, p) -> None:
        if not p.requires_grad:   # frozen (e.g. packed 4-bit weights): never stepped; checked if unfrozen
            return
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"MaskedAdamW: a parameter of shape {tuple(p.shape)} is {p.dtype}; the fused pass takes "
                            "float32, bfloat16 or float16 parameters")
        if not p.is_contiguous():
            raise ValueError(f"MaskedAdamW: a parameter of shape {tuple(p.shape)} has strides {p.stride()}, not "
                             "contiguous; the fused pass takes contiguous parameters (torch.optim.AdamW takes any): "
                             "make it contiguous (p.data = p.data.contiguous()) before building the optimizer")
        layer = owner_of(p)
        if layer is not None and self._target(p)[2] is None:
            raise TypeError(f"MaskedAdamW: a parameter of shape {tuple(p.shape)} is a master of a "
                            f"{type(layer).__name__}, which MaskedAdamW does not write (its masters: RowMaskedLinear's "
                            "weight_rows / bias_rows); use that layer's optimizer (SparseDeltaAdamW for "
                            "SparseDeltaLinear) or torch.optim.AdamW")

    @staticmethod
    def _target(p):
        """(full tensor, rows, layer) a row master writes to, as 2-D: the weight, or the bias as [out, 1]."""
        layer = owner_of(p)
        if layer is not None and getattr(layer, "weight_rows", None) is p:
            return layer.weight, layer.rows, layer
        if layer is not None and getattr(layer, "bias_rows", None) is p:
            return layer.bias.view(-1, 1), layer.rows, layer
        return None, None, None

    @torch.no_grad()
    def step(self, closure=None):
        self._written = {}
        loss = super().step(closure)
        for layer in self._written.values():   # the fused pass wrote their rows: the forward need not
            layer.mark_rows_written()
        return loss

    def _entries(self, p, st) -> tuple:
        tgt, rows, layer = self._target(p)
        if layer is not None:
            self._written[id(layer)] = layer
        if tgt is None:     # a plain parameter (no target: masked_adamw_ allocates nothing for it)
            return (p, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"], None, None)
        shape = (p.shape[0], tgt.shape[1])      # a bias master [n] goes in as [n, 1]
        return (p.view(shape), p.grad.contiguous().view(shape), st["exp_avg"].view(shape),
                st["exp_avg_sq"].view(shape), tgt, rows)

    def _run(self, lists, group, step) -> None:
        masked_adamw_(*lists, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], step=step, backend=self.backend,
                      check_rows=False, check=False)  # rows checked by the layers, lists built here

    def _check_run(self, lists, group, step, tensors: bool) -> None:
        check_hparams("masked_adamw_", group["lr"], group["betas"][0], group["betas"][1], group["eps"],
                      group["weight_decay"], step)
        if tensors:
            _check_adamw_lists(*lists, lists[0][0].device, False, distinct=False)   # (as the kernels check)
