"""Which models the model-level RoSTE API takes: Hugging Face Llama / Qwen2 / Mistral causal LMs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTN + MLP
LAYOUT = ("model.model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, "
          "post_attention_layernorm; model.model.norm, model.model.embed_tokens, model.lm_head")


@dataclass
class Architecture:
    name: str                 # the supported class the model is (or derives from)
    hidden_size: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    intermediate_sizes: tuple  # down_proj.in_features of each layer
    tied: bool                # lm_head.weight is embed_tokens.weight


def _unsupported(what: str, model, problem: str) -> TypeError:
    return TypeError(f"{what}: {type(model).__name__} is not supported ({problem}); supported: Hugging Face "
                     f"{', '.join(SUPPORTED)} ({LAYOUT})")


def linear_names(model: nn.Module) -> list[str]:
    """The qualified names of the seven projections of every decoder layer, in order."""
    out = []
    for i, layer in enumerate(model.model.layers):
        out += [f"model.layers.{i}.self_attn.{p}" for p in ATTN] + [f"model.layers.{i}.mlp.{p}" for p in MLP]
    return out


def _refuse_shared(model, what: str) -> None:
    """Refuse a projection or norm whose parameters serve two places (a module shared across layers): each
    layer's norm is folded into its readers and the rotations are merged once per place, which one shared weight
    cannot hold. (A tied lm_head / embed_tokens is fine: rotate_model unties it.)"""
    inner, seen = model.model, {}
    places = [("model.embed_tokens", inner.embed_tokens), ("model.norm", inner.norm), ("lm_head", model.lm_head)]
    for i, layer in enumerate(inner.layers):
        places += [(f"model.layers.{i}.{nm}", getattr(layer, nm))
                   for nm in ("input_layernorm", "post_attention_layernorm")]
        places += [(f"model.layers.{i}.self_attn.{p}", getattr(layer.self_attn, p)) for p in ATTN]
        places += [(f"model.layers.{i}.mlp.{p}", getattr(layer.mlp, p)) for p in MLP]
    for place, mod in places:
        for pn, p in mod.named_parameters():
            here = f"{place}.{pn}"
            first = seen.setdefault(id(p), here)
            if first != here and {first, here} != {"model.embed_tokens.weight", "lm_head.weight"}:
                raise _unsupported(what, model, f"{here} is the same parameter as {first} (shared across layers): "
                                   "each layer's norm folds into its own projections and the rotations merge into "
                                   "each place once, which a shared weight cannot hold; give each place its own copy")


def inspect_model(model, what: str, linear_types: tuple = (nn.Linear,)) -> Architecture:
    """The architecture of a supported model; TypeError naming what is supported otherwise. The seven
    projections must be instances of linear_types (plain nn.Linear for prepare/rotate_model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected a Hugging Face causal LM (nn.Module), got {type(model).__name__}")
    inner = getattr(model, "model", None)
    for path, obj in (("model.model", inner), ("model.model.layers", getattr(inner, "layers", None)),
                      ("model.model.embed_tokens", getattr(inner, "embed_tokens", None)),
                      ("model.model.norm", getattr(inner, "norm", None)),
                      ("model.lm_head", getattr(model, "lm_head", None))):
        if obj is None:
            raise _unsupported(what, model, f"it has no {path}")
    names = [c.__name__ for c in type(model).__mro__]
    arch = next((n for n in names if n in SUPPORTED), None)
    if arch is None:
        raise _unsupported(what, model, "not one of the supported classes")
    emb, lm_head = inner.embed_tokens, model.lm_head
    if not isinstance(emb, nn.Embedding) or not isinstance(lm_head, nn.Linear):
        raise _unsupported(what, model, "embed_tokens must be nn.Embedding and lm_head nn.Linear, got "
                           f"{type(emb).__name__} and {type(lm_head).__name__}")
    hidden = emb.embedding_dim
    cfg = getattr(model, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if not isinstance(n_kv, int) or n_kv <= 0:
        raise _unsupported(what, model, "its config has no num_key_value_heads / num_attention_heads")
    norms = [("model.model.norm", inner.norm)]
    inter, head_dim = [], None
    if len(inner.layers) == 0:
        raise _unsupported(what, model, "it has no decoder layers")
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for sub, names_ in ((attn, ATTN), (mlp, MLP)):
            for p in names_:
                lin = getattr(sub, p, None)
                if lin is None:
                    raise _unsupported(what, model, f"layer {i} has no {'self_attn' if sub is attn else 'mlp'}.{p}")
                if not isinstance(lin, linear_types):
                    raise TypeError(f"{what}: layer {i} {p} is a {type(lin).__name__}, expected "
                                    f"{' or '.join(t.__name__ for t in linear_types)} (a model patched by "
                                    "fusedtune.patch or peft must be unpatched first)")
        for nm in ("input_layernorm", "post_attention_layernorm"):
            norms.append((f"model.model.layers[{i}].{nm}", getattr(layer, nm, None)))
        q, k, v, o = (getattr(attn, p) for p in ATTN)
        g, u, d = (getattr(mlp, p) for p in MLP)
        if any(m.in_features != hidden for m in (q, k, v, g, u)) or o.out_features != hidden \
                or d.out_features != hidden or g.out_features != d.in_features or u.out_features != d.in_features:
            raise _unsupported(what, model, f"layer {i}'s projection shapes do not fit hidden size {hidden}")
        if k.out_features != v.out_features or k.out_features % n_kv:
            raise _unsupported(what, model, f"layer {i}: k_proj/v_proj out_features {k.out_features}/"
                               f"{v.out_features} do not split into {n_kv} KV heads")
        head_dim = k.out_features // n_kv
        inter.append(d.in_features)
    for path, norm in norms:
        w = getattr(norm, "weight", None)
        if norm is None or not type(norm).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) \
                or tuple(w.shape) != (hidden,) or getattr(norm, "bias", None) is not None:
            raise _unsupported(what, model, f"{path} must be an RMSNorm with a weight of shape ({hidden},), got "
                               f"{type(norm).__name__}")
    if lm_head.in_features != hidden:
        raise _unsupported(what, model, f"lm_head.in_features {lm_head.in_features} != hidden size {hidden}")
    _refuse_shared(model, what)
    return Architecture(arch, hidden, len(inner.layers), n_kv, head_dim, tuple(inter),
                        lm_head.weight is emb.weight)


def check_float_params(model: nn.Module, what: str, allowed=None) -> None:
    for name, p in model.named_parameters():
        if not p.is_floating_point() or (allowed is not None and p.dtype not in allowed):
            need = "a floating-point dtype" if allowed is None else "/".join(str(d).replace("torch.", "")
                                                                               for d in allowed)
            hint = ("; cast the model (e.g. model.float()) first, or use rotate_model for the rotation alone"
                    if allowed is not None else "")
            raise TypeError(f"{what}: parameter {name} is {p.dtype}, needs {need}{hint}")
