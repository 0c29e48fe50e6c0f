"""fusedtune.patch / unpatch / report: apply a fine-tuning method to a (Hugging Face) model.

    rep = fusedtune.patch(model, "mezo", lr=1e-3)          # or "full", "lora", ... (fusedtune.methods)
    print(rep)                                              # which backend and path every part takes
    loss = rep.step(lambda: model(**batch).loss)            # one training step, whatever the method
    fusedtune.unpatch(model)                                # plain nn.Linear / Conv1D, weights merged

Methods register with `register_method(name, cls)`. A method is a `Method` subclass; layer-swapping
methods subclass `SwapMethod` and implement `make` (nn.Linear -> the method's layer) and `merge`
(the method's layer -> nn.Linear). This module owns the shared machinery: finding the target
linear layers (peft-like names, "all-linear", per-architecture defaults, lm_head excluded),
GPT-2's transposed Conv1D (a method sees nn.Linear semantics unless its base_for takes the Conv1D as
it is, as plain LoRA does; unpatch converts back),
swapping in place, freezing and restoring requires_grad, and the report.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .nn.lora import is_bnb_4bit  # noqa: F401  (also the methods')
from .nn.plain import is_conv1d   # (also sparse_delta's, through here)

_ATTR = "_fusedtune_patch"
_MADE = "_fusedtune_swapped_in"   # set on every layer a patch swaps in (a plain attribute in the module's __dict__)
_METHODS: dict[str, type] = {}

# Default target_modules per transformers model_type: every linear layer of the decoder blocks (lm_head is
# never a default target). MoE models (mixtral, qwen3_moe, gpt_oss): attention only, since transformers 5
# keeps their experts as fused 3-D parameters, not linear layers (qwen2_moe's shared expert is linear).
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_STYLE for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo",
                                 "olmo2", "granite", "cohere", "qwen2_moe")},
    **{t: _LLAMA_STYLE[:4] for t in ("mixtral", "qwen3_moe", "gpt_oss")},
    **{t: _FUSED_QKV for t in ("gpt_neox", "falcon", "bloom")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
}


class PatchError(ValueError):
    """fusedtune.patch / unpatch cannot do what was asked; the message says why and what would work."""


# ----------------------------------------------------------------------------------------- registry

def register_method(name: str, cls: type) -> type:
    """Register a fine-tuning method (a Method subclass) under `name`; returns cls."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_method: name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method: {cls!r} is not a subclass of fusedtune.patch.Method")
    if name in _METHODS and _METHODS[name] is not cls:
        raise PatchError(f"register_method: a method named {name!r} is already registered ({_METHODS[name].__name__})")
    _METHODS[name] = cls
    cls.name = name
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plugins that register temporary methods)."""
    if _METHODS.pop(name, None) is None:
        raise PatchError(f"unregister_method: no method named {name!r}; registered: {', '.join(sorted(_METHODS))}")


def methods() -> dict[str, type]:
    """Every registered method, by name (loads fusedtune.methods, where the families register)."""
    from . import methods as _m  # noqa: F401  (registers the built-in methods)
    return dict(_METHODS)


def missing_requirements(cls) -> list[str]:
    """The modules of cls.requires that cannot be imported here."""
    import importlib.util
    return [m for m in getattr(cls, "requires", ()) if importlib.util.find_spec(m) is None]


def _method_class(method) -> type:
    known = methods()
    if not isinstance(method, str) or method not in known:
        raise PatchError(f"unknown method {method!r}; registered methods: {', '.join(sorted(known))}")
    return known[method]


# ----------------------------------------------------------------------------------------- report

@dataclass
class ReportRow:
    name: str           # layer name, or a description of a parameter group
    method: str
    backend: str        # the backend the fused op takes ("cpu", "cuda", "triton", "reference", "torch")
    path: str           # what runs, in words
    why_not: str = ""   # why a faster path was not taken ("" when the fastest path runs)
    params: int = 0     # trainable elements in this row


@dataclass
class PatchReport:
    method: str | None
    rows: list[ReportRow] = field(default_factory=list)
    optimizer: Any = None
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)
    _impl: Any = field(default=None, repr=False)
    _probe: Any = field(default=None, repr=False)     # (module, name, Parameter): one the optimizer steps
    _model: Any = field(default=None, repr=False)     # the patched model (its trainable parameters, checked a step)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One training step of the method: loss_fn() runs the forward pass and returns the loss
        (the method decides about gradients: AdamW backpropagates, MeZO runs two forwards)."""
        if self._impl is None:
            raise PatchError("this report has no method attached (the model is not patched)")
        if self._impl.__dict__.get("_unpatched"):
            raise PatchError("report.step: the model was unpatched (fusedtune.unpatch) since this report was made; "
                             "its optimizer would train tensors the model no longer uses. Patch the model again "
                             "for a new report")
        if self._probe is not None:
            module, name, param = self._probe
            if module._parameters.get(name) is not param:
                raise PatchError(
                    f"report.step: the optimizer's parameters are no longer the model's ({name!r} of a "
                    f"{type(module).__name__} was replaced: fully_shard, or a load with assign=True, after "
                    "fusedtune.patch), so the step would train tensors the model does not use. Make an optimizer "
                    "over model.parameters() now (after fully_shard: torch.optim.AdamW for full, lora, qlora, fp8, "
                    "fp8_lora, roste, hft) and step it yourself")
        self._check_trainables()
        return self._impl.train_step(self.optimizer, loss_fn)

    def _check_trainables(self) -> None:
        """Refuse parameters that train (requires_grad) but that the optimizer does not hold: a LoRA adapter added
        after patch (add_adapter, load_adapter + set_adapter) or a parameter unfrozen since got gradients every
        step and never changed, silently (found by audit)."""
        if self._model is None or self.optimizer is None:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self._model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise PatchError(f"report.step: {len(missing)} parameter(s) of the model train (requires_grad) but are not "
                             f"in the report's optimizer ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                             "): added or unfrozen after fusedtune.patch (a new adapter: add_adapter, or load_adapter "
                             "and set_adapter), they would get gradients and never change. Add them "
                             "(report.optimizer.add_param_group({'params': [...]})), freeze them, or make an optimizer "
                             "over the trainable parameters and step it yourself; nothing was run")

    def _set_probe(self, model: nn.Module) -> None:
        """Remember where the optimizer's first parameter sits in the model: one identity test a step tells
        whether the model still holds it (fully_shard replaces every parameter with its own)."""
        self._model = model
        first = None if self.optimizer is None else \
            next((p for g in self.optimizer.param_groups for p in g["params"]), None)
        if first is None:
            return
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is first:
                    self._probe = (module, name, p)
                    return

    def as_dicts(self) -> list[dict]:
        return [dict(vars(r)) for r in self.rows]

    def table(self) -> str:
        head = ("name", "method", "backend", "path", "why not fused", "params")
        body = [(r.name, r.method, r.backend, r.path, r.why_not or "-", f"{r.params:,}") for r in self.rows]
        return format_table(head, body)

    def __str__(self) -> str:
        if self.method is None:
            return "fusedtune: model is not patched"
        top = (f"fusedtune.patch: method={self.method!r}, trainable {self.trainable_params:,} of "
               f"{self.total_params:,} parameters")
        return "\n".join([top, self.table()] + [f"note: {n}" for n in self.notes])


