"""Pure-PyTorch reference of the zeroth-order family: the specification (docs/zo_noise.md).

Every step mirrors csrc/include/fusedtune/zo_math.h operation for operation: Philox4x32-10 on int64
tensors (32x32-bit products split into 16-bit halves, so nothing overflows), the table transform in
float32 with each multiply and add rounded on its own, one rounding to the storage format.
"""
from __future__ import annotations

import functools

import torch

from .._inference import outside_inference

from .zo_table import TABLE_HEX

MASK32 = 0xFFFFFFFF
NOISES = {"normal": 0, "rademacher": 1}
ROUNDINGS = {"nearest": 0, "stochastic": 1}
STREAM_NOISE, STREAM_ROUNDING = 0, 1
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def splitmix64(x: int) -> int:
    """SplitMix64's mixing of a 64-bit integer (MeZO's step seeds, default rounding seeds)."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=None)
@outside_inference
def _table_cpu() -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in TABLE_HEX], dtype=torch.float32)


def normal_table(device="cpu") -> torch.Tensor:
    """The float32 quantile table (1025 values) of the normal-shaped noise."""
    return _table_cpu().to(device)


def _mulhilo(a: int, b: torch.Tensor):
    al, ah = a & 0xFFFF, a >> 16
    p1 = b * al
    p2 = b * ah
    mid = p1 + ((p2 & 0xFFFF) << 16)
    return ((p2 >> 16) + (mid >> 32)) & MASK32, mid & MASK32


def philox4x32_10(key: int, c0, c1, c2, c3):
    """Philox4x32-10 on int64 tensors holding uint32 words; key is a 64-bit int."""
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & MASK32, (k1 + _PHILOX_W[1]) & MASK32
    return c0, c1, c2, c3


def random_words(numel: int, seed: int, tensor_id: int, stream: int, device) -> torch.Tensor:
    """The uint32 word (as int64) that element i of a tensor draws: lane i%4 of group i//4."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(g, v)  # noqa: E731
    q = philox4x32_10(int(seed) & ((1 << 64) - 1), g & MASK32, g >> 32, full(tensor_id & MASK32), full(stream))
    return torch.stack(q, dim=1).reshape(-1)[:numel]


def noise_from_words(u: torch.Tensor, noise: str) -> torch.Tensor:
    neg = (u >> 31) == 1
    if noise == "rademacher":
        return torch.where(neg, -1.0, 1.0).to(torch.float32)
    table = normal_table(u.device)
    r = u & 0x7FFFFFFF
    j = r >> 21
    f = (r & 0x1FFFFF).to(torch.float32) * 2.0**-21
    a = table[j]
    v = a + (table[j + 1] - a) * f
    return torch.where(neg, -v, v)


def _delta(numel, seeds, coeffs, tensor_id, noise, device) -> torch.Tensor:
    d = torch.zeros(numel, dtype=torch.float32, device=device)
    for s, c in zip(seeds, coeffs):
        z = noise_from_words(random_words(numel, s, tensor_id, STREAM_NOISE, device), noise)
        d = d + torch.tensor(c, dtype=torch.float32, device=device) * z
    return d


_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def to_bits(v: torch.Tensor, dtype) -> torch.Tensor:
    """Round float32 values to `dtype` (nearest-even) and return the storage bits as int64. A NaN becomes
    the 16-bit format's quiet NaN with v's sign (0x7FC0 / 0x7E00, as common.h), not whatever torch's cast
    gives on the device (CUDA's casts give 0x7FFF)."""
    if dtype == torch.float32:
        return v.view(torch.int32).to(torch.int64) & MASK32
    b = v.to(dtype).view(_BITS_VIEW[dtype]).to(torch.int64) & 0xFFFF
    sign = (v.view(torch.int32).to(torch.int64) >> 16) & 0x8000
    return torch.where(torch.isnan(v), sign | (0x7FC0 if dtype == torch.bfloat16 else 0x7E00), b)


def f16_stochastic_bits(v: torch.Tensor, rnd: torch.Tensor) -> torch.Tensor:
    """fp16 bits of float32 v rounded stochastically with the 32-bit words rnd (docs/zo_noise.md):
    in fp16's normal range 13 random bits are added to v's pattern and the low 13 dropped; below 2^-14
    D = 13 + (-14 - e) bits (e: v's exponent); below 2^-24 the result is 2^-24 with probability
    |v| * 2^24 (24 random bits), else 0; |v| >= 65504 and non-finite values round to nearest."""
    x = v.view(torch.int32).to(torch.int64) & MASK32
    sign, ax = x & 0x80000000, x & 0x7FFFFFFF
    e = (ax >> 23) - 127
    d = torch.where(e >= -14, torch.full_like(e, 13), -1 - e).clamp(13, 23)
    mask = (1 << d) - 1
    kept = (ax + (rnd & mask)) & ~mask
    p = _f32(ax) * 16777216.0                                           # |v| * 2^24, exact
    u = (rnd >> 8).to(torch.float32) * 5.9604644775390625e-08         # 24 random bits * 2^-24, exact
    tiny = torch.where(u < p, torch.full_like(ax, 0x33800000), torch.zeros_like(ax))
    pattern = sign | torch.where(ax < 0x33800000, tiny, kept)
    return torch.where(ax >= 0x477FE000, to_bits(v, torch.float16), to_bits(_f32(pattern), torch.float16))


