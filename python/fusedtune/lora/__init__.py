"""fusedtune.lora: LoRA adapters as files, in peft's format.

    fusedtune.lora.save_adapter(model, "out_dir", adapter_name="default")   # adapter_model.safetensors
                                                                         # + adapter_config.json
    fusedtune.lora.load_adapter(model, "out_dir", adapter_name="default")   # into the model's LoRALinear layers
    fusedtune.lora.init_adapters(model)       # adapters built on a meta-device model and never loaded
    fusedtune.lora.fuse_peft(peft_model)      # a peft model's LoRA layers run the fused op (peft_model.py)
    with fusedtune.lora.adapter_names(model, ["default", "__base__", "task2"]):  # one adapter per sample,
        model(input_ids)                                                     # in every LoRALinear (peft's
                                                                             # adapter_names=; generate too)

The directory is what peft's save_pretrained writes (keys base_model.model.<module>.lora_A.weight, a
LoraConfig JSON), so peft's PeftModel.from_pretrained reads ours and load_adapter reads peft's. The
tensors are written as they are (float32 adapters stay float32): bit-exact round trips. Per-module
ranks and alphas that differ from the most common one go to rank_pattern / alpha_pattern, as peft does.
Modules trained in full (patch's modules_to_save, e.g. embed_tokens / lm_head) are written as peft
writes them (base_model.model.<module>.<param>, "modules_to_save" in the config) and loaded into the
model's own modules. Adapters with lora_bias carry <module>.lora_B.bias ("lora_bias": true). DoRA
adapters (use_dora) carry their magnitude as peft writes it (base_model.model.<module>.lora_magnitude_vector,
"use_dora": true). PiSSA / OLoRA adapters are written
as peft writes them without conversion ("init_lora_weights": "pissa"): loading one onto the original
model first rewrites each target's weight as the residual W - scale B0 A0 of its own decomposition (as
peft does), then loads the trained A and B.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import warnings

import torch

from ..nn.lora import LoRALinear, _decomposition, _is_fp8
from ..ops.lora import LoRAUnsupported
from ..patch import shared_outside
from .peft_model import fuse_peft, unfuse_peft  # noqa: F401

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"     # a DoRA adapter's magnitude: <module>.lora_magnitude_vector in the file


def lora_layers(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapter_names(model: torch.nn.Module, names: list[str]):
    """Inside, every LoRALinear of the model serves a mixed batch: sample i of each input (its first
    dimension) goes through adapter names[i] ("__base__": none), as peft's `adapter_names=` does for a
    model's forward and generate. An input of c * len(names) samples (c > 1) holds c consecutive copies
    of each sample, as generate makes them for num_beams and num_return_sequences: every copy takes its
    sample's adapter (peft expands for num_beams only). Unknown names are refused before anything runs; a
    layer that lacks a name the model knows (an adapter over fewer modules) serves those samples with its
    base layer alone, as peft's mixed batch does."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("adapter_names: the model has no LoRALinear layers (fusedtune.patch(model, 'lora') first)")
    names = list(names)
    known = set().union(*(set(m.r) for m in layers.values())) | {"__base__"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise KeyError(f"adapter_names: unknown adapters {unknown}; the model has {sorted(known - {'__base__'})}")

    before = {m: m.__dict__.get("_batch_names") for m in layers.values()}
    for m in layers.values():    # (an attribute its forward reads, so torch.compile guards on it: a forward
        m.__dict__["_batch_names"] = tuple(names)   # pre-hook added after compiling went unseen, found by audit)
    try:
        yield model
    finally:
        for m, prev in before.items():
            m.__dict__["_batch_names"] = prev


def _pattern(patterns: dict, module: str, default):
    """peft's lookup of rank_pattern / alpha_pattern: a key matches a module name it ends (a dotted
    suffix, or a regular expression matching the end)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _common(values: dict):
    return collections.Counter(values.values()).most_common(1)[0][0]


def _saved_modules(model: torch.nn.Module, modules_to_save) -> tuple[list[str], list[str] | None]:
    """(module names, the config's modules_to_save): given names (suffixes, as peft's option), or None for
    what fusedtune.patch trains in full (its modules_to_save option)."""
    if modules_to_save is None:
        st = model.__dict__.get("_fusedtune_patch")
        opt = (st or {}).get("options", {}).get("modules_to_save")
        if not opt:
            return [], None
        return list(getattr(st["impl"], "saved", {})), [opt] if isinstance(opt, str) else list(opt)
    from ..patch import outermost_modules  # noqa: PLC0415
    wanted = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    return outermost_modules(model, wanted), wanted


_BIAS = "_fusedtune_adapter_bias"   # model.__dict__: {adapter: {"bias": peft's bias option, "params": [names],
#                                     "modules": [modules it trains in full, from the file load_adapter read]}}


def _target_modules(model: torch.nn.Module, layers: dict) -> list[str]:
    """peft's target_modules for exactly these layers: their last names where those select no other module
    of the model (peft takes a module whose name is an entry or ends with "." + an entry), else full names."""
    inside = tuple(n + "." for n in layers)
    others = [n for n, _ in model.named_modules() if n and n not in layers and not n.startswith(inside)]
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if any(n == t or n.endswith("." + t) for n in others for t in short):
        return sorted(layers)
    return short


def save_adapter(model: torch.nn.Module, path: str, adapter_name: str = "default", modules_to_save=None) -> dict:
    """Write the adapter `adapter_name` of every LoRALinear in `model` to the directory `path`
    (created if needed) in peft's format; returns the config written. modules_to_save: names of modules
    whose full parameters go in the file too (peft's option); None: those fusedtune.patch trains in full."""
    from safetensors.torch import save_file
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.r}
    if not layers:
        raise ValueError(f"save_adapter: the model has no LoRALinear layer with an adapter named {adapter_name!r}")
    saved, saved_cfg = _saved_modules(model, modules_to_save)
    extra = model.__dict__.get(_BIAS, {}).get(adapter_name, {"bias": "none", "params": []})
    if modules_to_save is None and extra.get("modules"):   # trained in full by the file load_adapter read
        saved = saved + [m for m in extra["modules"] if m not in saved]
        saved_cfg = (saved_cfg or []) + [m for m in extra["modules"] if m not in (saved_cfg or [])]
    tensors = {f"{PREFIX}{n}.{pn}": p.detach().to("cpu", copy=True).contiguous()   # copies: tied weights stay apart
               for n in saved for pn, p in model.get_submodule(n).named_parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in extra["params"] if n not in params]
    if missing:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} was loaded with bias={extra['bias']!r} (peft's "
                         f"option: it trains biases), and the model no longer has {missing[:3]}")
    for n in extra["params"]:
        tensors[f"{PREFIX}{n}"] = params[n].detach().to("cpu", copy=True).contiguous()
    for name, m in layers.items():
        if adapter_name in m.merged_adapters:
            raise ValueError(f"save_adapter: adapter {adapter_name!r} is merged into {name}; unmerge() first")
        m._check_ready([adapter_name], f"save_adapter ({name})")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach().contiguous().cpu()
        if m.lora_bias[adapter_name]:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = m.lora_B[adapter_name].bias.detach().contiguous().cpu()
        if m.use_dora[adapter_name]:       # peft's key: no ".weight"
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = \
                m.lora_magnitude_vector[adapter_name].weight.detach().contiguous().cpu()
    ranks = {n: m.r[adapter_name] for n, m in layers.items()}
    alphas = {n: m.lora_alpha[adapter_name] for n, m in layers.items()}
    drops = {m.lora_dropout_p[adapter_name] for m in layers.values()}
    rslora = {m.use_rslora[adapter_name] for m in layers.values()}
    dora = {m.use_dora[adapter_name] for m in layers.values()}
    biased = {m.lora_bias[adapter_name] for m in layers.values()}
    inits = {m.init_lora_weights.get(adapter_name, True) for m in layers.values()}
    init = inits.pop() if len(inits) == 1 and _decomposition(next(iter(inits))) else True
    if len(drops) > 1 or len(rslora) > 1 or len(dora) > 1 or len(biased) > 1:
        raise ValueError("save_adapter: peft's config holds one dropout, one use_rslora, one use_dora and one "
                         f"lora_bias per adapter; the layers differ ({sorted(drops)}, {sorted(rslora)}, "
                         f"{sorted(dora)}, {sorted(biased)})")
    r, alpha = _common(ranks), _common(alphas)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": drops.pop(),
              "use_rslora": rslora.pop(), "target_modules": _target_modules(model, layers),
              "rank_pattern": {n: v for n, v in ranks.items() if v != r},
              "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
              "bias": extra["bias"], "fan_in_fan_out": False, "init_lora_weights": init, "use_dora": dora.pop(),
              "lora_bias": biased.pop(), "modules_to_save": saved_cfg, "inference_mode": True, "task_type": None,
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


# peft LoraConfig fields that make an adapter something other than plain LoRA (its forward, what it targets, or the
# base it expects differ), each set to something other than its default
_VARIANTS = (("alora_invocation_tokens", "aLoRA (activated LoRA)"), ("use_bdlora", "BD-LoRA"),
             ("arrow_config", "Arrow routing"), ("velora_config", "VeLoRA"), ("monteclora_config", "MonteCLoRA"),
             ("kasa_config", "KaSA"), ("use_qalora", "QA-LoRA"), ("layer_replication", "layer replication"),
             ("target_parameters", "LoRA on parameters (target_parameters)"),
             ("trainable_token_indices", "trainable tokens"), ("lora_ga_config", "LoRA-GA"), ("corda_config", "CorDA"))
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")   # init names (besides True / False) whose tensors are plain LoRA


def _check_plain(cfg: dict, path) -> None:
    """Refuses a peft config of a LoRA variant that load_adapter would load as plain LoRA (silently wrong)."""
    for field, what in _VARIANTS:
        if cfg.get(field) not in (None, False, {}, [], ""):
            raise LoRAUnsupported(f"load_adapter: {path} holds an adapter of a LoRA variant, {what} ({field}="
                                  f"{cfg[field]!r}); fusedtune loads plain LoRA, DoRA, rsLoRA, lora_bias, PiSSA and "
                                  "OLoRA adapters")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and (init in _PLAIN_INITS or _decomposition(init)))):
        raise LoRAUnsupported(f"load_adapter: {path} has init_lora_weights={init!r}, which peft applies to the base "
                              "or the forward as well (plain inits, PiSSA and OLoRA load here)")


