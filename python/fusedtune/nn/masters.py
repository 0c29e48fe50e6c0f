"""Float32 masters under dtype conversions: `model.to(torch.bfloat16)`, `.half()` and the like cast every
floating Parameter, and would round the float32 truth of a fusedtune layer (SparseDeltaLinear's deltas,
RowMaskedLinear's row masters) to the model's dtype, losing exactly what the master exists to keep.
Layers route nn.Module._apply through keep_dtype: masters (and their gradients) follow device moves and
keep their dtype.

The fused optimizers (MaskedAdamW, SparseDeltaAdamW) also write a master's layer (its merged weight) in
their pass, so they look up the layer that owns a master: `bind_owner` / `owner_of`. The link lives in a
registry keyed by the Parameter's identity, not in an attribute of the Parameter: an attribute was lost
by a deep copy (the copy's optimizer stopped writing the weight) and made torch.save of the model fail
(a weak reference cannot be pickled). Layers bind their masters when they make them, when the layer is copied or
unpickled (__setstate__) and when a load assigns new Parameters (load_state_dict(assign=True)).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

_OWNERS = WeakIdKeyDictionary()   # master Parameter -> weakref to its layer


def bind_owner(layer: torch.nn.Module, *masters) -> None:
    """Record `layer` as the owner of each master (None entries skipped)."""
    for p in masters:
        if p is not None:
            _OWNERS[p] = weakref.ref(layer)


def owner_of(p: torch.Tensor):
    """The live layer that bound `p` as its master, or None."""
    ref = _OWNERS.get(p)
    return ref() if ref is not None else None


_STEPS = [0]   # optimizer steps taken in this process (any torch.optim.Optimizer; the hook below counts them)


def optimizer_steps() -> int:
    """How many optimizer steps ran in this process: a cache of something computed from parameters (LoRALinear's
    DoRA norms) keys on it, as torch's fused AdamW writes parameters without bumping their version counters."""
    return _STEPS[0]


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """A global optimizer step post-hook: an optimizer other than the fused ones (which write the layers' merged
    copies in their pass) stepped some layer's masters. The layers notice writes by the masters' version
    counters, which torch's fused AdamW (transformers.Trainer's default optim, adamw_torch_fused) does not
    bump: without this its training never reached the forward, silently. Each such layer checks its merged
    copy against its masters and writes it again now (masters_written_elsewhere), not at its next forward: a
    compiled forward (torch.compile, Trainer's torch_compile=True) skips that check, and training through it
    did nothing, silently."""
    _STEPS[0] += 1
    if not _OWNERS or getattr(optimizer, "writes_master_layers", False):
        return
    layers = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = owner_of(p)
            if layer is not None:
                layers[id(layer)] = layer
    if not layers:
        return
    with torch.no_grad():
        for layer in layers.values():
            layer.masters_written_elsewhere()


register_optimizer_step_post_hook(_after_optimizer_step)


class OwnsMasters(torch.nn.Module):
    """A layer with float32 masters (master_parameters()) that stays their owner when it is copied or
    unpickled (__setstate__) and when a load assigns new Parameters; set_* methods call bind_masters()."""

    def master_parameters(self) -> list:
        raise NotImplementedError

    def masters_written_elsewhere(self) -> None:
        """Another optimizer stepped the masters, perhaps without bumping their versions: check the layer's
        merged copy against them and write it if they changed (what an eager forward does first)."""

    def bind_masters(self) -> None:
        bind_owner(self, *self.master_parameters())

    def check_masters_bound(self) -> None:
        """Under torch.distributed, refuse a forward whose masters are Parameters no layer made: FSDP2's
        fully_shard swaps in its own (sharded, then gathered) ones, and the optimizer's steps of those never
        reach the weight the forward reads, so nothing would train. Single-process flows that hand a layer
        other Parameters (nn.DataParallel's replicas, accelerate's hooks) are not checked; the same masters
        as at the last check cost one identity test."""
        if not _dist_initialized() or getattr(self, "_is_replica", False):
            return
        masters = self.master_parameters()
        seen = self.__dict__.get("_checked_masters")
        if seen is not None and len(seen) == len(masters) and all(a is b for a, b in zip(seen, masters)):
            return
        for p in masters:
            if p is not None and owner_of(p) is None:
                raise RuntimeError(
                    f"{type(self).__name__}: its trainable masters are Parameters it did not make (the model was "
                    "sharded with FSDP's fully_shard after patching?): optimizer steps of them would never reach "
                    "the weight the forward reads. FSDP2 works with full, lora, qlora, fp8, fp8_lora, roste and hft "
                    "at matrix granularity; use DistributedDataParallel here. (A master assigned by hand: call "
                    "bind_masters() after.)")
        self.__dict__["_checked_masters"] = tuple(masters)   # (a plain attribute: nn.Module's __setattr__ is slow)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # a deep copy or an unpickled layer has masters of its own; a shallow copy (copy.copy) shares the
        # original's, which stays their owner (the optimizers find a layer through its masters)
        bind_owner(self, *[p for p in self.master_parameters() if p is not None and owner_of(p) is None])

    @contextlib.contextmanager
    def _masters_unbound(self):
        """Inside, this layer's masters are out of the owner registry, and after, it owns them again and any
        new ones: torch.utils.swap_tensors (torch.__future__.set_swap_module_params_on_conversion(True), which
        .to() and load_state_dict follow) refuses a tensor with a weak reference, and left the layer half
        converted; an overwrite-mode conversion and load_state_dict(assign=True) put in new Parameters."""
        for p in self.master_parameters():
            if p is not None and owner_of(p) is self:
                del _OWNERS[p]
        try:
            yield
        finally:
            self._bind_unowned()

    def _bind_unowned(self) -> None:
        """Own the masters no layer owns (a subclass whose masters are not masters binds nothing)."""
        bind_owner(self, *[p for p in self.master_parameters() if p is not None and owner_of(p) is None])

    def _apply(self, fn, recurse=True):
        with self._masters_unbound():
            return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        with self._masters_unbound():
            super()._load_from_state_dict(*args, **kwargs)


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], masters) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn for nn.Module._apply that applies fn to everything, except that a master in `masters` (or its
    .grad) comes out in its own dtype, on the device fn chose."""
    keep = {id(t) for p in masters if p is not None for t in (p, p.grad) if t is not None}

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if id(t) in keep and out.dtype != t.dtype:
            out = t.to(device=out.device)
        return out
    return apply
