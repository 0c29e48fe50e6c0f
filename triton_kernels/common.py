"""Pieces shared by the Triton GEMM kernels of several families."""
from __future__ import annotations

import os
import zlib

import triton
import triton.language as tl

AUTOTUNE_ENV = "FUSEDTUNE_AUTOTUNE"
AUTOTUNE_MODES = ("full", "one")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints on the host. (Not triton.cdiv: triton 3.6 makes it a constexpr_function, whose
    call unwraps its arguments -- 34 such calls cost ~0.25 ms of profiled host time in one LoRA layer's
    forward+backward on an H200's host.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1) on the host (not triton.next_power_of_2, a constexpr_function
    since triton 3.6: ~8 us of profiled host time a call)."""
    return 1 << (n - 1).bit_length()


def autotune_mode() -> str:
    """FUSEDTUNE_AUTOTUNE: "full" (default) times every config once per key; "one" takes one config per
    kernel variant without timing (the GPU tests: correctness needs no tuning, and each variant then
    compiles once instead of once per config)."""
    mode = os.environ.get(AUTOTUNE_ENV, "full") or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}: expected one of {AUTOTUNE_MODES}")
    return mode


def variant_config(configs, nargs, **meta):
    """The one config of FUSEDTUNE_AUTOTUNE=one: picked by a stable hash (crc32) of the launch's variant
    (its tensors' dtypes and its bool/str meta-parameters), so one variant keeps one config for every
    shape it meets (one compile) and different variants spread over the configs."""
    sig = [str(v.dtype) for v in nargs.values() if hasattr(v, "dtype")]
    sig += [str(v.dtype) if hasattr(v, "dtype") else f"{k}={v}" for k, v in sorted(meta.items())
            if hasattr(v, "dtype") or isinstance(v, (bool, str))]
    return [configs[zlib.crc32(repr(sig).encode()) % len(configs)]]


def _untimed(kernel_call, quantiles):
    return [0.0 for _ in quantiles]


def autotune(configs: list, key: list, **kwargs):
    """triton.autotune(configs, key), except under FUSEDTUNE_AUTOTUNE=one (autotune_mode)."""
    if autotune_mode() == "one" and len(configs) > 1:
        kwargs.update(prune_configs_by={"early_config_prune": variant_config}, do_bench=_untimed)
    return triton.autotune(configs=configs, key=key, **kwargs)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles share their column tiles while
    those are in L2 (the usual super-grouping of a GEMM's output tiles)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def gemm_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    """(pid_n, offs_m, offs_n, offs_k, m_ok, n_ok) of output tile `pid` (grouped order) of an M x N GEMM."""
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N