def _put(layer: LoRALinear, module: torch.nn.Module, attr: str, t: torch.Tensor) -> None:
    """Write a loaded tensor into an adapter's parameter; one still on the meta device (built on a meta model)
    has no memory to copy into, so it gets a new Parameter (as load_state_dict(assign=True)) on the base's
    device, or the file's while the base is on the meta device too."""
    p = getattr(module, attr)
    if not p.is_meta:
        p.copy_(t)
        return
    w = layer.base_layer.weight
    new = t.to(device=t.device if w.is_meta else w.device, dtype=p.dtype, copy=True)
    setattr(module, attr, torch.nn.Parameter(new, requires_grad=p.requires_grad))


def init_adapters(model: torch.nn.Module) -> list[str]:
    """Initialise every LoRA adapter that has no values yet (built on a meta-device model -- patch or LoRALinear
    under torch.device("meta") / init_empty_weights -- and given none since, or given uninitialised memory by
    model.to_empty): A kaiming-uniform and B zero (or as the adapter was made), as peft initialises; one still on
    meta gets memory of its own on its base's device. Run it after your own initialisation loop
    (nn.Linear.reset_parameters would give lora_B random values). Refused, with nothing changed, where a base is
    still on the meta device too. Returns "<module>.<adapter>" for each adapter initialised."""
    todo = [(n, m, a) for n, m in lora_layers(model).items() for a in m.waiting_adapters()]
    for n, m, a in todo:
        m._check_initialisable(a, f"init_adapters ({n})")
    for n, m, a in todo:
        m.reset_lora_parameters(a)
    return [f"{n}.{a}" for n, _, a in todo]


def _refuse_second_copy(model, adapter_name: str, modules: list[str], path) -> None:
    """peft keeps a copy of each module trained in full (modules_to_save) per adapter and switches them with the
    active adapter; fusedtune keeps the model's one. A file bringing such a module that another adapter already
    trains in full (patch's modules_to_save for "default", or an earlier load_adapter) would overwrite that
    adapter's module (found by audit): refused, before anything changes."""
    alive = set().union(*(set(m.r) for m in lora_layers(model).values()))   # (a deleted adapter owns nothing)
    owners = {m: a for a, e in model.__dict__.get(_BIAS, {}).items() if a != adapter_name and a in alive
              for m in e.get("modules", ())}
    st = model.__dict__.get("_fusedtune_patch")
    if st and st.get("options", {}).get("modules_to_save") and adapter_name != "default":
        owners.update({m: "default" for m in getattr(st["impl"], "saved", {})})

    def within(a, b):   # one module inside the other (patch records outermost modules, a file its parameters')
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")
    clash = sorted((m, o) for m in modules for o in owners if within(m, o))
    if clash:
        raise LoRAUnsupported(f"load_adapter: {path} trains {clash[0][0]!r} in full (modules_to_save), which adapter "
                              f"{owners[clash[0][1]]!r} trains in full already ({clash[0][1]!r}): peft keeps one copy "
                              "per adapter, fusedtune the model's one, so loading would overwrite it. Load the file "
                              f"into its own copy of the model, or under adapter_name={owners[clash[0][1]]!r}; nothing was "
                              "changed")


