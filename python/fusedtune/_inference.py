"""Caches built during a torch.inference_mode forward (an evaluation or a generate() between training
steps) must hold normal tensors: an inference tensor that a later training forward saves for backward
raises "Inference tensors cannot be saved for backward", on every step from then on."""
from __future__ import annotations

import contextlib
import functools

import torch

_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def _normal():
    with torch.inference_mode(False), torch.no_grad():   # (inference_mode(False) alone turns grad mode on)
        yield


def cache_scope():
    """A scope whose new tensors are normal tensors, not inference tensors, and record no autograd graph
    (nothing to do outside inference mode)."""
    if torch.compiler.is_compiling():   # (dynamo cannot trace is_inference_mode_enabled; a graph runs no cache)
        return _NULL
    return _normal() if torch.is_inference_mode_enabled() else _NULL


def outside_inference(fn):
    """fn (a cache's builder) run in cache_scope()."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cache_scope():
            return fn(*args, **kwargs)
    return wrapper


def version(t: torch.Tensor):
    """t._version, or for an inference tensor (a layer built under torch.inference_mode; it has no version
    counter) a new object, equal to nothing: a check keyed on it takes its slow, exact path every time."""
    return object() if t.is_inference() else t._version


class Stamp:
    """Which tensors, at which versions: a layer's record that its weight holds its masters' current values.
    matches(*ts) needs the very same tensors (not only equal version counters: a master swapped for a new tensor,
    by functional_call or by assigning a new Parameter, starts at the old one's version) at the same versions.
    It holds the tensors themselves (a weak reference would block torch.utils.swap_tensors, which the swap
    conversion mode uses on the masters; the layer holds them anyway, and a replaced one only until the next
    check). A pickled or deep-copied stamp matches nothing, so the copy checks its weight once, exactly.
    The data pointer counts too: `p.data = new` (torch.nn.utils.vector_to_parameters, hand-written updates) keeps
    the tensor and its version but changes its memory. An in-place write through `.data` (p.data.add_(...)) moves
    neither and stays invisible: tell the layer (masters_written_elsewhere()).
    """
    __slots__ = ("_ts", "_versions")

    def __init__(self, *ts: torch.Tensor):
        self._ts = ts
        self._versions = tuple((version(t), t.data_ptr()) for t in ts)

    def matches(self, *ts: torch.Tensor) -> bool:
        # (a plain loop: checked on every forward of the layers, ~1 us; generators took 3-5)
        if len(ts) != len(self._ts):
            return False
        for a, b, (v, ptr) in zip(self._ts, ts, self._versions):
            if a is not b or version(b) != v or b.data_ptr() != ptr:
                return False
        return True

    def __reduce__(self):
        return (Stamp, ())
