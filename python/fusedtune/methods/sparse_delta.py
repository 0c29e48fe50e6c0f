"""method="sparse_delta": sparse fine-tuning (SpIEL-style) with fusedtune.nn.SparseDeltaLinear.

    rep = fusedtune.patch(model, "sparse_delta", density=0.01, seed=0, lr=1e-4,
                          regrow={"every": 20, "rate": 0.2, "total_steps": 1000, "variant": "ag"})
    loss = rep.step(lambda: model(**batch).loss)
    fusedtune.sparse_delta.save(model, "delta.safetensors")      # the trained deltas
    fusedtune.unpatch(model)                  # nn.Linear with W0 + delta merged
    fusedtune.unpatch(model, merge=False)     # nn.Linear with exactly W0

Every target linear becomes a SparseDeltaLinear with k = round(density * out * in) trainable float32
deltas at random positions (seeded per layer: the seed mixed with the layer's name, so layers of the
same shape get different positions). The optimizer is fusedtune.optim.SparseDeltaAdamW (one fused
pass over the deltas that also writes round(W0 + delta) into the merged weights; bias_correction
"element": grown entries count their own Adam steps, "tensor": the layer's). regrow: None (fixed
positions), True (fusedtune.sparse_delta.Regrower defaults) or a dict of Regrower keyword arguments;
the Regrower runs after every optimizer.step() (an optimizer step hook) and is rep.regrower.
delta_grad: "auto" (default), "sddmm" or "dense": how the deltas' gradient is formed (SparseDeltaLinear).
"""
from __future__ import annotations

import inspect
import numbers
import zlib

import torch
from torch import nn

from ..patch import PatchError, SwapMethod, register_method


def _layer_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


class SparseDeltaMethod(SwapMethod):
    refuses_tied = True     # the merged deltas would land in the tied embedding too, their gradient would not
    options = {"density": 0.01, "seed": 0, "lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
               "regrow": None, "bias_correction": "element", "backend": None, "delta_grad": "auto"}
    demo = {"lr": 3e-2, "density": 0.05, "step_multiplier": 1}

    # -- SwapMethod
    def make(self, linear: nn.Linear, name: str, density, seed, backend, delta_grad, **_) -> nn.Module:
        from ..nn import SparseDeltaLinear  # noqa: PLC0415
        return SparseDeltaLinear.from_linear(linear, density=density, seed=_layer_seed(seed, name), backend=backend,
                                             delta_grad=delta_grad)

    def merge(self, module) -> nn.Linear:
        return module.to_linear()

    def base(self, module) -> nn.Linear:
        lin = module.to_linear()
        with torch.no_grad():   # W0 exactly: the stored base values at the delta positions
            lin.weight.view(-1).index_copy_(0, module.indices.long(), module.base_values.to(lin.weight.dtype))
        return lin

    def describe(self, module) -> tuple[str, str, str]:
        from ..hft.tuner import describe_row_layer  # noqa: PLC0415  (any layer with _fusedtune_report)
        return describe_row_layer(module)

    def make_optimizer(self, params, lr, weight_decay, betas, eps, backend, bias_correction, **_):
        from ..optim import SparseDeltaAdamW  # noqa: PLC0415
        return SparseDeltaAdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                backend=backend, bias_correction=bias_correction)

    # -- regrowth
    @staticmethod
    def _regrow_kwargs(regrow) -> dict | None:
        from ..sparse_delta.regrow import Regrower  # noqa: PLC0415
        if regrow is None or regrow is False:
            return None
        if regrow is True:
            return {}
        if not isinstance(regrow, dict):
            raise PatchError(f"method 'sparse_delta': regrow must be None, True or a dict of Regrower options, "
                             f"got {regrow!r}")
        allowed = [p for p in inspect.signature(Regrower).parameters if p not in ("model", "optimizer", "attach")]
        unknown = sorted(set(regrow) - set(allowed))
        if unknown:
            raise PatchError(f"method 'sparse_delta': regrow option(s) {unknown} unknown; Regrower takes "
                             f"{', '.join(allowed)}")
        return dict(regrow)

    def apply(self, model, targets, **options):
        from .._dist import sync_group  # noqa: PLC0415
        from ..sparse_delta.regrow import Regrower  # noqa: PLC0415
        rg = self._regrow_kwargs(options["regrow"])    # refused before anything is swapped
        if rg is not None:
            bound = inspect.signature(Regrower).bind_partial(None, None, **rg)
            bound.apply_defaults()
            settings = {k: v for k, v in bound.arguments.items()
                        if k not in ("model", "optimizer", "seed", "attach", "process_group", "grad_scaler")}
            try:
                Regrower.check_settings(**settings)
                Regrower.check_scaler(bound.arguments["grad_scaler"])
                sync_group(bound.arguments["process_group"], "Regrower")
            except (RuntimeError, TypeError, ValueError) as e:
                raise PatchError(f"method 'sparse_delta': regrow={options['regrow']!r}: {e}") from e
        if isinstance(options["seed"], bool) or not isinstance(options["seed"], numbers.Integral):
            raise PatchError(f"method 'sparse_delta': seed must be an int, got {options['seed']!r}")
        if not 0 < float(options["density"]) <= 1:
            raise PatchError(f"method 'sparse_delta': density must be in (0, 1], got {options['density']!r}")
        from ..optim.sparse_delta_adamw import BIAS_CORRECTIONS  # noqa: PLC0415
        if options["bias_correction"] not in BIAS_CORRECTIONS:
            raise PatchError(f"method 'sparse_delta': bias_correction must be 'element' (grown entries count "
                             f"their own Adam steps) or 'tensor', got {options['bias_correction']!r}")
        self.regrower = None
        rep = super().apply(model, targets, **options)
        if rg is not None:
            try:
                self.regrower = Regrower(model, rep.optimizer, attach=True, **rg)
            except (TypeError, ValueError) as e:    # settings were checked: not reached through patch
                super().remove(model, merge=False)    # plain linears over the original weights again
                raise PatchError(f"method 'sparse_delta': regrow={options['regrow']!r}: {e}") from e
        rep.regrower = self.regrower
        self._note(rep)
        return rep

    def remove(self, model, merge):
        if getattr(self, "regrower", None) is not None:
            self.regrower.detach()
            self.regrower = None
        super().remove(model, merge)

    def report(self, model):
        rep = super().report(model)
        self._note(rep)
        return rep

    def _note(self, rep) -> None:
        rg = getattr(self, "regrower", None)
        rep.regrower = rg
        rep.notes = [n for n in rep.notes if not n.startswith("sparse_delta:")]
        if rg is None:
            rep.notes.append("sparse_delta: fixed delta positions (no regrowth)")
        else:
            bc = getattr(rep.optimizer, "bias_correction", None)
            rep.notes.append(f"sparse_delta: prune/regrow SpIEL-{rg.variant.upper()} every {rg.every} steps, rate "
                             f"{rg.rate} ({rg.decay}), dense gradients on {rg.accumulate_steps} steps per selection; "
                             f"grown entries' Adam bias correction: "
                             f"{'their own step counts' if bc == 'element' else 'the layer step'}; step {rg.t}")


register_method("sparse_delta", SparseDeltaMethod)
