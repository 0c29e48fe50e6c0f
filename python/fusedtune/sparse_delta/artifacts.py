"""Sparse deltas as artifacts: SparseDelta, save/load (safetensors), apply/revert, compose.

A SparseDelta holds, per linear layer (by module name), k flat row-major int32 indices
r * in_features + c into the layer's weight [out, in] (sorted, unique) and k float32 values.

File format (safetensors, format version 1):
    tensors   "<module name>.indices"  int32 [k]
              "<module name>.values"   float32 [k]
    metadata  "format": "fusedtune.sparse_delta", "format_version": "1",
              "layers": JSON {name: {"shape": [out, in], "dtype": "<weight dtype or null>", "k": k}},
              "user": JSON {str: str} (optional, whatever the caller passed as metadata=)
The raw bytes are stored, so save -> load is bit-exact (NaN payloads and -0.0 included).

apply(model, delta, scale=1.0) writes, at every index of every layer,
    W[i] <- round_to_W_dtype( fp32(W[i]) + fp32(scale * values[i]) )        (fp64 for fp64 weights)
and returns an AppliedDelta handle that keeps the original W values at the touched indices (and
the values it wrote), so revert(model, handle_or_delta) restores the weights bit-exactly. Several
applied deltas are reverted in reverse order of apply where they touch the same weights (revert
refuses otherwise); revert also refuses when the weights at the touched indices were changed after
apply (force=True restores the saved originals anyway). apply(model, delta, scale=-1.0) on a model
whose weights were merged elsewhere (no handle) is the inexact alternative: each touched element is
then within one rounding of W's dtype of the original (|W' - W0| <= ulp(W0 + d)), not exact.

Targets: nn.Linear, transformers' Conv1D (GPT-2; indices are in nn.Linear (out, in) semantics and
are transposed on the fly) and fusedtune.nn.SparseDeltaLinear, whose frozen base W0 becomes
W0 + delta while its own trainable deltas stay on top (W = round(base + values) is re-merged).
"""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

FORMAT = "fusedtune.sparse_delta"
FORMAT_VERSION = 1
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_EXACT_FLOATS = (torch.float32, torch.float16, torch.bfloat16)   # convert to float32 exactly
_STACK = "_fusedtune_sparse_deltas"   # model.__dict__ key: the AppliedDelta handles, in apply order


class SparseDeltaError(ValueError):
    """A sparse delta, its file or its target model is not what the operation needs; nothing was changed."""


# ----------------------------------------------------------------------------------------- checks

def check_indices(indices, numel: int, what: str = "indices") -> torch.Tensor:
    """Flat row-major indices: a 1-D integer tensor, every entry in [0, numel), strictly increasing
    (sorted, no duplicates). Returns them as a contiguous int32 tensor; raises SparseDeltaError /
    TypeError naming `what` otherwise (the input is never modified)."""
    if not torch.is_tensor(indices):
        raise TypeError(f"{what}: expected a torch.Tensor of flat row-major indices, got {type(indices).__name__}")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"{what}: expected an integer tensor (stored as int32), got dtype {indices.dtype}")
    if indices.dim() != 1:
        raise SparseDeltaError(f"{what}: expected a 1-D tensor, got shape {tuple(indices.shape)}")
    if numel > 2 ** 31 - 1:
        raise SparseDeltaError(f"{what}: the weight has {numel} elements; int32 flat indices address at most "
                               f"{2 ** 31 - 1}")
    if indices.numel():
        idx = indices.detach().to(torch.int64)
        bad = ((idx < 0) | (idx >= numel)).nonzero()
        if bad.numel():
            p = int(bad[0])
            raise SparseDeltaError(f"{what}: index out of range at position {p}: got {int(idx[p])}, need "
                                   f"0 <= index < {numel} (out_features * in_features); "
                                   f"{bad.numel()} of {idx.numel()} out of range")
        if idx.numel() > 1:
            d = idx[1:] - idx[:-1]
            bad = (d <= 0).nonzero()
            if bad.numel():
                p = int(bad[0])
                kind = "duplicate" if int(d[p]) == 0 else "unsorted"
                raise SparseDeltaError(f"{what}: {kind} index at position {p + 1}: {int(idx[p + 1])} after "
                                       f"{int(idx[p])}; indices must be sorted row-major and unique")
    return indices.detach().to(torch.int32).contiguous()


