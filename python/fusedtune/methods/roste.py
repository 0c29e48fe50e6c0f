"""method="roste": quantization-aware fine-tuning with rotations (fusedtune.nn.RoSTELinear).

    rep = fusedtune.patch(model, "roste", w_bits=4, a_bits=4, rotate=True, clip_ratio=0.95, lr=1e-5)
    fusedtune.unpatch(model)                 # plain nn.Linear with the trained (unquantized) weights

Every target linear becomes a RoSTELinear: input and weight rotated by the same orthonormal Hadamard
matrix and fake-quantized (activations per token, weights per output channel), straight-through
gradients; every parameter trains (AdamW). Layers whose input size has no Hadamard construction here
are refused before anything changes. This method only swaps the linears; the model-level set-up
(norm folding, the offline hidden-size rotation merged into the weights, K/V fake quantization), the
per-layer rotation search and export are fusedtune.roste.prepare / search_rotation / export.
"""
from __future__ import annotations

import torch
from torch import nn

from ..patch import PatchError, SwapMethod, register_method


class RoSTEMethod(SwapMethod):
    trains_everything = True
    options = {"w_bits": 4, "a_bits": 4, "rotate": True, "clip_ratio": 0.95, "ste": "identity", "lr": 1e-5,
               "weight_decay": 0.0, "backend": None}
    demo = {"lr": 1e-3, "a_bits": 8, "step_multiplier": 1}

    def make(self, linear, name, w_bits, a_bits, rotate, clip_ratio, ste, backend, **_) -> nn.Module:
        from ..nn import RoSTELinear  # noqa: PLC0415
        from ..roste.checks import check_hadamard  # noqa: PLC0415
        if rotate:
            try:
                check_hadamard("method 'roste'", f"input size of {name}", linear.in_features)
            except ValueError as e:
                raise PatchError(f"{e}; pass rotate=False to quantize it unrotated, or leave {name} out of "
                                 "target_modules. Nothing was changed") from None
        return RoSTELinear.from_linear(linear, w_bits, a_bits, rotate, clip_ratio, ste, backend)

    def merge(self, module) -> nn.Linear:
        return module.to_linear()

    def describe(self, module) -> tuple[str, str, str]:
        from ..hft.tuner import describe_row_layer  # noqa: PLC0415  (any layer with _fusedtune_report)
        return describe_row_layer(module)

    def make_optimizer(self, params, lr, weight_decay, **_):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


register_method("roste", RoSTEMethod)
