"""Zeroth-order family ops: in-place multi-tensor perturbation with counter-based noise.

    zo_apply_(tensors, seeds, coeffs)   t <- round(alpha * undo(t) + sum_j coeffs[j] * z(seeds[j], id(t)))
    zo_noise(shape, seed, tensor_id)    materialise z for tests and users

The noise spec (Philox4x32-10, the quantile-table normal, stochastic rounding, the undo rule) is in
docs/zo_noise.md; every backend is bit-identical to fusedtune.reference.zo.
"""
from __future__ import annotations

import numbers
import struct

from typing import Sequence

import torch

from .. import _ext
from .. import backend as _backend
from ..reference import zo as ref
from ..reference.adamw import check_writable
from ._eager import EagerOp

NOISES = ref.NOISES
ROUNDINGS = ref.ROUNDINGS
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_U64 = 1 << 64
_HAS = ("reference", "cpu", "cuda", "triton")


def _zo_apply_impl(tensors: list[torch.Tensor], seeds: torch.Tensor, coeffs: torch.Tensor,
                   prev_seeds: torch.Tensor, prev_coeffs: torch.Tensor, tensor_ids: list[int], alpha: float,
                   noise: int, rounding: int, rounding_seed: int, backend: str) -> None:
    _check_distinct(tensors)
    if backend == "reference":
        names = {v: k for k, v in NOISES.items()}, {v: k for k, v in ROUNDINGS.items()}
        ref.zo_apply_(tensors, seeds, coeffs, prev_seeds, prev_coeffs, tensor_ids, alpha,
                      names[0][noise], names[1][rounding], rounding_seed)
    elif backend in ("cpu", "cuda"):
        torch.ops.fusedtune.zo_apply_kernel_(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs,
                                             alpha, noise, rounding, rounding_seed)
    elif backend == "triton":
        from ..triton_kernels import zo as tk
        tk.zo_apply_(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs, alpha, noise, rounding,
                     rounding_seed)
    else:
        raise _backend.BackendError(f"zo_apply_: unknown backend {backend!r}")


_zo_apply_op = torch.library.custom_op("fusedtune::zo_apply_", mutates_args=("tensors",))(_zo_apply_impl)
_zo_apply = EagerOp(_zo_apply_op, _zo_apply_impl, mutated=(0,))   # direct in plain eager mode


@_zo_apply_op.register_fake
def _(tensors, seeds, coeffs, prev_seeds, prev_coeffs, tensor_ids, alpha, noise, rounding, rounding_seed, backend):
    return None


if _ext.loaded():
    @torch.library.register_fake("fusedtune::zo_apply_kernel_")
    def _(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs, alpha, noise, rounding, rounding_seed):
        return None


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host values to the device without a host sync: a pinned staging copy, copied asynchronously
    (a plain .to('cuda') of pageable memory synchronises the stream). Under CUDA-graph capture pass
    seeds/coeffs as device tensors instead: a captured copy would re-read the staging buffer."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _refuse_host_values_in_capture(seeds, coeffs, undo, device):
    if torch.device(device).type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return
    vals = [seeds, coeffs] + (list(undo) if isinstance(undo, (tuple, list)) else [])
    if not all(torch.is_tensor(v) and v.device.type == "cuda" for v in vals):
        raise ValueError("zo_apply_: under CUDA-graph capture pass seeds, coeffs (and undo) as CUDA tensors; "
                         "host values would be copied from a staging buffer that replays do not refresh")


def _as_seeds(seeds, name: str, device) -> torch.Tensor:
    if torch.is_tensor(seeds):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise TypeError(f"zo_apply_: {name} must be a 1-D int64 tensor, got {seeds.dtype} with shape "
                            f"{tuple(seeds.shape)}")
        if seeds.device.type != "cpu" and seeds.device != device:
            raise ValueError(f"zo_apply_: {name} is on {seeds.device}, the tensors on {device}")
        seeds = seeds.contiguous()      # (the kernels read seeds + j: a strided view is copied)
        return seeds if seeds.device == device else _to_device(seeds, device)
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not -(1 << 63) <= s < _U64:
            raise ValueError(f"zo_apply_: {name} must be integers in [-2**63, 2**64), got {s!r}")
        s = int(s)        # (numpy integers too)
        out.append(s - _U64 if s >= 1 << 63 else s)
    return _to_device(torch.tensor(out, dtype=torch.int64), device)