def check_values(values, k: int, what: str = "values") -> torch.Tensor:
    """k delta values as a contiguous float32 tensor (float16/bfloat16 convert exactly; float64 is refused)."""
    if not torch.is_tensor(values):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in _EXACT_FLOATS:
        raise TypeError(f"{what}: expected float32 (or float16/bfloat16, converted exactly), got {values.dtype}; "
                        "convert explicitly if rounding to float32 is intended")
    if values.dim() != 1 or values.numel() != k:
        raise SparseDeltaError(f"{what}: expected shape ({k},) to match the indices, got {tuple(values.shape)}")
    return values.detach().to(torch.float32).contiguous()


def _shape(shape, what) -> tuple[int, int]:
    try:
        out, inp = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise SparseDeltaError(f"{what}: shape must be (out_features, in_features), got {shape!r}") from None
    if out < 1 or inp < 1:
        raise SparseDeltaError(f"{what}: shape must be positive (out_features, in_features), got {shape!r}")
    return out, inp


def _dtype_name(dtype, what: str) -> str | None:
    """The weight dtype's name, information only: a torch dtype or a string naming one ('bfloat16',
    'torch.bfloat16', 'half') gives torch's name ('float16'); another string is kept as given (files may
    name it their way); None stays None; anything else is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else dtype
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        return dtype
    raise SparseDeltaError(f"{what}: dtype must be a torch dtype or a name (e.g. 'bfloat16'), got {dtype!r}")


# ----------------------------------------------------------------------------------------- SparseDelta

@dataclass(frozen=True)
class LayerDelta:
    """One layer's delta: int32 indices [k] (flat row-major into weight [out, in]), float32 values [k]."""
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]          # (out_features, in_features)
    dtype: str | None = None        # dtype of the weight it was trained on (information only)

    @property
    def k(self) -> int:
        return self.indices.numel()

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class SparseDelta:
    """Sparse weight deltas of several linear layers, by module name.

        d = SparseDelta()
        d.add("model.layers.0.mlp.down_proj", indices, values, shape=(out, in), dtype="bfloat16")
        d["model.layers.0.mlp.down_proj"].values
    """

    def __init__(self, layers: dict | None = None, metadata: dict | None = None):
        self._layers: dict[str, LayerDelta] = {}
        self.metadata: dict[str, str] = dict(metadata or {})
        for name, ld in (layers or {}).items():
            if isinstance(ld, LayerDelta):
                self.add(name, ld.indices, ld.values, ld.shape, ld.dtype)
            else:
                self.add(name, *ld)

    def add(self, name: str, indices, values, shape, dtype=None) -> "SparseDelta":
        """Add (or replace) layer `name`; indices and values are checked (see check_indices) and copied
        to int32 / float32 (no tensor given is kept or modified)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"SparseDelta.add: name must be a non-empty module name, got {name!r}")
        shape = _shape(shape, f"SparseDelta layer {name!r}")
        idx = check_indices(indices, shape[0] * shape[1], f"SparseDelta layer {name!r}: indices").clone()
        val = check_values(values, idx.numel(), f"SparseDelta layer {name!r}: values").clone()
        if val.device != idx.device:
            raise SparseDeltaError(f"SparseDelta layer {name!r}: indices on {idx.device} but values on {val.device}")
        self._layers[name] = LayerDelta(idx, val, shape, _dtype_name(dtype, f"SparseDelta layer {name!r}"))
        return self

    # -- container
    def __getitem__(self, name: str) -> LayerDelta:
        return self._layers[name]

    def __contains__(self, name) -> bool:
        return name in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def names(self) -> list[str]:
        return list(self._layers)

    def items(self):
        return self._layers.items()

    @property
    def nnz(self) -> int:
        """Total number of delta entries over all layers."""
        return sum(ld.k for ld in self._layers.values())

    def to(self, device) -> "SparseDelta":
        """A copy on `device`."""
        out = SparseDelta(metadata=self.metadata)
        for n, ld in self._layers.items():
            out._layers[n] = LayerDelta(ld.indices.to(device), ld.values.to(device), ld.shape, ld.dtype)
        return out

    def clone(self) -> "SparseDelta":
        out = SparseDelta(metadata=self.metadata)
        for n, ld in self._layers.items():
            out._layers[n] = LayerDelta(ld.indices.clone(), ld.values.clone(), ld.shape, ld.dtype)
        return out

    def dense(self, name: str) -> torch.Tensor:
        """Layer `name`'s delta as a dense float32 [out, in] tensor."""
        ld = self._layers[name]
        d = torch.zeros(ld.numel, dtype=torch.float32, device=ld.values.device)
        d[ld.indices.long()] = ld.values
        return d.view(ld.shape)

    def equal(self, other: "SparseDelta") -> bool:
        """Same layers, shapes, indices and bit-identical values."""
        if not isinstance(other, SparseDelta) or list(self._layers) != list(other._layers):
            return False
        for n, a in self._layers.items():
            b = other._layers[n]
            if a.shape != b.shape or not torch.equal(a.indices.cpu(), b.indices.cpu()):
                return False
            if not torch.equal(a.values.cpu().view(torch.int32), b.values.cpu().view(torch.int32)):
                return False
        return True

    def __repr__(self) -> str:
        return f"SparseDelta({len(self)} layers, {self.nnz:,} entries)"


