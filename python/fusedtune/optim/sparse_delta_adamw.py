"""SparseDeltaAdamW: AdamW on the float32 deltas of SparseDeltaLinear layers, one fused
multi-tensor pass that also writes round(base + delta) into each merged weight."""
from __future__ import annotations

import torch

from ..ops.sparse_delta import sparse_adamw_
from .fused_adamw import FusedAdamW


class SparseDeltaAdamW(FusedAdamW):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 backend: str | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, backend)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._layer(p)  # refuse trainable tensors that are not SparseDeltaLinear deltas, up front

    @staticmethod
    def _layer(p):
        ref = getattr(p, "_fusedtune_sparse_layer", None)
        layer = ref() if ref is not None else None
        if layer is None or layer.values is not p:
            raise ValueError("SparseDeltaAdamW takes the `values` of SparseDeltaLinear layers only "
                             f"(got a parameter of shape {tuple(p.shape)})")
        return layer

    @torch.no_grad()
    def reset_state(self, p, positions: torch.Tensor, exp_avg=None, exp_avg_sq=None) -> None:
        """Seed the moments of entries `positions` (e.g. grown by regrowth); default zeros."""
        st = self._state(p)
        st["exp_avg"][positions] = 0.0 if exp_avg is None else exp_avg
        st["exp_avg_sq"][positions] = 0.0 if exp_avg_sq is None else exp_avg_sq

    def _entries(self, p, st) -> tuple:
        layer = self._layer(p)
        return (p, p.grad.float().contiguous(), st["exp_avg"], st["exp_avg_sq"], layer.weight, layer.base_values,
                layer.indices)

    def _run(self, lists, group, step) -> None:
        sparse_adamw_(*lists, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], step=step, backend=self.backend,
                      check=False)  # indices checked by the layers
        for p in lists[0]:   # the merged weights are current: the layers need not merge again
            self._layer(p)._merged_version = p._version