def _as_coeffs(coeffs, name: str, device) -> torch.Tensor:
    if torch.is_tensor(coeffs):
        if not coeffs.is_floating_point() or coeffs.dim() != 1:
            raise TypeError(f"zo_apply_: {name} must be a 1-D floating tensor, got {coeffs.dtype} with shape "
                            f"{tuple(coeffs.shape)}")
        if coeffs.device.type != "cpu" and coeffs.device != device:
            raise ValueError(f"zo_apply_: {name} is on {coeffs.device}, the tensors on {device}")
        coeffs = coeffs.to(torch.float32).contiguous()    # (read as coeffs + j: a strided or expanded view copied)
        return coeffs if coeffs.device == device else _to_device(coeffs, device)
    return _to_device(torch.tensor([float(c) for c in coeffs], dtype=torch.float32), device)


def _default_rounding_seed(seeds, coeffs) -> int:
    """Stochastic rounding's seed when none is given: a hash of every seed and (given on the host) every
    coefficient's float32 bits, so repeated calls that share a seed (FedKSeed's fixed pool, a replay) draw
    fresh rounding bits; coefficients given as a tensor are not read (no host sync): pass rounding_seed
    for such a series. (It hashed the first seed alone: a fixed pool reused the same bits every round,
    and the rounding errors added up instead of averaging out.)"""
    h = 0x5851F42D4C957F2D
    for s in seeds:
        h = ref.splitmix64((h ^ (int(s) % _U64)) % _U64)
    if not torch.is_tensor(coeffs):
        for c in coeffs:
            h = ref.splitmix64(h ^ struct.unpack("<I", struct.pack("<f", float(c)))[0])
    return h


def _check_tensors(tensors) -> list[torch.Tensor]:
    if torch.is_tensor(tensors):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError("zo_apply_: tensors is empty")
    for i, t in enumerate(tensors):
        if not torch.is_tensor(t):
            raise TypeError(f"zo_apply_: tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in _DTYPES:
            raise TypeError(f"zo_apply_: tensors[{i}] has dtype {t.dtype}; needs float32, bfloat16 or float16")
        if not t.is_contiguous():
            raise ValueError(f"zo_apply_: tensors[{i}] (shape {tuple(t.shape)}) is not contiguous; "
                             "pass .contiguous() storage (a copy would not be updated in place)")
        if t.device != tensors[0].device:
            raise ValueError(f"zo_apply_: tensors[{i}] is on {t.device}, tensors[0] on {tensors[0].device}; "
                             "one call takes tensors of one device")
        if t.is_meta:
            raise ValueError(f"zo_apply_: tensors[{i}] is on the meta device (no values to perturb); materialise "
                             "the model first (to_empty and load its state dict)")
    check_writable("zo_apply_", ((t,) for t in tensors))
    return tensors


def _check_distinct(tensors: list[torch.Tensor]) -> None:
    """Two entries whose bytes overlap (the same tensor twice, or overlapping views of one storage) would
    get the noise twice, and race on a GPU. Checked where the op runs on real tensors (torch 2.11's
    torch.compile cannot trace data_ptr() as a dict key; 2.14's can)."""
    spans: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            start = t.data_ptr()
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + t.numel() * t.element_size(), i))
    for ranges in spans.values():
        ranges.sort()
        for (_, end, i), (start, _, j) in zip(ranges, ranges[1:]):
            if start < end:
                raise ValueError(f"zo_apply_: tensors[{max(i, j)}] overlaps tensors[{min(i, j)}] in memory "
                                 "(the same storage); each tensor must be passed once")


