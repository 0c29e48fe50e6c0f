"""HFT selection rules: map a decoder-only causal LM onto HFT's categories and choose, from a seed and
a stage number, which matrices (or rows) train.

The mapping works by module names. Llama-style models (transformers' Llama, Qwen2, Mistral, Gemma and
their relatives) are the paper's case; SCHEMAS below maps Phi-3, OPT, Phi, StarCoder2, GPT-NeoX,
Falcon and BLOOM the same way, with their own attention / MLP member names (Phi-3's fused qkv_proj:
one of qkv_proj / o_proj trains per layer at ratio 0.5). For Llama:

    <prefix>layers.<i>.self_attn.{q,k,v,o}_proj      attention matrices      (category "attn")
    <prefix>layers.<i>.mlp.{gate,up,down}_proj        MLP matrices            (category "mlp")
    <prefix>layers.<i>.<...norm...>                   the layer's norms       (category "norm")
    <prefix>embed_tokens (any nn.Embedding)           embeddings              (train; HalfFineTuner(
    lm_head (get_output_embeddings())                 output head              train_embeddings=False)
                                                                              freezes both)
    <prefix>norm (a norm outside the layers)          final norm              (trains by default: it is
                                                      one vector feeding lm_head, which trains;
                                                      HalfFineTuner(train_final_norm=False) freezes it)

A layer's norms are all norm modules inside it: input_layernorm and post_attention_layernorm in
Llama/Qwen2/Mistral/Gemma; also Gemma2's pre/post_feedforward_layernorm and Qwen3's q_norm/k_norm.
Biases (Qwen2's q/k/v) go with their matrix. Any parameter outside these categories is refused.

The rule (HFT's category-level selection, generalized to any ratio r in (0, 1]): for a category with
n members in each of L layers, T = round(r * n * L) members train in all (round half down: never
more than the ratio); every layer gets floor(r * n) of them and T - L * floor(r * n) layers, drawn by
the seed, get one more. Which members a layer trains is drawn by the seed too. At r = 0.5:

    attention: 2 of q/k/v/o in every layer                                  (exactly half)
    MLP:       2 of gate/up/down in L/2 layers, 1 in the others             (exactly half for even L;
               for odd L, floor(L/2) layers get 2: (3L - 1) / 2 of 3L matrices, e.g. 4 of 9)
    norms:     1 of input_layernorm / post_attention_layernorm per layer    (exactly half of the layers'
               norms; with the final norm, L + 1 of 2L + 1 norm vectors train)

Everything is a pure function of (seed, stage) and the module names: the same seed and stage give the
same choice on every run and machine (random.Random seeded with a string; torch.Generator seeded from SHA-256).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..patch import PatchError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GRANULARITIES = ("matrix", "row", "block")
ROW_GRANULARITIES = ("row", "block")   # the granularities that swap in row-masked linears


@dataclass(frozen=True)
class Schema:
    """Where a family keeps a decoder layer's linear layers: <layer>.<attn_sub>.<attn member> and
    <layer>.<mlp_sub>.<mlp member> (mlp_sub "" when they sit in the layer itself)."""
    families: str
    attn_sub: str
    attn: tuple[str, ...]
    mlp_sub: str
    mlp: tuple[str, ...]

    def name(self, prefix: str, sub: str, member: str) -> str:
        return f"{prefix}{sub}.{member}" if sub else f"{prefix}{member}"


# Tried in order; the first whose members every layer has maps the model. The category rule is the same
# for all: half of each layer's attention matrices and of its MLP matrices (e.g. 1 of Phi-3's fused
# qkv_proj / o_proj), half of its norms.
SCHEMAS = (
    Schema("Llama, Qwen2/3, Mistral, Gemma, OLMo, Granite, Cohere", "self_attn", ATTN, "mlp", MLP),
    Schema("Phi-3", "self_attn", ("qkv_proj", "o_proj"), "mlp", ("gate_up_proj", "down_proj")),
    Schema("OPT", "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"), "", ("fc1", "fc2")),
    Schema("Phi", "self_attn", ("q_proj", "k_proj", "v_proj", "dense"), "mlp", ("fc1", "fc2")),
    Schema("StarCoder2", "self_attn", ATTN, "mlp", ("c_fc", "c_proj")),
    Schema("GPT-NeoX (Pythia)", "attention", ("query_key_value", "dense"), "mlp", ("dense_h_to_4h", "dense_4h_to_h")),
    Schema("Falcon, BLOOM", "self_attention", ("query_key_value", "dense"), "mlp",
           ("dense_h_to_4h", "dense_4h_to_h")),
)


class HFTError(PatchError):
    """HalfFineTuner cannot do what was asked (an architecture it cannot map, a bad argument, ...)."""


def round_half_down(x: float) -> int:
    """Nearest integer, ties toward zero (HFT never trains more than the ratio asks on a tie)."""
    return int(math.ceil(x - 0.5 - 1e-9))


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
        raise HFTError(f"HalfFineTuner: ratio must be a number in (0, 1] (the fraction of each category that "
                       f"trains; the HFT paper uses 0.5), got {ratio!r}")
    return float(ratio)


# ------------------------------------------------------------------------------------ model map

@dataclass
class LayerMap:
    index: int
    prefix: str                      # "model.layers.3."
    attn: dict[str, str]             # "q_proj" -> module name
    mlp: dict[str, str]              # "gate_proj" -> module name
    norms: dict[str, str]            # short name ("input_layernorm") -> module name


@dataclass
class ModelMap:
    layers: list[LayerMap]
    embeddings: list[str] = field(default_factory=list)   # module names
    lm_head: str | None = None
    final_norms: list[str] = field(default_factory=list)

    def linear_names(self) -> list[str]:
        return [n for lay in self.layers for n in (*lay.attn.values(), *lay.mlp.values())]


_LAYER_RX = re.compile(r"^(?P<container>(?:.*\.)?(?:layers|h))\.(?P<i>\d+)\.$")
_EXPECTED = ("a decoder-only causal LM with decoder layers named '<prefix>layers.<i>' or '<prefix>h.<i>', each "
             "holding its attention and MLP linear layers as one of these families does: "
             + "; ".join(f"{sc.families}: {sc.attn_sub}.{{{','.join(sc.attn)}}}, "
                         f"{(sc.mlp_sub + '.') if sc.mlp_sub else ''}{{{','.join(sc.mlp)}}}" for sc in SCHEMAS)
             + " (nn.Linear; GPT-2's Conv1D is not mapped), its norms, embeddings, a final norm and lm_head")


def _is_norm(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return "norm" in leaf or "norm" in type(module).__name__.lower()


def _describe(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {mt!r})"


def _some(names, n=12) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "") if names else "(none)"


def _layer_prefixes(modules: dict, schema: Schema) -> dict[tuple[str, int], str]:
    """(container, index) -> "<container>.<i>." of every decoder layer holding schema's first attention member."""
    anchor = schema.name("", schema.attn_sub, schema.attn[0])
    out = {}
    for n in modules:
        if n.endswith("." + anchor):
            m = _LAYER_RX.match(n[: -len(anchor)])
            if m:
                out[(m.group("container"), int(m.group("i")))] = n[: -len(anchor)]
    return out


