"""MaskedAdamW: AdamW as one fused multi-tensor pass, with moments only for what trains.

Works on ordinary parameters (fp32/bf16/fp16; moments in fp32; one rounding per step) and on the
row masters of fusedtune.nn.RowMaskedLinear, whose updated rows are written into the layer's full
weight in the same pass, so frozen rows are never touched and no optimizer state exists for them.
"""
from __future__ import annotations

import torch

from ..ops.hft import masked_adamw_
from .fused_adamw import FusedAdamW


class MaskedAdamW(FusedAdamW):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 backend: str | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, backend)

    @staticmethod
    def _target(p):
        ref = getattr(p, "_fusedtune_row_layer", None)
        layer = ref() if ref is not None else None
        if layer is None or layer.weight_rows is not p:
            return None, None
        return layer.weight, layer.rows

    def _entries(self, p, st) -> tuple:
        tgt, rows = self._target(p)
        return (p, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"],
                torch.empty(0, device=p.device) if tgt is None else tgt,
                torch.empty(0, dtype=torch.int64, device=p.device) if rows is None else rows)

    def _run(self, lists, group, step) -> None:
        masked_adamw_(*lists, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], step=step, backend=self.backend,
                      check_rows=False)  # rows checked by the layers
