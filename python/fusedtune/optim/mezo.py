"""MeZO (Malladi et al., 2023) on fusedtune's in-place zo kernels, plus seed-replay and ES updates.

One step is three passes over the weights, each one fused multi-tensor kernel:
  1. w1 = round(w + eps*z)                       -> loss_plus = closure()
  2. w2 = round(undo(w1) - eps*z)                -> loss_minus = closure()
  3. w' = round((1 - lr*wd) * undo(w2) - lr*g*z)  with g = (loss_plus - loss_minus) / (2 eps)
undo() returns the exact bf16/fp16/fp32 preimage (docs/zo_noise.md), so the second forward sees
exactly round(w - eps*z) and the update lands on the unperturbed weights: no drift from the
perturbation round trip, where MeZO's +eps, -2eps, +eps, update loop rounds four times.
g stays a device tensor: a step never synchronises with the host.

fold=True makes a step two passes: pass 3 also adds the next step's +eps*z' (one rounding to nearest), so
the next step starts at its pass 2, and between steps the parameters carry that perturbation. The updated
weights are then never stored on their own: the next undo takes them as the preimage of what was stored,
w' rounded with the next perturbation as a dither, within one step of w' (docs/zo_noise.md, "Folding").
Call settle() before using the weights for anything but the next step (evaluation, saving, another
optimizer). Seed replay of a folded run differs from it by up to one more step of rounding a step.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._dist import sync_group
from ..ops.zo import _check_distinct, _check_tensors, zo_apply_
from .copyable import CopyableOptimizer
from .fused_adamw import refuse_sharded

from ..reference.zo import splitmix64

_MASK64 = (1 << 64) - 1


class MeZO(CopyableOptimizer):
    """Zeroth-order SGD with in-place seeded perturbations (no gradients, inference memory).

    opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(**batch).loss)   # closure: a forward pass, no backward

    Parameter groups may set their own lr and weight_decay (e.g. 0 for biases and norms). Parameters
    with requires_grad=False at a step are left alone (as MeZO does): MeZO(model.parameters()) on a model
    with a frozen base trains only what is trainable, and freezing a parameter later takes effect at the
    next step. A non-finite loss leaves the weights as they were (weight decay aside) instead of making
    them NaN; opt.last shows the losses, and a projected_grad of 0 (what the step applied). A
    parameter's noise stream is its position among all the params given (frozen ones counted), so
    replay does not depend on which are frozen.
    fold: two passes a step instead of three (see the module docstring), with rounding="nearest" only: after
    step() the parameters hold round(w' + eps z(next seed)); opt.settle() takes that off (one pass; the next
    step perturbs again, one more, and the run then differs from an unsettled one by up to a step of rounding
    in a few percent of 16-bit weights). `opt.pending_seed` is the seed they carry (None when settled).
    The optimizer records which tensors carry it and with which eps, and state_dict() records that too, so
    a checkpoint of the model and the optimizer taken together resumes exactly; a step whose tensors (frozen
    or added since) or eps differ settles those first.
    same_rng: both forward passes of a step see the same torch random numbers (dropout masks): the CPU
    generator and the CUDA generators of the parameters' devices are reset before the second pass,
    so the difference of the two losses measures the eps step, not dropout noise.
    After each step, `opt.last` holds 'loss_plus', 'loss_minus', 'projected_grad' (tensors) and
    'seed'; `opt.seed_for(step)` gives the seed of any step for replay. Bad parameters are refused
    when the optimizer is made; if the closure raises (or returns more than one value), the weights are
    restored first, as the step's own undo restores them (exact wherever the preimage is unique:
    docs/zo_noise.md).
    Data parallel (DDP, accelerate: every rank its own batch): process_group="auto" (the
    default) averages both losses over torch.distributed's default group when it is initialized with
    more than one rank (one all-reduce of 2 floats per step), so every rank takes the same update;
    the first step checks that all ranks have the same seed and step count (load a resumed state on
    every rank before it). FSDP's sharded or flattened parameters are refused. A ProcessGroup picks another group; None
    keeps each rank's own losses (ranks with different data then drift apart).
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, noise: str = "normal",
                 rounding: str = "nearest", seed: int = 0, backend: str | None = None, same_rng: bool = True,
                 process_group="auto", fold: bool = False):
        if not lr > 0:
            raise ValueError(f"MeZO: lr must be > 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"MeZO: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"MeZO: weight_decay must be >= 0, got {weight_decay}")
        if noise not in ("normal", "rademacher"):
            raise ValueError(f"MeZO: noise={noise!r}; choose 'normal' or 'rademacher'")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"MeZO: rounding={rounding!r}; choose 'nearest' or 'stochastic'")
        if fold and rounding != "nearest":
            raise ValueError("MeZO: fold=True needs rounding='nearest': the next step's undo takes the stored "
                             "weights as a nearest rounding, so a stochastic one would random-walk them (about half "
                             "a step a step); folded, the next perturbation already dithers small updates "
                             "(docs/zo_noise.md, 'Folding')")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps, self.noise, self.rounding, self.backend = float(eps), noise, rounding, backend
        self.same_rng, self.fold = bool(same_rng), bool(fold)
        self.pending = None    # fold: (seed, eps, tensor ids) of the +eps the parameters carry
        self.process_group, self._seed_checked = process_group, False
        self.seed, self.steps = int(seed) & _MASK64, 0
        self.last: dict = {}
        self._buckets = self._make_buckets()

    _copied = ("eps", "noise", "rounding", "backend", "same_rng", "process_group", "_seed_checked", "seed", "steps",
               "last", "fold", "pending")

    def __getstate__(self) -> dict:
        if not (self.process_group is None or isinstance(self.process_group, str)):
            raise TypeError("MeZO: an optimizer given a ProcessGroup cannot be copied or pickled (the group cannot); "
                            "make a new MeZO for the copy, or use process_group='auto'")
        return super().__getstate__()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fold", False)     # (pickled before fold existed)
        self.__dict__.setdefault("pending", None)
        self._buckets = self._make_buckets()

    @property
    def pending_seed(self) -> int | None:
        """fold=True: the seed of the +eps perturbation the parameters carry between steps (None: none)."""
        return None if self.pending is None else self.pending[0]

    def _make_buckets(self):
        """(group, device) -> trainable tensors and their stable tensor ids (position in the param
        list, frozen parameters counted); each bucket is checked as zo_apply_ would check it."""
        refuse_sharded([p for g in self.param_groups for p in g["params"]], "MeZO")
        buckets = self._buckets_of(lambda tid, p: p.requires_grad)
        for _, _, ts, _ in buckets:
            _check_tensors(ts)
        _check_distinct([t for _, _, ts, _ in buckets for t in ts])
        self._buckets_for = self._trainable()
        return buckets

    def _buckets_of(self, keep) -> list:
        """[(group, device, tensors, tensor ids)] of the parameters keep(tensor id, p) selects; a tensor id is the
        parameter's position in the param list (frozen parameters counted)."""
        buckets, tid = [], 0
        for group in self.param_groups:
            by_dev: dict = {}
            for p in group["params"]:
                if keep(tid, p):
                    ts, ids = by_dev.setdefault(p.device, ([], []))
                    ts.append(p)
                    ids.append(tid)
                tid += 1
            buckets += [(group, dev, ts, ids) for dev, (ts, ids) in by_dev.items()]
        return buckets

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            if "eps" in param_group:
                raise ValueError("MeZO: eps is the optimizer's (one perturbation for all parameters: its seed's "
                                 "noise scaled by one eps), not a parameter group's; set MeZO(eps=...)")
            _check_group_values(param_group, "MeZO: parameter group")
        super().add_param_group(param_group)
        if hasattr(self, "_buckets"):
            try:
                self._buckets = self._make_buckets()
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise

    def seed_for(self, step: int) -> int:
        return splitmix64(self.seed ^ splitmix64(step))

    def _apply(self, seeds, coeffs_for, undo=None, final=False, rounding_seed=None):
        for group, dev, ts, ids in self._buckets:
            coeffs = coeffs_for(group, dev)
            alpha = 1.0 - group["lr"] * group["weight_decay"] if final else 1.0
            zo_apply_(ts, seeds, coeffs, self.noise, self.rounding if final else "nearest", undo=undo,
                      alpha=alpha, tensor_ids=ids, rounding_seed=rounding_seed, backend=self.backend)

    def _rng_states(self):
        cuda = sorted({dev.index or 0 for _, dev, _, _ in self._buckets if dev.type == "cuda"})
        return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda]

    @staticmethod
    def _set_rng_states(states):
        cpu, cuda = states
        torch.set_rng_state(cpu)
        for d, st in cuda:
            torch.cuda.set_rng_state(st, d)

    @staticmethod
    def _loss(closure) -> torch.Tensor:
        out = closure()
        if not (torch.is_tensor(out) or (isinstance(out, numbers.Real) and not isinstance(out, bool))
                or type(out).__module__ == "numpy"):
            hint = " (a model output: return its .loss)" if hasattr(out, "loss") else ""
            raise TypeError(f"MeZO.step: the closure must return the loss as a tensor or a number, got "
                            f"{type(out).__name__}{hint}")
        loss = torch.as_tensor(out, dtype=torch.float64) if isinstance(out, numbers.Real) else \
            torch.as_tensor(out).detach()      # (a Python float is a double: keep it one)
        if loss.numel() != 1:
            raise ValueError(f"MeZO.step: the closure must return one loss value, got a tensor of shape "
                             f"{tuple(loss.shape)} (reduce it, e.g. .mean())")
        return loss.reshape(())

    def _trainable(self) -> tuple:
        return tuple(p.requires_grad for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("MeZO.step needs a closure that runs a forward pass and returns the loss")
        if self._trainable() != self._buckets_for:     # a parameter frozen or unfrozen since: as torch.optim
            self._buckets = self._make_buckets()
        self._check_before_step()
        self._check_same_seed()
        s = self.seed_for(self.steps)
        eps = self.eps
        rng = self._rng_states() if self.same_rng else None
        if self.pending != (s, eps, self._ids()):     # not carried over from the previous step as it is (fold)
            self.settle()
            self._apply([s], lambda g, d: [eps])
        self.pending = None                           # the parameters hold round(w + eps z(s)) now
        try:
            loss_plus = self._loss(closure)
        except BaseException:
            self._apply([s], lambda g, d: [0.0], undo=([s], [eps]))   # back to the exact weights
            raise
        self._apply([s], lambda g, d: [-eps], undo=([s], [eps]))
        if rng is not None:
            self._set_rng_states(rng)
        try:
            loss_minus = self._loss(closure)
            loss_plus, loss_minus = self._average_over_ranks(loss_plus, loss_minus)
        except BaseException:
            self._apply([s], lambda g, d: [0.0], undo=([s], [-eps]))
            raise
        # the difference in float64 (two nearby losses given in float64 keep their digits), then float32
        pg = ((loss_plus.double() - loss_minus.double()) / (2 * eps)).float().reshape(1)
        # a non-finite loss (an overflow in one forward) moves nothing along z rather than making every
        # weight NaN; opt.last still shows it. On the device: no host sync.
        step_pg = torch.where(torch.isfinite(pg), pg, torch.zeros_like(pg))
        rounding_seed = splitmix64(s ^ 0x726F756E64)
        if self.fold:        # the update and the next step's +eps in one pass (one rounding)
            nxt = self.seed_for(self.steps + 1)
            self._apply([s, nxt], lambda g, d: torch.cat([(-g["lr"] * step_pg).to(d),
                                                          torch.full((1,), eps, dtype=torch.float32, device=d)]),
                        undo=([s], [-eps]), final=True, rounding_seed=rounding_seed)
            self.pending = (nxt, eps, self._ids())
        else:
            self._apply([s], lambda g, d: (-g["lr"] * step_pg).to(d), undo=([s], [-eps]), final=True,
                        rounding_seed=rounding_seed)
        # the projected gradient the step applied (0 for a non-finite one: the losses show that): replaying
        # (seed, -lr * projected_grad) pairs (zo_replay_) reproduces the run's updates, up to the undo's
        # rounding: each step's -eps pass restores a weight exactly only where its preimage under the rounding
        # is unique (docs/zo_noise.md), so a replay can differ from the run by an ulp there (the perturbed weight in a larger binade)
        self.last = {"loss_plus": loss_plus, "loss_minus": loss_minus, "projected_grad": step_pg[0], "seed": s}
        self.steps += 1
        return loss_plus

    def _check_before_step(self) -> None:
        """Before the step's first pass, so a failure changes nothing: the scheduled lr and weight decay are
        finite numbers, and every tensor is still what its bucket holds (a parameter made non-contiguous
        since is refused here, not half-way through the groups; one moved to another device re-buckets)."""
        for group in self.param_groups:
            _check_group_values(group, "MeZO.step: a parameter group's")
        if self._moved():
            self._buckets = self._make_buckets()
            return
        for _, _, ts, _ in self._buckets:
            _check_tensors(ts)

    def _moved(self) -> bool:
        """Whether a parameter is no longer on its bucket's device (model.to(...) since the buckets were made)."""
        return any(t.device != dev for _, dev, ts, _ in self._buckets for t in ts)

    def replay_args(self, group: int | None = None) -> tuple[list, list]:
        """(params, tensor ids) of the parameters the steps perturb now (of param_groups[group] only, if
        given), for zo_replay_(params, seeds, coeffs, tensor_ids=ids)."""
        keep = [(ts, ids) for g, _, ts, ids in self._buckets if group is None or g is self.param_groups[group]]
        return [t for ts, _ in keep for t in ts], [i for _, ids in keep for i in ids]

    def _ids(self) -> tuple:
        """The tensor ids of the parameters the steps perturb now."""
        return tuple(i for _, _, _, ids in self._buckets for i in ids)

    @torch.no_grad()
    def settle(self) -> None:
        """fold=True: take the next step's +eps perturbation off the parameters that carry it, with the eps it
        was added with (one pass; exact wherever the preimage is unique, as every undo). Nothing to do when
        they carry none."""
        if self.pending is None:
            return
        seed, eps, ids = self.pending
        want = set(ids)
        for _, _, ts, tids in self._buckets_of(lambda tid, p: tid in want):
            zo_apply_(ts, [seed], [0.0], self.noise, "nearest", undo=([seed], [eps]), tensor_ids=tids,
                      backend=self.backend)
        self.pending = None

    def _sync_group(self):
        """(True, group) when each step's losses are averaged over `group` (None: the default group), else
        (False, None): one process, torch.distributed not initialized, or process_group=None."""
        return sync_group(self.process_group, "MeZO")

    def _check_same_seed(self) -> None:
        """Once, before the first perturbation: every rank must perturb along the same direction, so the seed
        and the step count (the step's seed is seed_for(steps); a resume loads it) must agree. (Once: a check
        after a later load, made by the loading ranks only, would pair with the others' loss all-reduce.)"""
        if self._seed_checked:
            return
        sync, group = self._sync_group()
        if not sync:
            return
        import torch.distributed as dist
        dev = self._buckets[0][1] if self._buckets else torch.device("cpu")
        halves = [self.seed >> 32, self.seed & 0xFFFFFFFF, self.steps]
        t = torch.tensor(halves + [-h for h in halves], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)    # max(h) == h and max(-h) == -h: all equal
        if t.tolist() != halves + [-h for h in halves]:
            raise RuntimeError("MeZO: the ranks of the process group have different seeds or step counts (an "
                               "optimizer state loaded on some ranks only?); every rank must perturb along the same "
                               "direction (pass the same seed=, load the same state on every rank)")
        self._seed_checked = True

    def _average_over_ranks(self, loss_plus, loss_minus):
        sync, group = self._sync_group()
        if not sync:
            return loss_plus, loss_minus
        import torch.distributed as dist
        dt = torch.promote_types(torch.promote_types(loss_plus.dtype, loss_minus.dtype), torch.float32)
        t = torch.stack([loss_plus.to(dt).reshape(()), loss_minus.to(dt).reshape(())])   # (float64 stays so)
        dist.all_reduce(t, group=group)
        t = t / dist.get_world_size(group)
        return t[0], t[1]

    def backend_report(self) -> list[dict]:
        from ..ops.zo import zo_backend
        buckets = self._buckets
        if self._moved():     # the devices the parameters are on now (the next step re-buckets them so)
            ids = set(self._ids())
            buckets = self._buckets_of(lambda tid, p: tid in ids)
        rows = []
        for _, dev, ts, ids in buckets:
            choice = zo_backend(dev, self.backend)
            for p, i in zip(ts, ids):
                rows.append({"param_index": i, "shape": tuple(p.shape), "dtype": str(p.dtype), "device": str(dev),
                             "backend": choice["backend"], "why_not": choice["why_not"]})
        return rows

    def state_dict(self):
        """torch's, with a "mezo" entry (seed, step count, eps, a pending fold) added before the state-dict
        post-hooks run, so that they see it."""
        pending = None if self.pending is None else {"seed": self.pending[0], "eps": self.pending[1],
                                                     "tensor_ids": list(self.pending[2])}

        def add(opt, sd):
            sd["mezo"] = {"seed": self.seed, "steps": self.steps, "eps": self.eps, "pending": pending}
            return sd

        handle = self.register_state_dict_post_hook(add, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict):
        """torch's; the "mezo" entry is taken after the load-state-dict pre-hooks (which may change it) and
        applied once torch has loaded the rest, before the post-hooks (a refused load changes nothing)."""
        held = {}

        def take(sd):
            sd = dict(sd)
            held["mezo"] = sd.pop("mezo", None)
            return sd

        def apply():
            m = held["mezo"]
            if m is not None:
                self.seed, self.steps, self.eps = m["seed"], m["steps"], m["eps"]
                p = m.get("pending")
                self.pending = None if p is None else (p["seed"], p["eps"], tuple(p["tensor_ids"]))

        self._load_around(state_dict, take, apply)


def _check_group_values(group: dict, what: str) -> None:
    for key, low in (("lr", 0.0), ("weight_decay", 0.0)):
        if key in group and not torch.is_tensor(group[key]):   # (a tensor lr is not read: no host sync)
            v = group[key]
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"{what} {key} must be a number, got {group[key]!r}") from None
            if not (math.isfinite(v) and v >= low):
                raise ValueError(f"{what} {key} must be a finite number >= {low:g}, got {group[key]!r}; nothing was "
                                 "changed")