def load_adapter(model: torch.nn.Module, path: str, adapter_name: str = "default") -> list[str]:
    """Load the adapter in `path` (ours or peft's) into the model's LoRALinear layers as `adapter_name`:
    an existing adapter of that name is overwritten (its rank must match; its alpha, dropout and rslora
    become the file's), a missing one is added with the file's rank, alpha, dropout and rslora (alpha per
    module through alpha_pattern, matched as peft matches it), inactive and frozen where the layer has an
    active adapter, as peft's load_adapter adds it (set_adapter activates it; the active adapters and what
    trains stay as they were); weights of modules trained in full (peft's
    modules_to_save) are copied into the model's parameters of those names (save_adapter writes them back; a
    file that would overwrite modules another adapter trains in full is refused: peft keeps a copy per adapter).
    Refuses, before changing
    anything, a file whose modules the model lacks or whose shapes do not fit. Returns the LoRA module names
    loaded, then the names of the parameters loaded in full."""
    from safetensors.torch import load_file
    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"load_adapter: {path} is not a LoRA or DoRA adapter (peft_type "
                                  f"{cfg.get('peft_type')})")
    _check_plain(cfg, path)
    dora = bool(cfg.get("use_dora", False))
    biased = bool(cfg.get("lora_bias", False))
    init = cfg.get("init_lora_weights", True)
    decompose = _decomposition(init)
    tensors = load_file(os.path.join(path, WEIGHTS))
    layers = lora_layers(model)
    plan, full = {}, {}
    kept = cfg.get("modules_to_save") or []
    kept = [kept] if isinstance(kept, str) else kept

    def trained_in_full(name):   # a parameter of a modules_to_save module (a bias of one comes with its module)
        mod = name.rpartition(".")[0]
        return any(mod == k or mod.endswith("." + k) or f".{k}." in f".{mod}." for k in kept)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, t in tensors.items():
        if ".lora_" not in key:        # a module trained in full (peft's modules_to_save)
            name = key.removeprefix(PREFIX)
            p = params.get(name)
            if p is None or p.shape != t.shape:
                raise KeyError(f"load_adapter: {key} (a modules_to_save weight {tuple(t.shape)}) fits no parameter of "
                               f"the model" + ("" if p is None else f": {name} is {tuple(p.shape)}"))
            if p.is_meta:
                raise ValueError(f"load_adapter: {name} (a modules_to_save weight) is on the meta device; load the "
                                 "base model's weights first; nothing was changed")
            full[name] = (p, t)
            continue
        mod, _, which = key.removeprefix(PREFIX).rpartition(".lora_")
        part = "B.bias" if which == "B.bias" else which.split(".")[0]
        if mod not in layers or part not in ("A", "B", "B.bias", "magnitude_vector"):
            raise KeyError(f"load_adapter: {key} has no LoRALinear at {mod!r} in the model "
                           f"(LoRALinear layers: {sorted(layers)[:5]}{' ...' if len(layers) > 5 else ''})")
        plan.setdefault(mod, {})[part] = t
    kept_modules = sorted({n.rpartition(".")[0] for n in full if trained_in_full(n)})
    _refuse_second_copy(model, adapter_name, kept_modules, path)
    tied = shared_outside(model, sorted({n.rpartition(".")[0] for n in full}))
    if tied:
        name, other = tied
        raise ValueError(f"load_adapter: {name} (trained in full: peft's modules_to_save) is tied to {other} in "
                         f"the model, which the file does not train: loading it would change {other} too (peft "
                         "keeps a copy); give it its own weight first (e.g. model.lm_head.weight = "
                         "nn.Parameter(model.lm_head.weight.detach().clone()); model.config.tie_word_embeddings = "
                         "False)")
    for mod, parts in plan.items():
        m, A, B, mag = layers[mod], parts.get("A"), parts.get("B"), parts.get("magnitude_vector")
        if A is None or B is None or A.shape[1] != m.in_features or B.shape != (m.out_features, A.shape[0]):
            raise ValueError(f"load_adapter: {mod}: lora_A {None if A is None else tuple(A.shape)} / lora_B "
                             f"{None if B is None else tuple(B.shape)} do not fit a {m.in_features}->"
                             f"{m.out_features} layer")
        if dora != (mag is not None) or (mag is not None and mag.shape != (m.out_features,)):
            raise ValueError(f"load_adapter: {mod}: the config says use_dora={dora} but the file has "
                             + ("no lora_magnitude_vector" if mag is None else
                                f"a lora_magnitude_vector of {tuple(mag.shape)} (the layer has {m.out_features} "
                                "outputs)"))
        b = parts.get("B.bias")
        if biased != (b is not None) or (b is not None and b.shape != (m.out_features,)):
            raise ValueError(f"load_adapter: {mod}: the config says lora_bias={biased} but the file has "
                             + ("no lora_B.bias" if b is None else f"a lora_B.bias of {tuple(b.shape)}"))
        if adapter_name in m.r and m.lora_bias[adapter_name] != biased:
            raise ValueError(f"load_adapter: {mod} has adapter {adapter_name!r} with lora_bias="
                             f"{m.lora_bias[adapter_name]}, the file has lora_bias={biased}")
        if adapter_name in m.r and m.r[adapter_name] != A.shape[0]:
            raise ValueError(f"load_adapter: {mod} has adapter {adapter_name!r} with r={m.r[adapter_name]}, the file "
                             f"has r={A.shape[0]}")
        if adapter_name in m.merged_adapters:
            raise ValueError(f"load_adapter: {mod} has adapter {adapter_name!r} merged into its weight; unmerge() "
                             "it first (loading would leave the merged weight on the old values); nothing was changed")
        if dora and _is_fp8(m.base_layer):
            raise LoRAUnsupported(f"load_adapter: {mod}: DoRA over an FP8Linear base is not supported; nothing was "
                                  "changed")
        if decompose:
            m._check_decomposable(init, int(A.shape[0]))
        if (dora or decompose) and m.base_layer.weight.is_meta:
            raise ValueError(f"load_adapter: {mod}: the base weight is on the meta device, and a "
                             + ("DoRA" if dora else f"{init!r}") + " adapter needs its values; load the base model's "
                             "weights first; nothing was changed")
    for mod, parts in plan.items():
        m = layers[mod]
        r = int(parts["A"].shape[0])
        alpha = float(_pattern(cfg.get("alpha_pattern"), mod, cfg["lora_alpha"]))
        drop, rslora = float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora", False))
        if adapter_name not in m.r:
            active, trains = list(m.active_adapters), [(p, p.requires_grad) for p in m.parameters()]
            m.add_adapter(adapter_name, r, alpha, drop, rslora, adapter_dtype=parts["A"].dtype, use_dora=dora,
                          init_lora_weights=init if decompose else True, lora_bias=biased)
            if active:   # as peft's load_adapter: added inactive and frozen, the active adapters train on
                m.active_adapters = active
                for p, flag in trains:
                    p.requires_grad_(flag)
                for p in m._adapter_params(adapter_name):
                    p.requires_grad_(False)
        else:   # overwrite: the file's settings replace the adapter's
            m.lora_alpha[adapter_name] = alpha
            m.set_dropout(adapter_name, drop)
            m.use_rslora[adapter_name] = rslora
            m.scaling[adapter_name] = alpha / (math.sqrt(r) if rslora else r)
            if decompose and m.init_lora_weights.get(adapter_name, True) != init:   # base -> the residual
                with torch.no_grad():
                    m._decompose_init(decompose, m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight, r,
                                      m.scaling[adapter_name])
                m.init_lora_weights[adapter_name] = init
            m.set_dora(adapter_name, dora)
            m._tables.clear()
        with torch.no_grad():
            _put(m, m.lora_A[adapter_name], "weight", parts["A"])
            _put(m, m.lora_B[adapter_name], "weight", parts["B"])
            if dora:
                _put(m, m.lora_magnitude_vector[adapter_name], "weight", parts["magnitude_vector"])
            if biased:
                _put(m, m.lora_B[adapter_name], "bias", parts["B.bias"])
    with torch.no_grad():
        for p, t in full.values():
            p.copy_(t)
    bias = cfg.get("bias", "none")
    extras = model.__dict__.setdefault(_BIAS, {})
    if bias == "none":
        extras.pop(adapter_name, None)
    else:      # peft's bias="lora_only" / "all" trained these biases: save_adapter writes them back, as peft
        extras[adapter_name] = {"bias": bias, "params": sorted(n for n in full if n.endswith("bias")
                                                               and not trained_in_full(n))}
    if kept_modules:   # the modules it trained in full: save_adapter writes them back, as peft
        extras.setdefault(adapter_name, {"bias": "none", "params": []})["modules"] = kept_modules
    stale = sorted(n for n, m in layers.items() if adapter_name in m.r and n not in plan)
    if stale:   # (peft warns "Found missing adapter keys" too)
        warnings.warn(f"load_adapter: {path} has no weights for adapter {adapter_name!r} of {len(stale)} LoRALinear "
                      f"layer(s) ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): they keep the values "
                      "they had (delete_adapter there, or load under a new adapter_name, to serve the file alone)",
                      stacklevel=2)
    return sorted(plan) + sorted(full)
