"""Tiny transformers models built from configs (nothing downloaded), shared by the family tests."""
from __future__ import annotations

import torch


def tiny_llama(hidden: int = 32, intermediate: int = 48, vocab: int = 64, layers: int = 2, seed: int = 0):
    """A seeded LlamaForCausalLM of 4 heads (2 KV heads)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def train_losses(rep, model, ids, steps: int) -> list[float]:
    """The losses of `steps` training steps of a patched model (fusedtune.patch's report) on one batch."""
    return [float(rep.step(lambda: model(ids, labels=ids).loss)) for _ in range(steps)]


def adamw_losses(model, ids, steps: int, lr: float = 1e-3) -> list[float]:
    """The losses of `steps` plain AdamW steps of a causal LM on one batch (labels = ids)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses
