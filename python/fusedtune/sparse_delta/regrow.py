"""Prune and regrow the delta positions of SparseDeltaLinear layers during training (SpIEL).

    opt = SparseDeltaAdamW(params, lr=1e-4)
    rg = Regrower(model, opt, every=20, rate=0.2, decay="cosine", total_steps=1000, variant="ag")
    for batch in data:
        opt.zero_grad(); model(**batch).loss.backward(); opt.step()
        rg.step()                              # or rg.attach() once: runs after every opt.step()

Schedule. Steps are counted by step() calls (one per optimizer step), from 1. Every `every` steps
(t = every, 2*every, ...) is a selection step. At selection step t, each layer with k deltas drops
n = floor(rate(t) * k) of them and grows n new ones, so k stays constant:
    rate(t) = rate * (1 + cos(pi * min(t / total_steps, 1))) / 2     decay="cosine"
            = rate * max(0, 1 - t / total_steps)                      decay="linear"
            = rate                                                     decay="constant"
Drop: the n entries with the smallest |delta| (their weights return exactly to W0). Grow: the n
best-scoring positions outside the current indices, with delta 0, age 0, and seeded Adam moments
(seed_moments="zero": zero moments, through optimizer.reset_state; "grad": exp_avg 0 and exp_avg_sq
the squared gradient of an optimizer step, as the score saw it: AG (score / steps)^2, MA score * passes /
steps^2, with `steps` the window's optimizer steps and `passes` its backward passes -- with gradient
accumulation an upper bound of the step gradient's square, exact when the micro-batches agree, so a grown
entry's first update is never larger than Adam's). Kept entries keep their delta, moments and age. With
SparseDeltaAdamW's bias_correction="element" (its default), a zero-seeded entry's Adam step count
restarts too, so its first update is Adam's first (lr * sign(g)), not 3.2x that.
Ties (equal scores or equal |delta|) are broken by a seeded random draw: runs are deterministic.

Scores come from the dense weight gradient, which is formed only on the `accumulate_steps` steps
that end at a selection step (the "window"), and only if that selection moves something. On window
steps every layer runs in layer.dense_grad(sink) mode: its backward forms the dense float32 dW =
dy^T x once, gives the deltas dW at their k positions through autograd (so they keep training on
window steps, and DDP reduces their gradient as on any step), and hands dW to the sink, which updates
the score accumulator; the dense gradient lives only inside that backward (no weight .grad).

Data parallelism (DDP; every rank its own batch): process_group="auto" (the default) averages each
dense dW over torch.distributed's default group (where it is initialized with more than one rank)
before it reaches the scores, so every rank scores the global gradient and selects the same
positions (ties are broken by seeded draws, the same on every rank); a ProcessGroup picks another
group, None keeps each rank's own (ranks then select different positions: single-process use only).
That is one all-reduce of every layer's dense gradient per backward on window steps, full
fine-tuning's gradient traffic, on accumulate_steps of every `every` steps; every rank must run the
same backward passes through every layer on those steps.
    variant="ag"  (SpIEL-AG, accumulated gradients) score = sum over the window of |dW|.
                  candidates=c (float; default 1.0, SpIEL's k candidates): on the first window step
                  the top ceil(c*k) positions by |dW| outside the current indices become the
                  candidates, and |dW| is accumulated at those only (SpIEL's scheme: c*k floats).
                  candidates=None: a dense float32 accumulator per layer during the window (exact,
                  4 bytes per weight: ~26 GB for a 7B model).
    variant="ma"  (SpIEL-MA, SM3-style accumulators): per layer a row accumulator R [out] and a
                  column accumulator C [in]; each window step, with G = dW,
                      nu[r, c] = min(R[r], C[c]) + G[r, c]^2,  R[r] = max_c nu[r, c],  C[c] = max_r nu[r, c]
                  (SM3-II), and score[r, c] = min(R[r], C[c]), an upper bound of the squared
                  gradient summed over the window at (r, c), from out + in floats of state.
                  Accumulators restart at each window. Many positions share a score (it is
                  piecewise constant over rows/columns); ties are broken by the seeded draw.
Mixed precision with a loss scaler (float16): pass the scaler, Regrower(..., grad_scaler=scaler) (or set
rg.grad_scaler = scaler before the first window step, e.g. accelerate's accelerator.scaler): each dense
dW is divided by the scale before it reaches the scores (seed_moments="grad" seeds unscaled moments),
and a non-finite one -- the scaler skips that optimizer step -- is left out of the window
(`skipped_grads` counts them). Without it the scores and seeds are those of the scaled loss (the
selection is scale-invariant within a window whose scale does not change; seeded moments are not), and
the non-finite entries of an overflowing step's gradient are left out (zeroed, without a host sync: they
made every score NaN or inf, and the selection chose nothing useful).
With gradient accumulation (several backward passes per optimizer step) the score adds each
micro-batch's |dW| (AG) or dW^2 (MA) rather than the step's summed dW. On window steps the deltas'
gradient is the float32 dense dW gathered at the k indices (the SDDMM of the other steps also
accumulates in float32).

Per-element age: steps since the entry was grown (ages of the initial entries count from 0 at
construction); `ages[name]` (int32 [k], aligned with the layer's indices).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
import weakref

import torch
from torch import nn

from .._dist import sync_group
from ..ops.sparse_delta_select import regrow_candidates, sm3_update
from .artifacts import sparse_layers

STATE_KEY = "fusedtune_regrower"   # the Regrower's entry in its optimizer's state_dict()
_ATTACHED = "_fusedtune_regrower"  # the optimizer's attached Regrower (a weak reference in its __dict__)

_DECAYS = ("cosine", "linear", "constant")
_VARIANTS = ("ag", "ma")


def _seeded_pick(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n entries of `pool` (1-D), chosen by a seeded draw (deterministic, device independent)."""
    if n >= pool.numel():
        return pool
    perm = torch.randperm(pool.numel(), generator=gen)[:n].to(pool.device)
    return pool[perm]


def pick(pos: torch.Tensor, vals: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Given regrow_candidates' answer (sorted positions scoring at least the n-th best, and their
    scores), the sorted positions of the n best: all above the threshold, and the rest of n drawn
    from the ties at it by a seeded draw."""
    if pos.numel() == 0:
        return pos
    thr = vals.min()
    above = pos[vals > thr]
    return torch.cat([above, _seeded_pick(pos[vals == thr], n - above.numel(), gen)]).sort().values


def top_n(score: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted positions of the n largest entries of a 1-D `score`; ties at the threshold broken by a
    seeded draw. Entries equal to -inf or NaN are never chosen (fewer than n may come back)."""
    none = torch.empty(0, dtype=torch.int32, device=score.device)
    return pick(*regrow_candidates(n, none, scores=score, backend="reference", check=False), n, gen)


class Regrower:
    def __init__(self, model: nn.Module, optimizer, every: int = 20, rate: float = 0.2, decay: str = "cosine",
                 variant: str = "ag", accumulate_steps: int = 5, total_steps: int | None = None,
                 candidates: float | None | str = "auto", seed_moments: str = "zero", seed: int = 0,
                 attach: bool = False, process_group="auto", grad_scaler=None):
        candidates = self.check_settings(every, rate, decay, variant, accumulate_steps, total_steps, candidates,
                                         seed_moments)
        self.grad_scaler = self.check_scaler(grad_scaler)
        sync_group(process_group, "Regrower")     # a group without torch.distributed is refused here
        self.process_group = process_group
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError("Regrower: the model has no fusedtune.nn.SparseDeltaLinear layer")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, m in self.layers if id(m.values) not in owned]
        if missing:
            raise ValueError(f"Regrower: the optimizer does not hold the deltas (`values`) of {missing[:4]}"
                             + (" ..." if len(missing) > 4 else ""))
        for hook in ("reset_state",):
            if not callable(getattr(optimizer, hook, None)):
                raise TypeError(f"Regrower: the optimizer has no {hook}() (use fusedtune.optim.SparseDeltaAdamW)")
        self.optimizer = optimizer
        self.every, self.rate, self.decay, self.variant = every, float(rate), decay, variant
        self.accumulate_steps = min(accumulate_steps, every)
        self.total_steps, self.candidates, self.seed_moments, self.seed = total_steps, candidates, seed_moments, seed
        self.t = 0
        self.skipped_grads = 0              # non-finite dense gradients left out under grad_scaler
        self.ages = {n: torch.zeros(m.indices.numel(), dtype=torch.int32, device=m.indices.device)
                     for n, m in self.layers}
        self.history: list[dict] = []       # one dict per selection step
        self._acc: dict = {}                # name -> accumulator state of the current window
        self._seen: dict = {}               # name -> number of dense gradients accumulated in the window
        self._steps: dict = {}              # name -> [optimizer steps those came in, the last one's t]
        self._dense: list = []              # (context manager, hook handle) per layer while in a window
        self._post_hook = None
        self.dense_grad_steps: list[int] = []   # steps on which dense gradients were formed
        if attach:
            self.attach()
        self._update_mode()

    @staticmethod
    def check_scaler(scaler):
        """grad_scaler: None, or the torch.amp.GradScaler that scales the loss (module docstring)."""
        if scaler is not None and not (callable(getattr(scaler, "get_scale", None))
                                       and callable(getattr(scaler, "is_enabled", None))):
            raise TypeError(f"Regrower: grad_scaler must be a torch.amp.GradScaler (the one scaling the loss) or "
                            f"None, got {type(scaler).__name__}")
        return scaler

    @staticmethod
    def check_settings(every, rate, decay, variant, accumulate_steps, total_steps, candidates, seed_moments):
        """Refuse bad settings (before a model is touched: fusedtune.patch checks them first); returns
        `candidates` with "auto" resolved."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Regrower: every must be a positive int, got {every!r}")
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
            raise ValueError(f"Regrower: rate must be in [0, 1], got {rate!r}")
        if decay not in _DECAYS:
            raise ValueError(f"Regrower: decay must be one of {_DECAYS}, got {decay!r}")
        if decay != "constant" and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"Regrower: decay={decay!r} needs total_steps (a positive int: the step at which "
                             f"the regrowth rate reaches 0), got {total_steps!r}; or pass decay='constant'")
        if variant not in _VARIANTS:
            raise ValueError(f"Regrower: variant must be 'ag' (accumulated gradients) or 'ma' (SM3 row/column "
                             f"accumulators), got {variant!r}")
        if not isinstance(accumulate_steps, int) or accumulate_steps < 1:
            raise ValueError(f"Regrower: accumulate_steps must be a positive int, got {accumulate_steps!r}")
        if isinstance(candidates, str) and candidates == "auto":
            candidates = 1.0 if variant == "ag" else None
        if candidates is not None and (variant != "ag" or isinstance(candidates, str) or not candidates > 0):
            raise ValueError(f"Regrower: candidates (a positive factor of k) applies to variant='ag' only, got "
                             f"candidates={candidates!r} with variant={variant!r}")
        if seed_moments not in ("zero", "grad"):
            raise ValueError(f"Regrower: seed_moments must be 'zero' or 'grad', got {seed_moments!r}")
        return candidates

    # ------------------------------------------------------------------ schedule
    def rate_at(self, t: int) -> float:
        if self.decay == "constant":
            return self.rate
        f = min(t / self.total_steps, 1.0)
        if self.decay == "linear":
            return self.rate * (1.0 - f)
        return self.rate * 0.5 * (1.0 + math.cos(math.pi * f))

    def n_regrow(self, t: int, k: int, numel: int) -> int:
        """How many entries of a layer with k deltas (of numel weights) move at selection step t."""
        return max(0, min(int(self.rate_at(t) * k), numel - k))

    def _moves(self, t: int) -> bool:
        return any(self.n_regrow(t, m.indices.numel(), m.weight.numel()) > 0 for _, m in self.layers)

    def in_window(self, t: int) -> bool:
        """Is step t (1-based) a step on which dense gradients are formed?"""
        sel = -(-t // self.every) * self.every
        return sel - t < self.accumulate_steps and self._moves(sel)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        """A deep copy (or pickle) of a model whose patch holds a Regrower: hooks do not travel with copies
        (the optimizer's step hook, the layers' dense-gradient sinks), so the copy records whether they were
        set and sets its own (a copy would otherwise stop regrowing, silently)."""
        if not (self.process_group is None or isinstance(self.process_group, str)):
            raise TypeError("Regrower: a Regrower given a ProcessGroup cannot be copied or pickled (the group cannot); "
                            "make a new Regrower for the copy, or use process_group='auto'")
        state = dict(self.__dict__)
        state.pop("_loading", None)
        state["_post_hook"] = self._post_hook is not None
        state["_dense"] = bool(self._dense)
        state["grad_scaler"] = None          # (the loop's own scaler does not travel; warned on load)
        state["_had_scaler"] = getattr(self, "grad_scaler", None) is not None
        return state

    def __setstate__(self, state: dict) -> None:
        attached, dense = state["_post_hook"], state["_dense"]
        self.__dict__.update(state, _post_hook=None, _dense=[])
        self.__dict__.setdefault("process_group", "auto")
        self.__dict__.setdefault("grad_scaler", None)
        if self.__dict__.pop("_had_scaler", False):
            warnings.warn("fusedtune Regrower: this copy's grad_scaler is None (the original's loss scaler does not "
                          "travel with a copy or pickle); set rg.grad_scaler to the copy's scaler", stacklevel=2)
        if dense:
            self._enter_dense()
        if attached:
            self.attach()

    # ------------------------------------------------------------------ hooks / mode
    def attach(self) -> "Regrower":
        """Run step() automatically after every optimizer.step(), and travel with the optimizer's state:
        its state_dict() carries this Regrower's (under STATE_KEY) and its load_state_dict() restores it,
        so a checkpoint of the optimizer alone -- what transformers.Trainer saves and resumes -- resumes
        regrowth exactly (the step count, ages and window accumulators)."""
        if self._post_hook is None:
            opt = self.optimizer
            other = opt.__dict__.get(_ATTACHED)
            other = None if other is None else other()
            if other is not None and other is not self and other._post_hook is not None:
                raise ValueError("Regrower.attach: the optimizer has an attached Regrower already (its state travels "
                                 "in the optimizer's under one key); make one Regrower over the whole model, or "
                                 "detach() the other first")
            opt.__dict__[_ATTACHED] = weakref.ref(self)   # (not in a copy or pickle of the optimizer)
            self._post_hook = (opt.register_step_post_hook(lambda *_: self.step()),
                               opt.register_state_dict_post_hook(self._save_into),
                               opt.register_load_state_dict_pre_hook(self._load_from),
                               opt.register_load_state_dict_post_hook(self._loaded))
        return self

    def _save_into(self, optimizer, sd: dict) -> dict:
        sd[STATE_KEY] = self.state_dict()
        return sd

    def _load_from(self, optimizer, sd: dict) -> dict:
        """Load pre-hook: takes this Regrower's entry out of the optimizer's state and checks it; it is applied
        by _loaded once torch has loaded the optimizer (a load torch refuses leaves the Regrower as it was)."""
        if STATE_KEY not in sd:
            self.__dict__["_loading"] = None
            return sd
        sd = dict(sd)
        state = sd.pop(STATE_KEY)
        self._check_state(state)
        self.__dict__["_loading"] = state
        return sd

    def _loaded(self, optimizer) -> None:
        if "_loading" not in self.__dict__:
            return
        state = self.__dict__.pop("_loading")
        if state is None:
            warnings.warn("Regrower: the optimizer state being loaded has no Regrower state (saved before the "
                          "Regrower was attached, or by an older fusedtune); regrowth goes on from this "
                          f"Regrower's own step {self.t}, not the checkpoint's", stacklevel=_user_stacklevel())
        else:
            self._apply_state(state)

    def detach(self) -> None:
        """Stop: remove the optimizer hooks and leave dense-gradient mode (accumulators dropped)."""
        if self._post_hook is not None:
            for handle in self._post_hook:
                handle.remove()
            self._post_hook = None
            ref = self.optimizer.__dict__.get(_ATTACHED)
            if ref is not None and ref() is self:
                del self.optimizer.__dict__[_ATTACHED]
        self._leave_dense()
        self._acc.clear()
        self._seen.clear()
        self._steps.clear()

    def _update_mode(self) -> None:
        want = self.in_window(self.t + 1)
        if want and not self._dense:
            self._enter_dense()
        elif not want and self._dense:
            self._leave_dense()

    def _enter_dense(self) -> None:
        for name, layer in self.layers:
            cm = layer.dense_grad(self._make_sink(name, layer))
            cm.__enter__()
            self._dense.append(cm)

    def _leave_dense(self) -> None:
        for cm in self._dense:
            cm.__exit__(None, None, None)
        self._dense = []

    def _make_sink(self, name, layer):
        """The layer's dense-gradient sink. It holds the Regrower and the layer weakly: a layer's sink
        (its _dense_sink) must not keep a dropped Regrower (or model) alive; a sink whose Regrower is gone takes its
        layer out of window mode."""
        owner, layer_ref = weakref.ref(self), weakref.ref(layer)

        def sink(dW: torch.Tensor) -> None:
            rg, lay = owner(), layer_ref()
            if rg is None or lay is None:
                if lay is not None:
                    lay.dense_grad_off()
                return
            sync, group = sync_group(rg.process_group, "Regrower")
            if sync:    # the global gradient: every rank scores (and so selects) the same
                import torch.distributed as dist
                dist.all_reduce(dW, group=group)
                dW.div_(dist.get_world_size(group))
            with torch.no_grad():
                if rg._unscale_(dW):
                    rg._accumulate(name, lay, dW)
        return sink

    def _unscale_(self, dW: torch.Tensor) -> bool:
        """Under a GradScaler: dW of the scaled loss divided by the scale, in place; False (dW is left out)
        when it is not finite: the scaler skips that optimizer step (one host sync a layer, window steps
        only)."""
        scaler = getattr(self, "grad_scaler", None)
        if scaler is None or not scaler.is_enabled():
            dW.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)   # an unscaled overflow: out of the scores
            return True
        if not bool(torch.isfinite(dW).all()):
            self.skipped_grads = getattr(self, "skipped_grads", 0) + 1
            return False
        scale = getattr(scaler, "_scale", None)   # (the device tensor the loss was scaled by: no sync)
        dW.div_(scale if isinstance(scale, torch.Tensor) else scaler.get_scale())
        return True

    # ------------------------------------------------------------------ scores
    def _accumulate(self, name, layer, g: torch.Tensor) -> None:
        """Add one backward's dense float32 gradient g [out, in] to the layer's scores. g is the sink's to
        consume: it is overwritten in place (|g| or g^2), so a window step holds one dense buffer per layer
        at a time, plus the score state."""
        self._seen[name] = self._seen.get(name, 0) + 1
        st = self._steps.setdefault(name, [0, None])
        if st[1] != self.t:                  # (micro-batches of one optimizer step share t)
            st[0], st[1] = st[0] + 1, self.t
        if self.variant == "ma":
            if name not in self._acc:
                self._acc[name] = (torch.zeros(g.shape[0], device=g.device), torch.zeros(g.shape[1], device=g.device))
            self._acc[name] = sm3_update(g, *self._acc[name])
            return
        flat = g.reshape(-1)
        if self.candidates is None:
            if name in self._acc:
                self._acc[name].add_(flat.abs_())
            else:
                self._acc[name] = flat.abs_()
            return
        if name not in self._acc:                   # first window step: choose the candidates
            k = layer.indices.numel()
            c = min(math.ceil(self.candidates * k), flat.numel() - k)
            cand = pick(*regrow_candidates(c, layer.indices, scores=flat, absolute=True, check=False), c,
                        self._gen(name, 1))
            self._acc[name] = (cand, flat[cand].abs())
        else:
            cand, acc = self._acc[name]
            acc.add_(flat[cand].abs_())

    def _grow(self, name, layer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sorted positions of the n best scores outside the current indices, and each one's mean
        squared-gradient estimate). No dense score is formed beyond the accumulator itself."""
        seen = max(1, self._seen.get(name, 0))
        steps = max(1, self._steps.get(name, [seen])[0])
        gen = self._gen(name, 2)
        if self.variant == "ma":
            row, col = self._acc[name]
            pos, vals = regrow_candidates(n, layer.indices, row=row, col=col, check=False)
        elif self.candidates is None:
            pos, vals = regrow_candidates(n, layer.indices, scores=self._acc[name], check=False)
        else:   # scores at the candidates only (chosen outside the indices; in case these moved since)
            cand, acc = self._acc[name]
            acc = acc.masked_fill(torch.isin(cand, layer.indices.long()), float("-inf"))
            at = top_n(acc, n, gen)
            grow, v = cand[at], acc[at]
            return grow, (v / steps).square()
        grow = pick(pos, vals, n, gen)
        v = vals[torch.searchsorted(pos, grow)]
        return grow, (v * seen / steps ** 2 if self.variant == "ma" else (v / steps).square())

    def _gen(self, name, salt) -> torch.Generator:
        i = next(j for j, (n, _) in enumerate(self.layers) if n == name)
        return torch.Generator().manual_seed((((self.seed * 1_000_003 + self.t) * 8191 + i) * 4 + salt) % 2 ** 63)

    # ------------------------------------------------------------------ step
    def step(self) -> dict | None:
        """Advance one step (call after optimizer.step()); on selection steps, prune and regrow.
        Returns the selection's summary on selection steps ({"step", "rate", "moved", "layers": {name:
        {"moved", "dropped", "grown"}}}, the flat indices that left and came), else None. `history`
        keeps the counts of every selection (not the indices)."""
        self.t += 1
        for a in self.ages.values():
            a.add_(1)
        if self._dense:
            self.dense_grad_steps.append(self.t)
        out = None
        if self.t % self.every == 0 and self._moves(self.t):
            out = self._select()
        if self.t % self.every == 0:
            self._acc.clear()
            self._seen.clear()
            self._steps.clear()
        self._update_mode()
        return out

    @torch.no_grad()
    def _select(self) -> dict:
        summary = {"step": self.t, "rate": self.rate_at(self.t), "moved": 0, "layers": {}}
        for name, layer in self.layers:
            k, numel = layer.indices.numel(), layer.weight.numel()
            n = self.n_regrow(self.t, k, numel)
            if n == 0:
                continue
            if not self._seen.get(name):
                summary["layers"][name] = {"moved": 0, "why": "no dense gradient reached this layer in the window"}
                continue
            grow, v2 = self._grow(name, layer, n)
            n = grow.numel()
            if n == 0:
                continue
            old = layer.values
            absval = old.detach().abs().nan_to_num(nan=-1.0)      # a NaN delta is dropped first
            drop = top_n(-absval, n, self._gen(name, 3))
            keep = torch.ones(k, dtype=torch.bool, device=absval.device)
            keep[drop] = False
            idx = torch.cat([layer.indices.long()[keep], grow])
            order = torch.argsort(idx)
            new_idx = idx[order]
            zeros = torch.zeros(n, dtype=torch.float32, device=absval.device)
            new_vals = torch.cat([old.detach()[keep], zeros])[order]
            grown_pos = (order >= k - n).nonzero().flatten()
            age = self.ages[name]
            self.ages[name] = torch.cat([age[keep], torch.zeros(n, dtype=age.dtype, device=age.device)])[order]
            st = self.optimizer.state.get(old)
            dropped_idx = layer.indices.long()[drop].cpu()
            layer.set_indices(new_idx.to(torch.int32), new_vals, keep_parameter=True)   # same Parameter: DDP-safe
            new = layer.values
            self._rebind(old, new)
            if st:   # permute the kept moments with their entries; grown entries are seeded below
                for key in ("exp_avg", "exp_avg_sq", "elem_step"):
                    if key in st and torch.is_tensor(st[key]) and st[key].shape == (k,):
                        st[key].copy_(torch.cat([st[key][keep], zeros.to(st[key].dtype)])[order])
            if st is not None:
                self.optimizer.state[new] = st
            seed_v = v2[torch.searchsorted(grow, new_idx[grown_pos])] if self.seed_moments == "grad" else None
            self.optimizer.reset_state(new, grown_pos, exp_avg=None, exp_avg_sq=seed_v)
            summary["layers"][name] = {"moved": n, "dropped": dropped_idx, "grown": grow.cpu()}
            summary["moved"] += n
        self.history.append({**summary, "layers": {n: {"moved": v["moved"]} for n, v in summary["layers"].items()}})
        return summary

    def _rebind(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Put the layer's new `values` Parameter in the optimizer in place of the old one."""
        if new is old:
            return
        for g in self.optimizer.param_groups:
            g["params"] = [new if p is old else p for p in g["params"]]
        self.optimizer.state.pop(old, None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Step count, ages and the current window's accumulators (for an exact resume)."""
        return {"t": self.t, "ages": {n: a.clone() for n, a in self.ages.items()},
                "acc": {n: (tuple(x.clone() for x in v) if isinstance(v, tuple) else v.clone())
                        for n, v in self._acc.items()},
                "seen": dict(self._seen), "steps": {n: list(v) for n, v in self._steps.items()},
                "history": list(self.history)}

    def load_state_dict(self, sd: dict) -> None:
        self._check_state(sd)
        self._apply_state(sd)

    def _check_state(self, sd: dict) -> None:
        names = {n for n, _ in self.layers}
        if set(sd["ages"]) != names:
            raise ValueError("Regrower.load_state_dict: the state is for other layers "
                             f"({sorted(set(sd['ages']) ^ names)[:4]} differ)")
        for n, m in self.layers:
            a = sd["ages"][n]
            if not isinstance(a, torch.Tensor) or a.dim() != 1 or a.numel() != m.indices.numel() \
                    or a.dtype.is_floating_point or a.dtype == torch.bool:
                got = f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"Regrower.load_state_dict: ages[{n!r}] must be an integer tensor of one age per "
                                 f"delta ({m.indices.numel()}), got {got}: the state is from another selection of "
                                 "this layer (load the model's deltas from the same checkpoint)")

    def _apply_state(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self.ages = {n: sd["ages"][n].to(torch.int32, copy=True).to(m.indices.device) for n, m in self.layers}
        dev = {n: m.indices.device for n, m in self.layers}   # a resume on another device: the layers'
        self._acc = {n: (tuple(x.to(dev[n]) for x in v) if isinstance(v, tuple) else v.to(dev[n]))
                     for n, v in sd.get("acc", {}).items() if n in dev}
        self._seen = dict(sd.get("seen", {}))
        if "steps" in sd:
            self._steps = {n: list(v) for n, v in sd["steps"].items()}
        else:   # (a state saved before steps were counted: one step per pass, the last in the step before t)
            self._steps = {n: [s, self.t - 1] for n, s in self._seen.items()}
        self.history = list(sd.get("history", []))
        self._update_mode()


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside fusedtune and torch: the user's call (the
    optimizer hooks run a varying number of torch frames below it)."""
    inside = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
