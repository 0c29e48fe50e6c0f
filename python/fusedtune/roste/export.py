"""export: a deep copy of a prepared model whose RoSTELinear layers hold integer weight codes.

QuantizedLinear stores, for y = Q_a(x H) Wq^T + b (H only when rotate):
    qweight     uint8, the asymmetric codes q in [0, 2^w_bits - 1] of W H (or W): for w_bits <= 4 two
                codes per byte ([out, ceil(in / 2)], code k in byte k // 2, the even k in the low nibble),
                else one per byte ([out, in]); `.codes` unpacks them to uint8 [out, in]
    scale, zero float32 [out, 1], per output channel: Wq = (codes - zero) * scale
    bias        the layer's bias (or None)
    w_bits, a_bits, rotate, clip_ratio, gemm
The codes come from fusedtune.reference.roste.quantize, the function fake_quant itself uses, applied to
the layer's rotation of W (fusedtune.ops.roste.quant_rotation: the rotation rotate_fake_quant uses on the
layer's backend), so Wq is bit-identical to RoSTELinear.quantized_weight(). gemm="integer" (default):
the activations become a_bits codes per token and the product runs on int8 tensor cores
(fusedtune.ops.roste.int_linear, exact integer products, docs/roste.md); gemm="fake": fake-quantized
activations times the dequantized weight, the prepared model's arithmetic bit for bit.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops.roste import int_linear, quant_rotation, rotate_fake_quant
from ..reference import roste as rref
from .search import _roste_layers


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> two per byte ([..., ceil(n / 2)], even k in the low nibble) for bits <= 4;
    a contiguous copy for more bits."""
    if bits > 4:
        return codes.contiguous().clone()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of pack_codes: uint8 codes [..., n]."""
    if bits > 4:
        return packed
    return torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2)[..., :n]


GEMMS = ("integer", "fake")


class QuantizedLinear(nn.Module):
    """Inference layer from a RoSTELinear: x -> (Hadamard if rotate) -> per-token a_bits codes -> the
    integer GEMM with the weight codes (gemm="integer", fusedtune.ops.roste.int_linear), or the fake-
    quantized activations times the dequantized weight (codes - zero) * scale (gemm="fake": exactly the
    prepared model's arithmetic)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 w_bits: int, a_bits: int, rotate: bool, clip_ratio: float, backend: str | None = None,
                 gemm: str = "integer"):
        super().__init__()
        if gemm not in GEMMS:
            raise ValueError(f"QuantizedLinear: gemm must be one of {GEMMS}, got {gemm!r}")
        if gemm == "integer" and codes.dim() == 2 and codes.shape[1] > rref.INT_MAX_K:
            raise ValueError(f"QuantizedLinear: the integer GEMM takes in_features <= {rref.INT_MAX_K} (exact "
                             f"int32 accumulator), got {codes.shape[1]}; use gemm='fake'")
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise TypeError(f"QuantizedLinear: codes must be a 2-D uint8 tensor, got {codes.dtype} "
                            f"{tuple(codes.shape)}")
        out_f, in_f = codes.shape
        for nm, t in (("scale", scale), ("zero", zero)):
            if t.dtype != torch.float32 or tuple(t.shape) != (out_f, 1):
                raise TypeError(f"QuantizedLinear: {nm} must be float32 of shape ({out_f}, 1), got {t.dtype} "
                                f"{tuple(t.shape)}")
        if int(codes.max()) > 2 ** w_bits - 1:
            raise ValueError(f"QuantizedLinear: codes exceed 2^{w_bits} - 1")
        self.in_features, self.out_features = in_f, out_f
        self.w_bits, self.a_bits, self.rotate, self.clip_ratio, self.backend = (w_bits, a_bits, bool(rotate),
                                                                               float(clip_ratio), backend)
        self.gemm = gemm
        self._derived = (None, None)
        self.register_buffer("qweight", pack_codes(codes, w_bits))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)

    @classmethod
    def from_roste(cls, layer, gemm: str = "integer") -> "QuantizedLinear":
        from ..nn import RoSTELinear  # noqa: PLC0415
        if not isinstance(layer, RoSTELinear):
            raise TypeError(f"QuantizedLinear.from_roste: expected a RoSTELinear, got {type(layer).__name__}")
        w = layer.weight.detach()
        # the rotation RoSTELinear's rotate_fake_quant runs for this weight (same backend choice), in w's dtype
        y = quant_rotation(w, backend=layer.backend) if layer.rotate else w
        q, scale, zero = rref.quantize(y, layer.w_bits, "token", False, layer.clip_ratio)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(q.to(torch.uint8), scale, zero, bias, layer.w_bits, layer.a_bits, layer.rotate,
                   layer.clip_ratio, layer.backend, gemm)

    def _apply(self, fn, recurse=True):
        """A dtype conversion of the model (.half(), .to(torch.bfloat16)) leaves the float32 scale and zero
        points as they are (the integer GEMM takes them float32, and rounding them would change the exported
        weight); the bias converts, and device moves move everything."""
        from ..nn.masters import keep_dtype  # noqa: PLC0415
        return super()._apply(keep_dtype(fn, [self.scale, self.zero]), recurse)

    @property
    def codes(self) -> torch.Tensor:
        """The weight codes, uint8 [out, in] (unpacked from qweight)."""
        return unpack_codes(self.qweight, self.w_bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zero) * scale in float32, cast to dtype (in the rotated basis when rotate)."""
        return ((self.codes.float() - self.zero.float()) * self.scale.float()).to(dtype)

    def channel_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sw, zw - 2^(w_bits-1), uw = sum_k (codes - 2^(w_bits-1)) - in_features * centered zw) per output
        channel (float32, float32, float64): the integer GEMM's weight-side terms, recomputed when the
        codes or zero points change (load_state_dict, .to())."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.qweight, self.zero, self.scale))
        if self._derived[0] != key:
            c = 2 ** (self.w_bits - 1)
            zw = (self.zero.reshape(-1) - c).contiguous()
            sumw = self.codes.to(torch.int64).sum(1) - c * self.in_features
            uw = sumw.double() - self.in_features * zw.double()
            self._derived = (key, (self.scale.reshape(-1).contiguous(), zw, uw))
        return self._derived[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm == "integer":
            sw, zw, uw = self.channel_terms()
            return int_linear(x, self.a_bits, self.clip_ratio, self.qweight, self.w_bits, sw, zw, uw,
                              None if self.bias is None else self.bias.to(x.dtype), self.rotate, self.backend)
        xq = rotate_fake_quant(x, self.a_bits, "token", False, self.clip_ratio, self.rotate, backend=self.backend)
        return nn.functional.linear(xq, self.dequantized_weight(xq.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, rotate={self.rotate}, clip_ratio={self.clip_ratio}, "
                f"qweight={'two codes' if self.w_bits <= 4 else 'one code'} per byte, gemm={self.gemm}")


def export(model: nn.Module, gemm: str = "integer") -> nn.Module:
    """A deep copy of the model with every RoSTELinear replaced by a QuantizedLinear (module docstring;
    gemm="integer": the int8 tensor-core GEMM, "fake": the prepared model's arithmetic bit for bit);
    the model itself is left untouched. K/V quantization (attention-level) is carried by the copy; hooks
    on the replaced layers are not."""
    if gemm not in GEMMS:
        raise ValueError(f"export: gemm must be one of {GEMMS}, got {gemm!r}")
    _roste_layers(model, "export")
    out = copy.deepcopy(model)
    names = list(_roste_layers(out, "export"))
    if names == [""]:                                      # the model is itself a RoSTELinear
        with torch.no_grad():
            return QuantizedLinear.from_roste(out, gemm)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        layer = getattr(parent, child)
        with torch.no_grad():
            new = QuantizedLinear.from_roste(layer, gemm)
        setattr(parent, child, new)
    return out
