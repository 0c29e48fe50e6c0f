"""LoRALinear: a peft-compatible LoRA layer whose forward and backward run the fused LoRA ops.

Layout and state-dict keys are peft's (`base_layer.weight`, `lora_A.<name>.weight`, `lora_B.<name>.weight`),
so a peft model's state dict loads as it is. What peft's LoRA does that users rely on works here:
scale alpha/r or alpha/sqrt(r) (rslora), set_scale at run time, dropout on the LoRA branch only and in
training only, several named adapters with several active (set_adapter), mixed batches
(forward(x, adapter_names=[...]), "__base__" = no adapter), merge/unmerge (safe_merge), a
bitsandbytes NF4 base (Linear4bit), DoRA adapters (use_dora=True: peft's lora_magnitude_vector, forward
and merge; fusedtune.ops.dora). What it does not support (lora_bias, independent dropout masks for
several adapters summed in one forward, merging into an NF4 base, a DoRA adapter active together with
others or in a mixed batch, DoRA over an FP8 base) raises a clear error.
"""
from __future__ import annotations

import contextlib
import math
import types
import warnings
import weakref

import torch
from torch import nn

from .. import _autocast
from .._inference import Stamp, cache_scope
from ..ops import dora as dora_ops
from ..ops import lora as lora_ops
from ..ops.lora import LoRAUnsupported
from ..reference.nf4 import Nf4Weight
from .fp8 import FP8Linear
from .masters import optimizer_steps
from .plain import is_conv1d, plain_linear, refuse_meta

BASE = "__base__"   # peft's name for "no adapter" in a mixed batch


def is_bnb_4bit(module) -> bool:
    """A quantized bitsandbytes 4-bit weight: bnb's Params4bit, or the plain Parameter (quant_state kept) that a
    torch.save / torch.load of a whole model turns it into; bitsandbytes' own forward takes both."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _is_fp8(module) -> bool:
    return isinstance(module, FP8Linear)


def _features(base) -> tuple[int, int]:
    if is_bnb_4bit(base):
        qtype = getattr(base.weight.quant_state, "quant_type", "nf4")
        if qtype != "nf4":
            raise LoRAUnsupported(f"LoRALinear: a bitsandbytes Linear4bit base must be NF4, got quant_type={qtype!r}")
        n, k = base.weight.quant_state.shape
        return int(k), int(n)
    if type(base) is nn.Linear or _is_fp8(base):
        return base.in_features, base.out_features
    if is_conv1d(base):     # transformers' Conv1D (GPT-2): weight (in, out)
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    sub = (" (a subclass of nn.Linear: the fused op computes x W^T itself and would skip its own forward)"
           if isinstance(base, nn.Linear) else "")
    raise TypeError(f"LoRALinear: the base layer must be nn.Linear, transformers' Conv1D, fusedtune.nn.FP8Linear or "
                    f"a quantized bitsandbytes Linear4bit (NF4), got {type(base).__name__}{sub}")


@contextlib.contextmanager
def _kept_requires_grad(params):
    """Inside, anything may change these parameters' requires_grad; on the way out each gets its own back."""
    flags = [(p, p.requires_grad) for p in params]
    try:
        yield
    finally:
        for p, g in flags:
            p.requires_grad_(g)


def _decomposition(init) -> str:
    """"pissa", "pissa_niter_<k>" or "olora" when `init` asks for one (peft's spellings), else ""."""
    if not isinstance(init, str):
        return ""
    if init in ("pissa", "olora"):
        return init
    head, sep, k = init.partition("_niter_")
    if head == "pissa" and sep:
        if not k.isdigit():
            raise ValueError(f"LoRALinear: init_lora_weights={init!r}: the number after _niter_ must be an int")
        return init
    return ""


def _init_factors(A: nn.Linear, B: nn.Linear, init, r: int) -> None:
    """peft's plain initialisations of a new adapter's factors (in place, no grad); B's bias (lora_bias) zero."""
    if B.bias is not None:
        B.bias.zero_()
    if init is True:                  # peft's default: A kaiming-uniform(a=sqrt(5)), B zero
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        B.weight.zero_()
    elif init == "gaussian":
        nn.init.normal_(A.weight, std=1.0 / r)
        B.weight.zero_()
    elif init is False:               # random B too: a non-identity adapter (tests)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
    else:
        raise LoRAUnsupported(f"LoRALinear: init_lora_weights={init!r} is not supported "
                              "(True, False, 'gaussian', 'pissa', 'pissa_niter_<k>' or 'olora')")


def _backward_schedule(R: int) -> str:
    from ..triton_kernels.lora import DY_MAX_R, dy_fused  # noqa: PLC0415
    if R == 0:
        return ""
    if dy_fused(R):
        return "; backward reads dy once for u and dB (lora_dy_kernel)"
    why = f"r > {DY_MAX_R}" if R > DY_MAX_R else "torch deterministic mode"
    return f"; backward reads dy twice for u and dB ({why})"


