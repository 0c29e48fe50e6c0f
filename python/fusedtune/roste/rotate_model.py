"""The offline part of RoSTE's rotation: fold the RMSNorm weights into the linears that read them and
rotate the residual stream by Q = H_n / sqrt(n) (n the hidden size), merged into the weights; and
(head_rotation) each attention head's values by R = H_d / sqrt(d) (RoSTE's R2), merged into v_proj and
o_proj.

    h' = h Q everywhere in the residual stream:
      embed_tokens   E <- E Q
      readers        W <- W Q          q/k/v_proj, gate/up_proj, lm_head (their biases unchanged)
      writers        W <- Q^T W, b <- Q^T b     o_proj, down_proj
A weight-free RMSNorm commutes with an orthogonal Q (||x Q|| = ||x||), so after folding its weight
g into the readers (W <- W diag(g), g <- 1) the model computes the same function. The math runs in
float64 and is cast back to each parameter's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..reference import hadamard as href
from .architecture import check_float_params, inspect_model
from .checks import MARKER, check_hadamard, check_in_place, own_config, rotated_already


def _rotate_cols(w: torch.Tensor) -> torch.Tensor:
    """w Q in float64 (Q = H_n / sqrt(n) over the last dim of w): the reference butterfly's x H / sqrt(n)."""
    return href.hadamard(w.detach().double(), 1.0 / math.sqrt(w.shape[-1]), transpose=True)


def _assign(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


def _rotate_heads(attn: nn.Module, d: int) -> None:
    """R2: every head's value v_h <- v_h R (R = H_d / sqrt(d)) and o_proj's input columns of each head
    W_o[:, h] <- W_o[:, h] R, so that o_proj sees (a_h R) R^T = a_h. Attention mixes whole value vectors,
    so a_h = softmax(...) v_kv(h) rotates with v."""
    v, o = attn.v_proj, attn.o_proj
    wv = v.weight.detach().double()                       # [kv_heads * d, hidden]: W_h <- R^T W_h
    kv = wv.shape[0] // d
    wv = _rotate_cols(wv.reshape(kv, d, -1).transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape)
    _assign(v.weight, wv)
    if v.bias is not None:
        _assign(v.bias, _rotate_cols(v.bias.detach().double().reshape(kv, d)).reshape(-1))
    wo = o.weight.detach().double()                       # [hidden, heads * d]: columns of head h times R
    _assign(o.weight, _rotate_cols(wo.reshape(wo.shape[0], -1, d)).reshape(o.weight.shape))


@torch.no_grad()
def rotate_model(model: nn.Module, head_rotation: bool = True) -> dict:
    """Fold the RMSNorm weights and merge the hidden-size rotation into a Llama / Qwen2 / Mistral causal LM,
    in place; with head_rotation also the per-head rotation of V and of o_proj's input (RoSTE's R2,
    below). The model function is unchanged (up to rounding in the parameter dtype). Unties a tied
    lm_head (it gets its own Parameter; config.tie_word_embeddings is set False). Returns a small dict
    report. Records what it merged in model.config.fusedtune_roste_rotation (saved with the config), and
    refuses a model that has it. Refuses (before changing anything) other architectures, hidden sizes
    (head_dim with head_rotation) without a Hadamard construction, and weights it cannot change in place
    (offloaded by accelerate, inference tensors)."""
    what = "rotate_model"
    arch = inspect_model(model, what)
    check_float_params(model, what)
    check_in_place(model, what)
    if rotated_already(model):
        raise ValueError(f"{what}: the weights are rotated already (config.{MARKER} = {rotated_already(model)}, "
                         "written by rotate_model / prepare and saved with the checkpoint); rotating again would "
                         "undo it (H H = n I for symmetric H). fusedtune.roste.prepare skips the offline rotation on "
                         "such a model. Nothing was changed")
    n = arch.hidden_size
    check_hadamard(what, "hidden size", n)
    if head_rotation:
        check_hadamard(what, "head_dim (head_rotation=True rotates V per head)", arch.head_dim)
    inner = model.model
    own_config(model)

    untied = False
    if arch.tied:
        model.lm_head.weight = nn.Parameter(inner.embed_tokens.weight.detach().clone(),
                                            requires_grad=inner.embed_tokens.weight.requires_grad)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
        untied = True

    def fold(norm, readers):
        g = norm.weight.detach().double()
        for lin in readers:
            _assign(lin.weight, lin.weight.detach().double() * g)
        norm.weight.fill_(1.0)

    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj))
        fold(layer.post_attention_layernorm, (m.gate_proj, m.up_proj))
    fold(inner.norm, (model.lm_head,))

    _assign(inner.embed_tokens.weight, _rotate_cols(inner.embed_tokens.weight))
    readers = [model.lm_head]
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        readers += [a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj]
        for w in (a.o_proj, m.down_proj):                        # W <- Q^T W = (W^T Q)^T, b <- Q^T b
            _assign(w.weight, _rotate_cols(w.weight.detach().t()).t())
            if w.bias is not None:
                _assign(w.bias, _rotate_cols(w.bias))
    for lin in readers:
        _assign(lin.weight, _rotate_cols(lin.weight))
    if head_rotation:
        for layer in inner.layers:
            _rotate_heads(layer.self_attn, arch.head_dim)
    cfg = getattr(model, "config", None)
    if cfg is not None:   # (save_pretrained writes it into config.json: a re-prepare knows)
        setattr(cfg, MARKER, {"hidden_size": n, "head_rotation": bool(head_rotation)})
    return {"head_rotation": f"H_{arch.head_dim} / sqrt({arch.head_dim}) per head (v_proj, o_proj)"
            if head_rotation else None,
            "architecture": arch.name, "hidden_size": n, "rotation": f"H_{n} / sqrt({n})",
            "folded_norms": 2 * arch.n_layers + 1, "untied_lm_head": untied}