def zo_apply_(tensors: torch.Tensor | Sequence[torch.Tensor], seeds, coeffs, noise: str = "normal",
              rounding: str = "nearest", *, undo=None, alpha: float = 1.0,
              tensor_ids: Sequence[int] | None = None, rounding_seed: int | None = None,
              backend: str | None = None) -> None:
    """Add sum_j coeffs[j] * z(seeds[j]) to every tensor in place, in one pass with one rounding.

    tensors: float32/bfloat16/float16 contiguous tensors of one device (parameters are fine).
    seeds: ints (64-bit) or an int64 tensor; coeffs: floats or a float tensor (a device tensor
        needs no host sync, so the call is CUDA-graph capturable).
    noise: "normal" (unit-variance, table-based, bit-identical on every backend) or "rademacher".
    rounding: "nearest" or "stochastic" (bfloat16 and float16 tensors; float32 needs no rounding; the
        random bits come from rounding_seed, default derived from seeds[0]; docs/zo_noise.md).
    undo: (seeds, coeffs) of the call that last wrote these tensors with rounding="nearest": the
        tensors are first returned to their exact preimage (see docs/zo_noise.md), so
        perturb -> undo+update does not drift.
    alpha: multiplies the (restored) weights before the noise is added (decoupled weight decay).
    tensor_ids: the id that selects each tensor's noise stream (default 0..n-1).
    """
    tensors = _check_tensors(tensors)
    device = tensors[0].device
    if noise not in NOISES:
        raise ValueError(f"zo_apply_: noise={noise!r}; choose one of {', '.join(NOISES)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"zo_apply_: rounding={rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    _refuse_host_values_in_capture(seeds, coeffs, undo, device)
    s = _as_seeds(seeds, "seeds", device)
    c = _as_coeffs(coeffs, "coeffs", device)
    if s.numel() != c.numel() or s.numel() == 0:
        raise ValueError(f"zo_apply_: need as many seeds as coeffs (at least one), got {s.numel()} and {c.numel()}")
    if undo is not None:
        if not isinstance(undo, (tuple, list)) or len(undo) != 2:
            raise TypeError("zo_apply_: undo must be a (seeds, coeffs) pair")
        ps, pc = _as_seeds(undo[0], "undo seeds", device), _as_coeffs(undo[1], "undo coeffs", device)
        if ps.numel() != pc.numel() or ps.numel() == 0:
            raise ValueError(f"zo_apply_: undo needs as many seeds as coeffs, got {ps.numel()} and {pc.numel()}")
    else:
        ps = torch.empty(0, dtype=torch.int64, device=device)
        pc = torch.empty(0, dtype=torch.float32, device=device)
    ids = list(range(len(tensors))) if tensor_ids is None else [int(i) for i in tensor_ids]
    if len(ids) != len(tensors):
        raise ValueError(f"zo_apply_: {len(tensors)} tensors but {len(ids)} tensor_ids")
    if any(not 0 <= i < 1 << 32 for i in ids):
        raise ValueError(f"zo_apply_: tensor_ids must be in [0, 2**32), got {ids}")
    if rounding_seed is None:
        if rounding == "stochastic" and torch.is_tensor(seeds):
            raise ValueError("zo_apply_: with seeds given as a tensor, pass rounding_seed for stochastic rounding")
        # (nearest rounding uses none: no host read of a seeds tensor, which compile and graph capture refuse)
        rounding_seed = _default_rounding_seed(seeds, coeffs) if rounding == "stochastic" else 0
    if not -(1 << 63) <= int(rounding_seed) < _U64:
        raise ValueError(f"zo_apply_: rounding_seed must be a 64-bit integer, got {rounding_seed}")
    rs = int(rounding_seed) % _U64
    rs = rs - _U64 if rs >= 1 << 63 else rs
    name = _backend.resolve("zo_apply_", device, _HAS, backend)
    with torch.no_grad():
        _zo_apply(tensors, s, c, ps, pc, ids, float(alpha), NOISES[noise], ROUNDINGS[rounding], rs, name)


def zo_noise(shape, seed: int, tensor_id: int = 0, noise: str = "normal", dtype=torch.float32, device="cpu",
             backend: str | None = None) -> torch.Tensor:
    """The noise tensor z(seed, tensor_id) that zo_apply_ adds (rounded to dtype)."""
    out = torch.zeros(shape, dtype=dtype, device=device)
    zo_apply_([out], [seed], [1.0], noise=noise, tensor_ids=[tensor_id], backend=backend)
    return out


def zo_backend(device, backend: str | None = None) -> dict:
    """Which backend zo_apply_ takes on `device` and why the others were not taken."""
    return _backend.explain("zo_apply_", torch.device(device), _HAS, backend)
