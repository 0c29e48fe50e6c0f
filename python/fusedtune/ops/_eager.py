"""Eager calls of fusedtune's torch.library ops without the dispatcher's Python glue.

Every fusedtune op is a torch.library custom op (schema, fake impl, register_autograd), and that op is
what torch.compile, torch.export, torch.jit.trace, fake tensors, functorch transforms, dispatch and
function modes and autocast see and call. In plain eager mode the glue costs more than a small GEMM: on
every call of an op with autograd, torch 2.14 rebuilds the op's argument list once per argument
(torch._library.utils.fill_defaults reads schema.arguments, a fresh list, inside its loop: quadratic in
the argument count; ~180 us for lora_linear's 18 arguments on this repository's CPU), and the dispatch
itself adds ~25 us.

`EagerOp(op, impl, setup_context, backward)` calls the op's own implementation, setup_context and backward
functions (the ones registered with torch.library) directly, through a torch.autograd.Function when an
input needs a gradient, whenever nothing needs the dispatcher (`direct`). The math, the saved tensors
and the gradients are the op's; tests compare both routes (`dispatcher_only()` forces the op's).
FUSEDTUNE_EAGER_OPS=0 (read at import) turns the direct route off for the process.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .._env import env_flag

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_PYTHON_KEY = torch._C.DispatchKey.Python
_state = threading.local()
_ON = env_flag("FUSEDTUNE_EAGER_OPS", True)   # read at import


@contextlib.contextmanager
def dispatcher_only():
    """Every fusedtune op call in this scope (this thread) goes through torch.ops (tests, benchmarks)."""
    prev = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = prev


def direct(args) -> bool:
    """May a call with these arguments skip the dispatcher? Only in plain eager mode: not compiling,
    exporting or jit-tracing, no dispatch or function mode, no functorch transform, no autocast, every
    tensor a plain tensor, a Parameter or a subclass without __torch_dispatch__ (in lists too: the multi-tensor
    ops), and off the meta device."""
    if torch.compiler.is_compiling() or not _ON or _state.__dict__.get("off"):   # (the thread's own dict:
        # getattr with a default raises and catches AttributeError in a thread that never set it, ~0.5 us)
        return False
    if (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._is_any_autocast_enabled()
            or torch._C._get_tracing_state() is not None):    # torch.jit.trace records the op, not its body
        return False
    first = None
    for a in args:
        t = type(a)
        if t in _PLAIN:
            if first is None:
                first = a
        elif isinstance(a, torch.Tensor):
            if torch._C._dispatch_keys(a).has(_PYTHON_KEY):
                return False
            if first is None:
                first = a
        elif t is list or t is tuple:   # the element types in one C pass; elements looked at only if needed
            kinds = set(map(type, a))
            if kinds <= _PLAIN:
                if first is None and a:
                    first = a[0]
            elif any(issubclass(k, torch.Tensor) for k in kinds):
                for e in a:
                    if isinstance(e, torch.Tensor):
                        if type(e) not in _PLAIN and torch._C._dispatch_keys(e).has(_PYTHON_KEY):
                            return False
                        if first is None:
                            first = e
    return first is None or not first.is_meta   # (an op's tensors share one device; a mix fails in the op)


def _forward_ad(args) -> bool:
    """Whether forward-mode AD would go through this call: a torch.func.jvp / jacfwd transform is active, or a
    torch.autograd.forward_ad level holds a dual tensor among the arguments. Custom ops have no forward-mode
    formula, and torch gives them zero tangents without a word (torch 2.14), so the call is refused."""
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters  # noqa: PLC0415
        jvp = torch._C._functorch.TransformType.Jvp
        if any(i.key() == jvp for i in retrieve_all_functorch_interpreters()):
            return True
    if torch.autograd.forward_ad._current_level < 0:
        return False
    from torch.autograd.forward_ad import unpack_dual  # noqa: PLC0415
    tensors = [e for a in args for e in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(e, torch.Tensor)]
    return any(unpack_dual(t).tangent is not None for t in tensors)


FORWARD_AD = ("fusedtune's ops have no forward-mode derivative (torch.func.jvp / jacfwd, torch.autograd.forward_ad): "
              "torch would give them zero tangents without an error. Use reverse mode (loss.backward(), "
              "torch.autograd.grad)")


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class EagerOp:
    """A custom op called directly in plain eager mode (module docstring). op: the torch.library op;
    impl: its implementation; setup_context and backward: what register_autograd was given (None for an
    op without autograd); mutated: the positions of the arguments (tensor lists) the op writes in place,
    whose version counters a direct call bumps (one C call a list) as the op's own wrapper does (one Python
    call a tensor: ~1 us each, 280 a SparseDeltaAdamW step over 56 layers)."""

    def __init__(self, op, impl, setup_context=None, backward=None, mutated: tuple = ()):
        self.op, self.impl, self.mutated = op, impl, tuple(mutated)
        self.fn = None
        if backward is not None:
            def forward(ctx, *args):
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

            name = "Eager_" + str(getattr(op, "_qualname", impl.__name__)).replace("::", "_")
            self.fn = type(name, (torch.autograd.Function,),
                           {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
            if _forward_ad(args):     # (two cheap checks first: plain calls pay nothing more)
                raise NotImplementedError(f"{getattr(self.op, '_qualname', 'fusedtune op')}: {FORWARD_AD}")
        if not direct(args):
            return self.op(*args)
        if _needs_grad(args):
            if self.fn is not None:
                return self.fn.apply(*args)
            if not self.mutated:
                # an op without autograd (e.g. a backward's own op, run again under create_graph=True for a double
                # backward) on inputs that need a gradient: the op's route, whose outputs raise "no autograd
                # formula" if differentiated. Called directly its outputs would be constants and a double
                # backward silently wrong. (Normal forwards and backwards never get here: backward runs without
                # grad mode, and the ops called inside an autograd.Function's forward see none either.)
                return self.op(*args)
        try:
            return self.impl(*args)
        finally:                 # (also when it fails part way: what it wrote has a new version, as on the op's route)
            for i in self.mutated:   # autograd's check of saved tensors sees the writes (a kernel's are invisible)
                torch._C._increment_version(args[i])
