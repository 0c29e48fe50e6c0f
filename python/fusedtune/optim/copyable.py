"""Optimizers that survive copy.deepcopy and pickling with their own settings.

torch.optim.Optimizer.__getstate__ keeps only `defaults`, `state` and `param_groups` (hooks are left
out: they may be lambdas). A subclass's own attributes (a backend, MeZO's seed and step count) were
lost, so a deep-copied model's optimizer (fusedtune.patch keeps it with the model) or a torch.save'd one
failed at its first step. Subclasses name the attributes to keep in `_copied`."""
from __future__ import annotations

import torch


class CopyableOptimizer(torch.optim.Optimizer):
    _copied: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._copied if k in self.__dict__})
        return state