# ----------------------------------------------------------------------------------------- model <-> delta

def _sdl_class():
    try:
        from ..nn import SparseDeltaLinear  # noqa: PLC0415
    except ImportError:   # the layer is not importable (should not happen in a full install)
        return None
    return SparseDeltaLinear


def _is_sdl(module) -> bool:
    cls = _sdl_class()
    return cls is not None and isinstance(module, cls)


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fusedtune.nn.SparseDeltaLinear in model (the model itself included)."""
    return [(n, m) for n, m in model.named_modules() if _is_sdl(m)]


def extract(model: nn.Module) -> SparseDelta:
    """The trained deltas of every SparseDeltaLinear in `model` (copies, on the layers' devices)."""
    if isinstance(model, SparseDelta):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a SparseDelta, got {type(model).__name__}")
    layers = sparse_layers(model)
    if not layers:
        raise SparseDeltaError("the model has no fusedtune.nn.SparseDeltaLinear layer (patch it with "
                               "fusedtune.patch(model, 'sparse_delta', ...) or pass a SparseDelta)")
    if layers[0][0] == "":
        raise SparseDeltaError("extract: a SparseDeltaLinear alone has no module name to file its delta under; "
                               "pass the model that holds it (or build a SparseDelta with SparseDelta.add(name, ...))")
    out = SparseDelta()
    for name, m in layers:
        out.add(name, m.indices, m.values, (m.out_features, m.in_features), m.weight.dtype)
    return out


def save(model_or_delta, path, metadata: dict | None = None) -> SparseDelta:
    """Save the deltas of a model's SparseDeltaLinear layers (or a SparseDelta) to a safetensors file.
    `metadata`: extra str -> str entries kept in the file (SparseDelta.metadata is saved too).
    Returns the SparseDelta that was written."""
    from safetensors.torch import save_file  # noqa: PLC0415
    delta = extract(model_or_delta)
    user = {**delta.metadata, **(metadata or {})}
    bad = [k for k, v in user.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"save: metadata must map str to str; offending keys: {bad}")
    tensors, layers = {}, {}
    for name, ld in delta.items():
        tensors[f"{name}.indices"] = ld.indices.detach().to("cpu", copy=True).contiguous()
        tensors[f"{name}.values"] = ld.values.detach().to("cpu", copy=True).contiguous()
        layers[name] = {"shape": list(ld.shape), "dtype": ld.dtype, "k": ld.k}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers)}
    if user:
        meta["user"] = json.dumps(user)
    save_file(tensors, os.fspath(path), metadata=meta)
    return delta


