"""Pure-PyTorch reference of the FP8 family (docs/fp8.md): E4M3 with fine-grained scales.

Scale convention (one for every tensor): a block's dequantization multiplier is s = amax / 448 in
float32 (amax = max |x| over the block; 448 = the largest E4M3 value), optionally rounded up to a
power of two (pow2=True: the float32 bits of amax / 448 with the mantissa cleared and the exponent
carried up when the mantissa was not zero: 2^ceil(log2(amax / 448)) for normal values), so that
x / s is exact and still <= 448.
q = E4M3(x / s) with round-to-nearest-even (IEEE division, then torch's cast); x ~ q * s.
Rules: an all-zero block has s = 1 (q = 0); a block holding inf or NaN has s = NaN, so its q and its
dequantized values are NaN (a non-finite input is never turned into finite numbers); where amax / 448
is subnormal or 0 (float32 input with amax < 448 * 2^-126) and s * 448 < amax, s is the next float32 up
(so x / s stays <= 448, and a nonzero block never gets s = 0, which would make its zeros 0/0 = NaN).

1x128 tiles (activations, gradients): a row's 128 consecutive elements along the last dim share a
scale; the transposed copy is quantized again from the source along the other dim (a 1x128-scaled
tensor cannot be transposed with its scales). 128x128 blocks (weights) transpose with their scales.
The last tile of a dimension that is not a multiple of 128 is partial: its scale covers the
elements that exist.
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128


def block_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """float32 dequantization multipliers from float32 block maxima (module docstring)."""
    amax = amax.float()
    s = amax / torch.full_like(amax, E4M3_MAX)
    if pow2:   # round the bits up to a power of two: clear the mantissa, carry into the exponent
        b = s.view(torch.int32)
        b = torch.where((b & 0x7FFFFF) != 0, ((b >> 23) + 1) << 23, b)
        s = b.view(torch.float32)
    # a subnormal (or zero) amax / 448 is rounded with little precision: where s * 448 < amax (x / s would
    # pass 448 and saturate), s becomes the next float32 up (2^-149 from 0); s * 448 is exact there
    up = (s < 2.0 ** -126) & (s * E4M3_MAX < amax)
    s = torch.where(up, (s.view(torch.int32) + 1).view(torch.float32), s)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def _pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    pad = (-n) % TILE
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim)


def _amax_rows(x: torch.Tensor) -> torch.Tensor:
    """[M, K] -> [M, ceil(K/128)] max |x| of each 1x128 tile (NaN propagates)."""
    M, K = x.shape
    xa = _pad_to(x.float().abs(), 1).reshape(M, (K + TILE - 1) // TILE, TILE)   # explicit: M or K may be 0
    nan = torch.isnan(xa).any(-1)
    return torch.where(nan, torch.full_like(nan, float("nan"), dtype=torch.float32), xa.amax(-1))


def _quant(x: torch.Tensor, s_full: torch.Tensor) -> torch.Tensor:
    """E4M3(x / s); every NaN as 0x7F, the kernels' byte (torch's cast keeps a NaN's sign: 0xFF)."""
    y = x.float() / s_full
    return torch.where(torch.isnan(y), torch.full_like(y, float("nan")), y).to(E4M3)


def quantize_rows(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 along the last dim: (q [M, K] e4m3, s [M, ceil(K/128)] float32)."""
    M, K = x.shape
    s = block_scale(_amax_rows(x), pow2)
    s_full = s.repeat_interleave(TILE, dim=1)[:, :K].contiguous()
    return _quant(x, s_full).contiguous(), s.contiguous()


def quantize_1x128(x: torch.Tensor, pow2: bool = False):
    """(q_row [M, K], s_row [M, K/128], q_col [K, M], s_col [K, M/128]) from one source [M, K]."""
    q_row, s_row = quantize_rows(x, pow2)
    q_col, s_col = quantize_rows(x.t(), pow2)
    return q_row, s_row, q_col, s_col


def quantize_128x128(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] e4m3, s [ceil(N/128), ceil(K/128)] float32)."""
    N, K = w.shape
    wa = _pad_to(_pad_to(w.float().abs(), 0), 1).reshape((N + TILE - 1) // TILE, TILE, (K + TILE - 1) // TILE, TILE)
    nan = torch.isnan(wa).any(3).any(1)
    amax = torch.where(nan, torch.full_like(nan, float("nan"), dtype=torch.float32), wa.amax(dim=(1, 3)))
    s = block_scale(amax, pow2)
    s_full = s.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:N, :K].contiguous()
    return _quant(w, s_full), s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.repeat_interleave(TILE, dim=1)[:, : q.shape[1]]


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    return q.float() * s.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:N, :K]


def gemm(a_q, a_s, b_q, b_s, b_block_rows: int, out_dtype=torch.float32) -> torch.Tensor:
    """C [M, N] = sum over 128-wide K blocks kb of (A_kb . B_kb^T) * a_s[:, kb] * b_s[n, kb]: each block's
    exact-product partial sum promoted into fp32 with both scales (DeepGEMM's promotion).
    a: [M, K] e4m3 with 1x128 scales [M, K/128]; b: [N, K] e4m3 with scales per row (b_block_rows=1,
    [N, K/128]) or per 128x128 block (b_block_rows=128, [N/128, K/128])."""
    M, K = a_q.shape
    N = b_q.shape[0]
    bs = b_s if b_block_rows == 1 else b_s.repeat_interleave(TILE, 0)[:N]
    out = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for kb in range((K + TILE - 1) // TILE):
        sl = slice(kb * TILE, min(K, (kb + 1) * TILE))
        part = a_q[:, sl].float() @ b_q[:, sl].float().t()
        out += part * a_s[:, kb:kb + 1] * bs[:, kb][None, :]
    return out.to(out_dtype)


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of x against ref."""
    ref = ref.detach().double()
    noise = (x.detach().double() - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