def _params(params) -> list[torch.Tensor]:
    params = [params] if torch.is_tensor(params) else list(params)
    if not params:
        raise ValueError("zo update: params is empty")
    return params


def zo_replay_(params, seeds, coeffs, noise: str = "normal", rounding: str = "nearest", backend=None,
               rounding_seed: int | None = None, tensor_ids=None) -> None:
    """Apply a list of (seed, coeff) pairs to params in one pass per device (seed replay: e.g.
    MeZO steps `coeff = -lr * projected_grad`, FedKSeed's K pairs). Tensor ids: `tensor_ids` (one per
    param), else the order of params. MeZO numbers a parameter by its position among all the params it
    was given, frozen ones counted, over its groups in order: replay a run with frozen parameters or
    several groups with `params, ids = opt.replay_args()` (per group, where the groups' lr differ).
    One rounding for all pairs, so it differs from replaying step by step only by that rounding."""
    params = _params(params)
    ids = list(range(len(params))) if tensor_ids is None else [int(i) for i in tensor_ids]
    if len(ids) != len(params):
        raise ValueError(f"zo_replay_: {len(params)} params but {len(ids)} tensor_ids")
    by_dev: dict = {}
    for i, p in zip(ids, params):
        by_dev.setdefault(p.device, ([], []))
        by_dev[p.device][0].append(p)
        by_dev[p.device][1].append(i)
    for dev, (ts, ids) in by_dev.items():
        zo_apply_(ts, seeds, coeffs, noise, rounding, tensor_ids=ids, backend=backend, rounding_seed=rounding_seed)


def es_step_(params, seeds, rewards, lr: float, sigma: float, normalize: bool = True, **kw) -> torch.Tensor:
    """Evolution-strategies update from a population's seeds and rewards, in one pass:
    w += lr / (n * sigma) * sum_j r_j z_j, with r standardised when normalize. Returns the coefficients."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if r.numel() != len(seeds):
        raise ValueError(f"es_step_: {len(seeds)} seeds but {r.numel()} rewards")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"es_step_: rewards must be finite (one NaN or inf would make every weight NaN), got "
                         f"{r[~torch.isfinite(r)].tolist()[:4]} among them; nothing was changed")
    if normalize and r.numel() > 1:
        r = (r - r.mean()) / (r.std() + 1e-12)
    coeffs = (lr / (r.numel() * sigma)) * r
    zo_replay_(params, seeds if torch.is_tensor(seeds) else list(seeds), coeffs.tolist(), **kw)
    return coeffs