def load(path, device="cpu") -> SparseDelta:
    """Load a SparseDelta saved by save(); every layer is checked (a corrupt or foreign file is
    refused with the reason)."""
    from safetensors import safe_open  # noqa: PLC0415
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SparseDeltaError(f"load({path!r}): not a fusedtune sparse-delta file (metadata format "
                                   f"{meta.get('format')!r}, need {FORMAT!r})")
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            version = None
        if version != FORMAT_VERSION:
            raise SparseDeltaError(f"load({path!r}): format version {meta.get('format_version')!r} is not "
                                   f"supported (this fusedtune reads version {FORMAT_VERSION})")
        try:
            layers = json.loads(meta["layers"])
            user = json.loads(meta["user"]) if "user" in meta else {}
        except (KeyError, json.JSONDecodeError) as e:
            raise SparseDeltaError(f"load({path!r}): the layer table in the metadata is missing or "
                                   f"unreadable ({e})") from None
        if not isinstance(layers, dict):
            why = f"'layers' is a {type(layers).__name__}, not a mapping of layer names to entries"
        else:
            bad = next((n for n, i in layers.items() if not isinstance(i, dict)), None)
            why = None if bad is None else f"layer {bad!r}'s entry is a {type(layers[bad]).__name__}, not a mapping"
        if why is None and not isinstance(user, dict):
            why = f"'user' is a {type(user).__name__}, not a mapping"
        if why is not None:
            raise SparseDeltaError(f"load({path!r}): the metadata is malformed: {why}")
        keys = set(f.keys())
        wanted = {f"{n}.{s}" for n in layers for s in ("indices", "values")}
        if keys != wanted:
            missing, extra = sorted(wanted - keys), sorted(keys - wanted)
            raise SparseDeltaError(f"load({path!r}): tensors do not match the layer table "
                                   f"(missing {missing[:5]}, unexpected {extra[:5]})")
        out = SparseDelta(metadata=user)
        for name, info in layers.items():
            idx, val = f.get_tensor(f"{name}.indices"), f.get_tensor(f"{name}.values")
            if idx.dtype != torch.int32 or val.dtype != torch.float32:
                raise SparseDeltaError(f"load({path!r}): layer {name!r} has indices {idx.dtype} and values "
                                       f"{val.dtype}; the format stores int32 and float32")
            k = info.get("k", idx.numel())
            if isinstance(k, bool) or not isinstance(k, int) or k != idx.numel():
                raise SparseDeltaError(f"load({path!r}): layer {name!r} lists k={k!r} but stores "
                                       f"{idx.numel()} indices")
            try:
                out.add(name, idx, val, info.get("shape"), info.get("dtype"))
            except (SparseDeltaError, TypeError, ValueError) as e:
                raise SparseDeltaError(f"load({path!r}): {e}") from None
    return out.to(device) if torch.device(device) != torch.device("cpu") else out


# ----------------------------------------------------------------------------------------- apply / revert

@dataclass
class _Entry:
    name: str
    kind: str                 # "linear", "conv1d", "sdl"
    module: nn.Module
    pos: torch.Tensor         # int64 positions into module.weight.view(-1), on the weight's device
    orig: torch.Tensor        # weight (or SparseDeltaLinear base) values there before apply
    new: torch.Tensor         # ... and after apply


class AppliedDelta:
    """What apply() did to a model; revert(model, handle) (or handle.revert()) undoes it exactly."""

    def __init__(self, model, delta, scale, entries):
        self._model = weakref.ref(model)
        self.delta, self.scale, self.entries = delta, scale, entries
        self.reverted = False

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __getstate__(self):          # picklable / deep-copyable: the model reference is not kept
        return {**self.__dict__, "_model": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._model is None:
            self._model = lambda: None

    def revert(self, force: bool = False) -> None:
        model = self._model()
        if model is None:
            raise SparseDeltaError("the model this delta was applied to no longer exists")
        revert(model, self, force=force)

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else "applied"
        return f"AppliedDelta({state}, {len(self.entries)} layers, scale={self.scale})"


def _stack(model) -> list:
    return model.__dict__.setdefault(_STACK, [])


def applied(model: nn.Module) -> list[AppliedDelta]:
    """The deltas currently applied to `model` by apply(), oldest first."""
    return list(model.__dict__.get(_STACK, []))


def _target(model, name, ld: LayerDelta):
    """(kind, module, weight) for layer `name`, or raise; checks type and shape."""
    from ..patch import is_conv1d  # noqa: PLC0415
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise SparseDeltaError(f"the delta has layer {name!r}, which the model does not have") from None
    if _is_sdl(mod):
        kind, shape = "sdl", (mod.out_features, mod.in_features)
    elif is_conv1d(mod):
        kind, shape = "conv1d", (mod.weight.shape[1], mod.weight.shape[0])
    elif isinstance(mod, nn.Linear):
        kind, shape = "linear", tuple(mod.weight.shape)
    else:
        raise SparseDeltaError(f"layer {name!r} is a {type(mod).__name__}; sparse deltas apply to nn.Linear, "
                               "transformers' Conv1D and fusedtune.nn.SparseDeltaLinear")
    if tuple(shape) != tuple(ld.shape):
        raise SparseDeltaError(f"layer {name!r}: the delta is for a weight (out, in) = {ld.shape}, the model's "
                               f"is {tuple(shape)}")
    w = mod.weight
    if not w.is_floating_point():
        raise SparseDeltaError(f"layer {name!r}: weight dtype {w.dtype} is not floating point")
    if not w.is_contiguous():
        raise SparseDeltaError(f"layer {name!r}: the weight is not contiguous; make it contiguous first")
    return kind, mod, w


def _positions(kind, mod, ld: LayerDelta, device) -> torch.Tensor:
    idx = ld.indices.to(device=device, dtype=torch.int64)
    if kind == "conv1d":   # (out, in) row-major -> Conv1D weight (in, out) row-major
        n_in, n_out = mod.weight.shape
        idx = (idx % n_in) * n_out + idx // n_in
    return idx


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (NaN == NaN with the same payload)."""
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.contiguous().view(view) == b.contiguous().view(view)


def _base_at(mod, pos) -> torch.Tensor:
    """A SparseDeltaLinear's frozen base W0 at flat positions `pos` (base_values where the layer has a
    delta, the weight elsewhere)."""
    cur = mod.weight.detach().view(-1)[pos].clone()
    lidx = mod.indices.long()
    if lidx.numel() and pos.numel():
        loc = torch.searchsorted(lidx, pos)
        inside = loc < lidx.numel()
        inside &= lidx[loc.clamp(max=lidx.numel() - 1)] == pos
        cur[inside] = mod.base_values[loc[inside]].to(cur.dtype)
    return cur


@torch.no_grad()
def _write_base(mod, pos, vals) -> None:
    """Set a SparseDeltaLinear's frozen base W0 at `pos` to `vals`, keeping its own deltas merged on top."""
    mod.revert_()                                       # weight == W0 everywhere
    mod.weight.view(-1)[pos] = vals
    mod.base_values.copy_(mod.weight.view(-1)[mod.indices.long()])
    mod.merge_()                                        # weight == round(base + values) at its indices


