"""method="mezo": zeroth-order fine-tuning with fusedtune.optim.MeZO (swaps no layer).

The selected parameters (all, or those of target_modules) are perturbed in place by the fused
multi-tensor zo_apply_ kernel; the others are frozen. Training needs forward passes only:
report.step(loss_fn) runs loss_fn under torch.no_grad() twice per step. With transformers.Trainer, use
fusedtune.optim.MeZOTrainer instead (its MeZO perturbs what requires grad; freeze the rest first).
"""
from __future__ import annotations

from ..patch import ParamMethod, ReportRow, count, register_method, why_not_text

_PATHS = {
    "cuda": "fused multi-tensor zo_apply_ (CUDA kernel, one grid over all tensors)",
    "triton": "fused multi-tensor zo_apply_ (Triton kernel)",
    "cpu": "fused multi-tensor zo_apply_ (C++ CPU kernel)",
    "reference": "zo_apply_ PyTorch reference (unfused, same bits)",
}


class MeZOMethod(ParamMethod):
    options = {"lr": 1e-6, "eps": 1e-3, "weight_decay": 0.0, "noise": "normal", "rounding": "nearest",
               "seed": 0, "backend": None, "fold": False}
    zeroth_order = True
    demo = {"lr": 1e-4, "eps": 1e-3, "step_multiplier": 10}

    def make_optimizer(self, params, **options):
        from ..optim.mezo import MeZO
        return MeZO(params, **options)

    def remove(self, model, merge):
        self.optimizer.settle()        # fold=True: the weights carry the next step's +eps between steps
        super().remove(model, merge)

    def rows(self, model):
        groups: dict = {}
        for r in self.optimizer.backend_report():
            key = (str(r["device"]), str(r["dtype"]), r["backend"], why_not_text(r["why_not"]))
            groups.setdefault(key, []).append(r["param_index"])
        rows = []
        flat = [p for g in self.optimizer.param_groups for p in g["params"]]   # (param_index: across groups)
        for (device, dtype, backend, why), idx in groups.items():
            n = count(flat[i] for i in idx)
            name = f"{self.scope}: {len(idx)} tensors, {dtype.replace('torch.', '')}, {device}"
            rows.append(ReportRow(name, self.name, str(backend), _PATHS.get(backend, str(backend)), why, n))
        return rows


register_method("mezo", MeZOMethod)
