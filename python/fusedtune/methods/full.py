"""method="full": plain full fine-tuning with torch.optim.AdamW (the baseline; swaps nothing)."""
from __future__ import annotations

import torch

from ..patch import ParamMethod, ReportRow, count, register_method


class FullFineTuning(ParamMethod):
    """All selected parameters trained by backpropagation and torch.optim.AdamW."""
    options = {"lr": 2e-5, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}
    demo = {"lr": 1e-3, "step_multiplier": 1}

    def make_optimizer(self, params, lr, weight_decay, betas, eps):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)

    def rows(self, model):
        return [ReportRow(self.scope, self.name, "torch", "autograd backward + torch.optim.AdamW",
                          "full fine-tuning runs plain PyTorch (no fusedtune kernel)", count(self.params))]


register_method("full", FullFineTuning)
