"""HalfFineTuner: HFT's half-of-each-category selection applied to a model in place."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ..patch import bypassed_hooks, format_table, refuse_ddp, refuse_packed, refuse_sharded, set_module
from .selection import (GRANULARITIES, ROW_GRANULARITIES, HFTError, ModelMap, check_ratio, choose_members,
                        map_model, select_rows)

_ATTR = "_fusedtune_hft"
PARTS = ("frozen", "selected", "all")


def _row_linear_class():
    """fusedtune.nn.RowMaskedLinear, or the reason it cannot be had."""
    try:
        from ..nn import RowMaskedLinear  # noqa: PLC0415
        return RowMaskedLinear, ""
    except Exception as e:  # noqa: BLE001 - ImportError, or an error while the module loads
        return None, f"{type(e).__name__}: {e}"


def _masked_adamw_class():
    try:
        from ..optim import MaskedAdamW  # noqa: PLC0415
        return MaskedAdamW, ""
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def describe_row_layer(module: nn.Module) -> tuple[str, str, str]:
    """(backend, path, why_not) of a RowMaskedLinear, from the layer's own report."""
    rep = getattr(module, "_fusedtune_report", None)
    if callable(rep):
        try:
            out = rep()
            why = out.get("why_not", "")
            if isinstance(why, dict):
                why = "; ".join(f"{k}: {v}" for k, v in why.items())
            return str(out.get("backend")), str(out.get("path", type(module).__name__)), str(why or "")
        except Exception as e:  # noqa: BLE001 - a report must not fail
            return "?", type(module).__name__, f"the layer's report failed: {type(e).__name__}: {e}"
    return "?", type(module).__name__, "the layer does not report its backend"


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def _bit_sum(t: torch.Tensor) -> int:
    """The sum of a tensor's bit patterns as integers (exact in int64 arithmetic): a checksum that any
    change of one element moves (NaNs included)."""
    flat = t.detach().reshape(-1)
    return int(flat.view(_INT_OF_SIZE[flat.element_size()]).sum(dtype=torch.int64))