def _f32(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of 32-bit patterns held in int64."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def as_dtype(b: torch.Tensor, dtype) -> torch.Tensor:
    """The `dtype` values whose storage bits are b (int64), with no float conversion on the way (CUDA's
    float32 -> float16 cast would turn every NaN into 0x7FFF)."""
    half = 1 << (31 if dtype == torch.float32 else 15)
    return torch.where(b >= half, b - 2 * half, b).to(_BITS_VIEW[dtype]).view(dtype)


def from_bits(b: torch.Tensor, dtype) -> torch.Tensor:
    return as_dtype(b, dtype).to(torch.float32)


def _sign(dtype) -> int:
    return 1 << 31 if dtype == torch.float32 else 1 << 15


def _to_ord(b, dtype):
    s = _sign(dtype)
    mag = b & (s - 1)
    return torch.where((b & s) != 0, -mag, mag)


def _from_ord(o, dtype):
    return torch.where(o >= 0, o, _sign(dtype) | (-o))


def invert(x_bits, dp, dtype):
    """Bits of the nearest w with round(w + dp) == x (see zo_math.h::invert)."""
    xv = from_bits(x_bits, dtype)
    b0 = to_bits(xv - dp, dtype)
    fwd = lambda b: to_bits(from_bits(b, dtype) + dp, dtype)  # noqa: E731
    o = _to_ord(b0, dtype)
    bm, bp = _from_ord(o - 1, dtype), _from_ord(o + 1, dtype)
    out = torch.where(fwd(bp) == x_bits, bp, b0)
    out = torch.where(fwd(bm) == x_bits, bm, out)
    out = torch.where(fwd(b0) == x_bits, b0, out)
    return torch.where(torch.isfinite(xv), out, x_bits)


def zo_apply_(tensors, seeds, coeffs, prev_seeds=(), prev_coeffs=(), tensor_ids=None, alpha=1.0,
              noise="normal", rounding="nearest", rounding_seed=0):
    """In place: t <- round(alpha * undo(t) + sum_j coeffs[j] * z(seeds[j], tensor_id)).

    undo(t) is the exact preimage of t under the earlier application (prev_seeds, prev_coeffs)
    when there is one, else t itself. Seeds and coefficients may be tensors or sequences.
    """
    seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    coeffs = [float(c) for c in (coeffs.tolist() if torch.is_tensor(coeffs) else coeffs)]
    prev_seeds = [int(s) for s in (prev_seeds.tolist() if torch.is_tensor(prev_seeds) else prev_seeds)]
    prev_coeffs = [float(c) for c in (prev_coeffs.tolist() if torch.is_tensor(prev_coeffs) else prev_coeffs)]
    ids = list(range(len(tensors))) if tensor_ids is None else list(tensor_ids)
    alpha32 = torch.tensor(alpha, dtype=torch.float32).item()
    for t, tid in zip(tensors, ids):
        n, dev, dt = t.numel(), t.device, t.dtype
        x = t.reshape(-1).view(_BITS_VIEW[dt]).to(torch.int64) & (MASK32 if dt == torch.float32 else 0xFFFF)
        if prev_seeds:
            x = invert(x, _delta(n, prev_seeds, prev_coeffs, tid, noise, dev), dt)
        w = from_bits(x, dt)
        if alpha32 != 1.0:
            w = w * alpha32
        v = w + _delta(n, seeds, coeffs, tid, noise, dev)
        if rounding == "stochastic" and dt == torch.bfloat16:
            r = random_words(n, rounding_seed, tid, STREAM_ROUNDING, dev) & 0xFFFF
            vb = v.view(torch.int32).to(torch.int64) & MASK32
            sr = ((vb + r) >> 16) & 0xFFFF
            out = torch.where(torch.isfinite(v), sr, to_bits(v, dt))
        elif rounding == "stochastic" and dt == torch.float16:
            out = f16_stochastic_bits(v, random_words(n, rounding_seed, tid, STREAM_ROUNDING, dev))
        else:
            out = to_bits(v, dt)
        t.copy_(as_dtype(out, dt).view_as(t))
    return None


def zo_noise(shape, seed, tensor_id=0, noise="normal", dtype=torch.float32, device="cpu"):
    out = torch.zeros(shape, dtype=dtype, device=device)
    zo_apply_([out], [seed], [1.0], tensor_ids=[tensor_id], noise=noise)
    return out
