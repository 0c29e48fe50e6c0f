"""RoSTELinear: quantization-aware fine-tuning of a linear layer with an online Hadamard rotation (RoSTE)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.roste import roste_backend, rotate_fake_quant, triton_cannot_rotate
from ..reference.hadamard import split_size
from .plain import plain_linear


class RoSTELinear(nn.Module):
    """y = Q_a(x H) (Q_w(W H))^T + b: input and weight rotated by the same orthonormal Hadamard H (so
    (x H)(W H)^T = x W^T before quantization), activations fake-quantized per token, weights per output
    channel (each row of W), asymmetric min-max with clip_ratio, straight-through gradients (RoSTE's
    online rotation, as for down_proj). rotate=False quantizes without rotating."""

    def __init__(self, linear: nn.Linear, w_bits: int = 4, a_bits: int = 4, rotate: bool = True,
                 clip_ratio: float = 0.95, ste: str = "identity", backend: str | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RoSTELinear: expected nn.Linear, got {type(linear).__name__}")
        from ..roste.checks import check_backend, check_bits, check_clip  # noqa: PLC0415 - roste imports nn
        check_backend("RoSTELinear", backend, linear.weight.device)
        check_bits("RoSTELinear", "w_bits", w_bits)
        check_bits("RoSTELinear", "a_bits", a_bits)
        check_clip("RoSTELinear", clip_ratio)
        if ste not in ("identity", "clipped"):
            raise ValueError(f"RoSTELinear: ste must be 'identity' or 'clipped', got {ste!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.w_bits, self.a_bits, self.rotate, self.clip_ratio = w_bits, a_bits, rotate, clip_ratio
        self.ste, self.backend = ste, backend
        if rotate:
            split_size(self.in_features)         # refuses a size without a Hadamard construction, naming them
            from .. import backend as _backend   # noqa: PLC0415
            # (asked only where Triton was asked for: check_backend made sure it is installed then)
            why = triton_cannot_rotate(self.in_features) if _backend.requested(backend) == "triton" else None
            if why:
                raise _backend.BackendError(f"RoSTELinear: backend 'triton' was asked for, but {why}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int = 4, a_bits: int = 4, rotate: bool = True,
                    clip_ratio: float = 0.95, ste: str = "identity", backend: str | None = None) -> "RoSTELinear":
        return cls(linear, w_bits, a_bits, rotate, clip_ratio, ste, backend)

    def quantized_weight(self) -> torch.Tensor:
        """Q_w(W H): the rotated, fake-quantized weight (what low-bit inference stores)."""
        return rotate_fake_quant(self.weight, self.w_bits, "token", False, self.clip_ratio, self.rotate, self.ste,
                                 self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = rotate_fake_quant(x, self.a_bits, "token", False, self.clip_ratio, self.rotate, self.ste, self.backend)
        return nn.functional.linear(xq, self.quantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, rotate={self.rotate}, clip_ratio={self.clip_ratio}, ste={self.ste}")

    def _fusedtune_report(self) -> dict:
        b = roste_backend(self.weight.device, self.backend)
        why = triton_cannot_rotate(self.in_features) if self.rotate and b["backend"] == "triton" else None
        if why:     # what the op does then: the reference, after one warning
            b = {"backend": "reference", "why_not": {**b["why_not"], "triton": why}}
        how = ("one Triton launch per operand: rotation + per-row fake quant" if b["backend"] == "triton" else
               "reference math")
        return {"method": "roste", "backend": b["backend"],
                "path": f"{b['backend']}: {'Hadamard + ' if self.rotate else ''}W{self.w_bits}A{self.a_bits} fake "
                        f"quant ({how})", "why_not": b["why_not"]}
