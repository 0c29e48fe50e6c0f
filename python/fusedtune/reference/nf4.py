"""bitsandbytes NF4 weights: the container the LoRA ops take, and the reference dequantization.

Layout (bitsandbytes' own): the weight [N, K] is flattened row-major; element i is nibble i of the
packed uint8 buffer, byte i // 2, high nibble first. Its value is code[nibble] * absmax[i // blocksize].
With double quantization (compress_statistics=True) absmax is itself uint8 and
absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset, all in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Nf4Weight:
    q: torch.Tensor                 # uint8, N*K/2 packed nibbles (any shape; read flat)
    absmax: torch.Tensor            # float32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor              # float32 [16]
    shape: tuple                    # (N, K)
    blocksize: int
    absmax2: torch.Tensor | None = None   # float32, double quantization only
    code2: torch.Tensor | None = None     # float32 [256]
    blocksize2: int = 256
    offset: float = 0.0

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "Nf4Weight":
        """From a bitsandbytes Params4bit (or its packed tensor and QuantState)."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("Nf4Weight.from_bnb: the weight has no quant_state (is it quantized? move the "
                             "bitsandbytes layer to its device first)")
        if getattr(qs, "quant_type", "nf4") != "nf4":
            raise NotImplementedError(f"fusedtune LoRA supports the NF4 4-bit type, not {qs.quant_type!r}")
        shape = tuple(int(s) for s in qs.shape)
        if len(shape) != 2:
            raise ValueError(f"Nf4Weight.from_bnb: expected a 2-D weight, quant_state.shape is {shape}")
        q = weight.data if hasattr(weight, "data") else weight
        if q.dtype != torch.uint8 and q.is_contiguous():   # bnb's quant_storage (FSDP-QLoRA): the same bytes
            q = q.reshape(-1).view(torch.uint8)
        if q.dtype != torch.uint8 or q.numel() != (shape[0] * shape[1] + 1) // 2:   # (an odd count: a last half byte)
            raise ValueError(f"Nf4Weight.from_bnb: packed weight {q.dtype} {tuple(q.shape)} does not hold "
                             f"{shape[0]}x{shape[1]} nibbles")
        if q.numel() and q.data_ptr() % 16 and q.is_cuda:
            q = q.clone()
        kw = dict(q=q.reshape(-1), code=qs.code.float().to(q.device), shape=shape, blocksize=int(qs.blocksize))
        if getattr(qs, "nested", False) and qs.state2 is not None:
            s2 = qs.state2
            return cls(absmax=qs.absmax.to(q.device), absmax2=s2.absmax.float().to(q.device),
                       code2=s2.code.float().to(q.device), blocksize2=int(s2.blocksize), offset=float(qs.offset),
                       **kw)
        return cls(absmax=qs.absmax.float().to(q.device), **kw)

    @property
    def double(self) -> bool:
        return self.absmax2 is not None

    def op_args(self) -> tuple:
        """(absmax, code, absmax2, code2, blocksize, blocksize2, offset) as the custom op takes them."""
        return self.absmax, self.code, self.absmax2, self.code2, self.blocksize, self.blocksize2, self.offset

    def state(self) -> dict:
        return nf4_state(self.q, *self.op_args(), shape=self.shape)

    def nbytes(self) -> int:
        ts = (self.q, self.absmax, self.code, self.absmax2, self.code2)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def nf4_state(q, absmax, code, absmax2, code2, blocksize, blocksize2, offset, shape) -> dict:
    """The dict the kernels and dequantize() read."""
    d = {"q": q, "absmax": absmax, "code": code, "shape": tuple(shape), "blocksize": int(blocksize),
         "blocksize2": int(blocksize2), "offset": float(offset)}
    if absmax2 is not None:
        d["absmax2"], d["code2"] = absmax2, code2
    return d


def absmax_f32(d: dict) -> torch.Tensor:
    if "absmax2" not in d:
        return d["absmax"].float()
    a = d["absmax"].long()
    blk2 = torch.arange(a.numel(), device=a.device) // d["blocksize2"]
    return d["code2"][a] * d["absmax2"][blk2] + torch.tensor(d["offset"], dtype=torch.float32, device=a.device)


def dequantize(d, dtype=torch.float32) -> torch.Tensor:
    """The [N, K] weight in `dtype` (d: a dict from nf4_state, or an Nf4Weight)."""
    if isinstance(d, Nf4Weight):
        d = d.state()
    N, K = d["shape"]
    q = d["q"].reshape(-1).long()
    nib = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[: N * K]
    blk = torch.arange(N * K, device=q.device) // d["blocksize"]
    return (d["code"][nib] * absmax_f32(d)[blk]).to(dtype).reshape(N, K)