class DoRAMagnitude(nn.Module):
    """A DoRA adapter's magnitude vector m [out] (peft's lora_magnitude_vector[name]: its .weight)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)


class LoRALinear(nn.Module):
    """y = base(x) + sum over active adapters of scaling * lora_B(lora_A(dropout(x))), fused."""

    fan_in_fan_out = False   # set per layer (a Conv1D base); the class default serves layers pickled before it
    _batch_names: tuple | None = None   # per-sample adapters set by fusedtune.lora.adapter_names (a context)
    _waiting: frozenset = frozenset()   # adapters that may have no values yet (waiting_adapters() tells)
    _empty: dict = {}                   # adapter -> Stamp of the memory to_empty gave it (uninitialised until written)

    def __init__(self, base_layer: nn.Module, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = _features(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)    # peft's name: the base weight is stored (in, out)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()     # peft's: nn.Dropout(p), or nn.Identity for p = 0
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}            # peft's lora_bias: lora_B has a trainable bias
        self.init_lora_weights: dict[str, object] = {}     # how each adapter was initialized (adapter files)
        self.lora_magnitude_vector = nn.ModuleDict()    # DoRA adapters only
        self._dora_norms: dict = {}                     # eval-time cache of the DoRA weight norms
        self._dora_merged: dict[str, torch.Tensor] = {}  # the column scales of merged DoRA adapters
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.backend = backend
        self._tables: dict = {}
        self._nf4 = None
        self._stash: torch.Tensor | None = None
        self._stash_bias: torch.Tensor | None = None
        self._nf4_weight()   # an NF4 base's container, made in eager (torch.compile reuses it)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_name: str = "default", init_lora_weights=True,
                    adapter_dtype: torch.dtype | None = torch.float32, backend: str | None = None,
                    use_dora: bool = False, lora_bias: bool = False) -> "LoRALinear":
        """Wrap nn.Linear or bnb.nn.Linear4bit (NF4). adapter_dtype float32 is peft's default for 16-bit
        bases (autocast_adapter_dtype); None keeps the base's dtype. use_dora: a DoRA adapter. lora_bias:
        lora_B gets a trainable bias (zero at first), as peft's."""
        m = cls(linear, backend=backend)
        m.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init_lora_weights, adapter_dtype, use_dora,
                      lora_bias)
        return m

    def __getstate__(self):
        state = super().__getstate__()
        state["_dora_norms"] = {}       # a cache of weak references: not pickled (recomputed on use)
        state.pop("_batch_names", None)  # (a copy made inside adapter_names(...) is not inside it)
        return state

    def base_weight(self) -> torch.Tensor:
        """The dense base weight as [out, in]: a Conv1D's (in, out) weight transposed in place (a view; the
        kernels read it through its strides, nothing is copied)."""
        w = self._modules["base_layer"].weight
        return w.t() if self.fan_in_fan_out else w

    def _quant_state(self):
        """The NF4 base's bitsandbytes QuantState, or None for a 16/32-bit base. The weight carries it (kept here
        each time). A packed weight that FSDP's fully_shard has turned into a plain parameter (DTensor shards,
        gathered whole for the forward and backward; uint8, or FSDP-QLoRA's quant_storage dtype) no longer does:
        it takes the copy bitsandbytes keeps on the Linear4bit module for that case, as bitsandbytes' own forward
        does, else the one kept here (a Params4bit made without its module has no such copy). Packed: half a
        byte an element of the quant_state's shape."""
        base = self._modules["base_layer"]
        w = base.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False) and not torch.compiler.is_compiling():
            # bitsandbytes' eval forward on a CPU with AVX512-BF16 repacks the weight in place (its own layout);
            # back to the standard one, as its _save_to_state_dict does
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415
            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            qs = w.quant_state
        if qs is not None:
            self.__dict__["_bnb_qs"] = qs
            return qs
        kept = self.__dict__.get("_bnb_qs")
        if kept is None:
            return None                          # a 16/32-bit base
        kept = getattr(base, "quant_state", None) or kept
        n, k = (int(d) for d in kept.shape)
        return kept if w.numel() * w.element_size() == (n * k + 1) // 2 else None

    def _nf4_dtype(self, qs, x=None):
        """An NF4 base's compute dtype: its Linear4bit's; for an input x, by bitsandbytes' rule where the layer
        has none yet (Linear4bit.set_compute_type at its first forward: a float32 / bfloat16 input sets it to
        its own dtype, which this forward records on the layer as bitsandbytes' would; else the input's
        dtype); without x, the quant state's (the weight's dtype when it was quantized)."""
        base = self._modules["base_layer"]
        dt = getattr(base, "compute_dtype", None)
        if x is not None and getattr(base, "compute_type_is_set", True) is False:
            if x.dtype in (torch.float32, torch.bfloat16):
                dt = x.dtype
            if not torch.compiler.is_compiling():
                base.compute_dtype, base.compute_type_is_set = dt, True
        return dt or (x.dtype if x is not None else qs.dtype)

    def _nf4_wider_input(self, x) -> bool:
        """An NF4 base whose compute dtype is narrower than x's (float32 activations into a bf16 QLoRA layer,
        as peft.prepare_model_for_kbit_training leaves them): the base runs in the compute dtype and the
        adapters in float32 over x itself, as peft's layer computes (the fused op would round x, the branch
        and its gradients to the compute dtype too)."""
        if x.dtype != torch.float32:   # (first: the common 16-bit input costs one comparison)
            return False
        qs = self._quant_state()
        return qs is not None and self._nf4_dtype(qs, x) != torch.float32

    def _base_device_dtype(self):
        w = self.base_layer.weight
        qs = self._quant_state()
        return w.device, (self._nf4_dtype(qs) if qs is not None else w.dtype)

    def add_adapter(self, name: str, r: int, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights=True, adapter_dtype: torch.dtype | None = torch.float32,
                    use_dora: bool = False, lora_bias: bool = False) -> None:
        """Add a named adapter and make it the active one (peft's update_layer + set_adapter).
        init_lora_weights (peft's): True (A kaiming-uniform, B zero), "gaussian", False (B random too), or
        "pissa" / "pissa_niter_<k>" / "olora": A and B from the base weight's top-r SVD (randomized with k
        subspace iterations, from torch's generator) / QR, and the base weight becomes the residual
        W - scale B A (in place, a dense base only), so the layer's output is unchanged.
        use_dora: its magnitude starts at the weight norm ||W + scale B A|| per output row, so the layer's
        output is unchanged, as peft's.
        lora_bias: lora_B has a bias b, zero at first: the adapter adds scale * b to every output row
        (peft's; not with DoRA or PiSSA / OLoRA, which peft refuses too)."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"LoRALinear: invalid adapter name {name!r}")
        w = getattr(self._modules["base_layer"], "weight", None)
        meta = torch.is_tensor(w) and w.is_meta
        if meta and (use_dora or _decomposition(init_lora_weights) or is_bnb_4bit(self.base_layer)):
            refuse_meta("LoRALinear.add_adapter", w, "DoRA's magnitude (the weight norm), PiSSA / OLoRA's factors (its "
                        "decomposition) and an NF4 base's compute dtype (its quant state) come from the base's values")
        if name in self.r:
            raise ValueError(f"LoRALinear: an adapter named {name!r} exists already")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout!r}")
        if use_dora and _is_fp8(self.base_layer):
            raise LoRAUnsupported("LoRALinear: DoRA over an FP8Linear base is not supported (its weight norm needs "
                                  "the dense weight); use a 16-bit or NF4 base")
        if lora_bias and (use_dora or _decomposition(init_lora_weights)):
            raise LoRAUnsupported("LoRALinear: lora_bias is not supported with "
                                  + ("DoRA" if use_dora else f"init_lora_weights={init_lora_weights!r}")
                                  + " (peft refuses it too)")
        device, base_dtype = self._base_device_dtype()
        dtype = adapter_dtype or base_dtype
        scaling = float(alpha) / (math.sqrt(r) if use_rslora else r)
        decompose = _decomposition(init_lora_weights)
        if decompose:
            self._check_decomposable(init_lora_weights, r)
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=bool(lora_bias), device=device, dtype=dtype)
        with torch.no_grad():
            if decompose:
                self._decompose_init(decompose, A.weight, B.weight, r, scaling)   # (lora_bias refused above)
            else:
                _init_factors(A, B, init_lora_weights, r)
        self.lora_A[name], self.lora_B[name] = A, B
        self.r[name], self.lora_alpha[name] = r, float(alpha)
        self.use_rslora[name] = bool(use_rslora)
        self.set_dropout(name, dropout)
        self.scaling[name] = scaling
        self.init_lora_weights[name] = init_lora_weights
        self.use_dora[name] = bool(use_dora)
        self.lora_bias[name] = bool(lora_bias)
        if use_dora:
            self.lora_magnitude_vector[name] = DoRAMagnitude(self._dora_norm(name, cache=False).to(dtype))
        if meta:     # no values yet: loaded later (assign=True) or initialised after to_empty (init_adapters)
            self._waiting = self._waiting | {name}
        self.set_adapter(name)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights=None) -> None:
        """(peft's name) Give adapter `adapter_name` fresh initial values in place: init_lora_weights True (A
        kaiming-uniform, B zero), "gaussian" or False; None: the way it was made. The cure for an adapter built on
        the meta device that no load gave values (fusedtune.lora.init_adapters(model) does every such adapter): one
        still on meta gets memory of its own first, on the base's device. Refused for DoRA adapters and PiSSA /
        OLoRA (their values come from the base), and while the base is on the meta device too."""
        self._require(adapter_name)
        init = self.init_lora_weights.get(adapter_name, True) if init_lora_weights is None else init_lora_weights
        if self.use_dora[adapter_name] or _decomposition(init):
            raise LoRAUnsupported(f"LoRALinear.reset_lora_parameters: adapter {adapter_name!r} "
                                  + ("is a DoRA adapter" if self.use_dora[adapter_name] else f"uses {init!r}")
                                  + ", whose initial values come from the base weight; add it again instead")
        self._check_initialisable(adapter_name, "LoRALinear.reset_lora_parameters")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"LoRALinear.reset_lora_parameters: adapter {adapter_name!r} is merged; unmerge() first")
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if any(p.is_meta for p in self._adapter_params(adapter_name)):   # memory of its own, on the base's device
            A.to_empty(device=self.base_layer.weight.device)
            B.to_empty(device=self.base_layer.weight.device)
        with torch.no_grad():
            _init_factors(A, B, init, self.r[adapter_name])
        self.init_lora_weights[adapter_name] = init
        self._waiting = self._waiting - {adapter_name}

    def _check_initialisable(self, name: str, what: str) -> None:
        if any(p.is_meta for p in self._adapter_params(name)) and self.base_layer.weight.is_meta:
            raise ValueError(f"{what}: adapter {name!r} and the base weight are on the meta device; load the base "
                             "model's weights first (load_state_dict(..., assign=True)), or model.to_empty(device=...) "
                             "when nothing is loaded yet; nothing was changed")

    def waiting_adapters(self) -> list[str]:
        """Adapters with no values yet: built on the meta device and still there (no load with assign=True,
        load_adapter or init_adapters since), or given uninitialised memory by to_empty and not written since."""
        out = []
        for n in sorted(self._waiting):
            ps = self._adapter_params(n) if n in self.r else []
            stamp = self._empty.get(n)
            if any(p.is_meta for p in ps) or (stamp is not None and stamp.matches(*ps)):
                out.append(n)
        ready = self._waiting - set(out)
        if ready:   # (loaded since: any loader, accelerate's and swap_tensors included, gives new or written tensors)
            self._waiting = self._waiting - ready
            self._empty = {k: v for k, v in self._empty.items() if k not in ready}
        return out

    def _check_ready(self, names, what: str) -> None:
        """Refuse adapters among `names` that were built on the meta device and have not been given values: still
        meta, they fail with a device error; after to_empty they hold uninitialised memory (garbage, silently)."""
        names = set(names)
        waiting = [n for n in self.waiting_adapters() if n in names]
        if waiting:
            meta = any(p.is_meta for p in self._adapter_params(waiting[0]))
            raise ValueError(f"{what}: adapter(s) {waiting} were built on the meta device and have no values yet ("
                             + ("they are still on the meta device" if meta else
                                "to_empty gave them uninitialised memory") + "). Load them (load_state_dict(..., "
                             "assign=True) or fusedtune.lora.load_adapter), or initialise them as peft does "
                             "(fusedtune.lora.init_adapters(model))")

    def _check_decomposable(self, how: str, r: int) -> None:
        if self._quant_state() is not None or _is_fp8(self.base_layer):
            raise LoRAUnsupported(f"LoRALinear: init_lora_weights={how!r} rewrites the base weight as the residual "
                                  "W - scale B A: initialize on the 16/32-bit model, then quantize the residual")
        if self.base_layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"LoRALinear: init_lora_weights={how!r} needs a float32/16 base weight, got "
                            f"{self.base_layer.weight.dtype}")
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"LoRALinear: init_lora_weights={how!r} takes r <= min(in, out) = "
                             f"{min(self.in_features, self.out_features)} singular/QR directions, got r={r}")

    def _decompose_init(self, how: str, A: torch.Tensor, B: torch.Tensor, r: int, scaling: float) -> None:
        """PiSSA / OLoRA (peft's pissa_init / olora_init, the same float32 products): A, B from W's top-r
        decomposition, W <- round(W - scaling B A)."""
        W = self.base_weight()
        Wf = W.detach().float()
        if how == "olora":
            Q, R = torch.linalg.qr(Wf)
            a, b = R[:r].contiguous(), Q[:, :r].contiguous()
        else:
            if how == "pissa":
                U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, V = torch.svd_lowrank(Wf, r, niter=int(how.rpartition("_niter_")[2]))
                Vh = V.t()
            root = torch.sqrt(S / scaling)
            a, b = torch.diag(root) @ Vh, U @ torch.diag(root)
        A.copy_(a)
        B.copy_(b)
        W.copy_((Wf - scaling * b @ a).to(W.dtype))

    def set_dropout(self, name: str, p: float) -> None:
        """The LoRA-branch dropout probability of adapter `name` (peft's lora_dropout[name] module)."""
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {p!r}")
        self.lora_dropout[name] = nn.Dropout(float(p)) if float(p) > 0 else nn.Identity()

    def set_dora(self, name: str, use_dora: bool) -> None:
        """Make adapter `name` a DoRA adapter (its magnitude starts at the current weight norm, so the output
        does not change) or a plain one (its magnitude is dropped)."""
        self._require(name)
        if bool(use_dora) == self.use_dora[name]:
            return
        if name in self.merged_adapters:
            raise ValueError(f"LoRALinear: adapter {name!r} is merged; unmerge() first")
        if use_dora:
            if _is_fp8(self.base_layer):
                raise LoRAUnsupported("LoRALinear: DoRA over an FP8Linear base is not supported")
            if self.lora_bias[name]:
                raise LoRAUnsupported(f"LoRALinear: adapter {name!r} has lora_bias; DoRA with lora_bias is not "
                                      "supported (peft refuses it too)")
            self.use_dora[name] = True
            A = self.lora_A[name].weight
            mag = DoRAMagnitude(self._dora_norm(name).to(A.dtype))
            mag.weight.requires_grad_(A.requires_grad)
            self.lora_magnitude_vector[name] = mag
        else:
            self.use_dora[name] = False
            del self.lora_magnitude_vector[name]
        self._dora_norms.pop(name, None)

    @property
    def lora_dropout_p(self) -> types.MappingProxyType:
        """Adapter name -> dropout probability, read from lora_dropout (read-only: use set_dropout, or
        set .p of an adapter's nn.Dropout as with peft)."""
        return types.MappingProxyType({n: self._dropout_of(n) for n in self.lora_dropout})

    def _dropout_of(self, name: str) -> float:
        mod = self._modules["lora_dropout"]._modules[name]
        if isinstance(mod, nn.Dropout):
            return float(mod.p)
        if isinstance(mod, nn.Identity):
            return 0.0
        raise LoRAUnsupported(f"LoRALinear: lora_dropout[{name!r}] is a {type(mod).__name__}; the fused op "
                              "draws its own seeded mask (nn.Dropout or nn.Identity only)")

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise ValueError(f"LoRALinear: adapter {name!r} is merged; unmerge() first")
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias):
            d.pop(name)
        self.init_lora_weights.pop(name, None)
        self._dora_norms.pop(name, None)
        self._waiting = self._waiting - {name}
        self._empty = {k: v for k, v in self._empty.items() if k != name}
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        was_active = name in self.active_adapters
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._tables.clear()
        if was_active and not self.active_adapters and self.r:   # as peft: the first remaining one, said
            nxt = sorted(self.r)[0]
            warnings.warn(f"LoRALinear: adapter {name!r} was active and is deleted; the active adapter is now {nxt!r}",
                          stacklevel=2)
            self.set_adapter(nxt)

    # ------------------------------------------------------------------ peft-style controls
    def _require(self, name: str) -> None:
        if name not in self.r:
            raise KeyError(f"LoRALinear: no adapter named {name!r}; adapters: {sorted(self.r)}")

    def set_adapter(self, names) -> None:
        """Make `names` (a name or a list) the active adapters; they train, the others are frozen."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        for n in self.r:
            for p in self._adapter_params(n):
                p.requires_grad_(n in names)
        self.active_adapters = names

    def _apply(self, fn, recurse=True):
        """keep_adapter_dtype (set by fusedtune.patch's LoRA methods): a dtype conversion of the model (.half(),
        .to(torch.bfloat16)) converts the base but leaves the adapters in the dtype they were made in (float32
        by default), as patching a model already in that dtype gives them: float16 adapters under AdamW went NaN
        from the second step (eps underflows, 0/0 where a gradient is zero). Device moves move everything."""
        self.forget_dora_norms()   # (weak references to the parameters: torch.utils.swap_tensors refuses them)
        base = self._modules.get("base_layer")
        dt = getattr(base, "compute_dtype", None)
        if is_bnb_4bit(base) and isinstance(dt, torch.dtype):
            # a dtype conversion of the model (.to(torch.bfloat16) after patching) converts an NF4 base's compute
            # dtype too: it computed in the old one, and unpatch dequantized into it (a float32 layer in a bf16
            # model: the next forward failed)
            new = fn(torch.empty(0, dtype=dt)).dtype
            if new != dt and new in (torch.float32, torch.bfloat16, torch.float16):
                base.compute_dtype = new
        if self.__dict__.get("keep_adapter_dtype"):
            from .masters import keep_dtype  # noqa: PLC0415
            fn = keep_dtype(fn, [p for n in self.r for p in self._adapter_params(n)])
        w = getattr(base, "weight", None)
        was_meta = torch.is_tensor(w) and w.is_meta
        out = super()._apply(fn, recurse)
        w = getattr(base, "weight", None)
        if was_meta and torch.is_tensor(w) and not w.is_meta:   # only to_empty gets off the meta device: every
            self._waiting = frozenset(self.r)                   # adapter holds new, uninitialised memory now
            self._empty = {n: Stamp(*self._adapter_params(n)) for n in self.r}
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.forget_dora_norms()   # (before the children swap or copy their parameters)
        self._load_quant_state(state_dict, prefix + "base_layer.weight.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _load_quant_state(self, state_dict, key: str) -> None:
        """An NF4 base's bitsandbytes quant state in the state dict (absmax, quant_map, nested ..., the
        quant_state.bitsandbytes__nf4 entry, as its _save_to_state_dict writes them) becomes the base's quant
        state: a Linear4bit loads its packed codes only (strict: the rest were unexpected keys; strict=False:
        the new codes under the old scales, silently wrong)."""
        keys = [k for k in state_dict if k.startswith(key)]
        base = self._modules["base_layer"]
        if not keys or not is_bnb_4bit(base):
            return
        from bitsandbytes.functional import QuantState  # noqa: PLC0415
        qs = QuantState.from_dict({k[len(key):]: state_dict.pop(k) for k in keys}, device=base.weight.device)
        base.weight.quant_state = qs
        if getattr(base, "quant_state", None) is not None:
            base.quant_state = qs
        self.__dict__["_bnb_qs"] = qs
        self._nf4 = None

    def _adapter_params(self, name: str) -> list:
        ps = [self.lora_A[name].weight, self.lora_B[name].weight]
        ps += [self.lora_B[name].bias] if self.lora_B[name].bias is not None else []
        return ps + ([self.lora_magnitude_vector[name].weight] if name in self.lora_magnitude_vector else [])

    def _bias_delta(self, names) -> torch.Tensor | None:
        """float32 [out]: sum of scaling * lora_B.bias over the lora_bias adapters among `names` (None: none)."""
        parts = [self.scaling[n] * self.lora_B[n].bias.float() for n in names if self.lora_bias.get(n)]
        return sum(parts[1:], parts[0]) if parts else None

    @staticmethod
    def _with(bias, delta):
        """The base bias plus the adapters' bias delta (float32 when there is a delta: the op adds it in
        its float32 epilogue)."""
        if delta is None:
            return bias
        return delta if bias is None else bias.float() + delta

    @property
    def active_adapter(self) -> list[str]:
        return list(self.active_adapters)

    def set_scale(self, adapter: str, scale: float) -> None:
        """peft's set_scale: scaling = scale * alpha / r (alpha / sqrt(r) with rslora)."""
        if adapter not in self.r:
            return
        r = self.r[adapter]
        self.scaling[adapter] = float(scale) * self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora[adapter]
                                                                            else r)
        self._tables.clear()

    def scale_layer(self, scale: float) -> None:
        """peft's scale_layer: the active adapters' scaling times `scale`."""
        for a in self.active_adapters:
            self.scaling[a] *= float(scale)
        self._tables.clear()

    def unscale_layer(self, scale: float | None = None) -> None:
        """peft's unscale_layer: the active adapters' scaling divided by `scale`, or (None) back to
        alpha / r (alpha / sqrt(r) with rslora)."""
        for a in self.active_adapters:
            if scale is None:
                self.set_scale(a, 1.0)
            else:
                self.scaling[a] /= float(scale)
        self._tables.clear()

    def get_base_layer(self) -> nn.Module:
        """peft's get_base_layer: the layer the adapters sit on (base_layer)."""
        return self._modules["base_layer"]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ forward
    def _nf4_weight(self, x=None):
        """(the NF4 base as an Nf4Weight, its compute dtype (for input x: _nf4_dtype)), or (None, None) for a
        16/32-bit base."""
        qs = self._quant_state()
        if qs is None:
            return None, None
        base = self._modules["base_layer"]
        w, dt = base.weight, self._nf4_dtype(qs, x)
        if torch.compiler.is_compiling():
            # built in eager (the layer makes it when it is made): from_bnb's alignment check reads data_ptr
            if self._nf4 is not None and self._nf4[0][1] == w.device:
                return self._nf4[1], dt
            return Nf4Weight.from_bnb(w, qs), dt
        key = (w.data_ptr(), w.device)
        if self._nf4 is None or self._nf4[0] != key or self._nf4[2] is not qs:   # (a loaded quant state: new scales)
            with cache_scope():
                self._nf4 = (key, Nf4Weight.from_bnb(w, qs), qs)
        return self._nf4[1], dt

    def _table(self, names: tuple, device, summed: bool = False) -> torch.Tensor:
        """The scale table of `names` (one row per adapter; summed: one row, all of them), cached."""
        if torch.compiler.is_compiling():   # built in the graph, never cached from it: a table made in a compiled
            # inference-mode forward was an inference tensor, and every later training forward failed on it
            S = lora_ops.scale_table([self.r[n] for n in names], [self.scaling[n] for n in names], device)
            return S.sum(0, keepdim=True) if summed else S
        key = (names, tuple(self.scaling[n] for n in names), device, summed)
        t = self._tables.get(key)
        if t is None:
            if len(self._tables) > 8:
                self._tables.clear()
            with cache_scope():
                S = lora_ops.scale_table([self.r[n] for n in names], [self.scaling[n] for n in names], device)
                t = self._tables[key] = S.sum(0, keepdim=True) if summed else S
        return t

    def _stacked(self, names):
        A, B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        if len(names) == 1:
            return A[names[0]].weight, B[names[0]].weight
        return torch.cat([A[n].weight for n in names], 0), torch.cat([B[n].weight for n in names], 1)

    def _dropout(self, names) -> float:
        if not self.training:
            return 0.0
        if len(names) == 1:
            return self._dropout_of(names[0])
        ps = {self._dropout_of(n) for n in names}
        if len(ps) > 1:
            raise LoRAUnsupported(f"LoRALinear: adapters {list(names)} in one forward have different dropout "
                                  f"probabilities {sorted(ps)}; the fused op draws one mask per input element")
        return ps.pop() if ps else 0.0

    def _base_args(self, x):
        """(x, weight, nf4, bias, output dtype) for the fused op. An NF4 base computes in its own dtype.
        Under torch.autocast a 16/32-bit base computes in the autocast dtype, as peft's layer does
        (autocast does not reach inside the fused op, so x, W and the bias are cast here, and the
        caller runs the op with autocast off)."""
        nf4, dt = self._nf4_weight(x)
        bias = self._modules["base_layer"].bias
        self.__dict__["_last_rows"] = x.numel() // max(x.shape[-1], 1)   # the report's schedule of the last call
        self.__dict__["_last_dropped"] = False     # (_dora_forward: True for a call with dropout)
        # (through __dict__: nn.Module.__setattr__ costs ~3 us a call, checking for parameters and modules)
        if nf4 is not None:
            return (x if x.dtype == dt else x.to(dt)), None, nf4, bias, x.dtype
        w = self.base_weight()
        if not w.is_floating_point():
            raise LoRAUnsupported(
                f"LoRALinear: the base layer's weight is {w.dtype} {tuple(w.shape)}, not a 16/32-bit weight, and "
                "no bitsandbytes quant_state was ever seen for it (a packed 4-bit weight in a plain layer?)")
        dt = _autocast.linear_dtype(x.device)
        if dt is None:
            return x, w, None, bias, x.dtype
        x, w, bias = _autocast.cast(dt, x, w, bias)
        return x, w, None, bias, dt

    def _expanded_batch_names(self, x) -> list[str]:
        """The adapter_names context's names for this input: an input of c * len(names) samples (generate's
        num_beams / num_return_sequences copies) gives each copy its sample's adapter; a name this layer lacks
        serves its samples with the base alone (fusedtune.lora.adapter_names)."""
        names = self._batch_names
        copies, rest = divmod(x.shape[0], len(names)) if x.dim() > 1 and names else (1, 0)
        if rest or copies < 1:
            copies = 1                 # the mixed forward refuses the mismatch, naming both counts
        return [n if n in self.r else BASE for n in names for _ in range(copies)]

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        if adapter_names is None and self._batch_names is not None:
            adapter_names = self._expanded_batch_names(x)
        if self.disable_adapters or (adapter_names is None and (self.merged or not self.active_adapters)):
            if self.disable_adapters and self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self._waiting and not x.is_meta:
            self._check_ready(self.active_adapters if adapter_names is None else adapter_names, "LoRALinear.forward")
        if adapter_names is not None:
            if self.merged:
                raise ValueError("LoRALinear: mixed-batch inference (adapter_names) needs unmerged adapters")
            return self._mixed_forward(x, adapter_names)
        names = tuple(self.active_adapters)
        p = self._dropout(names)
        if p > 0.0 and len(names) > 1:
            raise LoRAUnsupported(f"LoRALinear: {len(names)} active adapters with dropout {p} in training: peft "
                                  "draws an independent mask per adapter, one fused call cannot; use dropout=0 or "
                                  "one active adapter")
        dora = self._dora_alone(names)
        if dora is not None:
            return self._dora_forward(x, dora, p)
        if _is_fp8(self._modules["base_layer"]) or self._nf4_wider_input(x):
            return self._unfused_forward(x, names, p)
        x, w, nf4, bias, out_dtype = self._base_args(x)
        A, B = self._stacked(names)
        with _autocast.off(x.device):
            y = lora_ops.lora_linear_grouped(x, w, A, B, self._table(names, x.device, summed=True), None,
                                             self._with(bias, self._bias_delta(names)), p, None, nf4, self.backend)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _dora_alone(self, names) -> str | None:
        """The DoRA adapter among `names`, or None; refuses one together with other adapters."""
        dora = [n for n in names if self.use_dora[n]]
        if dora and len(names) > 1:
            raise LoRAUnsupported(f"LoRALinear: DoRA adapter {dora} active together with others {list(names)}: peft "
                                  "rescales the running sum of their outputs (order-dependent); activate a DoRA "
                                  "adapter alone")
        return dora[0] if dora else None

    def _dora_forward(self, x, name, p):
        x, w, nf4, bias, out_dtype = self._base_args(x)
        self.__dict__["_last_dropped"] = p > 0.0   # DoRA with dropout: always the fused GEMM (the report says so)
        norm = self._dora_norm(name, cache=not self.training and not torch.is_grad_enabled())
        with _autocast.off(x.device):
            y = dora_ops.dora_linear(x, w, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                     self.lora_magnitude_vector[name].weight, bias, p, None, nf4, self.backend, norm)
        return y.to(out_dtype)

    def train(self, mode: bool = True):
        """nn.Module.train, and forgets the DoRA norms cached in eval mode: an optimizer that writes the
        parameters without bumping their version counters (bitsandbytes' 8-bit and paged optimizers, writes
        through .data) would otherwise leave the next evaluation on the old norms. Trainer calls
        model.train() every step; a loop that changes weights that way while in eval mode calls
        forget_dora_norms() itself."""
        self.forget_dora_norms()
        return super().train(mode)

    def forget_dora_norms(self) -> None:
        """Drop the DoRA weight norms cached for evaluation (recomputed at the next eval forward)."""
        self._dora_norms.clear()

    def _dora_norm(self, name: str, cache: bool = False) -> torch.Tensor:
        """float32 [out]: ||W + scaling B A|| per output row of the base weight as the GEMMs see it. cache: keep
        it while the weight, A, B and the scaling stay as they are (inference; training recomputes it) and
        until the next train()/eval() call, by version counters (see train())."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        nf4, nf4_dtype = self._nf4_weight()
        W = self.base_weight()
        key = None
        if cache and not torch.compiler.is_compiling() and not any(t.is_inference() for t in (W, A, B)):
            # (an inference tensor has no version counter: not cached)
            # the tensors themselves (weak references: a freed tensor's address and version can come back in a
            # new one, e.g. an adapter deleted and added again) and what they hold (address, in-place writes)
            owners = (self._modules["base_layer"].weight, A, B)
            key = (self.scaling[name], optimizer_steps()) + tuple((t.data_ptr(), t._version) for t in (W, A, B))
            # (an optimizer step invalidates it too: torch's fused AdamW writes without bumping versions)
            hit = self._dora_norms.get(name)
            if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[1], owners)):
                return hit[2]
        norm = dora_ops.dora_weight_norm(None if nf4 is not None else W, A, B, self.scaling[name], nf4,
                                         nf4_dtype if nf4 is not None else W.dtype, self.backend)
        if key is not None:
            self._dora_norms[name] = (key, tuple(weakref.ref(t) for t in owners), norm)
        return norm

    def _merge_scale(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """DoRA's column scale for merging adapter `name` into W: over the base weight without the adapters
        merged before (W itself when none is), as peft's merge (the norm over W with them in was 22% off)."""
        if not self.merged_adapters:
            return self.dora_scale(name)
        W0 = self._stash.to(W.device) if self._stash is not None else self._unmerged(W).to(W.dtype)
        norm = dora_ops.dora_weight_norm(W0, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                         None, W.dtype, self.backend)
        return self.lora_magnitude_vector[name].weight.detach().float() / norm

    def dora_scale(self, name: str) -> torch.Tensor:
        """float32 [out]: DoRA's column scale magnitude / ||W + scaling B A|| of adapter `name`."""
        self._require(name)
        if not self.use_dora[name]:
            raise ValueError(f"LoRALinear: adapter {name!r} is not a DoRA adapter")
        return self.lora_magnitude_vector[name].weight.detach().float() / self._dora_norm(name)

    def _unfused_forward(self, x, names, p, gid=None):
        """An FP8Linear base (its FP8 GEMM), or an NF4 base under a wider input (bitsandbytes' own forward:
        _nf4_wider_input), plus the LoRA branch in float32 as separate torch GEMMs, dropout from the same
        seeded rule as the fused op. gid (a mixed batch, _mixed_forward): each row's adapter index in `names`
        (-1: none); each adapter's branch then runs over its own rows."""
        from ..ops.lora_dropout import lora_dropout
        y = self.base_layer(x)   # x's dtype, or the autocast dtype under torch.autocast (as peft's output)
        with _autocast.off(x.device):   # the branch in float32, rounded once to y's dtype
            x2 = x.reshape(-1, x.shape[-1])
            xd = (lora_dropout(x2, p, lora_ops._seed_tensor(None, p)) if p else x2).float()
            if gid is None:
                A, B = self._stacked(names)
                S = self._table(names, x.device, summed=True)[0]
                lora = ((xd @ A.float().t()) * S) @ B.float().t()
                delta = self._bias_delta(names)
                if delta is not None:
                    lora = lora + delta
            else:
                lora = torch.zeros(x2.shape[0], self.out_features, device=x.device, dtype=torch.float32)
                for j, n in enumerate(names):
                    rows = (gid == j).nonzero().squeeze(1)
                    part = (xd.index_select(0, rows) @ self.lora_A[n].weight.float().t()) * self.scaling[n]
                    part = part @ self.lora_B[n].weight.float().t()
                    if self.lora_bias.get(n):
                        part = part + self._bias_delta((n,))
                    lora = lora.index_add(0, rows, part)
            acc = torch.promote_types(y.dtype, torch.float32)     # one rounding, as the fused op's
            return (y.to(acc) + lora.reshape(*x.shape[:-1], -1)).to(y.dtype)

    def _mixed_forward(self, x, adapter_names):
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(f"LoRALinear: adapter_names needs one name per sample ({x.shape[0] if x.dim() else 0}),"
                             f" got {len(adapter_names)}")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.r})
        if unknown:
            raise KeyError(f"LoRALinear: adapter_names has unknown adapters {unknown}; adapters: {sorted(self.r)}")
        names = tuple(sorted({n for n in adapter_names if n != BASE}))
        if not names:
            return self.base_layer(x)
        if any(self.use_dora[n] for n in names):
            raise LoRAUnsupported(f"LoRALinear: mixed-batch forward (adapter_names) with DoRA adapters "
                                  f"{[n for n in names if self.use_dora[n]]} is not supported (peft refuses it too)")
        p = self._dropout(names)
        idx = torch.tensor([names.index(n) if n != BASE else -1 for n in adapter_names], dtype=torch.int32)
        per = x.numel() // max(x.shape[-1], 1) // x.shape[0]
        gid = idx.repeat_interleave(per).to(x.device)
        if _is_fp8(self._modules["base_layer"]) or self._nf4_wider_input(x):
            return self._unfused_forward(x, names, p, gid)
        x, w, nf4, bias, out_dtype = self._base_args(x)
        A, B = self._stacked(names)
        with _autocast.off(x.device):
            y = lora_ops.lora_linear_grouped(x, w, A, B, self._table(names, x.device), gid, bias, p,
                                             None, nf4, self.backend, check_groups=False)   # built on the host
        if any(self.lora_bias.get(n) for n in names):   # per sample: its adapter's scale * b (one more pass)
            zero = torch.zeros(self.out_features, device=y.device)
            rows = torch.stack([self._bias_delta((n,)) if self.lora_bias[n] else zero for n in names] + [zero])
            y = (y.float() + rows[idx.long().to(y.device)].reshape(-1, *([1] * (y.dim() - 2)), y.shape[-1])).to(y.dtype)
        return y.to(out_dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """peft's name for delta_weight."""
        return self.delta_weight(adapter)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's switch: enabled=False runs the base layer alone (unmerging first if merged) and freezes every
        adapter; enabled=True makes the active adapters train again (peft's set_adapter)."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for n in self.r:
                for p in self._adapter_params(n):
                    p.requires_grad_(False)
        self.disable_adapters = not enabled

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, float32 [out, in]."""
        self._require(name)
        self._check_ready([name], "LoRALinear.delta_weight")
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def merge(self, safe_merge: bool = False, adapter_names=None, exact_unmerge: bool = True) -> None:
        """W <- round(W + sum of the adapters' deltas), one rounding; peft's argument order. adapter_names: a
        name or a list (None: the active adapters). exact_unmerge keeps a CPU copy of the weight as it was
        before the first merge, so unmerge() restores it bit-exactly; without it unmerge subtracts the deltas
        (peft's way; off by the rounding of the merge). safe_merge refuses (and leaves the weight untouched)
        when the merged weight is not finite."""
        if not isinstance(safe_merge, (bool, int)):
            raise TypeError(f"LoRALinear.merge(safe_merge=False, adapter_names=None), peft's order: safe_merge must "
                            f"be a bool, got {safe_merge!r} (pass the adapters as adapter_names=...)")
        if self._quant_state() is not None:
            raise LoRAUnsupported("LoRALinear.merge: merging into an NF4 base re-quantizes it (lossy); convert the "
                                  "base to a 16-bit nn.Linear first, or use to_linear()")
        names = self.active_adapters if adapter_names is None else \
            ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        names = [n for n in names if n not in self.merged_adapters]
        for n in names:
            self._require(n)
        if not names:
            return
        self._check_ready(names, "LoRALinear.merge")
        dora = [n for n in names if self.use_dora[n]]
        if dora and len(names) > 1:     # (one call after another works: unmerge undoes them in reverse)
            raise LoRAUnsupported(f"LoRALinear.merge: DoRA adapter {dora} merged together with others "
                                  f"({names}) in one call; merge a DoRA adapter alone")
        W, bias = self.base_weight(), self.base_layer.bias
        with torch.no_grad():
            delta_b = self._bias_delta(names)
            if delta_b is not None and bias is None:
                raise ValueError(f"LoRALinear.merge: adapters {[n for n in names if self.lora_bias[n]]} have lora_bias "
                                 "and the base layer has no bias to merge it into (peft refuses it too); nothing "
                                 "was changed")
            new = W.float() + sum(self.delta_weight(n) for n in names)
            if dora:    # W <- m / ||W0 + dW|| * (W + dW), the norm of the unmerged weight W0 (as peft)
                g = self._merge_scale(dora[0], W)
                new = g[:, None] * new
            new_b = None if delta_b is None else bias.float() + delta_b
            if safe_merge and not (torch.isfinite(new).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"LoRALinear.merge: merging {names} gives non-finite weights; nothing was changed")
            if exact_unmerge and self._stash is None and not self.merged_adapters:
                self._stash = W.detach().to("cpu", copy=True)   # (after an unsaved merge nothing exact is left)
                self._stash_bias = None if bias is None else bias.detach().to("cpu", copy=True)
            W.copy_(new.to(W.dtype))
            if new_b is not None:
                bias.copy_(new_b.to(bias.dtype))
        self.merged_adapters += names
        if dora:
            self._dora_merged[dora[0]] = g

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        W, bias = self.base_weight(), self.base_layer.bias
        with torch.no_grad():
            if self._stash is not None:
                W.copy_(self._stash.to(W.device))
                if self._stash_bias is not None:
                    bias.copy_(self._stash_bias.to(bias.device))
            else:
                W.copy_(self._unmerged(W).to(W.dtype))
                if bias is not None:
                    bias.copy_(self._unmerged_bias(bias).to(bias.dtype))
        self._stash = self._stash_bias = None
        self.merged_adapters = []
        self._dora_merged.clear()

    def _unmerged(self, W) -> torch.Tensor:
        """float32: the weight without the merged deltas, undone in the reverse order of the merges (a merged
        DoRA adapter: W / g - dW), as peft's unmerge."""
        Wf = W.float()
        run = []                         # plain adapters merged one after another: their deltas summed, then
        for n in list(reversed(self.merged_adapters)) + [None]:   # subtracted at once (as one merge added them)
            if n is None or n in self._dora_merged:
                if run:
                    Wf = Wf - sum(self.delta_weight(m) for m in reversed(run))
                    run = []
                if n is not None:
                    Wf = Wf / self._dora_merged[n].to(Wf.device)[:, None] - self.delta_weight(n)
            else:
                run.append(n)
        return Wf

    def _unmerged_bias(self, bias) -> torch.Tensor:
        """The base bias without the merged adapters' lora_bias (float32 where there is one)."""
        delta = self._bias_delta(self.merged_adapters)
        return bias if delta is None else bias.float() - delta

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain nn.Linear. merge=True: what forward computes (merged: the current weight; else the base
        with the active adapters merged, one rounding). merge=False: the base alone (the saved copy, or,
        after a merge without one, the current weight minus the merged deltas, as unmerge does). An NF4
        base is dequantized to its compute dtype; a Conv1D base comes back as the nn.Linear computing the
        same (its weight transposed)."""
        nf4, dt = self._nf4_weight()
        bias = self.base_layer.bias
        if nf4 is not None:
            from ..reference.nf4 import dequantize
            W = dequantize(nf4, dt)
            names = self.active_adapters if merge else []
        elif self.merged:
            W, names = self.base_weight(), []
            if merge:
                pass
            elif self._stash is not None:
                W, bias = self._stash.to(W.device), (None if bias is None else self._stash_bias.to(W.device))
            else:
                with torch.no_grad():
                    W = self._unmerged(W).to(W.dtype)
                    bias = None if bias is None else self._unmerged_bias(bias).to(bias.dtype)
        else:
            W = self.base_weight()
            names = self.active_adapters if merge else []
        with torch.no_grad():
            if names:
                new = W.float() + sum(self.delta_weight(n) for n in names)
                dora = self._dora_alone(names)
                if dora is not None:    # what forward computes
                    new = self.dora_scale(dora)[:, None] * new
                W = new.to(W.dtype)
                delta_b = self._bias_delta(names)
                if delta_b is not None:     # a base without a bias gets one
                    bias = (delta_b if bias is None else bias.float() + delta_b).to(
                        W.dtype if bias is None else bias.dtype)
        return plain_linear(W.detach(), None if bias is None else bias.detach())

    # ------------------------------------------------------------------ peft interop
    @classmethod
    def from_peft(cls, layer, backend: str | None = None) -> "LoRALinear":
        """Take over a peft LoRA Linear layer (its base layer and adapter parameters are shared, not copied)."""
        for attr in ("base_layer", "lora_A", "lora_B", "scaling", "r"):
            if not hasattr(layer, attr):
                raise TypeError(f"LoRALinear.from_peft: {type(layer).__name__} is not a peft LoRA layer (no {attr})")
        base = layer.get_base_layer()
        if bool(getattr(layer, "fan_in_fan_out", False)) != is_conv1d(base):
            raise LoRAUnsupported(f"LoRALinear.from_peft: fan_in_fan_out={getattr(layer, 'fan_in_fan_out', False)} "
                                  f"over a {type(base).__name__} base; the fused layer reads a Conv1D base transposed "
                                  "and any other as [out, in] (peft sets the flag by the base's type)")
        with _kept_requires_grad(base.parameters()):   # the base trains as under peft (bias="lora_only")
            m = cls(base, backend=backend)
        for name in layer.lora_A:
            dora = bool(getattr(layer, "use_dora", {}).get(name))
            variant = getattr(layer, "lora_variant", {}).get(name)
            if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
                raise LoRAUnsupported(f"LoRALinear.from_peft: adapter {name!r} is a {type(variant).__name__} adapter; "
                                      "not supported by the fused layer (plain LoRA and DoRA are)")
            drop = layer.lora_dropout[name]
            if not isinstance(drop, (nn.Dropout, nn.Identity)):
                raise LoRAUnsupported(f"LoRALinear.from_peft: adapter {name!r} has a {type(drop).__name__} as "
                                      "lora_dropout; the fused op draws its own seeded mask (nn.Dropout or "
                                      "nn.Identity only)")
            m.lora_A[name], m.lora_B[name] = layer.lora_A[name], layer.lora_B[name]
            m.r[name], m.lora_alpha[name] = int(layer.r[name]), float(layer.lora_alpha[name])
            m.use_rslora[name] = bool(getattr(layer, "use_rslora", {}).get(name, False))
            m.set_dropout(name, float(drop.p) if isinstance(drop, nn.Dropout) else 0.0)
            m.scaling[name] = float(layer.scaling[name])
            m.use_dora[name] = dora
            m.lora_bias[name] = layer.lora_B[name].bias is not None
            if dora:
                m.lora_magnitude_vector[name] = DoRAMagnitude(layer.lora_magnitude_vector[name].weight)
        if getattr(layer, "merged_adapters", None):    # after the checks: fuse_peft asks them of merged layers
            raise ValueError("LoRALinear.from_peft: the peft layer has merged adapters; unmerge() it first")
        m.active_adapters = [a for a in layer.active_adapters if a in m.r]
        m.disable_adapters = bool(getattr(layer, "disable_adapters", False))
        return m

    def to_peft(self):
        """A peft LoRA Linear layer holding the same base layer and adapters (parameters shared)."""
        from peft import LoraConfig
        from peft.tuners.lora import layer as peft_layer
        if self.merged:
            raise ValueError("LoRALinear.to_peft: unmerge() first")
        names = list(self.r)
        out = None
        for n in names:
            cfg = LoraConfig(r=self.r[n], lora_alpha=self.lora_alpha[n], lora_dropout=self.lora_dropout_p[n],
                             use_rslora=self.use_rslora[n], use_dora=self.use_dora[n], lora_bias=self.lora_bias[n],
                             fan_in_fan_out=self.fan_in_fan_out)
            if out is None:
                cls = peft_layer.Linear
                if self._quant_state() is not None:
                    from peft.tuners.lora.bnb import Linear4bit as cls  # noqa: N813
                out = cls(self.base_layer, n, config=cfg, r=self.r[n], lora_alpha=self.lora_alpha[n],
                          **({"is_target_conv_1d_layer": True} if self.fan_in_fan_out else {}))
            else:
                out.update_layer(n, self.r[n], self.lora_alpha[n], cfg)
            out.lora_A[n], out.lora_B[n] = self.lora_A[n], self.lora_B[n]
            out.scaling[n] = self.scaling[n]
            if self.use_dora[n]:
                out.lora_magnitude_vector[n].weight = self.lora_magnitude_vector[n].weight
        out.set_adapter(self.active_adapters)
        for n in names:     # peft's set_adapter freezes the others and trains the active ones, as here
            for p in self._adapter_params(n):
                p.requires_grad_(n in self.active_adapters)
        if self.disable_adapters:   # peft's switch freezes every adapter, as this layer's
            out.enable_adapters(False)
        return out.train(self.training)

    # ------------------------------------------------------------------ report
    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={{{', '.join(f'{n}: r={r}' + self._kind(n) for n, r in self.r.items())}}}"
                f", active={self.active_adapters}")

    def _kind(self, name: str) -> str:
        return (" dora" if self.use_dora[name] else "") + (" lora_bias" if self.lora_bias[name] else "")

    def _fusedtune_report(self) -> dict:
        device = self.base_layer.weight.device
        b = lora_ops.lora_backend(device, self.backend)
        nf4 = self._quant_state() is not None
        last = self.__dict__.get("_last_rows")
        if _is_fp8(self.base_layer):
            path = "FP8Linear base (block-scaled FP8 GEMMs) + LoRA branch as torch GEMMs (not fused)"
        elif b["backend"] == "triton":
            from ..ops import lora_triton
            from ..triton_kernels import lora_tma
            sched = None if last is None else lora_triton.schedule(
                last, self.out_features, self.in_features, nf4 or None, lora_ops.nf4_path(last, True) if nf4 else "")
            dt = self._base_device_dtype()[1]     # (an NF4 base: its compute dtype, the buffer's)
            if (sched == "fused" and lora_tma.ENABLED and last >= lora_tma.MIN_ROWS and lora_tma.available(device)
                    and (not nf4 or lora_ops.nf4_path(last, True) == "buffer")
                    and dt in (torch.bfloat16, torch.float16)):
                sched = "fused (lora_gemm_tma_kernel: TMA loads, persistent grid, where the operands allow)"
            if sched is not None and self.__dict__.get("_last_dropped"):
                sched = "fused (DoRA with dropout: the dropped input's GEMM runs in the fused kernel, never cuBLAS)"
            path = ("Triton: x.A^T shrink, then one GEMM with the LoRA term as an inner loop of length r (fused), or "
                    f"for M*N*K >= {lora_triton.CUBLAS_MIN_WORK} the base GEMM through cuBLAS and "
                    "lora_expand_kernel adding the LoRA term (cublas)"
                    + ("" if sched is None else f"; last call: {last} rows, {sched}")
                    + _backward_schedule(sum(self.r[n] for n in self.active_adapters)))
        else:
            path = f"{b['backend']}: the reference math (torch GEMMs in float32)"
        if nf4 and b["backend"] == "triton":
            path += ((f"; NF4 base dequantized in the GEMM tile load for <= {lora_ops.NF4_FUSED_MAX_ROWS} rows, "
                      "into a 16-bit buffer + GEMM above" if lora_ops.NF4_FUSED_MAX_ROWS > 0 else
                      "; NF4 base dequantized into a 16-bit buffer + GEMM") + ("" if last is None else
                                                          f" (last call: {last} rows, "
                                                          f"{lora_ops.nf4_path(last, True)})"))
        elif nf4:
            path += "; NF4 base dequantized by the reference on every call"
        if self.fan_in_fan_out:
            path += "; Conv1D base: its (in, out) weight read transposed in place (no copy)"
        if any(self.use_dora[n] for n in self.active_adapters):
            path += ("; DoRA: output columns scaled by magnitude / ||W + sBA|| (norm from one W.A^T GEMM, float32"
                     + (", cached in inference" if not self.training else "") + ")")
        ranks = ", ".join(f"{n}: r={self.r[n]} s={self.scaling[n]:g}" + self._kind(n)
                          for n in self.active_adapters)
        return {"method": "qlora" if nf4 else "lora", "backend": b["backend"],
                "path": f"{path}; active {ranks or 'none'}" + ("; merged" if self.merged else ""),
                "why_not": b["why_not"]}
