"""triton_kernels/launch.py: a launch through fast() gets the compiled kernel and the launcher arguments that
Triton's own path gives the same call, for every argument property Triton specializes on.

Runs without a GPU: fusedtune.bench.nogpu_driver compiles these test kernels for sm_90 (ptxas) and records
each launch instead of running it. (tests/test_triton_launch_gpu.py runs the fast path on a GPU.)
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fusedtune._env import interpreting
from fusedtune.bench import nogpu_driver
from fusedtune.triton_kernels import launch as L
from launch_cases import axpy as _axpy

pytestmark = pytest.mark.skipif(interpreting() or not L.ENABLED,
                                reason="compiles real Triton kernels (not in the interpreter)")


_FAVOURED = {"num_warps": 2}      # the config the test's benchmark times fastest (set per call)


def _bench(kernel_call, quantiles=None, **kw):
    kernel_call()
    fast = nogpu_driver.last_launch["num_warps"] == _FAVOURED["num_warps"]
    return [1.0 if fast else 2.0] * len(quantiles)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
                 key=["n"], do_bench=_bench)
@triton.jit
def _tuned(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


def _buf(n, dtype=torch.float32, offset=0):
    return torch.zeros(n + offset, dtype=dtype)[offset:]


def _same_launch(kernel, grid, args, meta):
    """Launch the call through Triton's path and through fast() (twice: the second is served from the cache
    when the first filled it); both must give the same compiled kernel and launcher arguments."""
    ref_ck = kernel[grid](*args, **meta)
    ref = dict(nogpu_driver.last_launch)
    for _ in range(2):
        ck = L.fast(kernel)[grid](*args, **meta)
        got = dict(nogpu_driver.last_launch)
        assert ck is ref_ck
        assert got["grid"] == ref["grid"]
        assert len(got["args"]) == len(ref["args"])
        assert all(a is b or a == b for a, b in zip(got["args"], ref["args"]))


# each call differs from the one before in one thing Triton specializes on (or not)
_VARIANTS = [
    dict(),
    dict(n=16),                      # an int divisible by 16
    dict(n=1),                       # an int equal to 1 becomes a constant
    dict(n=2**31 + 16),              # int64
    dict(stride=16),
    dict(stride=1),
    dict(seed=1),                    # not specialized: same kernel as seed=7
    dict(seed=2**40),                # but typed: int64
    dict(seed=-2**63),
    dict(seed=2**63 + 5),            # uint64
    dict(x_offset=1),                # a 4-byte aligned pointer
    dict(out_offset=2),
    dict(dtype=torch.bfloat16),
    dict(alpha=2.5),                 # floats are not specialized
    dict(FLAG=False),
    dict(BLOCK=256),
    dict(num_warps=8),
]


def _call(n=100, stride=3, seed=7, x_offset=0, out_offset=0, dtype=torch.float32, alpha=1.5, FLAG=True,
          BLOCK=128, num_warps=None):
    x, y, out = _buf(400, dtype, x_offset), _buf(400, dtype), _buf(400, dtype, out_offset)
    meta = dict(FLAG=FLAG, BLOCK=BLOCK)
    if num_warps is not None:
        meta["num_warps"] = num_warps
    return (x, y, out, n, stride, seed, alpha), meta


def test_fast_launch_matches_triton_for_every_specialization():
    with nogpu_driver.active():
        fk = L.fast(_axpy)
        before = dict(fk.stats)
        for v in _VARIANTS + _VARIANTS[::-1]:
            args, meta = _call(**v)
            _same_launch(_axpy, (4,), args, meta)
        assert fk.stats["fast"] - before["fast"] >= len(_VARIANTS)   # the cache served the repeats
        assert L._SLOW not in fk.cache.values()


def test_fast_launch_autotuned_keeps_the_config_per_key():
    grid = lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)  # noqa: E731
    with nogpu_driver.active():
        for n in (1000, 1001, 1000, 64, 1001):     # 1000 and 64 tune to BLOCK 64, 1001 to BLOCK 128
            _FAVOURED["num_warps"] = 4 if n % 2 else 2
            x, out = _buf(1100), _buf(1100)
            _same_launch(_tuned, grid, (x, out, n), {})
            assert nogpu_driver.last_launch["grid"][0] == triton.cdiv(1000, 128 if n % 2 else 64)
        assert L._SLOW not in L.fast(_tuned).cache.values()


def test_fast_launch_falls_back_where_it_cannot_serve():
    from triton import knobs
    with nogpu_driver.active():
        args, meta = _call()
        fk = L.fast(_axpy)
        fk[(4,)](*args, **meta)
        hook = lambda *a, **k: None  # noqa: E731
        if hasattr(knobs.runtime.launch_enter_hook, "add"):
            knobs.runtime.launch_enter_hook.add(hook)
            undo = lambda: knobs.runtime.launch_enter_hook.remove(hook)  # noqa: E731
        else:
            prev = knobs.runtime.launch_enter_hook
            knobs.runtime.launch_enter_hook = hook
            undo = lambda: setattr(knobs.runtime, "launch_enter_hook", prev)  # noqa: E731
        try:
            before = fk.stats["triton"]
            fk[(4,)](*args, **meta)        # a profiler's hook sees every launch: Triton's path
            assert fk.stats["triton"] == before + 1
        finally:
            undo()
        # a grid function that reads a non-meta argument: that class always takes Triton's path
        fk2 = L.fast(_tuned)
        x, out = _buf(300), _buf(300)
        grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
        for _ in range(2):
            _same_launch(_tuned, grid, (x, out, 300), {})
        assert L._SLOW in fk2.cache.values()
        # an argument of a type the class does not cover
        before = fk.stats["triton"]
        args2 = args[:3] + (np.int64(100),) + args[4:]
        for _ in range(2):
            try:
                fk[(4,)](*args2, **meta)
            except Exception:  # noqa: BLE001 -- whether Triton takes a numpy int is Triton's business
                pass
        assert fk.stats["triton"] == before + 2


def test_fast_launch_keys_positional_constexprs_and_debug_and_refuses_heuristics():
    from triton import knobs
    with nogpu_driver.active():
        for block in (128, 256, 128):          # FLAG and BLOCK passed by position: keyed by their values
            x, y, out = _buf(400), _buf(400), _buf(400)
            _same_launch(_axpy, (4,), (x, y, out, 100, 3, 7, 1.5, True, block), {})
        args, meta = _call()
        prev = knobs.runtime.debug
        try:
            for debug in (True, False):        # Triton compiles another kernel under its debug knob
                knobs.runtime.debug = debug
                _same_launch(_axpy, (4,), args, meta)
        finally:
            knobs.runtime.debug = prev
    heur = triton.heuristics({"BLOCK": lambda a: 64 if a["n"] % 64 == 0 else 128})(_tuned.fn)
    assert L.fast(heur) is heur                # values a heuristic computes are not in the class: Triton's path


def test_triton_path_scope_turns_the_fast_path_off_and_back_on():
    with nogpu_driver.active():
        fk = L.fast(_axpy)
        args, meta = _call()
        fk[(4,)](*args, **meta)
        before = dict(fk.stats)
        with L.triton_path():
            assert L.fast(_axpy) is _axpy
            fk[(4,)](*args, **meta)                 # a FastKernel taken before the scope: Triton's path too
        assert fk.stats == before
        fk[(4,)](*args, **meta)
        assert L.fast(_axpy) is fk and fk.stats["fast"] == before["fast"] + 1
