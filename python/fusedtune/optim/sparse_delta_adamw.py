"""SparseDeltaAdamW: AdamW on the float32 deltas of SparseDeltaLinear layers, one fused
multi-tensor pass that also writes round(base + delta) into each merged weight.

Bias correction. Adam divides its moments by 1 - beta^n, n the number of steps the moments have
seen. An entry grown by regrowth (Regrower) starts with zero moments while the layer has taken many
steps: with the layer's n its first update would be (1 - beta1) / sqrt(1 - beta2) = 3.2x Adam's first
(beta 0.9/0.999), and its next ones too large while its moments fill. bias_correction="element" (the
default) counts steps per entry once an entry is reseeded (state "elem_step", int32, 4 bytes per delta,
allocated at the first reset_state), so a grown entry's bias correction is that of Adam's own first
steps; "tensor" uses the layer's count for every entry (plain AdamW on a fixed index set)."""
from __future__ import annotations

import torch

from .._inference import Stamp
from ..nn.masters import owner_of
from ..ops.sparse_delta import _check_adamw_lists, sparse_adamw_
from ..reference.adamw import check_hparams
from .fused_adamw import FusedAdamW

BIAS_CORRECTIONS = ("element", "tensor")   # per-entry step counts, or the layer's


class SparseDeltaAdamW(FusedAdamW):
    _copied = FusedAdamW._copied + ("bias_correction",)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 backend: str | None = None, bias_correction: str = "element"):
        if bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"SparseDeltaAdamW: bias_correction must be one of {BIAS_CORRECTIONS}, "
                             f"got {bias_correction!r}")
        super().__init__(params, lr, betas, eps, weight_decay, backend)
        self.bias_correction = bias_correction

    def _check_param(self, p) -> None:
        if p.requires_grad:
            self._layer(p)  # refuse trainable tensors that are not SparseDeltaLinear deltas, up front

    @staticmethod
    def _layer(p):
        layer = owner_of(p)
        if layer is None or layer._parameters.get("values") is not p:
            raise ValueError("SparseDeltaAdamW takes the `values` of SparseDeltaLinear layers only "
                             f"(got a parameter of shape {tuple(p.shape)})")
        return layer

    @torch.no_grad()
    def reset_state(self, p, positions: torch.Tensor, exp_avg=None, exp_avg_sq=None) -> None:
        """Seed the moments of entries `positions` (e.g. grown by regrowth); default zeros.
        Zero moments (both None) restart those entries' step count at 0 under bias_correction="element"
        (their next update is Adam's first); seeded moments are taken as an estimate of the layer's age
        and keep the layer's count."""
        st = self._state(p)
        st["exp_avg"][positions] = 0.0 if exp_avg is None else exp_avg
        st["exp_avg_sq"][positions] = 0.0 if exp_avg_sq is None else exp_avg_sq
        fresh = exp_avg is None and exp_avg_sq is None
        if self.bias_correction == "element" and (fresh or "elem_step" in st):
            if "elem_step" not in st:
                st["elem_step"] = torch.full(p.shape, st["step"], dtype=torch.int32, device=p.device)
            st["elem_step"][positions] = 0 if fresh else st["step"]

    def _entries(self, p, st) -> tuple:
        layer = self._layer(p)   # (its tensors read from _parameters / _buffers: nn.Module.__getattr__ is slow)
        g = p.grad
        if g.dtype != torch.float32 or not g.is_contiguous():
            g = g.float().contiguous()
        w = layer._parameters.get("weight")
        bufs = layer._buffers
        return (p, g, st["exp_avg"], st["exp_avg_sq"], layer.weight if w is None else w, bufs["base_values"],
                bufs["indices"], st.get("elem_step") if self.bias_correction == "element" else None, layer)

    def _run(self, lists, group, step) -> None:
        *lists, steps, layers = lists
        sparse_adamw_(*lists, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], step=step, steps=steps, backend=self.backend,
                      check=False)  # indices checked by the layers
        for p, layer in zip(lists[0], layers):   # the merged weights are current: the layers need not merge again
            layer.__dict__["_merged_stamp"] = Stamp(p)   # a plain attribute (nn.Module's __setattr__ is slow)

    def _check_run(self, lists, group, step, tensors: bool) -> None:
        check_hparams("sparse_adamw_", group["lr"], group["betas"][0], group["betas"][1], group["eps"],
                      group["weight_decay"], step)
        if tensors:
            *lists, steps, _ = lists
            _check_adamw_lists(*lists, steps, lists[0][0].device, False, distinct=False)   # (as the kernels check)