def format_table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain-text table with aligned columns."""
    head = [str(h) for h in head]
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def why_not_text(why_not) -> str:
    """{'cuda': 'no GPU', ...} -> 'cuda: no GPU; ...'."""
    if not why_not:
        return ""
    if isinstance(why_not, dict):
        return "; ".join(f"{k}: {v}" for k, v in why_not.items())
    return str(why_not)


# ----------------------------------------------------------------------------------------- targets

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_linear(m)]


def _output_embedding_names(model: nn.Module) -> set[str]:
    names = {n for n in linear_names(model) if n == "lm_head" or n.endswith(".lm_head")}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # noqa: BLE001 - a model without output embeddings
            out = None
        names |= {n for n, m in model.named_modules() if out is not None and m is out}
    return names


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _names_list(names: str) -> str:
    shown = names[:40] if isinstance(names, list) else names
    more = f" ... ({len(names) - 40} more)" if isinstance(names, list) and len(names) > 40 else ""
    return ", ".join(shown) + more if shown else "(none)"


def refuse_packed(named_params, what: str, why: str, error: type = None) -> None:
    """Refuse parameters that are not floating point (packed quantized weights, e.g. a model loaded in 4 bits)
    where a method would train them in place: `what` names the refuser, `why` what it needs instead."""
    packed = [(n, p.dtype) for n, p in named_params if not p.is_floating_point()]
    if packed:
        more = f" ({len(packed) - 1} more)" if len(packed) > 1 else ""
        raise (error or PatchError)(f"{what}: parameter {packed[0][0]} is {packed[0][1]} (quantized weights, e.g. a "
                                    f"model loaded in 4 bits): {why}{more}")


def outermost_modules(model: nn.Module, names) -> list[str]:
    """The modules that name suffixes (peft's modules_to_save) match, without those inside another match."""
    found = find_targets(model, [names] if isinstance(names, str) else list(names), linear_only=False)
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


def shared_outside(model: nn.Module, names: list[str]) -> tuple[str, str] | None:
    """(a parameter of the modules `names`, another name it is held under outside them), or None: tied
    weights that training those modules in place would change elsewhere too."""
    saved = {id(m) for n in names for m in model.get_submodule(n).modules()}   # (a module under two names: one)
    holders: dict = {}
    for mn, mod in model.named_modules(remove_duplicate=False):
        for pn, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((f"{mn}.{pn}" if mn else pn, id(mod)))
    for n in names:
        for pn, p in model.get_submodule(n).named_parameters(remove_duplicate=False):
            other = next((h for h, owner in holders[id(p)] if owner not in saved), None)
            if other is not None:
                return f"{n}.{pn}", other
    return None


def find_targets(model: nn.Module, target_modules=None, linear_only: bool = True) -> list[str]:
    """Names of the modules a method applies to.

    target_modules: None (the architecture's default, from model.config.model_type), "all-linear"
    (every linear layer but the output embedding), a list of name suffixes (["q_proj", "v_proj"]:
    a module matches when its name equals an entry or ends with "." + entry; lm_head only when
    named), or any other string: a regular expression that must match the whole module name.
    linear_only: only nn.Linear / Conv1D modules are candidates (layer-swapping methods); else any
    module with parameters may match (parameter-selecting methods).
    """
    lin = linear_names(model)
    pool = lin if linear_only else [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
    what = "linear layers" if linear_only else "modules with parameters"
    if target_modules is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGETS:
            raise PatchError(
                f"no default target_modules for model type {mt!r} (defaults exist for "
                f"{', '.join(sorted(DEFAULT_TARGETS))}); pass target_modules=[...] or 'all-linear'. "
                f"Linear layers here: {_names_list(lin)}")
        target_modules = DEFAULT_TARGETS[mt]
    if target_modules == "all-linear":
        skip = _output_embedding_names(model)
        found = [n for n in lin if n not in skip]
    elif isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise PatchError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from e
        found = [n for n in pool if rx.fullmatch(n)]
    else:
        if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
            raise PatchError(f"target_modules must be None, 'all-linear', a regex string or a list of names, "
                             f"got {target_modules!r}")
        wanted = list(target_modules)
        if not wanted:
            raise PatchError("target_modules is an empty list")
        unmatched = [t for t in wanted if not any(_matches(n, t) for n in pool)]
        if unmatched and len(unmatched) < len(wanted):
            raise PatchError(f"target_modules entries {unmatched} match none of the model's {what}: "
                             f"{_names_list(pool)}")
        found = [n for n in pool if any(_matches(n, t) for t in wanted)]
    if not found:
        raise PatchError(f"target_modules={target_modules!r} matches none of the model's {what}: "
                         f"{_names_list(pool)}")
    return found


# ----------------------------------------------------------------------------------------- helpers

def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def base_kind(module: nn.Module) -> str:
    """What a target linear is, for the methods' refusals: "linear" (nn.Linear, or a subclass with 16/32-bit
    weights such as Falcon's FalconLinear, taken as x W^T + b), "conv1d" (GPT-2), "4bit" (bitsandbytes,
    quantized) or "other" (weights in another format: 8-bit, FP8 with scales, ...)."""
    if is_conv1d(module):
        return "conv1d"
    if is_bnb_4bit(module):
        return "4bit"
    return "linear" if module.weight.dtype in _WEIGHT_DTYPES else "other"


def as_linear(module: nn.Module) -> nn.Module:
    """The module a method builds its layer from, sharing the weights (the patched model holds them once):
    an nn.Linear as it is, a subclass as an nn.Linear over its parameters, a Conv1D as the nn.Linear that
    computes the same (its weight transposed: a copy), a bitsandbytes 4-bit layer as it is."""
    if type(module) is nn.Linear or is_bnb_4bit(module):
        return module
    if not is_conv1d(module):
        lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        lin.weight, lin.bias = module.weight, module.bias
        return lin
    w, bias = module.weight.detach().t(), module.bias
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    lin.weight.requires_grad_(module.weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


@dataclass
class Swapped:
    """What unpatch needs of a swapped module, without keeping its weights (the method's layer holds them):
    its class (a Conv1D comes back as one), its parameters' requires_grad flags, and its weight Parameter
    when another module shares it (a tied lm_head: unpatch writes the result into it, keeping the tie).
    `module`: the original module itself where the method's layer holds its parameters as the same objects
    (so keeping it costs no memory): unpatch then hands back that object -- its class, hooks and attributes,
    its weight and bias Parameters holding the result -- as peft's merge_and_unload hands back the base layer."""
    cls: type
    kind: str
    weight_requires_grad: bool
    bias_requires_grad: bool | None
    tied: object = None
    tied_with: str = ""
    module: object = None
    aliases: tuple = ()        # other names the module is registered under (one module, several places)

    @classmethod
    def of(cls, module: nn.Module) -> "Swapped":
        bias = getattr(module, "bias", None)
        return cls(type(module), base_kind(module), module.weight.requires_grad,
                   None if bias is None else bias.requires_grad)


def holds_own_parameters(orig: nn.Module, new: nn.Module) -> bool:
    """Whether `new` (a method's layer) holds every parameter and buffer of `orig` as the same objects: then
    keeping `orig` for unpatch costs no memory, and model.to(...) (which converts Parameters in place)
    keeps the two in step."""
    mine = {id(t) for t in (*new.parameters(), *new.buffers())}
    return all(id(t) in mine for t in (*orig.parameters(), *orig.buffers()))


def into_original(result: nn.Module, target: nn.Module) -> nn.Module:
    """Put unpatch's result (an nn.Linear) into the original module `target`: its weight and bias
    Parameters stay the same objects and take the result's tensors (as peft's merge: base_layer.weight.data
    = merged), so its class, hooks and references (optimizers, a tied embedding) carry over."""
    with torch.no_grad():
        if result.weight is not target.weight:
            target.weight.data = result.weight.data
        if result.bias is not None:
            if target.bias is None:          # a trained LoRA bias merged into a layer that had none
                target.bias = result.bias
            elif result.bias is not target.bias:
                target.bias.data = result.bias.data
    return target


def to_conv1d(linear: nn.Linear, conv_cls: type) -> nn.Module:
    """Convert an nn.Linear back to a module of Conv1D's class (weight stored as (in, out))."""
    conv = conv_cls(linear.out_features, linear.in_features)
    conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.detach().t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
        else:
            conv.bias.zero_()
    return conv


def count(params) -> int:
    """Weights held by `params`: a packed 4-bit weight (bitsandbytes' Params4bit, two or more codes a storage
    element) counts the weights it packs, as peft counts them."""
    return sum(_weights(p) for p in params)


def _weights(p: torch.Tensor) -> int:
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(shape)
    if type(p).__name__ == "Params4bit":   # no quant_state yet: two 4-bit codes a byte of its storage
        return p.numel() * 2 * p.element_size()
    return p.numel()


_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")   # transformers.Trainer's


def decay_groups(model: nn.Module, params: list, weight_decay) -> list:
    """`params` as an optimizer takes them: the list itself when weight_decay is 0, else transformers.Trainer's two
    groups (Trainer.get_decay_parameter_names: parameters of nn.LayerNorm modules and names matching its patterns,
    biases and norm weights, get none), as Trainer and MeZO's own code exempt them; patch decayed them too (found by
    audit: RMSNorm gains decayed towards 0). weight_decay None: the optimizer's default, on the first group."""
    if weight_decay is not None and not weight_decay:
        return params
    exempt = set()
    for mod_name, mod in model.named_modules():
        for pn, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if isinstance(mod, nn.LayerNorm) or _NO_DECAY.search(f"{mod_name}.{pn}".lower()):
                exempt.add(id(p))
    groups = [{"params": [p for p in params if id(p) not in exempt]},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def unique_params(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------- methods


def _option_type_error(value, default, loose: bool) -> str | None:
    """Why `value` cannot stand where the option's default is (None: it can): a flag takes a bool (use_dora="no"
    would be truthy), a number a real number, a name a string, betas a pair of numbers."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if loose or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "takes True or False"
    if isinstance(default, numbers.Real):
        return None if real else "takes a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "takes a string"
    if isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        return None if ok else f"takes {len(default)} numbers, as ({', '.join(map(str, default))})"
    if isinstance(default, torch.dtype):
        return None if isinstance(value, torch.dtype) else "takes a torch.dtype"
    return None

class Method:
    """A fine-tuning method. Subclasses set `options` (name -> default), and implement
    apply(model, targets, **options) -> PatchReport rows and remove(model, merge).

    swaps_layers: True when the method replaces linear layers (targets are linear names, defaults
    per architecture); False when it selects parameters (targets None = the whole model).
    zeroth_order: train_step runs forward passes only (no backward).
    demo: hyperparameters the demo uses for this method (lr, step_multiplier, ...).
    requires: modules the method imports (the demo skips a method whose modules are missing).
    """
    name = "?"
    options: dict[str, Any] = {}
    requires: tuple[str, ...] = ()
    swaps_layers = False
    zeroth_order = False
    demo: dict[str, Any] = {}

    @classmethod
    def replaces_modules(cls, options: dict) -> bool:
        """Whether patch/unpatch with these options put other modules in the model's place (refused on a
        model sharded by FSDP2, which manages its modules' parameters)."""
        return cls.swaps_layers

    def __init__(self):
        self._requires_grad: dict[int, tuple[nn.Parameter, bool]] = {}
        self._requires_grad_by_name: dict[str, bool] = {}

    # -- to implement
    def apply(self, model: nn.Module, targets: list[str] | None, **options) -> PatchReport:
        raise NotImplementedError

    def remove(self, model: nn.Module, merge: bool) -> None:
        raise NotImplementedError

    def report(self, model: nn.Module) -> PatchReport:
        raise NotImplementedError

    # -- shared
    def train_step(self, optimizer, loss_fn):
        if self.zeroth_order:
            def closure():
                with torch.no_grad():
                    return loss_fn()
            return optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    def freeze_except(self, model: nn.Module, trainable) -> None:
        """requires_grad=True for `trainable`, False for every other parameter; remembered for restore."""
        keep = {id(p) for p in trainable}
        self.remember_requires_grad(model)
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)

    def remember_requires_grad(self, model: nn.Module) -> None:
        """Each parameter's flag, and the flag under each of its names (a tied weight has several), as
        they are now; the first record of a parameter and of a name stays."""
        by_name = self.__dict__.setdefault("_requires_grad_by_name", {})   # (absent in a pickle of an older one)
        for name, p in model.named_parameters(remove_duplicate=False):
            self._requires_grad.setdefault(id(p), (p, p.requires_grad))
            by_name.setdefault(name, p.requires_grad)

    def restore_requires_grad(self, model: nn.Module) -> None:
        """The remembered flags, on the remembered parameters and on whatever parameter the model holds
        under a remembered name now (load_state_dict(assign=True) since the patch puts new Parameters
        there, which keep the patch's flags)."""
        by_name = self.__dict__.pop("_requires_grad_by_name", {})
        for p, flag in self._requires_grad.values():
            p.requires_grad_(flag)
        recorded = {id(p) for p, _ in self._requires_grad.values()}   # (a deep copy's keys are the original's ids)
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in recorded and name in by_name:
                p.requires_grad_(by_name[name])
        self._requires_grad.clear()

    loose_options = ()    # options whose default's type does not bound their values (checked by the method)

    @classmethod
    def check_options(cls, options: dict) -> dict:
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise PatchError(f"method {cls.name!r} does not take option(s) {unknown}; it takes "
                             f"{', '.join(sorted(cls.options)) or 'no options'}")
        for key, value in options.items():
            why = _option_type_error(value, cls.options[key], key in cls.loose_options)
            if why:
                raise PatchError(f"method {cls.name!r}: option {key}={value!r}: {why}. Nothing was changed")
        if options.get("backend") is not None:   # refused here, not at the first step
            from .backend import CHOICES  # noqa: PLC0415
            if options["backend"] not in CHOICES:
                raise PatchError(f"method {cls.name!r}: unknown backend {options['backend']!r}; choose one of "
                                 f"{', '.join(CHOICES)} (or None: the best one per op)")
        return {**cls.options, **options}


class SwapMethod(Method):
    """A method that replaces target linear layers by its own modules.

    Implement make(linear, name, **options) -> module, merge(module) -> nn.Linear with the method's
    update merged, base(module) -> nn.Linear with the original weights (for unpatch(merge=False)),
    and describe(module) -> (backend, path, why_not). The method always sees nn.Linear semantics:
    GPT-2's Conv1D is converted on the way in and back on the way out. After swapping, parameters
    of the new modules that have requires_grad set are trained with torch.optim.AdamW (override
    make_optimizer for anything else); every other parameter is frozen.
    """
    swaps_layers = True
    trains_everything = False     # True: every parameter that requires grad trains, not only the new modules'
    swaps_aliases = True          # a module registered under several names: the new module takes every place
                                  # (False: the first name only, as peft wraps it; the others keep the module)
    refuses_tied = False          # True: a target whose weight another module shares (a tied lm_head) is refused
    options = {"lr": 1e-3, "weight_decay": 0.0}

    def make(self, linear: nn.Linear, name: str, **options) -> nn.Module:
        raise NotImplementedError

    def base_for(self, module: nn.Module) -> nn.Module:
        """What make() builds from: as_linear(module), nn.Linear semantics (a Conv1D copied transposed)."""
        return as_linear(module)

    def merge(self, module: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def base(self, module: nn.Module) -> nn.Linear:
        raise PatchError(f"method {self.name!r} cannot unpatch without merging (merge=False)")

    def describe(self, module: nn.Module) -> tuple[str, str, str]:
        return "torch", type(module).__name__, ""

    def make_optimizer(self, params, **options):
        return torch.optim.AdamW(params, lr=options["lr"], weight_decay=options["weight_decay"])

    def saved_modules(self, model: nn.Module, targets: list[str], options: dict) -> list[str]:
        """Names of modules, not swapped, whose own parameters train in full next to the swapped layers
        (peft's modules_to_save); resolved (and refused) before anything changes. None by default."""
        return []

    def takes(self, kind: str) -> bool:
        """Whether the method swaps a target of this base_kind ("4bit": LoRA's methods only)."""
        return kind in ("linear", "conv1d")

    def _refuse_bases(self, model, targets) -> None:
        bad = [(n, base_kind(model.get_submodule(n)), type(model.get_submodule(n)).__name__) for n in targets]
        bad = [b for b in bad if not self.takes(b[1])]
        if not bad:
            return
        name, kind, cls = bad[0]
        why = ("a bitsandbytes 4-bit layer: the method needs the weights in 16 or 32 bits (use method 'lora' for "
               "LoRA over the 4-bit model, or load the model unquantized)" if kind == "4bit" else
               f"weights of {model.get_submodule(name).weight.dtype}: the method takes float32, bfloat16 or float16 "
               "weights (bitsandbytes 4-bit NF4 for the LoRA methods)")
        raise PatchError(f"method {self.name!r}: target {name} is a {cls}, {why}"
                         + (f" ({len(bad) - 1} more such targets)" if len(bad) > 1 else ""))

    def rewrites_base(self, options: dict) -> bool:
        """Whether make() may write the original module's parameters (LoRA's PiSSA/OLoRA residual): apply()
        then keeps CPU copies of each target's parameters while swapping, to put them back on a failure."""
        return False

    def _places(self, record: "Swapped | None") -> tuple:
        """The other names where the swapped module takes the target's place."""
        return record.aliases if record is not None and self.swaps_aliases else ()

    def apply(self, model, targets, **options):
        self._refuse_bases(model, targets)
        saved = self.saved_modules(model, targets, options)
        self.remember_requires_grad(model)         # every flag as it is now (make() may freeze a shared weight)
        self.swapped: dict[str, Swapped] = {}     # name -> what unpatch needs of the original module
        originals, made, backups = {}, [], []      # only while patching (to roll back)
        keep = self.rewrites_base(options)
        holders: dict[int, set] = {}              # parameter -> the modules holding it (tied weights: several)
        places: dict[int, list] = {}              # module -> every name it is registered under
        for n, mod in model.named_modules(remove_duplicate=False):
            places.setdefault(id(mod), []).append(n)
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(n)
        try:
            for name in targets:
                orig = model.get_submodule(name)
                if keep:
                    backups += [(p, p.detach().to("cpu", copy=True)) for p in orig.parameters()]
                record = Swapped.of(orig)
                record.aliases = tuple(n for n in places[id(orig)] if n != name)
                others = sorted(holders.get(id(orig.weight), set()) - {name, *self._places(record)})
                if others:
                    if self.refuses_tied or self.rewrites_base(options):   # (PiSSA/OLoRA write the residual in)
                        raise PatchError(f"method {self.name!r}: target {name}'s weight is shared with {others[:3]} "
                                         "(tied embeddings): the method writes the weight in place, which would change "
                                         f"{others[0]} too; leave {name} out of target_modules, or give it its own weight "
                                         "first (e.g. model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach()"
                                         ".clone()); model.config.tie_word_embeddings = False)")
                    record.tied, record.tied_with = orig.weight, others[0]
                new = self.make(self.base_for(orig), name, **options)
                if record.tied is not None:
                    # transformers' save_pretrained drops the tied copy it knows by name ("lm_head.weight"); the
                    # shared weight now sits under a new one ("lm_head.base_layer.weight"): named here, or
                    # safetensors refused the shared tensor (save_pretrained, every Trainer checkpoint)
                    leaves = [n for n, p in new.named_parameters() if p is record.tied]
                    if leaves:
                        new._tied_weights_keys = {leaf: f"{record.tied_with}.weight" for leaf in leaves}
                if record.kind in ("linear", "conv1d") and holds_own_parameters(orig, new):
                    record.module = orig
                originals[name] = orig
                self.swapped[name] = record
                for place in (name, *self._places(record)):
                    set_module(model, place, new)
                new.__dict__[_MADE] = True
                made.append(new)
            full = unique_params(p for n in saved for p in model.get_submodule(n).parameters())
            self.saved = {n: count(model.get_submodule(n).parameters()) for n in saved}
            self.saved_originals = [(p, p.detach().to("cpu", copy=True)) for p in full]   # for unpatch(merge=False)
            if self.trains_everything:   # e.g. FP8 or quantization-aware training: the whole model trains
                trainable = unique_params(p for p in model.parameters() if p.requires_grad)
            else:
                trainable = unique_params([p for m in made for p in m.parameters() if p.requires_grad] + full)
                self.freeze_except(model, trainable)
            rep = self.report(model)
            rep.optimizer = self.make_optimizer(decay_groups(model, trainable, options.get("weight_decay", 0)),
                                                **options) if trainable else None   # may refuse options
        except Exception:                          # leave the model as it was: modules, weights, flags
            for name, orig in originals.items():
                for place in (name, *self._places(self.swapped.get(name))):
                    set_module(model, place, orig)
            with torch.no_grad():
                for p, b in backups:
                    p.copy_(b)
            self.swapped, self.saved, self.saved_originals = {}, {}, []
            self.restore_requires_grad(model)
            raise
        return rep

    def remove(self, model, merge):
        live = {id(p) for p in model.parameters()}
        outs = {}   # everything that may raise first: the model is untouched until all results exist
        for name, orig in self.swapped.items():
            mod = model.get_submodule(name)
            lin = self.merge(mod) if merge else self.base(mod)
            # the original module again only while the layer still holds its Parameters (an assign-load or
            # to_empty since the patch gives the layer new ones: then a new module takes the place)
            keep = orig.module is not None and holds_own_parameters(orig.module, mod)
            tied = orig.tied if orig.tied is not None and id(orig.tied) in live else None
            # merge=False over a layer that never wrote the shared weight (a quantized copy of it): the shared
            # weight is the original itself, taken back as it is (copying the base in rounded it to NF4)
            write = merge or tied is None or _shares_storage(mod, tied)
            outs[name] = (to_conv1d(lin, orig.cls) if orig.kind == "conv1d" else lin, keep, tied, write)
        self.restore_requires_grad(model)
        for name, (new, keep, tied, write) in outs.items():
            orig = self.swapped[name]
            fits = tied is not None and new.weight is not tied and new.weight.shape == tied.shape and \
                new.weight.dtype == tied.dtype
            if merge and tied is not None and new.weight is not tied and (keep or fits):
                warnings.warn(f"fusedtune.unpatch: {name}'s weight is tied to {orig.tied_with}: the merged "
                              f"weight serves both (as peft's merge does)", stacklevel=3)
            if keep:                                  # the model's own module again (its weight is `tied`)
                new = into_original(new, orig.module)
            elif fits:                                # the result goes into the shared Parameter: the tie stays
                if write:
                    with torch.no_grad():
                        tied.copy_(new.weight)
                new.weight = tied
            if new.weight.is_floating_point():        # a 4-bit base handed back keeps its frozen packed weight
                new.weight.requires_grad_(orig.weight_requires_grad)
            if new.bias is not None and orig.bias_requires_grad is not None:   # (no method adds a bias: LoRA's
                new.bias.requires_grad_(orig.bias_requires_grad)                 # lora_bias merge is refused)
            for place in (name, *self._places(orig)):
                set_module(model, place, new)
        if not merge:   # after the write-backs: a tied embedding trained as a saved module gets its values back
            with torch.no_grad():
                for p, orig in getattr(self, "saved_originals", []):
                    p.copy_(orig)
        self.saved_originals = []
        self.swapped = {}

    def report(self, model):
        rows = []
        for name in self.swapped:
            mod = model.get_submodule(name)
            backend, path, why = self.describe(mod)
            rows.append(ReportRow(name, self.name, backend, path, why_not_text(why),
                                  count(p for p in mod.parameters() if p.requires_grad)))
        for name, n in getattr(self, "saved", {}).items():
            rows.append(ReportRow(name, self.name, "torch", "trained in full (modules_to_save)", "", n))
        trainable = (count(unique_params(p for p in model.parameters() if p.requires_grad))
                     if self.trains_everything or getattr(self, "saved", None) else sum(r.params for r in rows))
        notes = ["every parameter that requires grad trains (not only the swapped layers')"] \
            if self.trains_everything else []
        for name, rec in self.swapped.items():
            if rec.aliases:
                notes.append(f"{name} is also registered as {', '.join(rec.aliases)}: " + (
                    "one layer serves every place" if self.swaps_aliases else
                    "those places keep the original module, as peft wraps a module under its first name only"))
        return PatchReport(self.name, rows, trainable_params=trainable,
                           total_params=count(unique_params(model.parameters())), notes=notes, _impl=self)


class ParamMethod(Method):
    """A method that trains (a subset of) the model's own parameters in place, swapping nothing.

    targets None: every parameter; else the parameters of the target modules; in either, those that require grad
    (a parameter frozen before the patch stays frozen, as under the swapping methods). The rest are frozen.
    Implement make_optimizer(params, **options) and rows(model) -> list[ReportRow].
    unpatch(merge=False) is refused: the weights were trained in place, nothing is kept to unmerge.
    """
    def make_optimizer(self, params, **options):
        raise NotImplementedError

    def rows(self, model) -> list[ReportRow]:
        raise NotImplementedError

    def apply(self, model, targets, **options):
        if targets is None:
            named = list(model.named_parameters())
            self.scope = "all parameters"
        else:
            named = [(f"{t}.{n}", p) for t in targets for n, p in model.get_submodule(t).named_parameters()]
            self.scope = f"parameters of {len(targets)} modules"
        names, params = {}, []
        for n, p in named:
            if id(p) not in names:
                names[id(p)] = n
                params.append(p)
        if not params:
            raise PatchError(f"method {self.name!r}: the selected modules hold no parameters")
        refuse_packed([(names[id(p)], p) for p in params], f"method {self.name!r}",   # (frozen ones too: a 4-bit
                      "the method trains parameters in place; load the model in 16 or 32 bits, or use method 'lora'")
        self.kept_frozen = count(p for p in params if not p.requires_grad)            # model's packed weights)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise PatchError(f"method {self.name!r}: every selected parameter has requires_grad=False, and the method "
                             "keeps frozen parameters frozen; unfreeze what should train (model.requires_grad_(True))")
        self.params, self.param_names = params, [names[id(p)] for p in params]
        self.options_used = options
        optimizer = self.make_optimizer(decay_groups(model, params, options.get("weight_decay", 0)),
                                        **options)  # may refuse options before anything changes
        self.freeze_except(model, params)
        self.optimizer = optimizer
        rep = self.report(model)
        rep.optimizer = optimizer
        return rep

    def remove(self, model, merge):
        if not merge:
            raise PatchError(f"method {self.name!r} trains the weights in place: there is no separate update "
                             "to drop, so unpatch(merge=False) cannot restore the old weights (keep a copy "
                             "of the state_dict for that); use unpatch(model) to end the method")
        self.restore_requires_grad(model)

    def report(self, model):
        frozen = getattr(self, "kept_frozen", 0)
        notes = [f"{frozen:,} parameters frozen before the patch stay frozen"] if frozen else []
        return PatchReport(self.name, self.rows(model), trainable_params=count(self.params),
                           total_params=count(unique_params(model.parameters())), notes=notes, _impl=self)


# ----------------------------------------------------------------------------------------- API

def _state(model) -> dict | None:
    return model.__dict__.get(_ATTR)


def swapped_kind(model: nn.Module, name: str) -> str | None:
    """What module `name` of a patched model was before patch swapped it ("linear", "conv1d" (GPT-2's
    Conv1D, stored (in, out)), ...), or None (not patched, not swapped)."""
    st = _state(model)
    rec = None if st is None else getattr(st["impl"], "swapped", {}).get(name)
    return None if rec is None else rec.kind


def patch(model: nn.Module, method: str, target_modules=None, **options) -> PatchReport:
    """Apply fine-tuning `method` to `model` in place; returns a PatchReport (print it for the table;
    .optimizer trains it; .step(loss_fn) does one training step). See fusedtune.patch.find_targets
    for target_modules and fusedtune.patch.methods() for the registered methods and their options."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtune.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    cls = _method_class(method)
    peft_layer = next((n for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")), None)
    if peft_layer is not None:
        raise PatchError(f"fusedtune.patch: the model holds peft layers ({peft_layer or type(model).__name__}); patch "
                         "a model without them, or keep the peft model and fuse its LoRA layers in place: "
                         "fusedtune.lora.fuse_peft(peft_model). To carry a peft adapter over: "
                         "peft_model.save_pretrained(d); base = peft_model.unload(); "
                         "fusedtune.patch(base, 'lora', target_modules=[...]); fusedtune.lora.load_adapter(base, d) "
                         "(a PiSSA / OLoRA adapter: base = the original pretrained model, as peft loads it; unload() "
                         "holds the residual, which load_adapter would decompose again). One layer: fusedtune.nn.LoRALinear.from_peft(layer)")
    st = _state(model)
    if st is not None:
        raise PatchError(f"model is already patched with method {st['method']!r}; "
                         "call fusedtune.unpatch(model) first")
    for n, m in model.named_modules():
        if n and _ATTR in m.__dict__:
            raise PatchError(f"fusedtune.patch: its submodule {n} is patched already (method "
                             f"{m.__dict__[_ATTR]['method']!r}); unpatch it first. Nothing was changed")
        if m.__dict__.get(_MADE):
            raise PatchError(f"fusedtune.patch: {n or 'the module'} is a layer that another fusedtune.patch swapped "
                             "in: the model is part of a patched model; unpatch that one first. Nothing was changed")
    opts = cls.check_options(options)
    refuse_ddp(model, "fusedtune.patch", PatchError)
    if cls.replaces_modules(opts) and _sharded(model):
        raise PatchError(f"fusedtune.patch: method {method!r} replaces modules, and the model is sharded (FSDP2 "
                         "fully_shard, or DTensor parameters of tensor parallelism): FSDP would neither shard the new "
                         "modules' parameters nor reduce their gradients across ranks. Patch first, then fully_shard")
    refuse_offloaded(model, "fusedtune.patch", PatchError)
    if cls.swaps_layers:
        targets = find_targets(model, target_modules, linear_only=True)
        hooked = [(n, h) for n in targets if (h := bypassed_hooks(model.get_submodule(n)))]
        if hooked:
            raise PatchError(f"fusedtune.patch: target {hooked[0][0]} has a {hooked[0][1]}"
                             + (f" ({len(hooked) - 1} more targets have hooks)" if len(hooked) > 1 else "")
                             + f": method {method!r}'s layer computes the output from the weights without calling the "
                             "module, so its hooks would silently stop running. Remove them before patching (and "
                             "register them on the patched layer), or leave the module out of target_modules. "
                             "Nothing was changed")
    else:
        targets = None if target_modules is None else find_targets(model, target_modules, linear_only=False)
    impl = cls()
    rep = impl.apply(model, targets, **opts)
    rep._impl = impl
    rep._set_probe(model)
    model.__dict__[_ATTR] = {"method": method, "impl": impl, "targets": targets, "options": opts,
                             "optimizer": rep.optimizer}
    return rep


def _shares_storage(module: nn.Module, t: torch.Tensor) -> bool:
    """Whether a parameter of `module` lies in t's storage (the layer trains it in place)."""
    ptr = t.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == ptr for p in module.parameters())


def bypassed_hooks(module: nn.Module) -> str | None:
    """The hooks a fused layer in `module`'s place would not run (it computes from the weights directly, never
    calling the module), described; None when it has none. accelerate's hook (device_map dispatch, offload)
    replaces the module's forward rather than registering one."""
    kinds = [what for what, hooks in (("forward pre-hook", module._forward_pre_hooks),
                                      ("forward hook", module._forward_hooks),
                                      ("backward pre-hook", module._backward_pre_hooks),
                                      ("backward hook", module._backward_hooks)) if hooks]
    if getattr(module, "_hf_hook", None) is not None:
        kinds.append("accelerate hook (device_map dispatch or offload)")
    return ", ".join(kinds) or None


def _offloaded(model: nn.Module) -> str | None:
    """The first module whose weights accelerate offloads (kept in its weights map, on the meta device between
    forwards), or None."""
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in (getattr(hook, "hooks", None) or (hook,))):
            return name or type(model).__name__
    return None


def refuse_offloaded(model: nn.Module, what: str, error=ValueError) -> None:
    """Refuse a model whose weights accelerate offloads: they sit on the meta device between forwards, and the
    caller reads or writes them in place."""
    off = _offloaded(model)
    if off is not None:
        raise error(f"{what}: {off}'s weights are offloaded by accelerate (device_map with CPU/disk offload, "
                    "cpu_offload): they sit on the meta device between forwards, and this reads or writes them in "
                    "place. Load the model onto the GPU whole (device_map={'': 0}). Nothing was changed")


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages some module of the model, or a parameter is a DTensor (tensor parallelism).
    (An FSDP2 root keeps its parameters unsharded, plain tensors, after a forward.)"""
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:   # a torch without distributed: nothing is sharded
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or \
        any(isinstance(p, DTensor) for p in model.parameters())


def refuse_ddp(model: nn.Module, what: str, error=ValueError) -> None:
    """Refuse a model DistributedDataParallel wraps already: DDP fixed its set of parameters and its gradient
    buckets when it wrapped the model, so new layers' parameters, or flags changed after, are not reduced
    across ranks (the ranks drift apart silently)."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415
    if any(isinstance(m, DistributedDataParallel) for m in model.modules()):
        raise error(f"{what}: the model is wrapped in DistributedDataParallel already, which fixed the parameters "
                    "it reduces when it wrapped it; new or re-flagged parameters would train apart on each rank. "
                    "Call it on the model first, then wrap it in DDP. Nothing was changed")


def refuse_sharded(model: nn.Module, what: str, error=ValueError) -> None:
    """Refuse a model FSDP2 (or tensor parallelism) shards already, or one DDP wraps (refuse_ddp)."""
    refuse_ddp(model, what, error)
    if _sharded(model):
        raise error(f"{what}: the model is sharded (FSDP2 fully_shard, or DTensor parameters of tensor "
                    "parallelism), and FSDP would neither shard new parameters nor reduce their gradients. Call it "
                    "on the model first, then fully_shard. Nothing was changed")


def unpatch(model: nn.Module, merge: bool = True) -> nn.Module:
    """Undo fusedtune.patch: swapped layers become the model's own modules again -- the same objects (class,
    hooks, attributes) whose weight and bias Parameters hold the method's update merged in (merge=True) or
    the original weights (merge=False, where the method keeps them), as peft's merge_and_unload. Where the
    method's layer does not hold the module's own Parameters (sparse_delta; hft at row or block granularity;
    qlora, fp8, roste and fp8_lora over GPT-2's Conv1D; a 4-bit base merged; Parameters replaced since the
    patch, e.g. by an assign-load) a new nn.Linear / Conv1D takes the module's place. requires_grad flags
    are restored. The PatchReport of the patch refuses to step afterwards. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtune.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    st = _state(model)
    if st is None:
        raise PatchError("fusedtune.unpatch: the model is not patched (nothing to undo)")
    if st["impl"].replaces_modules(st["options"]) and _sharded(model):
        raise PatchError(f"fusedtune.unpatch: method {st['method']!r} puts modules back in the model's place, and "
                         "the model is sharded (FSDP2 fully_shard, or DTensor parameters), whose modules FSDP "
                         "manages. Gather a full state "
                         "dict (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                         "StateDictOptions(full_state_dict=True)), load it into the model built and patched the same "
                         "way without sharding, and unpatch that one. Nothing was changed")
    st["impl"].remove(model, merge)
    st["impl"].__dict__["_unpatched"] = True     # its PatchReport refuses to step from now on
    del model.__dict__[_ATTR]
    return model


def report(model: nn.Module) -> PatchReport:
    """The current report of a patched model: backend and path of every swapped layer or
    method-managed parameter group, and why a fused path is not taken (computed now, so it follows
    model.to(device)). A peft model whose LoRA layers fusedtune.lora.fuse_peft fused gives their report;
    another unpatched model an empty report (method None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtune.report: model must be a torch.nn.Module, got {type(model).__name__}")
    st = _state(model)
    if st is None:
        from .lora.peft_model import peft_report  # noqa: PLC0415
        rep = peft_report(model)     # a peft model with fused LoRA layers (fusedtune.lora.fuse_peft)
        return rep if rep is not None else PatchReport(None, total_params=count(unique_params(model.parameters())))
    rep = st["impl"].report(model)
    rep._impl = st["impl"]
    rep.optimizer = st["optimizer"]
    rep._set_probe(model)
    return rep
