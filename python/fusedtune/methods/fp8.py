"""method="fp8": fine-tuning with the target linears in FP8 (fusedtune.nn.FP8Linear).

    rep = fusedtune.patch(model, "fp8", lr=2e-5)     # every parameter trains; the linears' GEMMs in FP8
    fusedtune.unpatch(model)                         # plain nn.Linear with the trained weights

The linears keep their high-precision weights as the optimizer's masters; forward, dgrad and wgrad
run as block-scaled E4M3 GEMMs (1x128 scales for activations and gradients, 128x128 for weights).
All parameters train with torch.optim.AdamW (full fine-tuning in FP8). unpatch(merge=False) is refused:
the weights were trained in place.
"""
from __future__ import annotations

import torch
from torch import nn

from ..patch import PatchError, SwapMethod, register_method


class FP8Method(SwapMethod):
    trains_everything = True
    options = {"lr": 2e-5, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "pow2": False, "backend": None}
    demo = {"lr": 1e-3, "step_multiplier": 1}

    def make(self, linear, name, pow2, backend, **_) -> nn.Module:
        from ..nn import FP8Linear  # noqa: PLC0415
        return FP8Linear.from_linear(linear, pow2=pow2, backend=backend)

    def merge(self, module) -> nn.Linear:
        return module.to_linear()

    def describe(self, module) -> tuple[str, str, str]:
        from ..hft.tuner import describe_row_layer  # noqa: PLC0415  (any layer with _fusedtune_report)
        return describe_row_layer(module)

    def make_optimizer(self, params, lr, weight_decay, betas, eps, **_):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)

    def apply(self, model, targets, **options):
        refuse_fp8_gap(self.name, model, targets, options["backend"])
        return super().apply(model, targets, **options)


def refuse_fp8_gap(method: str, model: nn.Module, targets, backend) -> None:
    """Refuse, before anything is swapped, targets on a GPU without FP8 tensor cores (sm_80/86: the
    FP8 GEMMs would refuse at the first forward); backend='reference' (float32 emulation) runs anywhere."""
    from ..ops.fp8 import fp8_arch_gap  # noqa: PLC0415
    if backend == "reference":
        return
    for name in targets or []:
        w = getattr(model.get_submodule(name), "weight", None)
        gap = fp8_arch_gap(w.device) if w is not None else None
        if gap:
            raise PatchError(f"method {method!r}: {name}: {gap}; use method 'lora'/'full' there (or "
                             f"backend='reference', a slow float32 emulation)")


register_method("fp8", FP8Method)
