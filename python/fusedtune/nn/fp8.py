"""FP8Linear: a linear layer trained in E4M3 with 1x128 activation/gradient scales and 128x128 weight
scales (the DeepSeek-V3 / InfiR2 recipe), and fusedtune.fp8.convert for a whole model."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import backend as _backend
from .._inference import cache_scope
from ..ops import fp8 as fp8_ops
from ..ops.fp8 import fp8_arch_gap, fp8_backend, fp8_linear, fp8_quant_backend, fp8_quantize_128x128
from .plain import plain_linear


class FP8Linear(nn.Module):
    """y = x W^T + b with both GEMMs of the backward in FP8 too. The weight stays a high-precision
    parameter (the master the optimizer updates); its 128x128 FP8 copy is made per forward, or once
    and cached while the weight is frozen and unchanged (an FP8 base under LoRA). Backward keeps the
    FP8 column-wise copy of x and its scales, not a 16-bit x. Any shape works: partial 128-tiles at the
    edges have their own scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 pow2: bool = False, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _check_backend("FP8Linear", backend, device if device is not None else "cpu")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.pow2, self.backend = pow2, backend
        self._cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization (kaiming-uniform weight, uniform bias), so init loops over a model built
        on the meta device and materialized with to_empty() reach FP8Linear layers too."""
        nn.Linear.reset_parameters(self)
        self._cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2: bool = False, backend: str | None = None) -> "FP8Linear":
        """Shares linear's weight and bias (their requires_grad is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP8Linear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        _check_backend("FP8Linear.from_linear", backend, linear.weight.device)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m.pow2, m.backend, m._cache = pow2, backend, None
        return m

    def quantized_weight(self, transpose: bool = False):
        """(q, s, q_t): the weight's 128x128 FP8 copy and scales, and (transpose) the copy's bytes transposed
        for the dX GEMM, written by the same pass (else None). A frozen weight's copy is cached while the
        weight is the same tensor with the same storage and version (writes through the weight or under
        no_grad count; writes through `weight.data` do not: torch does not count them, so call
        `FP8Linear.forget_weight()` after). A new weight tensor is quantized again even where it got the
        freed memory of the old one at the same version (a replaced Parameter, torch.func.functional_call)."""
        w = self.weight
        if w.requires_grad or torch.compiler.is_compiling() or w.is_inference():
            # (compile: no data-pointer cache in the graph; an inference tensor has no version counter)
            self._cache = None
            return self._quantize(transpose)
        key = (w.data_ptr(), w._version, w.device, w.dtype, self.pow2, self.backend)
        c = self._cache
        if c is None or c[2]() is not w or c[0] != key or (transpose and c[1][2] is None):
            with cache_scope():
                self._cache = c = (key, self._quantize(transpose), weakref.ref(w))
        return c[1]

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state, _cache=None)   # (a weak reference does not pickle; the copy quantizes anew)
        return state

    def forget_weight(self) -> None:
        """Drop the cached FP8 copy of a frozen weight (after writing it through .data)."""
        self._cache = None

    def _quantize(self, transpose: bool):
        with torch.no_grad():
            if transpose:
                return fp8_quantize_128x128(self.weight.detach(), self.pow2, self.backend, transpose=True)
            return (*fp8_quantize_128x128(self.weight.detach(), self.pow2, self.backend), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q, w_s, w_qt = self.quantized_weight(transpose=x.requires_grad and torch.is_grad_enabled())
        return fp8_linear(x, self.weight, self.bias, w_q, w_s, self.pow2, self.backend, w_qt=w_qt)

    def to_linear(self) -> nn.Linear:
        return plain_linear(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scales=1x128 (x, dy) / 128x128 (W){', pow2' if self.pow2 else ''}")

    def _fusedtune_report(self) -> dict:
        b = fp8_backend(self.weight.device, self.backend)
        q = fp8_quant_backend(self.weight.device, self.backend if b["backend"] == "triton" else b["backend"])
        quant = {"cuda": "the extension's CUDA quantizers (where M and K are multiples of 8; Triton's elsewhere)",
                 "triton": "Triton's quantizers", "cpu": "the extension's C++ quantizers",
                 "reference": "the reference quantizers"}.get(q["backend"], "no quantizer backend")
        path = ("Triton: fused 1x128 quantize (+ transposed copy), block-scaled FP8 GEMMs for y, dX (over the "
                f"K-major copy of the FP8 W its quantizer writes in the same pass), dW; {quant}"
                if b["backend"] == "triton" else f"{b['backend']}: {quant}, float32 emulation of the FP8 GEMMs")
        gap = fp8_arch_gap(self.weight.device)
        if gap:
            path += f"; {gap}: the op refuses to run"
        elif b["backend"] == "triton":
            from ..ops import fp8_cublas
            why = "FUSEDTUNE_FP8_GEMM=triton" if fp8_cublas.engine() == "triton" else fp8_cublas.status(
                self.weight.device)
            path += ("; the GEMMs through cuBLAS's block-scaled FP8 GEMM where the shape allows (K a multiple of "
                     "512, or of 128 for dW; N of 16), Triton's elsewhere" if why is None else f"; cuBLAS's block-scaled GEMM not used: {why}")
        return {"method": "fp8", "backend": b["backend"], "path": path, "why_not": b["why_not"]}


def _check_backend(what: str, backend, device) -> None:
    """Refuse a backend that cannot run the FP8 linear on `device` before anything is built or swapped."""
    _backend.refuse_unservable(what, backend, device, (("fp8_linear", fp8_ops._HAS),), "the FP8 linear")


def convert(model: nn.Module, module_filter_fn=None, pow2: bool = False, backend: str | None = None) -> nn.Module:
    """Replace every linear layer -- nn.Linear, a subclass of it with 16/32-bit weights (Falcon's FalconLinear,
    as torchao's swap), transformers' Conv1D (GPT-2) -- for which module_filter_fn(module, fqn) is true
    (default: all but the output embedding, lm_head) by an FP8Linear sharing its parameters (a Conv1D's: its
    weight transposed into [out, in], a copy that replaces it); a layer registered under several names
    becomes one FP8Linear under all of them. Returns the model, or, when the model itself is such a layer
    (fqn ""), its FP8Linear (as torchao's convert_to_float8_training). Refused before anything changes, as
    fusedtune.patch refuses them: a backend that cannot run here, a model DDP wraps or FSDP2 shards, weights
    accelerate offloads, and hooks on a layer it would swap (they would stop running). Make the optimizer
    after converting."""
    from ..patch import (_output_embedding_names, as_linear, base_kind, bypassed_hooks, is_linear,
                         refuse_offloaded, refuse_sharded, set_module)
    what = "fusedtune.fp8.convert"
    param = next(model.parameters(), None)
    _check_backend(what, backend, param.device if param is not None else "cpu")
    refuse_sharded(model, what)
    refuse_offloaded(model, what)
    skip = _output_embedding_names(model) if module_filter_fn is None else set()
    targets = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not is_linear(mod) or name in skip or (base_kind(mod) not in ("linear", "conv1d")
                                                  and mod.weight.dtype != torch.float64):   # (refused below)
            continue
        if module_filter_fn is not None and not module_filter_fn(mod, name):
            continue
        targets.append((name, mod))
    wide = [(n, m.weight.dtype) for n, m in targets if m.weight.dtype not in (torch.float32, torch.bfloat16,
                                                                               torch.float16)]
    if wide:
        raise TypeError(f"{what}: {wide[0][0] or type(model).__name__} has {wide[0][1]} weights; FP8Linear takes "
                        "float32/bfloat16/float16 (cast the model first). Nothing was changed")
    hooked = [(n, h) for n, m in targets if (h := bypassed_hooks(m))]
    if hooked:
        raise ValueError(f"{what}: {hooked[0][0] or type(model).__name__} has a {hooked[0][1]}, which would "
                         f"silently stop running once the layer is an FP8Linear ({len(hooked)} such layer(s)); remove "
                         "the hooks, convert, and register them on the new layers. Nothing was changed")
    made = {}
    for name, mod in targets:
        new = made.get(id(mod))
        if new is None:
            new = made[id(mod)] = FP8Linear.from_linear(as_linear(mod), pow2=pow2, backend=backend)
        if not name:             # the root: no parent to put it in
            return new
        set_module(model, name, new)
    return model
