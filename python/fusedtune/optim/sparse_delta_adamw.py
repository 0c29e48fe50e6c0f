"""SparseDeltaAdamW: AdamW on the float32 deltas of SparseDeltaLinear layers, one fused
multi-tensor pass that also writes round(base + delta) into each merged weight."""
from __future__ import annotations

import torch

from ..ops.sparse_delta import sparse_adamw_


class SparseDeltaAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 backend: str | None = None):
        if not lr >= 0:
            raise ValueError(f"SparseDeltaAdamW: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SparseDeltaAdamW: betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"SparseDeltaAdamW: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"SparseDeltaAdamW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend
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

    def _state(self, p):
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return st

    @torch.no_grad()
    def reset_state(self, p, positions: torch.Tensor, exp_avg=None, exp_avg_sq=None) -> None:
        """Seed the moments of entries `positions` (e.g. grown by regrowth); default zeros."""
        st = self._state(p)
        st["exp_avg"][positions] = 0.0 if exp_avg is None else exp_avg
        st["exp_avg_sq"][positions] = 0.0 if exp_avg_sq is None else exp_avg_sq

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = self._layer(p)
                st = self._state(p)
                st["step"] += 1
                b = buckets.setdefault((p.device, st["step"]), [[] for _ in range(7)])
                for lst, val in zip(b, (p, p.grad.float().contiguous(), st["exp_avg"], st["exp_avg_sq"],
                                        layer.weight, layer.base_values, layer.indices)):
                    lst.append(val)
            for (_, step), lists in buckets.items():
                sparse_adamw_(*lists, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                              eps=group["eps"], weight_decay=group["weight_decay"], step=step, backend=self.backend,
                              check=False)  # indices checked by the layers
        return loss

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t))
