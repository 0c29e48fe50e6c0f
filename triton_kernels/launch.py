"""Triton launches without Triton's per-call Python work on repeated calls.

`fast(kernel)[grid](*args, **meta)` launches like `kernel[grid](*args, **meta)` (kernel a triton.jit
function or a triton.autotune of one). Triton's own path binds every argument by name, specializes each
one, hashes the result, and (autotuned) rebuilds a dict of the arguments and a key with `str(dtype)` of
every tensor, on every call: on a machine without a GPU (bench/host_profile.py --no-gpu) ~38 us of a
LoRA GEMM launch's ~49, where the launcher itself takes ~5 us.

The first call of each *launch class* goes through Triton's path (compile, autotune) and keeps the compiled
kernel Triton returned, with the argument values Triton bound after the positional ones; later calls of the
class call that compiled kernel's launcher directly. The class is a key at least as fine as everything
Triton chooses a compiled kernel by, so a later call never gets a kernel Triton would not have given it:
  - the current device, Triton's debug and instrumentation knobs, and the keyword arguments (names and
    values, in call order: constexprs, options);
  - each positional argument: a tensor's dtype and whether its address is 16-byte aligned; an int's
    equality with 1, divisibility by 16 and range (int32 / int64 / uint64) -- what Triton specializes and
    types an int by; a bool's value; a float's type; None; a constexpr's value; any other type sends the
    call down Triton's path;
  - for an autotuned kernel, the values of its key arguments (the config it tuned for them).
Falls back to Triton's path, always: under TRITON_INTERPRET=1, with Triton older than 3.6 (whose launcher
took other arguments), for kernels other than a JITFunction or an Autotuner directly over one (a
triton.heuristics wrapper computes values the class does not see), while a launch hook or a stages hook
is set (profilers), for kernels with run hooks or config pre-hooks, when the grid function reads more
than the meta-parameters, and with FUSEDTUNE_FAST_LAUNCH=0 (read at import). On the first call of a class
it checks its argument list against Triton's own binding and the compiled kernel's constexprs, warps and
stages against that list and the tuned config (another thread may have retuned in between).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import triton
from triton.runtime import driver

from fusedtune._env import env_flag, interpreting

try:
    from triton import knobs
except ImportError:          # a Triton without knobs (the fast path is off below 3.6 anyway)
    knobs = None

_ENV = "FUSEDTUNE_FAST_LAUNCH"
_MAX_CLASSES = 4096          # launch classes kept a kernel (then the cache starts over)


def _version_ok() -> bool:
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 6)


ENABLED = (env_flag(_ENV, True) and not interpreting() and _version_ok()
           and knobs is not None)
_SLOW = object()             # a class that always takes Triton's path
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_I32_LO, _I32_HI, _U64_LO = -2**31, 2**31, 2**63


def _hook_empty(hook) -> bool:
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def _arg_class(args):
    """The per-argument part of the launch class (module docstring), or None: an argument Triton's path
    must see."""
    key = []
    add = key.append
    for a in args:
        t = type(a)
        if t is int:
            add(-1 if a == 1 else (a & 15 == 0) + 2 * (_I32_LO <= a < _I32_HI) + 4 * (a >= _U64_LO))
        elif t is _Tensor or t is _Parameter or isinstance(a, _Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        elif t is float:
            add(float)
        elif t is bool:
            add("T" if a else "F")
        elif a is None:
            add(None)
        else:
            return None
    return key


class FastKernel:
    """A kernel launched through a cache of its compiled kernels (module docstring). Other attributes are
    the wrapped kernel's."""

    def __init__(self, kernel):
        """kernel: a JITFunction or an Autotuner directly over one (fast() leaves any other kind, e.g. a
        triton.heuristics wrapper whose values the class would not see, to Triton's path)."""
        self.kernel = kernel
        self.tuned = isinstance(kernel, triton.runtime.Autotuner)
        jit = kernel.fn if self.tuned else kernel
        if not isinstance(jit, triton.runtime.JITFunction):
            raise TypeError(f"fast launch: {type(kernel).__name__} over {type(jit).__name__}")
        self.jit = jit
        self.names = [p.name for p in jit.params]
        self.defaults = {p.name: p.default for p in jit.params if p.default is not inspect.Parameter.empty}
        self.tune_idx = [self.names.index(k) for k in kernel.keys] if self.tuned else []
        consts = [i for i, p in enumerate(jit.params) if p.is_constexpr]
        self.first_const = consts[0] if consts else len(self.names)   # positional constexprs key by value
        self.consts = consts
        self.cache = {}
        self.stats = {"fast": 0, "triton": 0}

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta):
        if not ENABLED:
            return self.kernel[grid](*args, **meta)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if not (_hook_empty(enter) and _hook_empty(leave)) or self.jit.pre_run_hooks:
            return self._triton(grid, args, meta, None)
        cls = _arg_class(args)
        if cls is None:
            return self._triton(grid, args, meta, None)
        if len(args) > self.first_const:  # a constexpr passed by position: Triton compiles for its value
            cls.append(tuple((type(a), a) for a in args[self.first_const:]))
        rt = knobs.runtime
        if rt.add_stages_inspection_hook is not None:
            return self._triton(grid, args, meta, None)
        drv = driver.active
        device = drv.get_current_device()
        cls.append(device)
        cls.append(rt.debug)             # what Triton's own compile key takes from its knobs
        cls.append(knobs.compilation.instrumentation_mode)
        cls.append(tuple(meta.items()))
        for i in self.tune_idx:
            if i < len(args):            # (a key argument passed by keyword is in meta)
                cls.append(args[i])
        key = tuple(cls)
        try:
            hit = self.cache.get(key)
        except TypeError:                # an unhashable keyword argument
            return self._triton(grid, args, meta, None)
        if hit is None:
            return self._triton(grid, args, meta, key)
        if hit is _SLOW:
            return self._triton(grid, args, meta, None)
        ck, tail, gmeta = hit
        if callable(grid):
            try:
                g = grid(gmeta)
            except Exception:  # noqa: BLE001 -- this call's grid function reads more than the meta-parameters
                return self._triton(grid, args, meta, None)
        else:
            g = grid
        n = len(g)
        try:
            ck.run(g[0], g[1] if n > 1 else 1, g[2] if n > 2 else 1, drv.get_current_stream(device), ck.function,
                   ck.packed_metadata, None, enter, leave, *args, *tail)
        except (TypeError, AttributeError) as e:   # a launcher that takes other arguments (raised before it
            # launches): Triton's path from now on, said once. (Other errors, e.g. a CPU tensor, are Triton's too.)
            self.cache[key] = _SLOW
            warnings.warn(f"fusedtune: the fast launch of {self.jit.__name__} failed ({type(e).__name__}: {e}); "
                          f"it takes Triton's own launch path from now on ({_ENV}=0 turns the fast path off)")
            return self._triton(grid, args, meta, None)
        self.stats["fast"] += 1
        return ck

    def _triton(self, grid, args, meta, key):
        """Triton's own launch; with a key, keep what a later call of the class needs."""
        self.stats["triton"] += 1
        ck = self.kernel[grid](*args, **meta)
        if key is None:
            return ck
        if hasattr(ck, "result"):        # a compile future
            ck = ck.result()
        if len(self.cache) >= _MAX_CLASSES:
            self.cache.clear()
        self.cache[key] = self._entry(ck, grid, args, meta)
        return ck

    def _entry(self, ck, grid, args, meta):
        """(ck, tail, gmeta) for later calls of the class, or _SLOW where something does not check out."""
        try:
            config = self.kernel.best_config if self.tuned else None
            if ck is None or (config is not None and config.pre_hook is not None):
                return _SLOW
            gmeta = dict(meta, **(config.all_kwargs() if config is not None else {}))
            if callable(grid):
                grid(gmeta)
            tail = [gmeta[n] if n in gmeta else self.defaults[n] for n in self.names[len(args):]]
            full = list(args) + tail
            bound = self._bound(args, gmeta)
            if len(bound) != len(full) or any(b is not a for b, a in zip(bound, full)):
                return _SLOW
            if not self._compiled_for(ck, full, config):
                return _SLOW
        except Exception:  # noqa: BLE001 -- a grid reading more than meta, a Triton without this binder: slow
            return _SLOW
        return ck, tail, gmeta

    def _compiled_for(self, ck, full, config) -> bool:
        """Was ck compiled for these constexpr values and this config's warps and stages? (Another thread's
        autotuning may have changed best_config between the launch and reading it.)"""
        consts = getattr(ck.src, "constants", None) or {}
        for i in self.consts:
            for k in ((i,), self.names[i], i):
                if k in consts:
                    if consts[k] != full[i]:
                        return False
                    break
        if config is not None:
            md = ck.metadata
            if getattr(md, "num_warps", config.num_warps) != config.num_warps or getattr(
                    md, "num_stages", config.num_stages) != config.num_stages:
                return False
        return True

    def _bound(self, args, gmeta):
        """Triton's own binding of the call's arguments (values in parameter order; raises where this Triton
        keeps its binder elsewhere, and the class then takes Triton's path)."""
        caches = self.jit.device_caches[driver.active.get_current_device()]
        bound_args, _spec, _options = caches[4](*args, **gmeta)
        return list(bound_args.values())


@contextlib.contextmanager
def triton_path():
    """Every launch in the scope (all threads) takes Triton's own path: benchmarks time what the fast path
    saves (bench rows "... through Triton's own launch path")."""
    global ENABLED
    prev, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = prev


_FAST: dict = {}


def fast(kernel):
    """The FastKernel of `kernel` (one per kernel object); the kernel itself where the fast path is off."""
    if not ENABLED:
        return kernel
    f = _FAST.get(id(kernel))    # (by id: a JITFunction hashes its source; the entry keeps the kernel alive)
    if f is None:
        try:
            f = FastKernel(kernel)
        except Exception:  # noqa: BLE001 -- a kind of kernel the fast path does not serve: Triton's path
            f = kernel
        _FAST[id(kernel)] = f
    return f
