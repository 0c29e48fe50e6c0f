"""method="hft": half fine-tuning with fusedtune.hft.HalfFineTuner.

    rep = fusedtune.patch(model, "hft", ratio=0.5, granularity="matrix", seed=0, lr=2e-5)

granularity="matrix" trains whole matrices (the HFT paper's rule; swaps nothing: frozen matrices get
requires_grad=False, so no dW and no optimizer state); granularity="row" swaps the
q/k/v/o/gate/up/down linears for fusedtune.nn.RowMaskedLinear (compact row weight gradients);
granularity="block" trains a contiguous block of rows per linear as views of the weight (no masters).
The optimizer is HalfFineTuner.make_optimizer (fusedtune.optim.MaskedAdamW, one fused multi-tensor
pass; torch.optim.AdamW for "block").
HFT picks its own parameters: target_modules is refused. unpatch(model) keeps the trained weights;
unpatch(model, merge=False) restores the pretrained ones from the tuner's snapshot (snapshot=True,
the default, keeps a CPU copy of the model's parameters).
"""
from __future__ import annotations

from ..patch import Method, PatchError, PatchReport, ReportRow, count, register_method, unique_params, why_not_text


def _optimizer_backend(device, backend) -> tuple[str, str]:
    """(backend, why_not) that MaskedAdamW's fused pass takes on `device`."""
    try:
        from ..ops.hft import hft_backend  # noqa: PLC0415
        b = hft_backend(device, backend)["masked_adamw_"]
        return str(b["backend"]), why_not_text(b["why_not"])
    except Exception as e:  # noqa: BLE001 - a report must not fail
        return "?", f"cannot tell ({type(e).__name__}: {e})"


class HFTMethod(Method):
    loose_options = ("snapshot",)     # True, False or "lazy"
    options = {"ratio": 0.5, "granularity": "matrix", "seed": 0, "lr": 2e-5, "weight_decay": 0.0,
               "betas": (0.9, 0.999), "eps": 1e-8, "train_final_norm": True,
               "train_embeddings": True, "snapshot": True, "backend": None}
    demo = {"lr": 1e-3, "step_multiplier": 1}   # full fine-tuning's, so the retention column compares like with like

    @classmethod
    def replaces_modules(cls, options: dict) -> bool:
        return options["granularity"] != "matrix"   # row and block swap in RowMaskedLinear layers

    def apply(self, model, targets, **options):
        from ..hft import HalfFineTuner  # noqa: PLC0415
        if targets is not None:
            raise PatchError("method 'hft' chooses its own parameters (half of each category of every layer, "
                             "embeddings and lm_head); target_modules is not supported")
        opt_kw = {k: options[k] for k in ("lr", "weight_decay", "eps")}
        opt_kw["betas"] = tuple(options["betas"])
        self.tuner = HalfFineTuner(model, ratio=options["ratio"], granularity=options["granularity"],
                                   seed=options["seed"], train_final_norm=options["train_final_norm"],
                                   train_embeddings=options["train_embeddings"],
                                   snapshot=options["snapshot"], backend=options["backend"])
        try:
            optimizer = self.tuner.make_optimizer(**opt_kw)
        except Exception:
            self.tuner.remove()
            raise
        rep = self.report(model)
        rep.optimizer = optimizer
        return rep

    def remove(self, model, merge):
        if not merge and not self.tuner.has_snapshot:
            raise PatchError("method 'hft' was applied with snapshot=False: the pretrained weights were not kept, "
                             "so unpatch(merge=False) cannot restore them; use unpatch(model)")
        self.tuner.remove(restore=not merge)

    def report(self, model):
        from ..hft.tuner import describe_row_layer  # noqa: PLC0415
        t = self.tuner
        rows = []
        rowwise = t.row_layers()
        short = lambda xs: ",".join(x.replace("_proj", "") for x in xs) or "-"  # noqa: E731
        device = next(model.parameters()).device
        opt_backend, opt_why = _optimizer_backend(device, t.backend)
        opt_text = f"MaskedAdamW {opt_backend}"
        if t.granularity == "block" and rowwise:      # make_optimizer gives torch's AdamW
            opt_backend, opt_why = "torch", ""
            opt_text = "torch.optim.AdamW" + (" (fused)" if device.type == "cuda" else "")
        for lay, m, s in zip(t.map.layers, t.members(), t.summary_rows()):
            name = lay.prefix[:-1]
            norms = ", ".join(m["norm"]) or "no norm"
            if rowwise:
                for mname in (*lay.attn.values(), *lay.mlp.values()):
                    mod = rowwise[mname]
                    backend, path, why = describe_row_layer(mod)
                    rows.append(ReportRow(mname, self.name, backend,
                                          f"{mod.rows.numel()}/{mod.out_features} rows train; {path}", why,
                                          sum(p.numel() for p in mod.master_parameters())))
                n_norm = sum(p.numel() for k in m["norm"] for p in model.get_submodule(lay.norms[k]).parameters())
                rows.append(ReportRow(f"{name} norms", self.name, opt_backend,
                                      f"trains {norms}; {opt_text}", opt_why, n_norm))
            else:
                rows.append(ReportRow(name, self.name, opt_backend,
                                      f"trains attn {short(m['attn'])} | mlp {short(m['mlp'])} | {norms} (whole "
                                      f"matrices: dW only for these, autograd); {opt_text}",
                                      opt_why, s["trainable"]))
        for s in t.summary_rows()[len(t.map.layers):]:
            rows.append(ReportRow(s["layer"], self.name, opt_backend,
                                  ("trains" if s["trains"] else "frozen") + f"; {opt_text}",
                                  opt_why, s["trainable"]))
        masters = {id(p) for m in rowwise.values() for p in m.master_parameters()}
        rep = PatchReport(self.name, rows, trainable_params=count(t.trainable_parameters()),
                          total_params=count(p for p in unique_params(model.parameters()) if id(p) not in masters),
                          _impl=self)
        rep.notes.append(f"HFT {t.granularity} granularity, ratio {t.ratio}, seed {t.seed}, stage {t.stage}; "
                         f"pretrained snapshot on the CPU: {t.snapshot_bytes / 2**20:.1f} MiB")
        return rep


register_method("hft", HFTMethod)