def apply(model: nn.Module, delta: SparseDelta, scale: float = 1.0) -> AppliedDelta:
    """Add `scale * delta` to the weights of `model` in place (see the module docstring for the
    rounding rule); returns the handle that revert() uses. Everything is checked before any weight
    changes (unknown layer, wrong type or shape: nothing is touched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"apply: delta must be a SparseDelta (fusedtune.sparse_delta.load / compose), "
                        f"got {type(delta).__name__}")
    scale = float(scale)
    plan = []
    for name, ld in delta.items():
        kind, mod, w = _target(model, name, ld)
        plan.append((name, ld, kind, mod, w))
    entries = []
    with torch.no_grad():
        for name, ld, kind, mod, w in plan:
            pos = _positions(kind, mod, ld, w.device)
            ct = _compute_dtype(w.dtype)
            add = ld.values.to(w.device) * scale if scale != 1.0 else ld.values.to(w.device)
            if kind == "sdl":
                orig = _base_at(mod, pos)
                new = (orig.to(ct) + add.to(ct)).to(w.dtype)
                _write_base(mod, pos, new)
            else:
                wf = w.view(-1)
                orig = wf[pos].clone()
                new = (orig.to(ct) + add.to(ct)).to(w.dtype)
                wf[pos] = new
            entries.append(_Entry(name, kind, mod, pos, orig, new))
    handle = AppliedDelta(model, delta, scale, entries)
    _stack(model).append(handle)
    return handle


def revert(model: nn.Module, delta, force: bool = False) -> None:
    """Undo apply(model, delta) exactly: the touched weights get back the bits they had before.
    `delta`: the AppliedDelta that apply returned, or the SparseDelta object that was applied (its
    latest application). Refused, with nothing changed, when a delta applied later touches the same
    weights (revert that first), when a layer was replaced since, or when the weights at the touched
    indices changed since apply (force=True writes the saved originals anyway)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, got {type(model).__name__}")
    stack = model.__dict__.get(_STACK, [])
    if isinstance(delta, AppliedDelta):
        if delta.reverted:
            raise SparseDeltaError("revert: this delta was already reverted")
        if not any(h is delta for h in stack):
            raise SparseDeltaError("revert: this AppliedDelta was not applied to this model")
        handle = delta
    elif isinstance(delta, SparseDelta):
        hits = [h for h in stack if h.delta is delta]
        if not hits:
            raise SparseDeltaError("revert: this SparseDelta is not applied to this model (not by "
                                   "fusedtune.sparse_delta.apply, or already reverted); without the handle "
                                   "the originals are unknown: apply(model, delta, scale=-1.0) subtracts it, "
                                   "within one rounding of the weight dtype per element")
        handle = hits[-1]
    else:
        raise TypeError(f"revert: expected an AppliedDelta or a SparseDelta, got {type(delta).__name__}")
    i = next(j for j, h in enumerate(stack) if h is handle)
    mine = {e.name: e for e in handle.entries}
    for later in stack[i + 1:]:
        for e in later.entries:
            m = mine.get(e.name)
            if m is not None and bool(torch.isin(m.pos, e.pos).any()):
                raise SparseDeltaError(f"revert: a delta applied later also changes layer {e.name!r} at the same "
                                       "weights; revert deltas in reverse order of apply")
    targets = []
    for e in handle.entries:
        try:
            mod = model.get_submodule(e.name)
        except AttributeError:
            mod = None
        if mod is not e.module and not force:
            raise SparseDeltaError(f"revert: layer {e.name!r} was replaced since apply (e.g. by fusedtune.patch or "
                                   "unpatch); revert before swapping layers, or force=True to write the saved "
                                   "originals into the current layer")
        if mod is None:
            raise SparseDeltaError(f"revert: the model no longer has layer {e.name!r}")
        kind, pos = e.kind, e.pos
        if mod is not e.module:   # force: write into the layer now there (same shape, its own layout)
            kind, mod, w = _target(model, e.name, handle.delta[e.name])
            pos = _positions(kind, mod, handle.delta[e.name], w.device)
            if w.dtype != e.orig.dtype:
                raise SparseDeltaError(f"revert: layer {e.name!r} now has dtype {w.dtype}, the saved originals "
                                       f"are {e.orig.dtype}")
        if not force:
            cur = _base_at(mod, pos) if kind == "sdl" else mod.weight.detach().view(-1)[pos]
            changed = int((~_same_bits(cur, e.new)).sum())
            if changed:
                raise SparseDeltaError(f"revert: layer {e.name!r} changed at {changed} of {pos.numel()} of the "
                                       "delta's positions since apply; reverting would discard those changes "
                                       "(force=True restores the saved originals anyway)")
        targets.append((e, kind, mod, pos))
    with torch.no_grad():
        for e, kind, mod, pos in targets:
            orig = e.orig.to(mod.weight.device)
            if kind == "sdl":
                _write_base(mod, pos, orig)
            else:
                mod.weight.view(-1)[pos] = orig
    stack.pop(i)
    handle.reverted = True


