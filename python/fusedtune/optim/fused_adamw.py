"""The shared skeleton of the families' fused AdamW optimizers (MaskedAdamW, SparseDeltaAdamW):
argument checks, float32 moments per parameter, and a step that gathers every parameter with a
gradient into one list per (device, step count) and hands each list to the family's fused op."""
from __future__ import annotations

import torch

from ..nn.masters import owner_of
from .copyable import CopyableOptimizer


def refuse_sharded(params, what: str) -> None:
    """DTensor parameters (FSDP2's fully_shard, tensor parallelism) hold a shard each: the fused kernels
    index whole tensors (sparse delta positions, row indices, noise counters), so they are refused by name."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # a torch without distributed: no DTensor exists
        return
    if any(getattr(p, "_fsdp_flattened", False) for p in params):   # FSDP1 (FullyShardedDataParallel)
        raise TypeError(f"{what}: parameters of FSDP's FullyShardedDataParallel (flattened / sharded) are not "
                        "supported: the forward reads FSDP's own unsharded copies, so steps of these tensors would "
                        "not reach it. Use DistributedDataParallel (tested) or one process")
    if any(isinstance(p, DTensor) for p in params):
        raise TypeError(f"{what}: DTensor (FSDP2 fully_shard / tensor-parallel) parameters are not supported: the "
                        "fused kernels work on whole tensors. Use DistributedDataParallel (tested) or one process; "
                        "with FSDP, use a method whose parameters are plain (full, lora, qlora, fp8, fp8_lora, roste, "
                        "hft at matrix granularity) and torch.optim.AdamW created after fully_shard")


UNSUPPORTED_OPTIONS = ("maximize", "amsgrad", "capturable", "differentiable", "foreach", "fused")


def refuse_options(what: str, group: dict) -> None:
    """torch.optim.AdamW options given in a param group: refused when set (False / None pass), since the fused
    pass would ignore them (maximize would minimise)."""
    for key in UNSUPPORTED_OPTIONS:
        if group.get(key) not in (None, False):
            raise TypeError(f"{what}: param group option {key}={group[key]!r} is not supported (the fused pass "
                            f"implements plain AdamW: lr, betas, eps, weight_decay)")
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay", 0):   # torch.optim.Adam's L2 decay
        raise TypeError(f"{what}: param group option decoupled_weight_decay=False with weight_decay="
                        f"{group['weight_decay']} (Adam's L2 penalty) is not supported: the fused pass decays as "
                        "AdamW does")


def _replaced(opt, p, held) -> bool:
    """Whether p is a master its layer has replaced (SparseDeltaLinear.set_indices without keep_parameter, an HFT
    stage change at row granularity): it gets no gradient any more and is skipped, its state dropped. Refused,
    naming the cure, while the optimizer lacks any of the layer's current trainable masters: stepping on would
    silently leave them untrained (found by audit)."""
    layer = owner_of(p)
    if layer is None:
        return False
    masters = layer.master_parameters()
    if any(q is p for q in masters):
        return False
    if any(id(q) not in held for q in masters if q.requires_grad):
        raise RuntimeError(f"{type(opt).__name__}: it holds a parameter of shape {tuple(p.shape)} that its "
                           f"{type(layer).__name__} has replaced (set_indices without keep_parameter=True, or a stage "
                           "change at row granularity): the layer's new masters are not all in this optimizer and "
                           "would never train. Build the optimizer again over the model's parameters (or add them with "
                           "add_param_group); nothing was stepped")
    return True


class FusedAdamW(CopyableOptimizer):
    """Subclasses implement `_entries(p, state) -> tuple` (what the fused op takes for p) and
    `_run(lists, group, step)` (one fused op call over the transposed entries)."""
    _copied = ("backend",)
    writes_master_layers = True   # the pass writes the layers' merged copies (nn/masters.py's step hook skips it)

    def __init__(self, params, lr: float, betas, eps: float, weight_decay: float, backend: str | None):
        name = type(self).__name__
        if not lr >= 0:
            raise ValueError(f"{name}: lr must be >= 0, got {lr}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, each parameter checked first (_check_param): a refused group adds nothing, and a step
        never meets a parameter its fused op refuses half way through the groups. (torch's constructor adds
        its groups through this too.) Parameters may come as (name, tensor) pairs (named_parameters()).
        torch.optim.AdamW's per-group options that the fused pass does not implement are refused, not ignored."""
        if isinstance(param_group, dict):
            refuse_options(type(self).__name__, param_group)
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):   # (a set: torch refuses it, as unordered)
            params = list(params)
            param_group = {**param_group, "params": params}
        if isinstance(params, list):
            tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
            if len({id(p) for p in tensors}) != len(tensors):   # (torch warns; two entries of one tensor in a pass)
                raise ValueError(f"{type(self).__name__}: a parameter appears twice in one param group")
            refuse_sharded(tensors, type(self).__name__)
            for p in tensors:
                self._check_param(p)
        super().add_param_group(param_group)

    def _check_param(self, p) -> None:
        """Raise if the fused op cannot step this parameter (subclasses)."""

    def _state(self, p) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    def _entries(self, p, state) -> tuple:
        raise NotImplementedError

    def _run(self, lists, group, step) -> None:
        raise NotImplementedError

    def _check_run(self, lists, group, step, tensors: bool) -> None:
        """Raise what _run(lists, group, step) would refuse: the hyperparameters, and with tensors=True the
        lists' tensors (host-side checks), without changing anything."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []      # every group's lists first: what _entries refuses is refused before anything changes
        held, stale = {id(p) for group in self.param_groups for p in group["params"]}, []
        for group in self.param_groups:
            buckets: dict = {}
            for p in group["params"]:
                if _replaced(self, p, held):
                    stale.append(p)
                    continue
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not take sparse gradients")
                st = self._state(p)
                entries = self._entries(p, st)
                key = (p.device, st["step"] + 1)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([[] for _ in entries], [])
                for lst, val in zip(bucket[0], entries):
                    lst.append(val)
                bucket[1].append(st)
            work.append((group, buckets))
        for p in stale:   # (their moments belong to positions their layers no longer have)
            self.state.pop(p, None)
        runs = [(group, step, lists, states) for group, buckets in work
                for (_, step), (lists, states) in buckets.items()]
        if len(runs) > 1:
            # Each op call refuses bad input before it changes anything, but only its own lists: a refusal in
            # a later call would leave the earlier ones stepped. So every group's hyperparameters are checked,
            # and every list but the largest on the host; the largest runs first (checked by its own call).
            runs.insert(0, runs.pop(max(range(len(runs)), key=lambda i: len(runs[i][3]))))
            for i, (group, step, lists, _) in enumerate(runs):
                self._check_run(lists, group, step, tensors=i > 0)
        for group, step, lists, states in runs:
            self._run(lists, group, step)
            for st in states:     # counted once its op ran
                st["step"] = step
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, hooks included, but the state tensors keep their saved dtypes (copied): torch casts
        every state tensor of a floating parameter to the parameter's dtype, which would make the float32
        moments of a bf16 parameter bf16 and the int32 step counts float. The saved tensors are taken from
        the state dict the load-state-dict pre-hooks leave, and put in before the post-hooks run. A
        torch.optim.AdamW checkpoint loads too: its tensor step count becomes an int, its moments float32."""
        final = {}

        def grab(sd):   # (a pre-hook: a refusal here leaves the optimizer as it was)
            for g in sd["param_groups"]:    # options the constructor refuses, from a torch.optim checkpoint
                refuse_options(f"{type(self).__name__}.load_state_dict", g)
            self._refuse_other_shapes(sd)
            final["sd"] = sd

        def restore():
            sd = final["sd"]
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            for i, p in zip(ids, params):
                for key, val in sd["state"].get(i, {}).items():
                    if key == "step" and torch.is_tensor(val):   # torch.optim.AdamW's float tensor count
                        self.state[p][key] = int(val.item())
                    elif key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(val):
                        self.state[p][key] = val.to(device=p.device, dtype=torch.float32, copy=True)
                    elif torch.is_tensor(val):
                        self.state[p][key] = val.to(device=p.device, copy=True)

        self._load_around(state_dict, grab, restore)

    def _refuse_other_shapes(self, sd: dict) -> None:
        """Refuse moments of another shape than their parameter (torch would fail at the first step with a
        raw size mismatch): the state dict of another selection of what trains."""
        saved = [g["params"] for g in sd["param_groups"]]
        if [len(ids) for ids in saved] != [len(g["params"]) for g in self.param_groups]:
            return                          # torch refuses that with its own message
        for gi, (ids, g) in enumerate(zip(saved, self.param_groups)):
            for j, (i, p) in enumerate(zip(ids, g["params"])):
                m = sd["state"].get(i, {}).get("exp_avg")
                if torch.is_tensor(m) and m.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the saved moments of parameter {j} of group {gi} "
                        f"have shape {tuple(m.shape)}, the parameter {tuple(p.shape)}: the state dict is of another "
                        "selection of what trains (another HFT seed or stage, sparse-delta density or target "
                        "modules). Nothing was loaded")

    def state_bytes(self) -> int:
        """Bytes of optimizer state (the moments)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t))