def _why_missing(model: nn.Module, modules: dict, name: str, mod) -> str:
    if mod is not None:
        return type(mod).__name__
    shared = dict(model.named_modules(remove_duplicate=False)).get(name)
    first = next((n for n, m in modules.items() if m is shared), None) if shared is not None else None
    return (f"the same module as {first}: a module shared across layers, which the per-layer halves cannot "
            "select" if first else "absent")


def map_model(model: nn.Module, linear_types: tuple = (nn.Linear,)) -> ModelMap:
    """Place every parameter of `model` in an HFT category, or raise HFTError saying what was expected.

    linear_types: module classes accepted as the q/k/v/o/gate/up/down projections.
    """
    if not isinstance(model, nn.Module):
        raise HFTError(f"HalfFineTuner: model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    found = None          # the first schema whose every member every layer has; else the first that fits at all
    for schema in SCHEMAS:
        layers = _layer_prefixes(modules, schema)
        if not layers:
            continue
        if all(isinstance(modules.get(schema.name(pre, sub, m)), linear_types)
               for pre in layers.values() for sub, names in ((schema.attn_sub, schema.attn),
                                                             (schema.mlp_sub, schema.mlp)) for m in names):
            found = (schema, layers)
            break
        found = found or (schema, layers)
    if found is None:
        lin = [n for n, mod in modules.items() if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"]
        raise HFTError(f"HalfFineTuner cannot map {_describe(model)}: it expects {_EXPECTED}. Found no decoder "
                       f"layer with such an attention module; the model's linear layers are: {_some(lin)}")
    schema, layers = found
    containers = sorted({c for c, _ in layers})
    if len(containers) > 1:
        raise HFTError(f"HalfFineTuner cannot map {_describe(model)}: decoder layers found under more than one "
                       f"container ({', '.join(containers)}); it expects {_EXPECTED}")
    idx = sorted(i for _, i in layers)
    if idx != list(range(len(idx))):
        raise HFTError(f"HalfFineTuner cannot map {_describe(model)}: layer indices {idx} are not 0..{len(idx) - 1}")

    lmaps = []
    for i in idx:
        prefix = layers[(containers[0], i)]
        missing, attn, mlp = [], {}, {}
        for short, group, sub in ([(s, attn, schema.attn_sub) for s in schema.attn]
                                  + [(s, mlp, schema.mlp_sub) for s in schema.mlp]):
            name = schema.name(prefix, sub, short)
            mod = modules.get(name)
            if mod is None or not isinstance(mod, linear_types):
                missing.append(f"{name} ({_why_missing(model, modules, name, mod)})")
            else:
                group[short] = name
        if missing:
            raise HFTError(f"HalfFineTuner cannot map {_describe(model)}: layer {i} lacks the linear layer(s) "
                           f"{', '.join(missing)}; it expects {_EXPECTED}")
        taken = set(attn.values()) | set(mlp.values())
        norms = {}
        for n, mod in modules.items():
            if (n.startswith(prefix) and n not in taken and _is_norm(n, mod)
                    and any(True for _ in mod.parameters(recurse=False))):
                norms[n[len(prefix):]] = n
        lmaps.append(LayerMap(i, prefix, attn, mlp, norms))

    mm = ModelMap(lmaps)
    container = containers[0] + "."
    get_out = getattr(model, "get_output_embeddings", None)
    out_mod = None
    if callable(get_out):
        try:
            out_mod = get_out()
        except Exception:  # noqa: BLE001 - a model without an output head
            out_mod = None
    for n, mod in modules.items():
        if not n or n.startswith(container):
            continue
        if out_mod is not None and mod is out_mod:
            mm.lm_head = n
        elif n == "lm_head" or n.endswith(".lm_head"):
            mm.lm_head = mm.lm_head or n
        elif isinstance(mod, nn.Embedding):
            mm.embeddings.append(n)
        elif _is_norm(n, mod) and any(True for _ in mod.parameters(recurse=False)):
            mm.final_norms.append(n)

    # every parameter must be owned by a mapped module
    owners = set(mm.linear_names()) | {n for lay in lmaps for n in lay.norms.values()}
    owners |= set(mm.embeddings) | set(mm.final_norms) | ({mm.lm_head} if mm.lm_head else set())
    unplaced = []
    for pname, _ in model.named_parameters(remove_duplicate=False):
        mod_name = pname.rpartition(".")[0]
        if not any(mod_name == o or mod_name.startswith(o + ".") for o in owners):
            unplaced.append(pname)
    if unplaced:
        raise HFTError(f"HalfFineTuner cannot place parameter(s) {_some(unplaced)} of {_describe(model)} in an HFT "
                       f"category (attention, MLP, norms, embeddings, lm_head); it expects "
                       f"{_EXPECTED}")
    return mm


# ------------------------------------------------------------------------------------ the rule

def _balanced(rng: random.Random, ratio: float, n: int, n_layers: int) -> list[int]:
    """How many of n members each of n_layers layers trains: floor(r*n) each, and round(r*n*L) in all."""
    base = int(math.floor(ratio * n + 1e-9))
    total = min(n * n_layers, round_half_down(ratio * n * n_layers))
    extra = max(0, min(n_layers, total - base * n_layers))
    plus = set(rng.sample(range(n_layers), extra)) if base < n else set()
    return [min(n, base + (1 if i in plus else 0)) for i in range(n_layers)]


def choose_members(mm: ModelMap, ratio: float, seed: int, stage: int) -> list[dict[str, list[str]]]:
    """Per layer: {'attn': [short names], 'mlp': [...], 'norm': [...]} that train at this stage."""
    rng = random.Random(f"fusedtune.hft:{int(seed)}:{int(stage)}")
    L = len(mm.layers)
    out = [{"attn": [], "mlp": [], "norm": []} for _ in range(L)]
    for cat in ("attn", "mlp"):
        names = tuple(getattr(mm.layers[0], cat))       # the family's members, in its schema's order
        counts = _balanced(rng, ratio, len(names), L)
        for lay, k in zip(mm.layers, counts):
            picked = set(rng.sample(names, k))
            out[lay.index][cat] = [s for s in names if s in picked]
    norm_sizes = {len(lay.norms) for lay in mm.layers}
    if len(norm_sizes) == 1:
        counts = _balanced(rng, ratio, norm_sizes.pop(), L)
    else:  # layers with different norm counts (not the case in the mapped families): round per layer
        counts = [round_half_down(ratio * len(lay.norms)) for lay in mm.layers]
    for lay, k in zip(mm.layers, counts):
        names = list(lay.norms)
        picked = set(rng.sample(names, k))
        out[lay.index]["norm"] = [s for s in names if s in picked]
    return out


def row_count(out_features: int, ratio: float) -> int:
    """Rows a row-masked matrix trains: round(ratio * out_features) (ties down), at least 1."""
    return max(1, min(out_features, round_half_down(ratio * out_features)))


def choose_rows(name: str, out_features: int, ratio: float, seed: int, stage: int) -> torch.Tensor:
    """Sorted int64 indices of the output rows of matrix `name` that train at this stage (CPU tensor).
    Depends only on (seed, stage, name, out_features, ratio)."""
    digest = hashlib.sha256(f"fusedtune.hft.rows:{int(seed)}:{int(stage)}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    k = row_count(out_features, ratio)
    return torch.randperm(out_features, generator=g)[:k].sort().values


def choose_block(name: str, out_features: int, ratio: float, seed: int, stage: int) -> torch.Tensor:
    """The rows of matrix `name` that train at this stage in block granularity: one contiguous block
    arange(start, start + k) of k = row_count(out_features, ratio) rows, start uniform in
    [0, out_features - k] (CPU int64 tensor). A block of whole rows of a row-major weight is a
    contiguous view of it, so it trains in place, with no master copy and under any optimizer.
    Depends only on (seed, stage, name, out_features, ratio)."""
    digest = hashlib.sha256(f"fusedtune.hft.block:{int(seed)}:{int(stage)}:{name}".encode()).digest()
    k = row_count(out_features, ratio)
    start = int.from_bytes(digest[:8], "little") % (out_features - k + 1)
    return torch.arange(start, start + k, dtype=torch.int64)


def select_rows(granularity: str, name: str, out_features: int, ratio: float, seed: int,
                stage: int) -> torch.Tensor:
    """choose_rows (granularity "row") or choose_block (granularity "block")."""
    pick = choose_block if granularity == "block" else choose_rows
    return pick(name, out_features, ratio, seed, stage)
