"""Sparse-delta family ops.

    sparse_delta_linear(x, weight, values, indices, bias)  y = x W^T + b with W the merged weight
        (frozen); the backward gives dX (full), the bias gradient when the bias trains, and the
        gradient of the float32 deltas `values` at the k indices only: by the SDDMM, or, on a GPU at
        densities where cuBLAS is faster (choose_delta_grad), from dW formed in float32 blocks.
        Under torch.autocast it computes in the autocast dtype, as F.linear would.
    sddmm(dy, x, indices)                                   that gradient, float32 [k]; the cpu and
        cuda backends run one tiled schedule (csrc/include/fusedtune/sddmm_tile.h, planned by
        sddmm_plan) and agree bit for bit for the same plan; triton streams each index's tokens;
        schedule="dense" forms dW = dy^T x in float32 blocks of at most DENSE_BLOCK_BYTES and
        gathers the k entries (on a GPU above a density where that is faster: choose_delta_grad)
    sparse_adamw_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, ...)
        one fused multi-tensor AdamW pass over the deltas that also writes round(base + delta)
        into the merged weights.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import _autocast, _ext
from .. import backend as _backend
from ..reference import sparse_delta as ref
from ..reference.adamw import CONST_KEYS, adamw_constants, check_distinct, check_hparams, check_writable
from ._eager import EagerOp
from ._linear import (check_linear_shapes, check_one_device, dense_weight_grad, refuse_double_backward,
                      values_readable)

_SDDMM_HAS = ("reference", "cpu", "cuda", "triton")
_ADAMW_HAS = ("reference", "cpu", "cuda")


def check_indices(indices: torch.Tensor, numel: int, what: str) -> None:
    """Flat indices must be a 1-D int32 tensor, sorted, unique and inside the weight (host check)."""
    if not torch.is_tensor(indices) or indices.dtype != torch.int32 or indices.dim() != 1:
        got = f"{indices.dtype} with shape {tuple(indices.shape)}" if torch.is_tensor(indices) else type(indices)
        raise TypeError(f"{what}: indices must be a 1-D int32 tensor, got {got}")
    if indices.numel() == 0 or not values_readable(indices):
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{what}: indices must lie in [0, {numel}), got [{lo}, {hi}]")
    if indices.numel() > 1:
        d = indices[1:] - indices[:-1]
        if bool((d == 0).any()):
            raise ValueError(f"{what}: indices contain duplicates")
        if bool((d < 0).any()):
            raise ValueError(f"{what}: indices must be sorted (row-major order)")


SDDMM_TC, SDDMM_THREADS = 16, 256            # sddmm_tile.h: kTc, kThreads
SDDMM_TILES = tuple(64 << i for i in range(7))  # tile rows / columns tried: 64 .. 4096
SDDMM_MIN_SPAN = 256                           # tokens per split at least (amortises a tile's item lists)
SDDMM_SETUP_TOKENS = 32                        # a tile's count/scan/fill phases, in tokens of dot work (est.)


def sddmm_smem(R: int, C: int, cap: int, elem: int) -> int:
    """Shared memory of one tile (sddmm_tile.h's layout): x and dy chunks, row arrays, scan, items."""
    return (R + C) * SDDMM_TC * elem + (2 * R + 1 + 2 * SDDMM_THREADS) * 4 + 8 * cap


@functools.lru_cache(maxsize=256)
def sddmm_plan(N: int, K: int, T: int, k: int, elem: int, smem_budget: int, parallel: int) -> tuple:
    """(R, C, splits, cap, span) of the tiled SDDMM for dy [T, N], x [T, K] (elem bytes) and k indices.

    Tile: among R, C in SDDMM_TILES (clipped to the matrix) whose arrays fit smem_budget, the one that
    stages the fewest elements per token over the whole matrix, tiles * (R + C) * batches, where a
    tile expects R*C*k/(N*K) items and holds `cap` of them (the expectation plus 25% and 4 standard
    deviations, in steps of 256) per batch. Splits: token ranges of >= SDDMM_MIN_SPAN tokens, as many
    as make the waves of `parallel` (tile, split) pairs (what runs at once) times (a split's tokens +
    SDDMM_SETUP_TOKENS) smallest, the fewer on a tie."""
    d = k / max(1, N * K)
    best = None
    for R in SDDMM_TILES:
        r = min(R, max(N, 1))
        for C in SDDMM_TILES:
            c = min(C, max(K, 1))
            room = (smem_budget - sddmm_smem(r, c, 0, elem)) // 8 // SDDMM_THREADS * SDDMM_THREADS
            if room >= SDDMM_THREADS:
                want = r * c * d
                cap = min(room, max(1, math.ceil((1.25 * want + 4 * math.sqrt(want) + 1) / SDDMM_THREADS)) * SDDMM_THREADS)
                tiles = -(-max(N, 1) // r) * -(-max(K, 1) // c)
                cost = (tiles * (r + c) * max(1, math.ceil(want / cap)), tiles)
                if best is None or cost < best[0]:
                    best = (cost, r, c, cap, tiles)
            if c == K:
                break
        if r == N:
            break
    if best is None:
        raise ValueError(f"sddmm_plan: {smem_budget} bytes of shared memory hold no tile (need "
                         f"{sddmm_smem(min(64, N), min(64, K), SDDMM_THREADS, elem)})")
    _, r, c, cap, tiles = best
    span = lambda s: max(SDDMM_TC, -(-(-(-T // s)) // SDDMM_TC) * SDDMM_TC)  # noqa: E731
    # least work on the busiest SM: waves of `parallel` (tile, split) pairs, each a split's tokens plus
    # SDDMM_SETUP_TOKENS for the tile's item lists
    splits = min(range(1, max(1, -(-T // SDDMM_MIN_SPAN)) + 1),
                 key=lambda s: (-(-tiles * s // parallel) * (span(s) + SDDMM_SETUP_TOKENS), s))
    return (r, c, max(1, -(-T // span(splits))), cap, span(splits))


def _device_plan(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> list[int]:
    """The plan for this device: on a GPU, shared memory for two tiles per SM and two tiles per SM to
    fill; on the CPU, 256 KiB tiles (an L2's worth) and four per thread."""
    if x.device.type == "cuda":
        p = torch.cuda.get_device_properties(x.device)
        budget = min(p.shared_memory_per_block_optin, p.shared_memory_per_multiprocessor // 2 - 1024)
        parallel = 2 * p.multi_processor_count
    else:
        budget, parallel = 256 * 1024, 4 * torch.get_num_threads()
    return list(sddmm_plan(dy.shape[1], x.shape[1], x.shape[0], indices.numel(), x.element_size(), budget, parallel))


# ----------------------------------------------------------------------------- the dense schedule
# On an H200 (run 3, bench/results/sparse_delta.csv, 4096 tokens, bf16) the SDDMM kernels were faster than
# cuBLAS's dense dW + gather only at low density: a line through each shape's three rows crosses the dense
# time at 0.34-0.41% for the tiled CUDA kernel and at 0.10-0.18% for Triton's (at q/o_proj Triton's never
# won); at 1% the CUDA kernel took 1.5-2.1x as long, at 2.4% 3.5-4.2x. Dense dW ran at 690-784 TFLOP/s. So
# above a density the gradient is taken from dW, formed in float32 (one GEMM, fp32 accumulation as in the
# SDDMM) a block of rows at a time, and gathered at the k positions.
DENSE = "dense"                      # the schedule's name where a backend name is passed (the op's `backend`)
DELTA_GRADS = ("auto", "sddmm", DENSE)
DENSE_BLOCK_BYTES = 256 << 20        # float32 dW formed at once; Llama-3-8B's largest (14336 x 4096) is 235 MB
DENSE_MIN_TOKENS = 256               # below it dense dW costs its 4*N*K-byte write more than its FLOPs
# Density from which auto takes the dense schedule over each SDDMM kernel on sm_90 and newer (measured, above).
# Older GPUs: estimates, unmeasured. Per SM and clock sm_80's bf16 tensor cores do half of sm_90's work and
# sm_86/89's (float32 accumulation) a quarter, while the SDDMM's shared-memory rate is about the same, so the
# crossover moves up about 2x (sm_80) and 4x (other sm_8x).
DENSE_MIN_DENSITY_SM90 = {"cuda": 0.0035, "triton": 0.0015}


def dense_min_density(capability, kernel: str = "cuda") -> float:
    """The density from which delta_grad="auto" takes the dense schedule over SDDMM kernel `kernel`
    ("cuda" or "triton") on a GPU of that compute capability."""
    scale = 1 if capability[0] >= 9 else 2 if tuple(capability) == (8, 0) else 4
    return DENSE_MIN_DENSITY_SM90[kernel] * scale


def delta_grad_schedule(N: int, K: int, T: int | None, k: int, dtype: torch.dtype, capability,
                        kernel: str = "cuda") -> tuple[str, str]:
    """("dense" or "sddmm", why): the faster way to the delta gradient of dy [T, N], x [T, K] at k positions
    against SDDMM kernel `kernel` on a GPU of `capability` (None: no GPU, always the SDDMM). Dense needs
    16-bit inputs (a float32-output GEMM of bf16/fp16), at least DENSE_MIN_TOKENS tokens (T None: not known
    yet, the rule for enough tokens) and dense_min_density."""
    if capability is None:
        return "sddmm", "not on a GPU"
    why = _sddmm_by_call(T, dtype)
    if why:
        return "sddmm", why
    need, dens, sm = dense_min_density(capability, kernel), k / max(1, N * K), f"sm_{capability[0]}{capability[1]}"
    if dens < need:
        return "sddmm", f"density {dens:.3%} < {need:.2%}, where dense dW starts to beat the {kernel} SDDMM on {sm}"
    return DENSE, f"density {dens:.3%} >= {need:.2%} on {sm}"


def _sddmm_by_call(T: int | None, dtype: torch.dtype) -> str:
    """Why a call takes the SDDMM whatever the GPU (its dtype, too few tokens), or "" (the density decides)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} inputs (the dense schedule takes 16-bit inputs)"
    if T is not None and T < DENSE_MIN_TOKENS:
        return f"{T} tokens < {DENSE_MIN_TOKENS}"
    return ""


NO_GPU_KERNEL = "no GPU kernel"    # choose_delta_grad's reason where the SDDMM backend is not a GPU kernel


def check_delta_grad(delta_grad: str, what: str) -> str:
    if delta_grad not in DELTA_GRADS:
        raise ValueError(f"{what}: delta_grad must be one of {', '.join(map(repr, DELTA_GRADS))}, got {delta_grad!r}")
    return delta_grad


def choose_delta_grad(delta_grad: str, name: str, backend: str | None, N: int, K: int, T: int | None, k: int,
                      dtype: torch.dtype, device) -> tuple[str, str]:
    """(what runs: DENSE or the SDDMM backend `name`, why) for a weight [N, K] with k deltas, T tokens (None:
    not known), `name` the backend resolved from `backend`. "auto" takes dense only where the backend was
    left on auto and resolved to a GPU kernel, and delta_grad_schedule says so."""
    if delta_grad == DENSE:
        return DENSE, "delta_grad='dense'"
    if delta_grad == "sddmm":
        return name, "delta_grad='sddmm'"
    if name not in ("cuda", "triton"):
        return name, NO_GPU_KERNEL
    if _backend.requested(backend) != "auto":
        return name, f"backend {name!r} named"
    why = _sddmm_by_call(T, dtype)    # (before the device query: a small call's host time)
    if why:
        return name, why
    p = torch.cuda.get_device_properties(device)      # (torch.compile folds it to a constant)
    pick, why = delta_grad_schedule(N, K, T, k, dtype, (p.major, p.minor), name)
    return (DENSE if pick == DENSE else name), why


def describe_delta_grad(device, N: int, K: int, k: int, dtype: torch.dtype, delta_grad: str = "auto",
                        backend: str | None = None) -> str:
    """How a layer of weight [N, K] (dtype: its inputs') with k deltas forms their gradient on `device`
    (fusedtune.report)."""
    name = _backend.explain("sddmm", torch.device(device), _SDDMM_HAS, backend)["backend"]
    run, why = choose_delta_grad(delta_grad, name, backend, N, K, None, k, dtype, device)
    sparse = f"SDDMM at the {k} positions ({name})"
    if run != DENSE:
        return sparse if why in (NO_GPU_KERNEL, "") else f"{sparse} ({why})"
    dense = f"dW in float32 blocks of <= {DENSE_BLOCK_BYTES >> 20} MiB, gathered at the {k} positions"
    if delta_grad == DENSE:
        return f"{dense} ({why})"
    return f"{dense} from {DENSE_MIN_TOKENS} tokens a call ({why}), {sparse} below"


def dense_fp32_dw(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float32 dy^T x for 2-D dy [T, N], x [T, K] (16-bit inputs on CUDA: accumulated and written in float32
    by one GEMM; float32 inputs: torch's float32 matmul, TF32 where torch's matmul precision allows it;
    float64 inputs: computed in float64, then rounded)."""
    if dy.is_cuda and dy.dtype == x.dtype and dy.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    acc = torch.promote_types(torch.promote_types(dy.dtype, x.dtype), torch.float32)
    return (dy.t().to(acc) @ x.to(acc)).float()


def _dense_delta_grad(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """g = (dy^T x).flatten()[indices] in float32, dW formed DENSE_BLOCK_BYTES at a time (blocks of rows;
    no host sync: each block writes the entries inside it)."""
    N, K = dy.shape[1], x.shape[1]
    rows = max(1, DENSE_BLOCK_BYTES // (4 * max(1, K)))
    if rows >= N:
        return dense_fp32_dw(dy, x).view(-1).index_select(0, indices)
    out = torch.empty(indices.shape, dtype=torch.float32, device=dy.device)
    flat = indices.long()      # (r0 * K may pass 2**31 for a weight of more than 2**31 elements)
    for r0 in range(0, N, rows):
        n = (min(N, r0 + rows) - r0) * K
        dw = dense_fp32_dw(dy[:, r0:r0 + rows], x).view(-1)
        local = flat - r0 * K
        inside = (local >= 0) & (local < n)
        torch.where(inside, dw.index_select(0, local.clamp_(0, n - 1)), out, out=out)
    return out


def _sddmm_impl(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "reference":
        return ref.sddmm(dy, x, indices)
    if backend == DENSE:
        return _dense_delta_grad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), indices)
    dy2, x2 = dy.reshape(-1, dy.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]).contiguous()
    if backend == "triton":
        from ..triton_kernels import sparse_delta as tk
        return tk.sddmm(dy2, x2, indices.contiguous())     # (read as indices + i)
    return torch.ops.fusedtune.sddmm_kernel(dy2, x2, indices.contiguous(), _device_plan(dy2, x2, indices))


_sddmm_op = torch.library.custom_op("fusedtune::sddmm", mutates_args=())(_sddmm_impl)
_sddmm = EagerOp(_sddmm_op, _sddmm_impl)


@_sddmm_op.register_fake
def _(dy, x, indices, backend):
    return x.new_empty((indices.shape[0],), dtype=torch.float32)


def sddmm(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, backend: str | None = None,
          check: bool = True, schedule: str = "sddmm") -> torch.Tensor:
    """g[i] = sum over tokens of dy[t, r_i] * x[t, c_i] for flat indices r_i * in + c_i.
    schedule: "sddmm" (the backend's SDDMM kernel), "dense" (dW in float32 blocks, gathered) or "auto"
    (dense where delta_grad_schedule says it is faster: on a GPU, backend left on auto)."""
    check_delta_grad(schedule, "sddmm")
    check_linear_shapes("sddmm", x, dy=dy)
    if dy.shape[:-1] != x.shape[:-1] or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"sddmm: dy {tuple(dy.shape)} {dy.dtype} and x {tuple(x.shape)} {x.dtype} must share "
                         "leading dims, dtype and device")
    if check:
        check_indices(indices, dy.shape[-1] * x.shape[-1], "sddmm")
    name = _backend.resolve("sddmm", x.device, _SDDMM_HAS, backend)
    if schedule != DENSE:      # (the dense schedule takes float64 itself)
        name = _float64_backend(name, x.dtype, backend)
    T = x.numel() // max(1, x.shape[-1])
    run, _ = choose_delta_grad(schedule, name, backend, dy.shape[-1], x.shape[-1], T, indices.numel(), x.dtype,
                               x.device)
    return _sddmm(dy, x, indices, run)


def _float64_backend(name: str, dtype: torch.dtype, backend: str | None) -> str:
    """The SDDMM kernels take 16/32-bit floats; float64 runs on the reference: taken on 'auto' (said once),
    refused where a kernel backend was asked for."""
    if dtype != torch.float64 or name == "reference":
        return name
    if _backend.requested(backend) != "auto":
        raise TypeError(f"sddmm: the {name} kernels take float32/bfloat16/float16 tensors, not float64 (float64 "
                        "runs on backend='reference')")
    _backend.warn_once(("sddmm", "float64"), "fusedtune: sddmm on float64 tensors runs the PyTorch reference "
                                             "(the kernels take float32/bfloat16/float16)")
    return "reference"


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return F.linear(x, weight, bias)


_linear_op = torch.library.custom_op("fusedtune::sparse_delta_linear", mutates_args=())(_linear_impl)


@_linear_op.register_fake
def _(x, weight, values, indices, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, values, indices, bias, backend = inputs
    ctx.save_for_backward(x, weight, indices)
    ctx.backend = backend


def _backward(ctx, dy):
    refuse_double_backward("sparse_delta_linear", ctx, 2, "deltas")
    x, weight, indices = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dense_weight_grad(dy, x) if ctx.needs_input_grad[1] else None   # a base the caller trains too
    dv = _sddmm(dy, x, indices, ctx.backend) if ctx.needs_input_grad[2] else None
    db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[4] else None
    return dx, dw, dv, None, db, None


torch.library.register_autograd("fusedtune::sparse_delta_linear", _backward, setup_context=_setup)
_linear = EagerOp(_linear_op, _linear_impl, _setup, _backward)


def sparse_delta_linear(x, weight, values, indices, bias=None, backend: str | None = None,
                        check: bool = True, delta_grad: str = "auto") -> torch.Tensor:
    """Linear layer over a merged weight whose trainable part is k float32 deltas at `indices`.
    check=False skips the host-side check of the index values (callers that checked them once).
    delta_grad: how the deltas' gradient is formed, "sddmm", "dense" or "auto" (sddmm()'s `schedule`)."""
    check_delta_grad(delta_grad, "sparse_delta_linear")
    check_linear_shapes("sparse_delta_linear", x, weight, bias)
    if values.dtype != torch.float32 or values.shape != indices.shape:
        raise ValueError(f"sparse_delta_linear: values must be float32 of shape {tuple(indices.shape)}, got "
                         f"{values.dtype} {tuple(values.shape)}")
    check_one_device("sparse_delta_linear", x, weight, values, indices, bias)
    if check:
        check_indices(indices, weight.numel(), "sparse_delta_linear")
    name = _backend.resolve("sddmm", x.device, _SDDMM_HAS, backend)
    if delta_grad != DENSE:    # (the dense schedule takes float64 itself)
        name = _float64_backend(name, x.dtype, backend)

    def call(x_, w_, b_):   # under autocast x_ is the cast input: the schedule is picked for its dtype
        run, _ = choose_delta_grad(delta_grad, name, backend, weight.shape[0], weight.shape[1],
                                   x_.numel() // max(1, x_.shape[-1]), indices.numel(), x_.dtype, x_.device)
        return _linear(x_, w_, values, indices, b_, run)
    return _autocast.linear_call(call, x, weight, bias)


def _adamw_impl(values: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], weights: list[torch.Tensor], bases: list[torch.Tensor],
                indices: list[torch.Tensor], steps: list[torch.Tensor], consts: list[float], backend: str) -> None:
    if backend == "reference":
        ref.sparse_adamw_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps or [None] * len(values),
                          dict(zip(CONST_KEYS, consts)), lr=consts[8], step=int(consts[9]))
    else:
        torch.ops.fusedtune.sparse_adamw_kernel_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps,
                                                 consts)


_adamw_op = torch.library.custom_op(
    "fusedtune::sparse_adamw_", mutates_args=("values", "exp_avgs", "exp_avg_sqs", "weights", "steps"))(_adamw_impl)
_adamw = EagerOp(_adamw_op, _adamw_impl, mutated=(0, 2, 3, 4, 7))   # direct in plain eager mode


@_adamw_op.register_fake
def _(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, consts, backend):
    return None


if _ext.loaded():
    @torch.library.register_fake("fusedtune::sparse_adamw_kernel_")
    def _(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, consts):
        return None

    @torch.library.register_fake("fusedtune::sddmm_kernel")
    def _(dy, x, indices, plan):
        return x.new_empty((indices.shape[0],), dtype=torch.float32)


def _check_adamw_lists(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, dev, check_idx,
                       distinct: bool = True):
    """What the kernels check, the index values (check_idx) and (distinct) that an entry's tensors share no
    memory (the Python-side check; SparseDeltaAdamW's own lists skip it)."""
    check_writable("sparse_adamw_", zip(values, exp_avgs, exp_avg_sqs, weights, steps))
    for i, (val, g, m, v, w, b, idx) in enumerate(zip(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices)):
        for what, t in (("values", val), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if t.dtype != torch.float32 or t.shape != idx.shape or not t.is_contiguous() or t.device != dev:
                raise ValueError(f"sparse_adamw_: {what}[{i}] must be contiguous float32 of shape "
                                 f"{tuple(idx.shape)} on {dev}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if distinct:
            check_distinct("sparse_adamw_", i, val, g, m, v, w, b)
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16) or b.dtype != w.dtype or b.shape != idx.shape:
            raise ValueError(f"sparse_adamw_: weights[{i}] ({w.dtype}) and bases[{i}] ({b.dtype}, "
                             f"{tuple(b.shape)}) must share a float dtype, bases one value per index")
        if not (w.is_contiguous() and b.is_contiguous()) or w.device != dev or b.device != dev:
            raise ValueError(f"sparse_adamw_: weights[{i}] and bases[{i}] must be contiguous, on {dev}")
        st = steps[i]
        if st is not None and (st.dtype != torch.int32 or st.shape != idx.shape or not st.is_contiguous()
                               or st.device != dev):
            raise ValueError(f"sparse_adamw_: steps[{i}] must be None or contiguous int32 of shape "
                             f"{tuple(idx.shape)} on {dev}, got {st.dtype} {tuple(st.shape)} on {st.device}")
        if check_idx:
            check_indices(idx, w.numel(), "sparse_adamw_")


def sparse_adamw_(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, step: int, steps=None, backend: str | None = None,
                  check: bool = True) -> None:
    """One AdamW step on float32 deltas (in place) and the scatter of round(base + delta) into the
    merged weights. check=False (SparseDeltaAdamW: the layers checked their indices, the optimizer built the
    lists) skips the host-side index check and, on the extension's kernels (which check every tensor's dtype,
    size, layout and device themselves before changing anything), the per-tensor Python checks.

    steps: None, or one entry per tensor: None or an int32 tensor of per-element step counts (shaped
    like the deltas). The kernel adds 1 to each count; an entry whose new count equals `step` takes
    the step's bias corrections (computed on the host in float64, rounded once), any other count n its
    own, in float32: sqrt(1 - beta2^n) and lr / (1 - beta1^n) with beta^n by binary exponentiation of
    the rounded betas (docs/sparse_delta.md, "Per-element bias correction")."""
    n = len(values)
    if not n:
        return
    steps = [None] * n if steps is None else list(steps)
    if not all(len(v) == n for v in (grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps)):
        raise ValueError("sparse_adamw_: the lists differ in length")
    check_hparams("sparse_adamw_", lr, beta1, beta2, eps, weight_decay, step)
    dev = values[0].device
    name = _backend.resolve("sparse_adamw_", dev, _ADAMW_HAS, backend)
    # check=False from a caller that built the lists itself (SparseDeltaAdamW): the extension's kernels check
    # every tensor again (sparse_delta_checks.h), so the per-tensor Python checks run for the reference only
    if check or name == "reference":
        _check_adamw_lists(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps, dev, check)
    c = adamw_constants(lr, beta1, beta2, eps, weight_decay, step)
    # no counts anywhere: an empty list (one empty tensor per entry would be 56 allocations a step for 8 layers)
    steps = [] if all(st is None for st in steps) else \
        [torch.empty(0, dtype=torch.int32, device=dev) if st is None else st for st in steps]   # none: empty
    with torch.no_grad():
        _adamw(list(values), list(grads), list(exp_avgs), list(exp_avg_sqs), list(weights), list(bases),
                  list(indices), steps,
                  [c[k] for k in CONST_KEYS] + [float(lr), float(step)], name)


def sparse_delta_backend(device, backend: str | None = None) -> dict:
    """Which backends the sparse-delta ops take on `device` and why the others were not taken."""
    d = torch.device(device)
    return {"sddmm": _backend.explain("sddmm", d, _SDDMM_HAS, backend),
            "sparse_adamw_": _backend.explain("sparse_adamw_", d, _ADAMW_HAS, backend)}