class HalfFineTuner:
    """Half fine-tuning (HFT) of a decoder-only causal LM (Llama-style, or a family in selection.SCHEMAS), in place.

        hft = HalfFineTuner(model, ratio=0.5, granularity="matrix", seed=0)
        opt = hft.make_optimizer(lr=2e-5)       # MaskedAdamW over hft.trainable_parameters()
        ... train stage 0 ...
        hft.next_stage()                        # new selection (seed, stage 1); build a new optimizer
        hft.reset("frozen")                     # optional: frozen part back to its pretrained values
        hft.remove()                            # plain nn.Linear again, requires_grad flags as before

    granularity="matrix" is the HFT paper's category-level selection (see fusedtune.hft.selection for
    the exact rule): per layer round(ratio * 4) of q/k/v/o, ratio * 3 of gate/up/down balanced over the
    layers (at 0.5: 2 in half the layers, 1 in the others; with an odd layer count floor(L/2) layers
    get 2, so (3L - 1) / 2 of the 3L MLP matrices train), half of each layer's norms; embeddings and
    lm_head train (the paper's rule; train_embeddings=False freezes them, as LoRA leaves them: block
    granularity at TinyLlama-1.1B shapes then keeps 0.44x of full fine-tuning's optimizer state, not 0.56x);
    the final norm trains unless train_final_norm=False. Frozen parameters get
    requires_grad=False: no gradient, no dW GEMM, no optimizer state.

    granularity="row": every q/k/v/o/gate/up/down linear is replaced (in place) by
    fusedtune.nn.RowMaskedLinear training a seeded random set of round(ratio * out_features) output
    rows (ties down, at least 1), and its bias at those rows: its weight gradient is computed for those
    rows only and the optimizer (fusedtune.optim.MaskedAdamW) keeps moments only for them. Norms,
    embeddings, lm_head and the final norm follow the matrix rule. next_stage() re-selects rows in
    place (RowMaskedLinear.set_rows).

    granularity="block": as "row", but each linear trains one seeded random contiguous block of the
    same number of rows (fusedtune.hft.selection.choose_block), and its weight_rows / bias_rows are
    views of that block of the weight (RowMaskedLinear(masters=False)): no float32 master copy, and
    the trained rows update in place under any optimizer. make_optimizer gives torch.optim.AdamW
    (fused on CUDA), whose moments are in the parameters' dtype, as in full fine-tuning with it: the
    optimizer state is that of the selected rows only (bf16 model: 4 bytes per trained element,
    against row granularity's 12 for float32 masters and moments). Rows of a block are not a random
    subset, but for a pretrained model the order of a matrix's output rows carries no meaning (an MLP
    layer's neurons can be permuted freely); for q/k/v a block is a run of whole or partial heads.

    ratio: any number in (0, 1]; the category counts generalize as described in
    fusedtune.hft.selection (each layer trains floor(r*n) or ceil(r*n) of a category's n members and
    round(r*n*L) in all).

    snapshot=True keeps a CPU copy of every parameter as it was at construction, for reset() and
    remove(restore=True): host memory equal to the model's parameter bytes (e.g. ~16 GB for an 8B
    model in bf16). snapshot="lazy" copies a parameter when a stage first makes it train (frozen
    parameters keep their pretrained values, so they need no copy): at stage 0 of matrix granularity
    about half of the q/k/v/o/MLP bytes are never copied (~9 GB instead of ~16 GB for an 8B model),
    and later stages add what they newly train (in row granularity every projection's rows train, so
    "lazy" saves only the frozen norms there). A parameter is copied, or left out of a reset as still
    pretrained, only if it is unchanged since construction: same version counter, or, when a write
    moved the counter (a load_state_dict, DDP's first broadcast), the same integer checksum of its
    bits; otherwise reset() refuses it by name before touching anything. snapshot=False keeps
    nothing; reset() then refuses.

    backend: the fusedtune backend of the row layers' ops and of make_optimizer's MaskedAdamW
    (None: per scope / FUSEDTUNE_BACKEND / auto, see fusedtune.backend).

    Deterministic: the selection is a pure function of (seed, stage) and the model's module names.
    """

    def __init__(self, model: nn.Module, ratio: float = 0.5, granularity: str = "matrix", seed: int = 0, *,
                 train_final_norm: bool = True, train_embeddings: bool = True, snapshot: bool | str = True,
                 backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise HFTError(f"HalfFineTuner: model must be a torch.nn.Module, got {type(model).__name__}")
        if granularity not in GRANULARITIES:
            raise HFTError(f"HalfFineTuner: granularity must be one of {', '.join(map(repr, GRANULARITIES))}, "
                           f"got {granularity!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HFTError(f"HalfFineTuner: seed must be an int, got {seed!r}")
        if snapshot not in (True, False, "lazy"):
            raise HFTError(f"HalfFineTuner: snapshot must be True, False or 'lazy', got {snapshot!r}")
        if model.__dict__.get(_ATTR) is not None:
            raise HFTError("HalfFineTuner: this model already has a HalfFineTuner attached; call .remove() on it "
                           "first (or next_stage() to change the selection)")
        for flag, value in (("train_final_norm", train_final_norm), ("train_embeddings", train_embeddings)):
            if not isinstance(value, bool):
                raise HFTError(f"HalfFineTuner: {flag} must be True or False, got {value!r}")
        self.ratio = check_ratio(ratio)
        self.granularity = granularity
        self.seed = seed
        self.train_final_norm = bool(train_final_norm)
        self.train_embeddings = bool(train_embeddings)
        self.backend = backend
        if granularity in ROW_GRANULARITIES:   # (matrix granularity swaps nothing: fine under FSDP2)
            refuse_sharded(model, f"HalfFineTuner(granularity={granularity!r})", HFTError)
        else:
            refuse_ddp(model, "HalfFineTuner", HFTError)
        self.model = model
        self.map: ModelMap = map_model(model)
        refuse_packed(model.named_parameters(), "HalfFineTuner",
                      "HFT trains the weights themselves; load the model in 16 or 32 bits", HFTError)
        meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
        if meta is not None and (snapshot is not False or granularity in ROW_GRANULARITIES):
            raise HFTError(f"HalfFineTuner: {meta} is on the meta device and holds no values, but the pretrained "
                           "snapshot (reset) and the row masters are copied from the weights now. Materialise the "
                           "model first (to_empty and load its state dict, or from_pretrained without "
                           "init_empty_weights). Nothing was changed")
        self._row_cls = None
        if granularity in ROW_GRANULARITIES:
            self._row_cls, why = _row_linear_class()
            if self._row_cls is None:
                raise HFTError(f"HalfFineTuner(granularity={granularity!r}) needs fusedtune.nn.RowMaskedLinear, "
                               f"which is not available here ({why}); use granularity='matrix'")
            param = next(model.parameters(), None)
            try:
                self._row_cls.check_backend(f"HalfFineTuner(granularity={granularity!r})", backend,
                                            param.device if param is not None else "cpu")
            except ValueError as e:
                raise HFTError(str(e)) from None
            hooked = [(n, h) for n in self.map.linear_names() if (h := bypassed_hooks(model.get_submodule(n)))]
            if hooked:   # the row-masked layer computes from the weights without calling the module
                raise HFTError(f"HalfFineTuner(granularity={granularity!r}): {hooked[0][0]} has a {hooked[0][1]}, "
                               "which the row-masked layer taking its place would not run; remove the hooks first "
                               "(or use granularity='matrix', which swaps nothing)")
        # names as they are before any swap; tied parameters appear under every name
        self._names = [(n, n.rpartition(".")[0], n.rpartition(".")[2], tuple(p.shape))
                       for n, p in model.named_parameters(remove_duplicate=False)]
        canon: dict[int, str] = {}
        self._alias: dict[str, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._alias[n] = canon.setdefault(id(p), n)
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._flag_by_name = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._lazy = snapshot == "lazy"
        self._canon = [n for n, _ in model.named_parameters()]     # one name per parameter
        self._versions = {n: p._version for n, p in model.named_parameters()}
        self._sums = {n: _bit_sum(p) for n, p in model.named_parameters()} if self._lazy else {}
        if snapshot is True:
            with torch.no_grad():
                self._snapshot = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        elif self._lazy:
            self._snapshot = {}
        self.stage = 0
        self._rows: dict[str, nn.Module] = {}      # module name -> RowMaskedLinear (row granularity)
        self._restored = False
        self._apply()
        model.__dict__[_ATTR] = self

    # ------------------------------------------------------------------------------ selection

    def _plan(self, stage: int):
        """(per-layer members, set of module names trained whole) for a stage."""
        members = choose_members(self.map, self.ratio, self.seed, stage)
        whole = set()
        if self.train_embeddings:
            whole |= set(self.map.embeddings)
            if self.map.lm_head:
                whole.add(self.map.lm_head)
        if self.train_final_norm:
            whole |= set(self.map.final_norms)
        for lay, m in zip(self.map.layers, members):
            whole |= {lay.norms[s] for s in m["norm"]}
            if self.granularity == "matrix":
                whole |= {lay.attn[s] for s in m["attn"]} | {lay.mlp[s] for s in m["mlp"]}
        return members, whole

    def _owned_modules(self) -> list[str]:
        names = list(self.map.embeddings) + list(self.map.final_norms)
        names += [self.map.lm_head] if self.map.lm_head else []
        for lay in self.map.layers:
            names += list(lay.norms.values())
            if self.granularity == "matrix" or self._restored:
                names += list(lay.attn.values()) + list(lay.mlp.values())
        return names

    def _apply(self) -> None:
        _, whole = self._plan(self.stage)
        model = self.model
        if self.granularity in ROW_GRANULARITIES and not self._restored:
            self._apply_rows()
        owned = self._owned_modules()
        with torch.no_grad():
            for name in owned:                      # frozen first, so that a tied parameter that is
                for p in model.get_submodule(name).parameters():   # trained anywhere trains
                    p.requires_grad_(False)
            for name in owned:
                if name in whole:
                    for p in model.get_submodule(name).parameters():
                        p.requires_grad_(True)
            for name in owned:     # a gradient left from an earlier stage would count in clip_grad_norm_ over
                for p in model.get_submodule(name).parameters():   # model.parameters() (an optimizer made
                    if not p.requires_grad:                         # for the new stage does not hold them)
                        p.grad = None
        if self._lazy:
            self._snapshot_trained()

    def _param(self, name: str) -> torch.Tensor:
        """The tensor behind a parameter name as before any swap (a row layer's weight or bias)."""
        mname, _, leaf = name.rpartition(".")
        row = self._rows.get(mname)
        return getattr(row, leaf) if row is not None else self.model.get_parameter(name)

    def _pristine(self, name: str, t: torch.Tensor) -> bool:
        """Unchanged since construction: the same version counter, or the same checksum of its bits."""
        if t._version == self._versions[name]:
            return True
        if _bit_sum(t) == self._sums[name]:
            self._versions[name] = t._version           # rewritten with the same values (a load, a broadcast)
            return True
        return False

    def _trains(self, name: str, t: torch.Tensor) -> bool:
        return t.requires_grad or name.rpartition(".")[0] in self._rows

    @torch.no_grad()
    def _snapshot_trained(self) -> None:
        """snapshot='lazy': copy what trains from now on and was not copied yet (still pretrained)."""
        for name in self._canon:
            if name in self._snapshot:
                continue
            t = self._param(name)
            if self._trains(name, t) and self._pristine(name, t):
                self._snapshot[name] = t.detach().to("cpu", copy=True)
            # (changed before a stage trained it: no pretrained value left to copy; reset() refuses it)

    def _apply_rows(self) -> None:
        model, made = self.model, []
        try:
            for name in self.map.linear_names():
                mod = model.get_submodule(name)
                rows = select_rows(self.granularity, name, mod.out_features, self.ratio, self.seed, self.stage)
                if isinstance(mod, self._row_cls):
                    mod.set_rows(rows.to(mod.weight.device))
                else:
                    new = self._row_cls.from_linear(mod, rows.to(mod.weight.device), backend=self.backend,
                                                    masters=self.granularity == "row")
                    set_module(model, name, new)
                    self._rows[name] = new
                    made.append((name, mod))
                    mod = new
                mod.weight.requires_grad_(False)
                mod.weight_rows.requires_grad_(True)
                if mod.bias is not None:
                    mod.bias.requires_grad_(False)
                    mod.bias_rows.requires_grad_(True)
        except Exception:
            for name, orig in made:                 # leave the model as it was
                set_module(model, name, orig)
                self._rows.pop(name, None)
            raise

    def next_stage(self) -> int:
        """Choose the selection of the next stage (seed, stage + 1) and apply it; returns the new stage.
        An optimizer built before holds the old parameters and moments: build a new one (HFTCallback
        does this for a Trainer's optimizer)."""
        return self.set_stage(self.stage + 1)

    def set_stage(self, stage: int) -> int:
        """Apply the selection of any stage (e.g. when resuming); returns it."""
        self._check_attached()
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
            raise HFTError(f"HalfFineTuner.set_stage: stage must be an int >= 0, got {stage!r}")
        if self.granularity in ROW_GRANULARITIES and self._restored:
            raise HFTError("HalfFineTuner: the row-masked layers were restored to nn.Linear "
                           "(restore_modules/merge); build a new HalfFineTuner to change the stage")
        self.stage = stage
        self._apply()
        return self.stage

    def selection(self, stage: int | None = None) -> dict[str, object]:
        """Parameter name (as before any swap; tied parameters under each name) -> True / False, or for
        the weight of a row-masked linear a bool tensor over its output rows. stage: default the current
        one; any other stage is computed without applying it."""
        stage = self.stage if stage is None else int(stage)
        _, whole = self._plan(stage)
        rowwise = self.granularity in ROW_GRANULARITIES and not self._restored
        row_mods = set(self.map.linear_names()) if rowwise else set()
        out: dict[str, object] = {}
        for pname, mname, leaf, shape in self._names:
            if mname in row_mods:
                if leaf in ("weight", "bias"):
                    mask = torch.zeros(shape[0], dtype=torch.bool)
                    mask[select_rows(self.granularity, mname, shape[0], self.ratio, self.seed, stage)] = True
                    out[pname] = mask
                else:
                    out[pname] = False
            else:
                out[pname] = any(mname == w or mname.startswith(w + ".") for w in whole)
        return out

    def members(self, stage: int | None = None) -> list[dict[str, list[str]]]:
        """Per layer, the short names that train: {'attn': ['q_proj', 'v_proj'], 'mlp': [...], 'norm': [...]}.
        (In row granularity 'attn' and 'mlp' are what matrix granularity would pick; the rows are in
        selection().)"""
        return choose_members(self.map, self.ratio, self.seed, self.stage if stage is None else int(stage))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer (requires_grad=True), each once, in model order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float = 1e-3, **kwargs):
        """fusedtune.optim.MaskedAdamW over trainable_parameters() (with weight_decay: biases and norm weights in a
        group of their own without it, as transformers.Trainer's). Without MaskedAdamW (not built in
        this install) matrix granularity falls back to torch.optim.AdamW with a warning; row granularity
        refuses (plain AdamW would not write the trained rows into the full weights).
        Block granularity: torch.optim.AdamW (fused=True when every parameter is on CUDA), moments in
        the parameters' dtype; its trained rows are views of the weights, so any optimizer works."""
        from ..patch import decay_groups  # noqa: PLC0415  (biases and norms: no weight decay, as Trainer's)
        flat = self.trainable_parameters()
        params = decay_groups(self.model, flat, kwargs.get("weight_decay"))   # (None: the optimizer's default)
        if self.granularity == "block" and not self._restored:
            if all(p.is_cuda for p in flat):
                kwargs.setdefault("fused", True)
            return torch.optim.AdamW(params, lr=lr, **kwargs)
        cls, why = _masked_adamw_class()
        if cls is not None:
            kwargs.setdefault("backend", self.backend)
            return cls(params, lr=lr, **kwargs)
        if self.granularity == "row" and not self._restored:
            raise HFTError(f"HalfFineTuner.make_optimizer: row granularity needs fusedtune.optim.MaskedAdamW, "
                           f"which is not available ({why})")
        warnings.warn(f"HalfFineTuner.make_optimizer: fusedtune.optim.MaskedAdamW is not available ({why}); "
                      "using torch.optim.AdamW (same math for whole matrices)", stacklevel=2)
        return torch.optim.AdamW(params, lr=lr, **kwargs)

    # ------------------------------------------------------------------------------ rows

    def row_layers(self) -> dict[str, nn.Module]:
        """Module name -> RowMaskedLinear (row granularity; empty otherwise)."""
        return dict(self._rows)

    @torch.no_grad()
    def write_back_rows(self) -> None:
        """Copy every row layer's trained masters (weight_rows, bias_rows) into its weight and bias.
        MaskedAdamW does this inside its step; call it after the step of any other optimizer."""
        for mod in self._rows.values():
            mod.write_rows_()

    # ------------------------------------------------------------------------------ reset / restore

    @property
    def has_snapshot(self) -> bool:
        """Whether reset() can restore pretrained values (snapshot=True or 'lazy')."""
        return self._snapshot is not None

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held by the pretrained snapshot (0 with snapshot=False)."""
        if not self._snapshot:
            return 0
        return sum(t.numel() * t.element_size() for t in self._snapshot.values())

    def _match(self, names) -> set[str] | None:
        if names is None:
            return None
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise HFTError(f"HalfFineTuner.reset: names must be parameter or module names (strings), got {names!r}")
        out, unknown = set(), []
        for n in names:
            hit = {c for a, c in self._alias.items() if a == n or a.startswith(n + ".")}
            if not hit and n.endswith((".weight_rows", ".bias_rows")):  # a row layer's master: its weight/bias
                hit = {c for a, c in self._alias.items() if a == n[: -len("_rows")]}
            if not hit:
                unknown.append(n)
            out |= hit
        if unknown:
            raise HFTError(f"HalfFineTuner.reset: {unknown} name no parameter or module of the model "
                           f"(parameters are named like {next(iter(self._alias), '?')!r})")
        return out

    @torch.no_grad()
    def reset(self, part: str = "frozen", names: Iterable[str] | str | None = None) -> list[str]:
        """Restore parameters to their values at construction, in place, bit-exactly.

        part: "frozen" (what does not train at the current stage; for a row-masked layer its unselected
        rows of weight and bias), "selected" (what trains now; for a row layer its selected rows, in the
        full weight and bias and in their fp32 masters), or "all". names: restrict to these parameter
        or module names (names as before any swap; a module name covers its parameters). Returns the
        names of the parameters touched (with snapshot="lazy", one never trained is listed under
        "frozen"/"all" without a copy: it holds its pretrained value). Moments already in an optimizer
        are not reset: reset before building the optimizer, or build a new one.
        """
        self._check_attached()
        if part not in PARTS:
            raise HFTError(f"HalfFineTuner.reset: part must be one of {', '.join(map(repr, PARTS))}, got {part!r}")
        if self._snapshot is None:
            raise HFTError("HalfFineTuner.reset: no snapshot of the pretrained weights was kept "
                           "(HalfFineTuner(..., snapshot=False))")
        wanted = self._match(names)
        todo = [n for n in self._canon if wanted is None or n in wanted]
        for name in todo:       # lazy: what was never copied must still be pretrained (checked first)
            if name in self._snapshot:
                continue
            t = self._param(name)
            if (part != "selected" or self._trains(name, t)) and not self._pristine(name, t):
                raise HFTError(f"HalfFineTuner.reset: {name} has no pretrained copy in the lazy snapshot: it "
                               "changed before a stage first trained it (snapshot=True keeps a copy of "
                               "everything); nothing was reset")
        touched = []
        for name in todo:
            snap = self._snapshot.get(name)
            if snap is None:    # never copied: frozen now, and still its pretrained value (checked)
                if part != "selected":
                    touched.append(name)
                continue
            mname, _, leaf = name.rpartition(".")
            row = self._rows.get(mname)
            if row is not None and leaf in ("weight", "bias"):
                w, rows = getattr(row, leaf), row.rows.to(row.weight.device)
                master = getattr(row, leaf + "_rows")
                src = snap.to(w.device)
                if part == "all":
                    w.copy_(src)
                elif part == "frozen":
                    keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
                    keep[rows] = False
                    w[keep] = src[keep]
                else:
                    w.index_copy_(0, rows, src.index_select(0, rows))
                if part != "frozen":
                    master.copy_(src.index_select(0, rows).to(master.dtype))
                    row.mark_rows_written()    # weight rows and master both hold the pretrained values
                touched.append(name)
                continue
            p = self.model.get_parameter(name)
            trains = p.requires_grad
            if part == "all" or (part == "selected") == trains:
                p.copy_(snap.to(p.device))
                touched.append(name)
        return touched

    def restore_modules(self) -> nn.Module:
        """Replace every RowMaskedLinear by an nn.Linear holding its current weights (to_linear());
        their requires_grad flags become what the original layers had. Ends row granularity for this
        tuner (next_stage refuses). Returns the model."""
        for name, mod in list(self._rows.items()):
            lin = mod.to_linear()
            lin.weight.requires_grad_(self._flag_by_name.get(name + ".weight", True))
            if lin.bias is not None:
                lin.bias.requires_grad_(self._flag_by_name.get(name + ".bias", True))
            set_module(self.model, name, lin)
        if self._rows:
            self._restored = True
        self._rows = {}
        return self.model

    merge = restore_modules

    def remove(self, restore: bool = False) -> nn.Module:
        """End HFT: restore_modules(), every requires_grad flag as it was before, drop the snapshot and
        detach from the model. restore=True first resets every parameter to its pretrained value."""
        self._check_attached()
        if restore:
            self.reset("all")
        self.restore_modules()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for n, p in self.model.named_parameters(remove_duplicate=False):   # new Parameters since (an assign-load)
            if n in self._flag_by_name:
                p.requires_grad_(self._flag_by_name[n])
        self._snapshot = None
        self._flags = []   # (they held the swapped layers' old weights: a second copy of every linear while the
        # tuner, or the PatchReport holding it, lived on)
        self.model.__dict__.pop(_ATTR, None)
        return self.model

    def _check_attached(self):
        if self.model.__dict__.get(_ATTR) is not self:
            raise HFTError("HalfFineTuner: this tuner was removed from its model (remove()); build a new one")

    # ------------------------------------------------------------------------------ reports

    def summary_rows(self) -> list[dict]:
        """Per layer (then 'embeddings', 'final norm', 'lm_head'): what trains and how many elements."""
        members, whole = self._plan(self.stage)
        rowwise = bool(self._rows)
        out = []
        for lay, m in zip(self.map.layers, members):
            r = {"layer": str(lay.index), "norm": m["norm"], "norm_of": len(lay.norms)}
            for cat in ("attn", "mlp"):
                mods = lay.attn if cat == "attn" else lay.mlp
                names = tuple(mods)
                if rowwise:
                    r[cat] = {s: (int(self._rows[mods[s]].rows.numel()), self._rows[mods[s]].out_features)
                              for s in names}
                else:
                    r[cat] = m[cat]
            r["trainable"] = sum(p.numel() for p in self.model.get_submodule(lay.prefix[:-1]).parameters()
                                 if p.requires_grad)
            out.append(r)
        seen = {id(p) for lay in self.map.layers for p in self.model.get_submodule(lay.prefix[:-1]).parameters()}
        for label, names in (("embeddings", self.map.embeddings), ("final norm", self.map.final_norms),
                             ("lm_head", [self.map.lm_head] if self.map.lm_head else [])):
            if not names:
                continue
            params = [p for mn in names for p in self.model.get_submodule(mn).parameters()]
            if params and all(id(p) in seen for p in params):
                label += " (tied)"
            n = 0
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel() if p.requires_grad else 0
            out.append({"layer": label, "trains": all(mn in whole for mn in names), "trainable": n})
        return out

    def summary(self) -> str:
        """A per-layer table of what trains at the current stage."""
        rows = []
        short = lambda s: s.replace("_proj", "")  # noqa: E731
        for r in self.summary_rows():
            if "attn" not in r:
                rows.append((r["layer"], "-", "-", "trains" if r["trains"] else "frozen", f"{r['trainable']:,}"))
                continue
            cells = []
            for cat, n_of in (("attn", 4), ("mlp", 3)):
                v = r[cat]
                if isinstance(v, dict):
                    k, tot = sum(a for a, _ in v.values()), sum(b for _, b in v.values())
                    cells.append(f"{k}/{tot} rows")
                else:
                    cells.append(f"{len(v)}/{n_of} " + (",".join(map(short, v)) or "-"))
            cells.append(f"{len(r['norm'])}/{r['norm_of']} " + (",".join(r["norm"]) or "-"))
            rows.append((r["layer"], *cells, f"{r['trainable']:,}"))
        total = sum(p.numel() for p in self.trainable_parameters())
        masters = {id(p) for m in self._rows.values() for p in m.master_parameters()}
        every = sum(p.numel() for p in self.model.parameters() if id(p) not in masters)
        rows.append(("total", "", "", "", f"{total:,} of {every:,} ({100 * total / max(every, 1):.1f}%)"))
        head = ("layer", "attention (q/k/v/o)", "mlp (gate/up/down)", "norms", "trainable")
        top = (f"HalfFineTuner: granularity={self.granularity!r}, ratio={self.ratio}, seed={self.seed}, "
               f"stage={self.stage}")
        return top + "\n" + format_table(head, rows)

    def __repr__(self) -> str:
        return (f"HalfFineTuner(granularity={self.granularity!r}, ratio={self.ratio}, seed={self.seed}, "
                f"stage={self.stage}, layers={len(self.map.layers)})")
