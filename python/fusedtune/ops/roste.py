"""RoSTE family ops (docs/roste.md; the math is python/fusedtune/reference/hadamard.py and roste.py).

    hadamard(x, scale=None, transpose=False)     orthonormal Hadamard transform of the last dim, sizes
        2^k and m * 2^k for the factors in fusedtune.reference.hadamard.FACTORS; backward: the
        transposed transform
    rotate_fake_quant(x, bits, granularity="token", symmetric=False, clip_ratio=1.0, rotate=True,
                      ste="identity")
        rotation + min-max fake quantization (2-8 bits), straight-through backward through the inverse
        rotation (ste="clipped": zero gradient outside the clipping range). granularity="token": one
        scale per row of the 2-D x (per token for activations; per output channel for a weight
        [out, in]: RoSTELinear quantizes weights this way); "channel": one scale per column
    int_linear(x, a_bits, clip_ratio, qweight, w_bits, sw, zw, uw, bias=None, rotate=False)
        the exported layers' integer GEMM: (rotation and) per-token activation codes in one launch, times
        packed weight codes on int8 tensor cores (triton_kernels/roste_int.py), exact integer products;
        inference only

Backends: the reference (float64 butterflies), the extension's butterfly kernels for hadamard ("cpu" C++
and "cuda": csrc/*/roste.*, fp32 math, any float dtype, n = m x 2^k up to 32768 with 2^k >= 8, m in
CUDA_FACTORS and, on the GPU, n a multiple of 256; the row lives in shared memory, n * 4 bytes; for
16-bit factored rows with MMA on, csrc/cuda/roste_mma.cu applies H_m first on tensor cores, any factor up to
172) and
Triton (triton_kernels/roste.py): hadamard as two tensor-core GEMMs per row of the sizes it serves
(n = A x P, A <= 256, i.e. up to 32768; float32 rows as three fp16 parts per operand, six GEMMs; under
"auto" it takes what the CUDA kernel cannot);
rotate_fake_quant per token in ONE kernel (rotation, min/max, quantization: one read of x, one write of
the result, plus the mask when ste="clipped"), equal bit for bit to the reference fake quantization of
the kernel's own rotation. Per channel (a column's min/max needs every row): the rotation kernel, then
a column kernel that reads each block of columns twice (min/max, quantize) and writes it once. The
straight-through backward is the transposed rotation (the Triton kernel when it serves). A call the
kernel cannot serve (sizes above 32768) runs the reference and says so once, or raises when
backend="triton" was asked for.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .. import _ext
from .._env import env_flag
from .._inference import cache_scope
from .. import backend as _backend
from ..reference import hadamard as href
from ..reference import roste as rref
from ._eager import EagerOp

_HAS = ("reference", "cpu", "triton")          # rotate_fake_quant ("cpu": the reference math)
_HAD_HAS = ("reference", "cpu", "cuda", "triton")
# the factor orders the extension's kernels are compiled for (20 never comes up: 20 * 2^k splits as 40 * 2^(k-1))
CUDA_FACTORS = (1, 12, 28, 36, 40, 44)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# The tensor-core factor kernel (csrc/cuda/roste_mma.cu, hadamard_mma_kernel) for 16-bit factored rows (every
# factor shipped, 12..172): H_m first, on mma.sync, then the butterflies. Off by default until a GPU has timed
# it against the butterfly kernel and Triton (bench roste's "cuda-mma" rows) and run its tests:
# FUSEDTUNE_HADAMARD_MMA=1 turns it on.
MMA_ENV = "FUSEDTUNE_HADAMARD_MMA"
MMA = env_flag(MMA_ENV, False)
_MMA_PAD = 8                                          # roste_cuda.h kMmaPad
_MMA_TILES = (1, 2, 3, 4, 5, 7, 9, 10, 11)            # ceil(m / 16) compiled (roste_cuda.h mma_tiles_compiled)


def mma_smem_bytes(m: int, p: int) -> int:
    """Shared memory a block of the tensor-core kernel: Y [m][p + 8] fp32, X [16 ceil(m / 16)][p + 8] 16-bit
    (roste_cuda.h mma_smem_bytes)."""
    return (4 * m + 2 * 16 * -(-m // 16)) * (p + _MMA_PAD)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.shared_memory_per_block_optin


def mma_refuses(x) -> str:
    """Why the tensor-core factor kernel cannot take x ('' when it can): CUDA, 16-bit rows of n = m x 2^k with
    m > 1 (any factor shipped, up to 172), 2^k >= 8, n <= 32768 and a multiple of 256, sm_80+, and its shared
    memory (mma_smem_bytes) within the GPU's limit a block."""
    if x.device.type != "cuda":
        return "it runs on CUDA tensors"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bfloat16 / float16 rows, not {x.dtype}"
    n = x.shape[-1]
    m, p = href.split_size(n)
    if m == 1:
        return f"n = {n} is a power of two (no factor)"
    if p < 8 or n > 32768 or n % 256 or -(-m // 16) not in _MMA_TILES:
        return (f"it serves n = m x 2^k with 2^k >= 8, n <= 32768, n % 256 == 0 and 16 ceil(m / 16) in "
                f"{tuple(16 * t for t in _MMA_TILES)}; n = {n} = {m} x {p} is not")
    major, optin = _device_limits(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if major < 8:
        return "it needs sm_80 or newer"
    if mma_smem_bytes(m, p) > optin:
        return f"a row of {n} needs {mma_smem_bytes(m, p)} bytes of shared memory; this GPU allows {optin}"
    return ""


_MMA_MATS: dict = {}


def _mma_factor(m: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_m (H_m^T) zero-padded to 16 ceil(m / 16) square, in the rows' dtype (+-1 and 0 are exact). Copied to
    the device on first use, which a CUDA graph cannot capture: refused clearly there (a warm-up call first)."""
    key = (m, transpose, dtype, str(device))
    if key not in _MMA_MATS:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"hadamard: the tensor-core kernel's H_{m} ({dtype}) is copied to the GPU on first "
                               "use, which a CUDA graph cannot capture; run one call (a warm-up step) before capturing")
        mp = 16 * -(-m // 16)
        H = href.factor_matrix(m)
        with cache_scope():   # (built once, off the per-launch path)
            h = torch.zeros(mp, mp, dtype=dtype)
            h[:m, :m] = (H.t() if transpose else H).to(dtype)
            _MMA_MATS[key] = h.to(device)
    return _MMA_MATS[key]


def _mma_call(x: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """The tensor-core factor kernel on the rows of x (2-D, contiguous, 16-byte aligned)."""
    m, _ = href.split_size(x.shape[-1])
    return torch.ops.fusedtune.hadamard_mma_kernel(x, scale, _mma_factor(m, transpose, x.dtype, x.device), m)


@contextlib.contextmanager
def mma_scope(on: bool):
    """The tensor-core factor kernel on (or off) inside the block, whatever MMA says (tests, bench)."""
    global MMA
    old, MMA = MMA, bool(on)
    try:
        yield
    finally:
        MMA = old


def _hadamard_impl(x: torch.Tensor, scale: float, transpose: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ..triton_kernels import roste as tk
        return tk.hadamard(x, scale, transpose)
    if backend in ("cpu", "cuda"):
        n = x.shape[-1]
        if backend == "cuda" and x.data_ptr() % 16:
            x = x.clone()                                # the kernel's 16-byte loads (forward and backward)
        if backend == "cuda" and (MMA or href.split_size(n)[0] not in CUDA_FACTORS) and not mma_refuses(x):
            out = _mma_call(x.reshape(-1, n), scale, transpose)   # (also a backward of its forward, MMA off since)
        else:
            out = torch.ops.fusedtune.hadamard_kernel(x.reshape(-1, n), scale, list(_neg_masks(n, transpose)))
        return out.reshape(x.shape)
    return href.hadamard(x, scale, transpose)


@functools.lru_cache(maxsize=None)
def _neg_masks(n: int, transpose: bool) -> tuple[int, ...]:
    """H_m (H_m^T when transpose) as one bit mask of -1 entries per row; () when n is a power of two."""
    m, _ = href.split_size(n)
    if m == 1:
        return ()
    H = href.factor_matrix(m)
    H = H.t() if transpose else H
    bits = (H < 0).long() << torch.arange(m)
    return tuple(int(v) for v in bits.sum(1))


_hadamard_op = torch.library.custom_op("fusedtune::hadamard", mutates_args=())(_hadamard_impl)


@_hadamard_op.register_fake
def _(x, scale, transpose, backend):
    return x.new_empty(x.shape)          # contiguous, as every backend's output (whatever x's strides)


def _h_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _h_backward(ctx, dy):
    scale, transpose, backend = ctx.args
    return _hadamard(dy.contiguous(), scale, not transpose, backend), None, None, None


torch.library.register_autograd("fusedtune::hadamard", _h_backward, setup_context=_h_setup)
_hadamard = EagerOp(_hadamard_op, _hadamard_impl, _h_setup, _h_backward)


def _check_x(x, what):
    if not torch.is_tensor(x) or x.dtype not in _FLOATS:
        raise TypeError(f"{what}: x must be a float32/bfloat16/float16 tensor, got "
                        f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{what}: x needs a last dimension")


def hadamard(x, scale: float | None = None, transpose: bool = False, backend: str | None = None) -> torch.Tensor:
    """x @ H^T * scale over the last dim (scale None: 1/sqrt(n), orthonormal). Unsupported sizes are
    refused with the list of supported ones."""
    _check_x(x, "hadamard")
    n = x.shape[-1]
    href.split_size(n)                                   # refuses unsupported sizes, naming the supported
    s = (1.0 / n ** 0.5) if scale is None else float(scale)
    return _hadamard(x.contiguous(), s, bool(transpose), hadamard_choice(x, backend))


def hadamard_choice(x, backend: str | None = None) -> str:
    """The backend hadamard(x, backend=backend) runs for this x ("cuda" takes the tensor-core kernel where
    MMA is on and it serves x). Raises as hadamard does for a named backend that cannot."""
    n = x.shape[-1]
    name = _backend.resolve("hadamard", x.device, _HAD_HAS, backend)
    if name in ("cpu", "cuda"):
        why = "" if name == "cuda" and MMA and not mma_refuses(x) else _ext_refuses(x)
        if why and name == "cuda" and MMA:
            why += f"; the tensor-core kernel: {mma_refuses(x)}"
        if why:
            if _backend.requested(backend) == name:
                raise _backend.BackendError(f"hadamard: backend {name!r}: {why}")
            nxt = "triton" if name == "cuda" and _backend.can_serve("triton", x.device, frozenset(_HAD_HAS))[0] \
                else "reference"
            if nxt == "reference":
                _backend.warn_once(("hadamard", name, n), f"fusedtune: hadamard: {why}; running the reference")
            name = nxt
        elif name == "cuda" and _backend.requested(backend) != "cuda" and _prefer_triton(x):
            name = "triton"
    return _rotation_backend("hadamard", x, name, backend)


def _ext_refuses(x) -> str:
    """Why the extension's butterfly kernel cannot take x ('' when it can)."""
    n = x.shape[-1]
    m, _ = href.split_size(n)
    gpu = x.device.type == "cuda"
    if m not in CUDA_FACTORS or n // m < 8 or n > 32768 or (gpu and n % 256):
        return (f"the butterfly kernel serves n = m x 2^k with 2^k >= 8, n <= 32768{', n % 256 == 0' if gpu else ''}"
                f" and m in {CUDA_FACTORS}; n = {n} = {m} x {n // m} is not")
    if gpu:
        optin = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
        if 4 * n > optin:
            return f"a row of {n} needs {4 * n} bytes of shared memory; this GPU allows {optin}"
    return ""


def _prefer_triton(x) -> bool:
    """Under auto on a GPU, factored rows (m > 1) longer than 8192 take the Triton kernel where it serves.
    On an H200 (bench/results/h200_2026-11-30.md, third and fourth runs) the CUDA block kernel beat Triton at
    4096 x 3584 (2.6x against 5.0x a memcpy) and 4096 x 5120 (3.0x against 5.6x), and lost to it by 2.5% at
    4096 x 14336 in both runs (3.34x against 3.26x; p20-p80 ranges apart): Triton's two GEMMs a row gain
    with the row's length, the block kernel's factor stage does not. Sizes between 5120 and 14336 are
    unmeasured; the cut is between the measured points. With MMA on, the tensor-core kernel takes every
    factored row it serves."""
    if MMA and not mma_refuses(x):
        return False
    return x.device.type == "cuda" and x.shape[-1] > 8192 and href.split_size(x.shape[-1])[0] != 1 \
        and _triton_serves(x.shape[-1]) and _backend.can_serve("triton", x.device, frozenset(_HAD_HAS))[0]


def _triton_serves(n: int) -> bool:
    from ..triton_kernels import roste as tk
    p = tk.plan(n)
    return p is not None and p[1] >= 16


def triton_cannot_rotate(n: int) -> str | None:
    """Why the Triton rotation cannot serve rows of n features, or None (it can)."""
    if _triton_serves(n):
        return None
    return f"the Triton rotation serves rows of n = A x P with A <= 256 and P >= 16; n = {n} is not"


def _rotation_backend(what: str, x, name: str, backend: str | None) -> str:
    """name, or "reference" (said once; raised when Triton was asked for) where the Triton rotation
    cannot serve x."""
    n = x.shape[-1]
    cannot = triton_cannot_rotate(n) if name == "triton" else None
    if cannot is None:
        return name
    why = f"{what}: {cannot}"
    if _backend.requested(backend) == "triton":
        raise _backend.BackendError(why)
    _backend.warn_once((what, n, x.dtype), f"fusedtune: {why}; running the reference")
    return "reference"


def _rfq_impl(x: torch.Tensor, bits: int, granularity: str, symmetric: bool, clip_ratio: float, rotate: bool,
              ste: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    clipped = ste == "clipped"
    if backend == "triton":
        from ..triton_kernels import roste as tk
        if granularity == "token":
            out, inside = tk.rotate_fake_quant(x, bits, symmetric, clip_ratio, rotate, clipped)
        else:
            y = tk.hadamard(x, 1.0 / x.shape[-1] ** 0.5, False) if rotate else x
            out, inside = tk.fake_quant_channels(y, bits, symmetric, clip_ratio, clipped)
    else:
        out, inside = rref.rotate_fake_quant(x, bits, granularity, symmetric, clip_ratio, rotate)
    return out, (inside if clipped else x.new_empty(0, dtype=torch.bool))


_rfq_op = torch.library.custom_op("fusedtune::rotate_fake_quant", mutates_args=())(_rfq_impl)


@_rfq_op.register_fake
def _(x, bits, granularity, symmetric, clip_ratio, rotate, ste, backend):
    return x.new_empty(x.shape), (x.new_empty(x.shape, dtype=torch.bool) if ste == "clipped"   # contiguous,
                                  else x.new_empty(0, dtype=torch.bool))                     # as the kernels'



def _q_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.rotate, ctx.ste, ctx.backend = inputs[5], inputs[6], inputs[7]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zero-filled gradient for the clip mask on every backward


def _reference_inverse(g: torch.Tensor) -> torch.Tensor:
    """The reference's transposed orthonormal rotation, called through the hadamard op: a compiled backward
    traces the op (its fake), not the reference's code, whose factor matrices H_m are real tensors."""
    return _hadamard(g.contiguous(), 1.0 / math.sqrt(g.shape[-1]), True, "reference")


def _q_backward(ctx, dy, _dinside):
    """Straight-through: dy (zeroed outside the clip range for ste="clipped") through the transposed
    rotation. The reference backend runs reference/roste.py's ste_backward (float32 math)."""
    if dy is None:    # the output reached no loss (grads are not materialized)
        return (None,) * 8
    (inside,) = ctx.saved_tensors
    if ctx.backend != "triton":
        dx = rref.ste_backward(dy, inside, ctx.rotate, ctx.ste, _reference_inverse)
    else:
        g = torch.where(inside, dy, torch.zeros((), dtype=dy.dtype, device=dy.device)) if ctx.ste == "clipped" else dy
        dx = _hadamard(g.contiguous(), 1.0 / dy.shape[-1] ** 0.5, True, "triton") if ctx.rotate else g
    return dx, None, None, None, None, None, None, None


torch.library.register_autograd("fusedtune::rotate_fake_quant", _q_backward, setup_context=_q_setup)
_rfq = EagerOp(_rfq_op, _rfq_impl, _q_setup, _q_backward)


def rotate_fake_quant(x, bits: int, granularity: str = "token", symmetric: bool = False, clip_ratio: float = 1.0,
                      rotate: bool = True, ste: str = "identity", backend: str | None = None) -> torch.Tensor:
    """Rotation + fake quantization with a straight-through backward (module docstring)."""
    _check_x(x, "rotate_fake_quant")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"rotate_fake_quant: bits must be an int in [2, 8], got {bits!r}")
    if granularity not in ("token", "channel"):
        raise ValueError(f"rotate_fake_quant: granularity must be 'token' or 'channel', got {granularity!r}")
    if granularity == "channel" and x.dim() != 2:
        raise ValueError(f"rotate_fake_quant: granularity 'channel' takes a 2-D tensor, got {tuple(x.shape)}")
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"rotate_fake_quant: clip_ratio must be in (0, 1], got {clip_ratio!r}")
    if ste not in ("identity", "clipped"):
        raise ValueError(f"rotate_fake_quant: ste must be 'identity' or 'clipped', got {ste!r}")
    name = _rfq_backend(x, rotate, backend)
    out, _ = _rfq(x.contiguous(), bits, granularity, bool(symmetric), float(clip_ratio), bool(rotate), ste, name)
    return out


def _rfq_backend(x, rotate: bool, backend: str | None) -> str:
    if rotate:
        href.split_size(x.shape[-1])
    name = _backend.resolve("rotate_fake_quant", x.device, _HAS, backend)
    return _rotation_backend("rotate_fake_quant", x, name, backend) if rotate else name


def quant_rotation(x, backend: str | None = None) -> torch.Tensor:
    """The rotated x (in x's dtype) exactly as rotate_fake_quant(x, ..., rotate=True, backend=backend)
    quantizes it: the Triton rotation on the Triton backend, else the float64 reference. For exporting
    codes that match the fake quantization bit for bit (fusedtune.roste.export)."""
    _check_x(x, "quant_rotation")
    name = _rfq_backend(x, True, backend)
    x = x.contiguous()
    if name == "triton":
        from ..triton_kernels import roste as tk
        return tk.hadamard(x, 1.0 / x.shape[-1] ** 0.5, False)
    return href.hadamard(x)


def _int_linear_impl(x: torch.Tensor, rotate: bool, a_bits: int, clip_ratio: float, qweight: torch.Tensor,
                     w_bits: int, sw: torch.Tensor, zw: torch.Tensor, uw: torch.Tensor, bias: torch.Tensor | None,
                     backend: str) -> torch.Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if backend == "triton":
        from ..triton_kernels import roste_int as ti
        fused = rotate and _triton_serves(n)
        if rotate and not fused:
            _backend.warn_once(("int_linear", n, x.dtype), f"fusedtune: int_linear: the Triton rotation does not "
                               f"serve n = {n} ({x.dtype}); rotating with the reference, then the integer GEMM")
            x2 = href.hadamard(x2)
        cx, sx, zx, sumx = ti.act_codes(x2, a_bits, clip_ratio, rotate=fused)
        out = ti.int_linear(cx, sx, zx, sumx, qweight, w_bits, sw, zw, uw, bias, x.dtype)
    else:
        from ..roste.export import unpack_codes
        cx, sx, zx, _ = rref.act_codes(href.hadamard(x2) if rotate else x2, a_bits, clip_ratio)
        cw = (unpack_codes(qweight, w_bits, n).to(torch.int16) - 2 ** (w_bits - 1)).to(torch.int8)
        out = rref.integer_linear(cx, sx, zx, cw, sw, zw, bias, x.dtype)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


_int_linear_op = torch.library.custom_op("fusedtune::roste_int_linear", mutates_args=())(_int_linear_impl)
_int_linear = EagerOp(_int_linear_op, _int_linear_impl)


@_int_linear_op.register_fake
def _(x, rotate, a_bits, clip_ratio, qweight, w_bits, sw, zw, uw, bias, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check_int_linear(x, a_bits, clip_ratio, qweight, w_bits, sw, zw, uw, bias):
    _check_x(x, "int_linear")
    for nm, b in (("a_bits", a_bits), ("w_bits", w_bits)):
        if not isinstance(b, int) or not 2 <= b <= 8:
            raise ValueError(f"int_linear: {nm} must be an int in [2, 8], got {b!r}")
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"int_linear: clip_ratio must be in (0, 1], got {clip_ratio!r}")
    K = x.shape[-1]
    if K > rref.INT_MAX_K:
        raise ValueError(f"int_linear: in_features {K} above {rref.INT_MAX_K} (the int32 accumulator's exact range)")
    width = (K + 1) // 2 if w_bits <= 4 else K
    if not torch.is_tensor(qweight) or qweight.dtype != torch.uint8 or qweight.dim() != 2 \
            or qweight.shape[1] != width or not qweight.is_contiguous():
        raise ValueError(f"int_linear: qweight must be contiguous uint8 [N, {width}] ({w_bits}-bit codes of {K} "
                         f"inputs), got {getattr(qweight, 'dtype', type(qweight).__name__)} "
                         f"{tuple(getattr(qweight, 'shape', ()))}")
    N = qweight.shape[0]
    want = {"sw": (sw, torch.float32), "zw": (zw, torch.float32), "uw": (uw, torch.float64)}
    if bias is not None:
        want["bias"] = (bias, x.dtype)
    for nm, (t, dt) in want.items():
        if not torch.is_tensor(t) or t.dtype != dt or tuple(t.shape) != (N,) or not t.is_contiguous():
            raise ValueError(f"int_linear: {nm} must be contiguous {dt} of shape ({N},), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    devices = {t.device for t in (x, qweight, sw, zw, uw) + (() if bias is None else (bias,))}
    if len(devices) > 1:
        raise ValueError(f"int_linear: every tensor must be on one device, got {sorted(map(str, devices))}")


def int_linear(x, a_bits: int, clip_ratio: float, qweight, w_bits: int, sw, zw, uw, bias=None, rotate: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """The integer GEMM of an exported RoSTE layer (reference/roste.py: act_codes, integer_linear): x (rotated
    first by the orthonormal Hadamard transform when rotate, as rotate_fake_quant rotates on the same
    backend) quantized per token to a_bits codes, times the weight codes qweight (fusedtune.roste.export's
    packing) on int8 tensor cores; sw, zw (centered) float32 [N], uw float64 [N] per channel. On Triton the
    rotation and the activation codes are one launch. Inference only (no autograd)."""
    _check_int_linear(x, a_bits, clip_ratio, qweight, w_bits, sw, zw, uw, bias)
    if rotate:
        href.split_size(x.shape[-1])
    name = _backend.resolve("roste_int_linear", x.device, _HAS, backend)
    return _int_linear(x.contiguous(), bool(rotate), int(a_bits), float(clip_ratio), qweight, int(w_bits), sw,
                          zw, uw, bias, name)


def roste_backend(device, backend: str | None = None) -> dict:
    return _backend.explain("rotate_fake_quant", torch.device(device), _HAS, backend)


def hadamard_backend(device, backend: str | None = None) -> dict:
    return _backend.explain("hadamard", torch.device(device), _HAD_HAS, backend)


if _ext.loaded():
    @torch.library.register_fake("fusedtune::hadamard_kernel")
    def _(x, scale, neg_masks):
        return torch.empty_like(x)

    @torch.library.register_fake("fusedtune::hadamard_mma_kernel")
    def _(x, scale, h, m):
        return torch.empty_like(x)
