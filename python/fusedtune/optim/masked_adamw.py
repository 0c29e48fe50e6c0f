"""MaskedAdamW: AdamW as one fused multi-tensor pass, with moments only for what trains.

Works on ordinary parameters (fp32/bf16/fp16; moments in fp32; one rounding per step) and on the
row masters of fusedtune.nn.RowMaskedLinear, whose updated rows are written into the layer's full
weight in the same pass, so frozen rows are never touched and no optimizer state exists for them.
"""
from __future__ import annotations

import torch

from ..ops.hft import masked_adamw_


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 backend: str | None = None):
        if not lr >= 0:
            raise ValueError(f"MaskedAdamW: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"MaskedAdamW: betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"MaskedAdamW: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"MaskedAdamW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend

    @staticmethod
    def _target(p):
        ref = getattr(p, "_fusedtune_row_layer", None)
        layer = ref() if ref is not None else None
        if layer is None or layer.weight_rows is not p:
            return None, None
        return layer.weight, layer.rows

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
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not take sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                st["step"] += 1
                tgt, rows = self._target(p)
                empty = torch.empty(0, device=p.device)
                b = buckets.setdefault((p.device, st["step"]), [[], [], [], [], [], []])
                for lst, val in zip(b, (p, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"],
                                        empty if tgt is None else tgt,
                                        torch.empty(0, dtype=torch.int64, device=p.device) if rows is None else rows)):
                    lst.append(val)
            for (dev, step), (ps, gs, ms, vs, ts, rs) in buckets.items():
                masked_adamw_(ps, gs, ms, vs, ts, rs, lr=group["lr"], beta1=group["betas"][0],
                              beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
                              step=step, backend=self.backend, check_rows=False)  # rows checked by the layers
        return loss

    def state_bytes(self) -> int:
        """Bytes of optimizer state (the moments)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t))