# ----------------------------------------------------------------------------------------- compose

def compose(deltas: Iterable[SparseDelta], scales: Iterable[float] | None = None) -> SparseDelta:
    """One SparseDelta equal to sum_j scales[j] * deltas[j]: per layer the union of the indices,
    values summed in float32 in list order ((s1*v1 + s2*v2) + s3*v3 ...; deterministic). Layers
    present in several deltas must have the same shape."""
    deltas = list(deltas)
    if not deltas or not all(isinstance(d, SparseDelta) for d in deltas):
        raise TypeError("compose: expected a non-empty list of SparseDelta")
    scales = [1.0] * len(deltas) if scales is None else [float(s) for s in scales]
    if len(scales) != len(deltas):
        raise SparseDeltaError(f"compose: {len(scales)} scales for {len(deltas)} deltas")
    names: list[str] = []
    for d in deltas:
        names += [n for n in d if n not in names]
    out = SparseDelta(metadata={"composed_from": str(len(deltas))})
    for name in names:
        parts = [(d[name], s) for d, s in zip(deltas, scales) if name in d]
        shapes = {p.shape for p, _ in parts}
        if len(shapes) > 1:
            raise SparseDeltaError(f"compose: layer {name!r} has different shapes in the deltas: {sorted(shapes)}")
        dev = parts[0][0].indices.device
        idx = torch.unique(torch.cat([p.indices.to(dev, torch.int64) for p, _ in parts]), sorted=True)
        val = torch.zeros(idx.numel(), dtype=torch.float32, device=dev)
        for p, s in parts:
            pos = torch.searchsorted(idx, p.indices.to(dev, torch.int64))
            v = p.values.to(dev)
            val[pos] += v * s if s != 1.0 else v
        dtypes = {p.dtype for p, _ in parts if p.dtype}
        out.add(name, idx.to(torch.int32), val, parts[0][0].shape, dtypes.pop() if len(dtypes) == 1 else None)
    return out
