"""Optimizers that survive copy.deepcopy and pickling with their own settings.

torch.optim.Optimizer.__getstate__ keeps only `defaults`, `state` and `param_groups` (hooks are left
out: they may be lambdas). A subclass's own attributes (a backend, MeZO's seed and step count) were
lost, so a deep-copied model's optimizer (fusedtune.patch keeps it with the model) or a torch.save'd one
failed at its first step. Subclasses name the attributes to keep in `_copied`.

`_load_around` is the shared way for a subclass to load state torch's load_state_dict would drop or cast."""
from __future__ import annotations

from typing import Callable

import torch


class CopyableOptimizer(torch.optim.Optimizer):
    _copied: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._copied if k in self.__dict__})
        return state

    def _load_around(self, state_dict: dict, take: Callable[[dict], dict | None],
                     apply: Callable[[], None]) -> None:
        """torch's load_state_dict, hooks included, with `take(sd)` run on the state dict the user's
        load-state-dict pre-hooks leave (a dict it returns replaces it) and `apply()` run once torch has
        loaded the rest, before the post-hooks. A load torch refuses applies nothing."""
        hooks = (self.register_load_state_dict_pre_hook(lambda opt, sd: take(sd)),        # appended: last
                 self.register_load_state_dict_post_hook(lambda opt: apply(), prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for h in hooks:
                h.remove()
